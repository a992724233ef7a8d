"""Distributed setup from torchrun or SLURM environment variables.

torchrun sets ``RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT``. Under ``srun`` (no
torchrun) SLURM sets its own variables, which :func:`slurm_to_torch_env` maps:

=================  =========================================================
RANK               SLURM_PROCID
LOCAL_RANK         SLURM_LOCALID
WORLD_SIZE         SLURM_NTASKS
MASTER_ADDR        MASTER_ADDR if set, else first host of SLURM_JOB_NODELIST (or SLURM_NODELIST)
MASTER_PORT        MASTER_PORT if set, else 15000 + SLURM_JOB_ID % 20000 (same on all tasks)
=================  =========================================================

A plain single process gets ``RANK=0, WORLD_SIZE=1, LOCAL_RANK=0`` and a free local port
(DeepSpeed needs these even for one process; without them it tries MPI discovery).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, MutableMapping

__all__ = ["DistInfo", "expand_hostlist", "slurm_to_torch_env", "resolve_dist_env",
           "init_distributed", "barrier"]

_TORCH_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _expand_range(spec: str) -> list[str]:
    out = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        else:
            out.append(part)
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist, e.g. ``'gpu[01-03,07],cpu5'`` -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Zero padding is kept; several bracket groups in one name (``r[1-2]n[1-2]``) expand as a
    product, in SLURM's order.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM nodelist")
    # split on commas that are not inside brackets
    items, depth, cur = [], 0, ""
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    hosts: list[str] = []
    for item in items:
        m = re.search(r"\[([^\]]+)\]", item)
        if not m:
            hosts.append(item)
            continue
        head, tail = item[:m.start()], item[m.end():]
        for mid in _expand_range(m.group(1)):
            hosts.extend(expand_hostlist(head + mid + tail))
    return hosts


def slurm_to_torch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables implied by SLURM's (pure; empty if not under srun)."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return {}
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist and not environ.get("MASTER_ADDR"):
        raise ValueError("SLURM_PROCID is set but neither SLURM_JOB_NODELIST nor SLURM_NODELIST; "
                         "cannot find the head node for MASTER_ADDR")
    port = environ.get("MASTER_PORT") or str(15000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    return {"RANK": environ["SLURM_PROCID"], "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": environ["SLURM_NTASKS"],
            "MASTER_ADDR": environ.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
            "MASTER_PORT": port}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_dist_env(environ: Mapping[str, str]) -> tuple[DistInfo, dict[str, str]]:
    """Decide rank/world from the environment. Returns (info, variables to set)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = {k: environ[k] for k in _TORCH_KEYS if k in environ}
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            if int(env["WORLD_SIZE"]) > 1:
                raise ValueError("RANK/WORLD_SIZE are set with WORLD_SIZE > 1 but MASTER_PORT is "
                                 "not; launch with torchrun or set MASTER_PORT")
            env["MASTER_PORT"] = str(_free_port())
        source = "torchrun"
    else:
        env = slurm_to_torch_env(environ)
        source = "slurm"
        if not env:
            env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
            source = "single"
    info = DistInfo(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]),
                    env["MASTER_ADDR"], int(env["MASTER_PORT"]), source)
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is outside world size {info.world_size} ({source} env)")
    return info, env


def init_distributed(device_type: str = "cpu", timeout_s: int = 1800,
                     environ: MutableMapping[str, str] | None = None,
                     export_env: bool = True) -> DistInfo:
    """Export the torch variables (from SLURM if needed; never overriding set ones) and,
    when WORLD_SIZE > 1, init the default process group (nccl on cuda, gloo on cpu).
    Idempotent. ``export_env=False`` leaves a single process's environment untouched
    (variables are always exported when WORLD_SIZE > 1: the env:// rendezvous reads them)."""
    import torch.distributed as dist

    environ = os.environ if environ is None else environ
    info, env = resolve_dist_env(environ)
    if export_env or info.world_size > 1:
        for k, v in env.items():
            environ.setdefault(k, v)
    if info.world_size > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s),
                                rank=info.rank, world_size=info.world_size)
    return info


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
