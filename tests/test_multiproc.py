"""Two ranks through the project's training engine (torchrun, gloo, CPU).

torchrun starts this same file as the worker (``__main__`` below). Each rank trains a tiny
MLP for a few steps on its own half of every global batch, through ``TrainEngine`` with the
DeepSpeed backend (ZeRO-2, DS_ACCELERATOR=cpu) or plain torch DDP, inside
``poserft.workflow.job`` exactly as a workflow script would. Checked:

* both ranks end with bit-identical weights;
* those weights equal an independent single-process reference: plain ``torch.optim.AdamW``
  on the full global batch (the mean of the two ranks' mean-loss gradients is the full
  batch's mean-loss gradient), so the ranks really exchanged gradients;
* only rank 0 logged to MLflow: ``job`` gave rank 1 a NullTracker, and a spy tracker handed
  to rank 1's engine was never called; the one MLflow run holds the engine's metrics.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS = 4
PER_RANK = 8
WORLD = 2
DIM_IN, DIM_HIDDEN = 6, 16
LR = 0.05
SEED = 1234


def make_model():
    """The tiny model both the ranks and the reference start from (same seed, same init)."""
    import torch
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(DIM_IN, DIM_HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(DIM_HIDDEN, 1))


def global_batches():
    """(STEPS, WORLD*PER_RANK, DIM_IN) inputs and their regression targets, fixed by SEED."""
    import torch
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(STEPS, WORLD * PER_RANK, DIM_IN, generator=g)
    y = torch.sin(x.sum(-1, keepdim=True))
    return x, y


def mse_loss(model, batch):
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    return loss, {"loss": loss.item()}


# --------------------------------------------------------------------------- the worker

class SpyTracker:
    """Records every call into a JSON file: the engine must never call it on rank != 0."""

    def __init__(self, path: Path):
        self.path, self.calls = path, []

    def _record(self, name):
        self.calls.append(name)
        self.path.write_text(json.dumps(self.calls))

    def log_params(self, *a, **k): self._record("log_params")
    def log_metrics(self, *a, **k): self._record("log_metrics")
    def log_artifact(self, *a, **k): self._record("log_artifact")
    def set_tags(self, *a, **k): self._record("set_tags")


def worker(out: Path, backend: str) -> None:
    import types

    import torch

    from poserft.tracking import NullTracker
    from poserft.train.config import EngineConfig, OptimConfig
    from poserft.train.engine import TrainEngine
    from poserft.workflow import job

    rank = int(os.environ["RANK"])
    fake_snakemake = types.SimpleNamespace(
        rule="multiproc", wildcards={"variant": backend}, params={"backend": backend},
        log=[str(out / f"rank{rank}.log")],
        config={"tracking": {"experiment": "multiproc", "enabled": True, "artifact_root": None,
                             "tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}})
    optim = OptimConfig(lr=LR, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0)
    engine_cfg = EngineConfig(backend=backend, zero_stage=2, device="cpu", precision="fp32",
                              checkpoint_every=0, log_every=1, num_threads=1, dist_timeout_s=60)
    x, y = global_batches()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    with job(fake_snakemake, results_dir=str(out / "results")) as (_, tracker):
        got_null = type(tracker) is NullTracker
        engine_tracker = tracker if rank == 0 else SpyTracker(out / f"spy{rank}.json")
        engine = TrainEngine(make_model(), optim, engine_cfg, STEPS, out / f"ckpt-{backend}",
                             grad_accum=1, micro_batch_size=PER_RANK, tracker=engine_tracker)
        for step in engine.steps():
            engine.train_step([(x[step, mine], y[step, mine])], mse_loss)
        state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
        torch.save(state, out / f"weights_rank{rank}.pt")
        (out / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": engine.dist.world_size, "source": engine.dist.source,
            "tracker_is_null": got_null, "run_id": getattr(tracker, "run_id", None)}))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
    sys.exit(0)


# --------------------------------------------------------------------------- the test

def reference_weights():
    """Single process, plain torch AdamW, the full global batch per step."""
    import torch
    model = make_model()
    opt = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.0},
         {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.95), eps=1e-8)
    x, y = global_batches()
    for step in range(STEPS):
        loss, _ = mse_loss(model, (x[step], y[step]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def _run_two_ranks(tmp_path: Path, backend: str) -> tuple[subprocess.CompletedProcess, float]:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MLFLOW_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                   "MASTER_ADDR", "MASTER_PORT")}
    root = Path(__file__).resolve().parents[1]
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [str(torchrun), "--standalone", f"--nproc-per-node={WORLD}", "--max-restarts=0",
           str(Path(__file__).resolve()), str(tmp_path), backend]
    t0 = time.monotonic()
    # timeout -k: torchrun forwards SIGTERM to its workers; SIGKILL if that hangs too.
    proc = subprocess.run(["timeout", "-k", "10", "150", *cmd], env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    return proc, time.monotonic() - t0


def _logs(tmp_path: Path, proc) -> str:
    parts = [proc.stdout[-3000:], proc.stderr[-6000:]]
    for r in range(WORLD):
        log = tmp_path / f"rank{r}.log"
        if log.exists():
            parts.append(f"--- rank{r}.log ---\n" + log.read_text()[-4000:])
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
def test_two_ranks_agree_and_only_rank0_logs(tmp_path, backend):
    # find_spec, not importorskip: importing deepspeed here would cost 15+ s for nothing.
    if backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    mlflow = pytest.importorskip("mlflow")
    import torch

    proc, wall = _run_two_ranks(tmp_path, backend)
    print(f"[multiproc] {backend}: 2 ranks x {STEPS} steps, wall {wall:.1f} s")
    assert proc.returncode == 0, f"torchrun failed (rc {proc.returncode}):\n{_logs(tmp_path, proc)}"

    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [i["world_size"] for i in infos] == [WORLD, WORLD]
    assert [i["source"] for i in infos] == ["torchrun", "torchrun"]

    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in range(WORLD))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"rank weights differ in {k}"
    ref = reference_weights()
    init = make_model().state_dict()
    for k in ref:
        assert not torch.allclose(init[k], ref[k]), f"{k} did not move: the test would be vacuous"
        torch.testing.assert_close(w0[k], ref[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{backend}: {k} differs from the full-batch reference: {m}")

    # Tracking: only rank 0 has an MLflow run, and the engine never logged on rank 1.
    assert infos[0]["tracker_is_null"] is False and infos[0]["run_id"]
    assert infos[1]["tracker_is_null"] is True and infos[1]["run_id"] is None
    assert not (tmp_path / "spy1.json").exists(), \
        f"engine called rank 1's tracker: {(tmp_path / 'spy1.json').read_text()}"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("multiproc")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [infos[0]["run_id"]]
    history = client.get_metric_history(infos[0]["run_id"], "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert runs[0].info.status == "FINISHED"
    shutil.rmtree(tmp_path / f"ckpt-{backend}", ignore_errors=True)
