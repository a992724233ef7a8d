"""torchrun / SLURM environment mapping (pure functions, no process group)."""

import pytest

from poserft.train.distributed import expand_hostlist, init_distributed, resolve_dist_env, \
    slurm_to_torch_env


@pytest.mark.parametrize("nodelist,expected", [
    ("node01", ["node01"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[8-10],cpu5", ["gpu8", "gpu9", "gpu10", "cpu5"]),
    ("a[1-2]b[3,5]", ["a1b3", "a1b5", "a2b3", "a2b5"]),
    ("x-[009-011]", ["x-009", "x-010", "x-011"]),
])
def test_expand_hostlist(nodelist, expected):
    assert expand_hostlist(nodelist) == expected


def test_slurm_mapping():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_JOB_NODELIST": "gpu[12-15]", "SLURM_NODELIST": "ignored", "SLURM_JOB_ID": "123456"}
    out = slurm_to_torch_env(env)
    assert out == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu12",
                   "MASTER_PORT": str(15000 + 123456 % 20000)}
    # every task of the job derives the same port; an explicit MASTER_PORT wins
    assert slurm_to_torch_env({**env, "SLURM_PROCID": "0"})["MASTER_PORT"] == out["MASTER_PORT"]
    assert slurm_to_torch_env({**env, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    assert slurm_to_torch_env({**env, "MASTER_ADDR": "login1"})["MASTER_ADDR"] == "login1"
    # SLURM_NODELIST is the fallback
    del env["SLURM_JOB_NODELIST"]
    assert slurm_to_torch_env(env)["MASTER_ADDR"] == "ignored"
    del env["SLURM_NODELIST"]
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        slurm_to_torch_env(env)
    assert slurm_to_torch_env({}) == {}


def test_resolve_prefers_torchrun_then_slurm_then_single():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NODELIST": "n1"}
    info, _ = resolve_dist_env(torchrun)
    assert (info.rank, info.world_size, info.source, info.master_port) == (1, 2, "torchrun", 1234)
    info, env = resolve_dist_env({"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NTASKS": "4",
                                  "SLURM_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7"})
    assert (info.rank, info.local_rank, info.world_size, info.master_addr, info.source) == \
        (3, 3, 4, "n1", "slurm")
    assert not info.is_main and env["RANK"] == "3"
    info, env = resolve_dist_env({})
    assert (info.rank, info.world_size, info.source, info.is_main) == (0, 1, "single", True)
    assert set(env) == {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    with pytest.raises(ValueError, match="MASTER_PORT"):
        resolve_dist_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="outside world size"):
        resolve_dist_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_PORT": "1"})


def test_init_distributed_exports_variables_without_overriding():
    environ = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
               "SLURM_NODELIST": "head[3-4]", "SLURM_JOB_ID": "1", "MASTER_ADDR": "keep-me"}
    info = init_distributed("cpu", environ=environ)   # world size 1: no process group
    assert environ["RANK"] == "0" and environ["WORLD_SIZE"] == "1" and environ["LOCAL_RANK"] == "0"
    assert environ["MASTER_ADDR"] == "keep-me"        # setdefault: explicit values win
    assert info.master_addr == "keep-me"
    del environ["MASTER_ADDR"], environ["RANK"], environ["WORLD_SIZE"]
    assert init_distributed("cpu", environ=environ).master_addr == "head3"
