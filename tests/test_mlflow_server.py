"""The cluster tracking recipe: one `mlflow server`, parallel jobs logging to it.

Starts ``mlflow server`` on 127.0.0.1 (a free port, SQLite backend and artifacts in a temp
dir), then runs a two-rule workflow with ``snakemake --cores 2`` in which both jobs log
through ``poserft.workflow.job`` at the same time (each waits until the other has started),
with ``MLFLOW_TRACKING_URI`` pointing at the server as it would on a cluster. Checked: no
'database is locked' anywhere, and both runs are complete and readable through the client
API (params, tags, every metric step, the artifact).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

STEPS = 40
RULES = ("alpha", "beta")
READY_TIMEOUT_S = 120

SNAKEFILE = """
config["tracking"] = {{"experiment": "server-test", "tracking_uri": None,
                       "artifact_root": None, "enabled": True}}

rule all:
    input: expand("out/{{name}}.txt", name={rules!r})

rule log_job:
    output: "out/{{name}}.txt"
    params: section=lambda wc: {{"name": wc.name, "steps": {steps}}}
    log: "logs/{{name}}.log"
    script: "log_job.py"
"""

JOB_SCRIPT = """
import time
from pathlib import Path
from poserft.workflow import job

name = snakemake.wildcards.name
others = [r for r in {rules!r} if r != name]
with job(snakemake) as (params, tracker):
    # Overlap on purpose: wait (bounded) until every other job has opened its run.
    Path(f"started/{{name}}").parent.mkdir(exist_ok=True)
    Path(f"started/{{name}}").touch()
    deadline = time.monotonic() + 90
    while not all(Path(f"started/{{o}}").exists() for o in others):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{{others}} never started: jobs did not run in parallel")
        time.sleep(0.05)
    for step in range(params["section"]["steps"]):
        tracker.log_metrics({{"loss": 1.0 / (step + 1), "step_x2": 2.0 * step}}, step=step)
    tracker.set_tags({{"finished_by": name}})
    Path(snakemake.output[0]).write_text(tracker.run_id)
    tracker.log_artifact(snakemake.output[0])
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture
def mlflow_server(tmp_path):
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        pytest.skip(f"mlflow CLI not found next to {sys.executable}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    srv = tmp_path / "server"
    srv.mkdir()
    log = open(srv / "server.log", "w")
    cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{srv / 'mlflow.db'}",
           "--artifacts-destination", str(srv / "artifacts")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # Own session: teardown signals exactly this server's process group (it forks workers).
    proc = subprocess.Popen(cmd, cwd=srv, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    t0 = time.monotonic()
    try:
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n"
                            f"{(srv / 'server.log').read_text()[-4000:]}")
            if time.monotonic() - t0 > READY_TIMEOUT_S:
                pytest.fail(f"mlflow server not healthy after {READY_TIMEOUT_S} s:\n"
                            f"{(srv / 'server.log').read_text()[-4000:]}")
            time.sleep(0.3)
        print(f"[mlflow-server] healthy at {url} after {time.monotonic() - t0:.1f} s")
        yield url, srv / "server.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_parallel_jobs_log_to_one_server(mlflow_server, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    url, server_log = mlflow_server
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "Snakefile").write_text(SNAKEFILE.format(rules=list(RULES), steps=STEPS))
    (wf / "log_job.py").write_text(JOB_SCRIPT.format(rules=list(RULES)))
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SLURM_"))}
    env.update(MLFLOW_TRACKING_URI=url, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.monotonic()
    proc = subprocess.run(
        ["timeout", "-s", "INT", "-k", "20", "300", str(Path(sys.executable).with_name("snakemake")),
         "--cores", "2", "--workflow-profile", "none"],
        cwd=wf, env=env, capture_output=True, text=True)
    print(f"[mlflow-server] 2 parallel jobs x {STEPS} steps: wall {time.monotonic() - t0:.1f} s")
    job_logs = {r: (wf / "logs" / f"{r}.log").read_text() if (wf / "logs" / f"{r}.log").exists()
                else "" for r in RULES}
    everything = proc.stdout + proc.stderr + "".join(job_logs.values()) + server_log.read_text()
    assert proc.returncode == 0, f"workflow failed:\n{proc.stderr[-4000:]}\n{job_logs}"
    assert "database is locked" not in everything.lower()

    client = mlflow.MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("server-test")
    assert exp is not None
    runs = {r.data.tags["wildcard.name"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == sorted(RULES)
    for name, run in runs.items():
        assert run.info.status == "FINISHED", (name, run.info.status)
        assert (wf / "out" / f"{name}.txt").read_text() == run.info.run_id
        assert run.data.tags["rule"] == "log_job" and run.data.tags["finished_by"] == name
        assert run.data.params["section.name"] == name
        assert run.data.params["section.steps"] == str(STEPS)
        hist = client.get_metric_history(run.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in hist) == [(s, 1.0 / (s + 1)) for s in range(STEPS)]
        assert len(client.get_metric_history(run.info.run_id, "step_x2")) == STEPS
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"{name}.txt"]
    # The two runs really overlapped in time (the jobs wait for each other; this confirms it).
    a, b = (runs[r].info for r in RULES)
    assert a.start_time < b.end_time and b.start_time < a.end_time
