"""The SLURM profile (slurm/config.yaml) and a real run of the workflow through SLURM.

Fast checks (no cluster): the profile parses the way snakemake parses it, the sbatch line
the executor plugin builds for each rule asks for GPUs through --gpus/--cpus-per-gpu (never
--gres in slurm_extra), account/partition come from the environment, and the test profile
switches every GPU off.

The cluster test (marker ``slurm``) starts a one-node SLURM cluster on this host
(tests/cluster/start_slurm.sh; needs root and the Debian packages that
tests/cluster/ci_setup.sh installs), runs the real `synthesize` and `tokenizer` rules of
the DAG with ``snakemake --profile slurm`` in a copy of the repository, and checks the
outputs and SLURM's own records of the jobs: every submitted job COMPLETED with exit code
0 (scontrol and the job-completion log) and ran the rule it was submitted for, and the
MLflow run of each rule carries the SLURM job id it ran under.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "cluster"
GPU_RULES = ("train_retrieval", "pretrain_pose_encoder", "sft", "rft", "evaluate", "gallery")
STATE_DIR = Path(os.environ.get("POSERFT_SLURM_DIR", "/tmp/poserft-slurm"))
SBIN = ("/usr/sbin", "/usr/bin")


# --------------------------------------------------------------------------- the profile

def load_profile(path: Path) -> dict:
    """The profile as snakemake reads it (YTE-processed YAML)."""
    import yte
    with open(path) as fh:
        return yte.process_yaml(fh, require_use_yte=True)


def rule_resources(profile: dict, rule: str) -> dict:
    """default-resources overlaid by the rule's set-resources (snakemake's precedence)."""
    return {**profile.get("default-resources", {}),
            **profile.get("set-resources", {}).get(rule, {})}


class _Resources(dict):
    """Snakemake's job.resources: mapping access plus attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def sbatch_line(resources: dict, threads: int = 1) -> str:
    """The sbatch call the SLURM executor plugin builds for a job with these resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    job = SimpleNamespace(resources=_Resources(resources), threads=threads)
    validate_slurm_extra(job)
    account = f" -A {resources['slurm_account']}" if resources.get("slurm_account") else ""
    partition = f" -p {resources['slurm_partition']}" if resources.get("slurm_partition") else ""
    params = {"run_uuid": "uuid", "slurm_logfile": "log", "comment_str": "rule",
              "account": account, "partition": partition, "workdir": "/wd"}
    return " ".join((get_submit_command(job, params) + set_gres_string(job)).split())


@pytest.fixture
def no_slurm_env(monkeypatch):
    for var in ("POSERFT_SLURM_ACCOUNT", "POSERFT_SLURM_PARTITION", "POSERFT_SLURM_GPU_PARTITION"):
        monkeypatch.delenv(var, raising=False)


def test_profile_settings(no_slurm_env):
    prof = load_profile(ROOT / "slurm" / "config.yaml")
    assert prof["executor"] == "slurm"
    assert prof["slurm-status-command"] == "squeue"
    assert prof["latency-wait"] >= 30
    defaults = prof["default-resources"]
    assert {"runtime", "mem_mb", "cpus_per_task"} <= set(defaults)
    # account/partition are the user's: unset unless given through the environment
    assert "slurm_account" not in defaults and "slurm_partition" not in defaults
    for rule in GPU_RULES:
        res = rule_resources(prof, rule)
        assert res.get("gpu", 0) >= 1 and res.get("cpus_per_gpu", 0) >= 1, rule
        assert "gres" not in str(res.get("slurm_extra", "")), rule


def test_sbatch_lines(no_slurm_env):
    prof = load_profile(ROOT / "slurm" / "config.yaml")
    sft = sbatch_line(rule_resources(prof, "sft"))
    want = rule_resources(prof, "sft")
    assert f"--gpus={want['gpu']}" in sft and f"--cpus-per-gpu={want['cpus_per_gpu']}" in sft
    assert "--cpus-per-task" not in sft and "--gres" not in sft and "--ntasks" not in sft
    assert f"--mem {want['mem_mb']}" in sft and f"-t {want['runtime']}" in sft
    assert " -A " not in sft and " -p " not in sft
    ev = sbatch_line(rule_resources(prof, "evaluate"))
    assert "--gpus=1" in ev and "--cpus-per-task" not in ev
    syn_res = rule_resources(prof, "synthesize")
    syn = sbatch_line(syn_res)
    assert "--gpus" not in syn and f"--cpus-per-task={syn_res['cpus_per_task']}" in syn
    assert "--ntasks=1" in syn
    # a rule with no entry gets the defaults
    tab = sbatch_line(rule_resources(prof, "no_such_rule"))
    assert f"--mem {prof['default-resources']['mem_mb']}" in tab
    assert f"--cpus-per-task={prof['default-resources']['cpus_per_task']}" in tab


def test_account_and_partitions_from_environment(monkeypatch):
    monkeypatch.setenv("POSERFT_SLURM_ACCOUNT", "proj42")
    monkeypatch.setenv("POSERFT_SLURM_PARTITION", "cpuq")
    monkeypatch.setenv("POSERFT_SLURM_GPU_PARTITION", "gpuq")
    prof = load_profile(ROOT / "slurm" / "config.yaml")
    assert " -A proj42 -p cpuq " in sbatch_line(rule_resources(prof, "synthesize"))
    for rule in GPU_RULES:
        assert " -A proj42 -p gpuq " in sbatch_line(rule_resources(prof, rule)), rule
    monkeypatch.delenv("POSERFT_SLURM_GPU_PARTITION")
    prof = load_profile(ROOT / "slurm" / "config.yaml")
    assert " -p cpuq " in sbatch_line(rule_resources(prof, "sft"))


def test_every_dataset_rule_has_resources(no_slurm_env):
    from poserft.data.converters.config import DATASET_NAMES
    prof = load_profile(ROOT / "slurm" / "config.yaml")
    for name in DATASET_NAMES:
        assert rule_resources(prof, f"convert_{name}")["mem_mb"] >= 32000, name
        assert rule_resources(prof, f"download_{name}")["runtime"] >= 360, name


def test_multinode_example_sbatch_line(no_slurm_env):
    """The documented multi-node recipe: 2 nodes x 8 GPUs, one srun task per GPU."""
    prof = load_profile(ROOT / "slurm" / "config.yaml")
    example = load_profile(ROOT / "slurm" / "multinode.example.yaml")
    for rule in ("sft", "rft"):
        res = {**prof["default-resources"], **example["set-resources"][rule]}
        line = sbatch_line(res)
        for flag in ("--nodes=2", "--ntasks-per-node=8", "--gres=gpu:8", "--cpus-per-gpu=8"):
            assert flag in line, (rule, flag, line)
        assert "--gpus" not in line and "--cpus-per-task" not in line and "--ntasks=" not in line
    # and poserft's SLURM -> torch mapping makes 16 ranks of it
    from poserft.train.distributed import slurm_to_torch_env
    env = slurm_to_torch_env({"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16",
                              "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert env["RANK"] == "9" and env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "16"
    assert env["MASTER_ADDR"] == "gpu07"


def test_test_profile_turns_gpus_off(no_slurm_env):
    prof = load_profile(CLUSTER / "profile" / "config.yaml")
    for rule in GPU_RULES:
        line = sbatch_line(rule_resources(prof, rule))
        assert "--gpus" not in line and "--cpus-per-task=1" in line, (rule, line)


def test_repo_root_profile_keeps_gpu_resources(no_slurm_env):
    """`snakemake --profile slurm` from the repo root, parsed exactly as snakemake does: the
    workflow profile (profiles/default, loaded automatically) overrides a global profile's
    default-resources/set-resources AS A WHOLE, so it must not define them."""
    code = ("import sys, json; from snakemake.cli import parse_args; "
            "_, a = parse_args(['--profile', 'slurm', '-n']); "
            "print(json.dumps({r: sorted(v) for r, v in (a.set_resources or {}).items()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    set_resources = json.loads(out.stdout.strip().splitlines()[-1])
    missing = [r for r in GPU_RULES if "gpu" not in set_resources.get(r, [])]
    assert not missing, (
        f"with `--profile slurm` the rules {missing} get no GPU: profiles/default/config.yaml "
        "defines default-resources/set-resources, which replace slurm/config.yaml's. Move "
        "per-rule local resources into the rules' `resources:` directives instead. "
        f"Effective set-resources: {set_resources}")


# --------------------------------------------------------------------------- the cluster

def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def _cluster_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start munged/slurmctld/slurmd (run tests/cluster/ci_setup.sh as root)"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")
               if _which(b) is None]
    if missing:
        return f"SLURM/munge binaries missing: {missing} (install with tests/cluster/ci_setup.sh)"
    etc = Path("/etc/slurm/slurm.conf")
    if (etc.exists() or etc.is_symlink()) and os.path.realpath(etc) != str(STATE_DIR / "slurm.conf"):
        return f"{etc} belongs to another SLURM install; not starting a test cluster beside it"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return "needs the git checkout (the test copies `git ls-files` into a temp dir)"
    return None


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = _cluster_skip_reason()
    if reason:
        print(f"[slurm] skipped: {reason}")
        pytest.skip(reason)
    env = {**os.environ, "POSERFT_SLURM_DIR": str(STATE_DIR)}
    already = _run([_which("scontrol"), "ping"], timeout=30).returncode == 0 and \
        (STATE_DIR / "slurmctld.pid").exists()
    t0 = time.monotonic()
    start = _run(["bash", str(CLUSTER / "start_slurm.sh")], env=env, timeout=120)
    assert start.returncode == 0, f"start_slurm.sh failed:\n{start.stdout}\n{start.stderr}"
    print(f"[slurm] cluster up in {time.monotonic() - t0:.1f} s ({'reused' if already else 'started'})")
    try:
        yield STATE_DIR
    finally:
        if not already:  # stop only what this fixture started
            stop = _run(["bash", str(CLUSTER / "stop_slurm.sh")], env=env, timeout=120)
            print(f"[slurm] stopped: rc {stop.returncode} {stop.stderr.strip()}")


def copy_repo(dest: Path) -> Path:
    """The working tree's tracked and untracked-but-not-ignored files (no .venv, no outputs)."""
    out = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
               cwd=ROOT, check=True)
    for rel in filter(None, out.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _scontrol_job(job_id: str) -> dict:
    out = _run([_which("scontrol"), "show", "job", "-o", job_id], timeout=30)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


@pytest.mark.slurm
@pytest.mark.slow
def test_synthesize_through_slurm(slurm_cluster, tmp_path):
    repo = copy_repo(tmp_path / "repo")
    targets = [f"data/synthetic/{s}.h5" for s in ("train", "val", "test")] + \
        ["results/tokenizer/tokenizer.json"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MLFLOW_"))}
    venv_bin = str(Path(sys.executable).parent)
    env.update(PATH=os.pathsep.join([venv_bin, env.get("PATH", "")]),
               PYTHONPATH=str(repo),  # the copy's poserft, not the editable install's
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    jobcomp = slurm_cluster / "jobcomp.log"
    jobcomp_before = jobcomp.stat().st_size if jobcomp.exists() else 0
    # A smaller world than the embedded default (2000/200/200 poses): the real rule, a few
    # seconds of work, so the test measures the cluster plumbing.
    small = tmp_path / "small_world.yaml"
    small.write_text("synth: {num_train: 300, num_val: 60, num_test: 60}\n")
    cmd = [f"{venv_bin}/snakemake", "--profile", "slurm", "--profile", "tests/cluster/profile",
           "--workflow-profile", "none", "--configfile", str(small), "--", *targets]
    t0 = time.monotonic()
    # Snakemake ignores SIGTERM while jobs run: SIGINT makes it scancel them and exit.
    proc = _run(["timeout", "-s", "INT", "-k", "30", "540", *cmd], cwd=repo, env=env)
    wall = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    print(f"[slurm] `{shlex.join(cmd[1:])}`: rc {proc.returncode}, wall {wall:.1f} s")
    assert proc.returncode == 0, f"snakemake through SLURM failed:\n{log[-8000:]}" + "".join(
        f"\n--- {p.relative_to(repo)} ---\n{p.read_text()[-3000:]}"
        for p in sorted(repo.glob("logs/**/*.log")))

    # Outputs exist and are valid split files.
    from poserft.data.h5io import validate_split
    for target in targets[:3]:
        validate_split(repo / target)
    assert (repo / targets[3]).stat().st_size > 0

    # Every job went through sbatch...
    submitted = dict(re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) "
                                r"\(log: \S*/rule_(\w+?)/", log))
    assert sorted(submitted.values()) == ["synthesize", "tokenizer"], log[-4000:]
    # ... and SLURM itself recorded it COMPLETED with exit code 0, running that rule.
    for job_id, rule in submitted.items():
        rec = _scontrol_job(job_id)
        assert rec.get("JobState") == "COMPLETED" and rec.get("ExitCode") == "0:0", rec
        assert f"rule_{rule}" in rec.get("Comment", ""), rec
        assert rec.get("WorkDir") == str(repo), rec
    comp = jobcomp.read_text()[jobcomp_before:] if jobcomp.exists() else ""
    done = {m.group(1): m.group(2) for m in re.finditer(r"JobId=(\d+) .*?JobState=(\S+)", comp)}
    assert {j: done.get(j) for j in submitted} == {j: "COMPLETED" for j in submitted}, comp

    # The code ran inside those jobs: each rule's MLflow run is tagged with its job id.
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'results' / 'mlflow.db'}")
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps])
    tagged = {r.data.tags.get("rule"): r.data.tags.get("slurm_job_id") for r in runs}
    assert {submitted[j]: j for j in submitted}.items() <= tagged.items(), tagged
