"""Training engine (torch backend): LR schedule, DeepSpeed config, accumulation, checkpoints."""

import math

import pytest
import torch
from torch import nn

from poserft.train.config import EngineConfig, OptimConfig
from poserft.train.engine import TrainEngine, deepspeed_config, latest_checkpoint, lr_factor


class _Net(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.drop = nn.Linear(4, 16), nn.Linear(16, 1), nn.Dropout(dropout)

    def forward(self, x):
        return self.l2(self.drop(torch.tanh(self.l1(x))))


def _batch(step, micro, n=8):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(n, 4, generator=g)
    return x, x.sum(-1, keepdim=True).sin()


def _mse(model, mb):
    x, y = mb
    loss = ((model(x) - y) ** 2).mean()
    return loss, {"mse": loss.item()}


class _Recorder:
    def __init__(self, kill_at=None):
        self.metrics, self.kill_at = [], kill_at

    def log_metrics(self, m, step=None):
        self.metrics.append((step, m))

    def log_params(self, p): ...
    def log_artifact(self, p): ...
    def set_tags(self, t): ...


def test_lr_schedule_closed_form():
    total, warm, floor = 110, 10, 0.1
    assert lr_factor(0, total, warm, floor) == pytest.approx(0.1)
    assert lr_factor(9, total, warm, floor) == pytest.approx(1.0)
    assert lr_factor(10, total, warm, floor) == pytest.approx(1.0)
    # half-way through the cosine: floor + (1 - floor) / 2
    assert lr_factor(60, total, warm, floor) == pytest.approx(0.55)
    assert lr_factor(110, total, warm, floor) == pytest.approx(floor)
    s = 35
    expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    assert lr_factor(s, total, warm, floor) == pytest.approx(expected)
    assert lr_factor(0, 5, 0, 0.0) == pytest.approx(1.0)


def test_deepspeed_config_is_complete():
    eng = EngineConfig(backend="deepspeed", zero_stage=3, offload_optimizer=True)
    opt = OptimConfig(grad_clip=0.5)
    cfg = deepspeed_config(eng, opt, micro_batch_size=4, grad_accum=3, world_size=2, bf16=True)

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from walk(v)
        else:
            yield x
    assert "auto" not in list(walk(cfg))
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] is True
    cfg0 = deepspeed_config(EngineConfig(zero_stage=0), opt, 1, 1, 1, False)
    assert "offload_optimizer" not in cfg0["zero_optimization"] and cfg0["bf16"]["enabled"] is False


def test_optimizer_uses_paper_betas_and_no_decay_on_biases(tmp_path):
    eng = TrainEngine(_Net(), OptimConfig(weight_decay=0.1), EngineConfig(), 10, tmp_path)
    groups = eng.optimizer.param_groups
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in groups)
    decays = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert decays == {0.1: 4 * 16 + 16, 0.0: 16 + 1}


def test_gradient_accumulation_equals_big_batch(tmp_path):
    x, y = _batch(0, 0, 8)
    cfg = OptimConfig(lr=0.1, warmup_steps=0, grad_clip=0.0)
    a = TrainEngine(_Net(), cfg, EngineConfig(), 3, tmp_path / "a", grad_accum=2)
    b = TrainEngine(_Net(), cfg, EngineConfig(), 3, tmp_path / "b")
    ma = a.train_step([(x[:4], y[:4]), (x[4:], y[4:])], _mse)
    mb = b.train_step([(x, y)], _mse)
    for pa, pb in zip(a.module.parameters(), b.module.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
    assert ma["mse"] == pytest.approx(mb["mse"], rel=1e-5)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)
    assert a.step == b.step == 1


def _run(out_dir, total, kill_after=None, every=2, fingerprint=None):
    """Train with dropout (exercises RNG restore); returns {step: loss} of this process."""
    eng = TrainEngine(_Net(dropout=0.3), OptimConfig(lr=0.05, warmup_steps=2), EngineConfig(
        checkpoint_every=every, keep_checkpoints=2, log_every=1), total, out_dir,
        fingerprint=fingerprint)
    losses = {}
    for step in eng.steps():
        m = eng.train_step([_batch(step, 0), _batch(step, 1)], _mse)
        losses[step] = m["mse"]
        if kill_after is not None and step == kill_after:
            raise KeyboardInterrupt  # simulated kill: step trained, its checkpoint not written
    return losses, eng


def test_resume_after_kill_reproduces_uninterrupted_run(tmp_path):
    full, _ = _run(tmp_path / "full", 7)
    # kill while step index 4 is being trained (checkpoints exist for steps 2 and 4)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "killed", 7, kill_after=4)
    assert latest_checkpoint(tmp_path / "killed").name == "step_00000004"
    resumed, eng = _run(tmp_path / "killed", 7)
    assert min(resumed) == 4                          # continued after the 4 finished steps
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    assert eng.step == 7
    kept = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert kept == ["step_00000006", "step_00000007"]  # keep_checkpoints=2, final step saved


def test_checkpoint_of_another_run_is_not_resumed(tmp_path):
    # a rerun after a config change (Snakemake keeps the checkpoints: they are no output)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, 7, kill_after=4, fingerprint="config-a")
    assert (latest_checkpoint(tmp_path) / "FINGERPRINT").read_text() == "config-a"
    same, _ = _run(tmp_path / "copy", 7)              # reference: a fresh uninterrupted run
    other, eng = _run(tmp_path, 7, fingerprint="config-b")
    assert min(other) == 0 and eng.step == 7           # started afresh, not from step 4
    for step, loss in other.items():
        assert loss == pytest.approx(same[step], rel=1e-6, abs=1e-7), step
    assert (latest_checkpoint(tmp_path) / "FINGERPRINT").read_text() == "config-b"
    # the same fingerprint resumes
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "c", 7, kill_after=4, fingerprint="x")
    resumed, _ = _run(tmp_path / "c", 7, fingerprint="x")
    assert min(resumed) == 4
    # a checkpoint without a fingerprint (older engine) is stale for a run that has one
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "d", 7, kill_after=4)
    fresh, _ = _run(tmp_path / "d", 7, fingerprint="x")
    assert min(fresh) == 0


def test_run_fingerprint_tracks_config_and_inputs(tmp_path):
    import os
    from poserft.train.engine import run_fingerprint

    f = tmp_path / "weights.bin"
    f.write_bytes(b"abc")
    base = run_fingerprint({"lr": 1e-3, "nested": {"a": 1}}, [f])
    assert base == run_fingerprint({"nested": {"a": 1}, "lr": 1e-3}, [f])   # key order
    assert base != run_fingerprint({"lr": 2e-3, "nested": {"a": 1}}, [f])
    assert base != run_fingerprint({"lr": 1e-3, "nested": {"a": 2}}, [f])
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))               # a rewritten input
    assert base != run_fingerprint({"lr": 1e-3, "nested": {"a": 1}}, [f])


def test_incomplete_checkpoint_is_ignored(tmp_path):
    _run(tmp_path, 2)
    ck = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    (ck / "step_00000009").mkdir()                   # no COMPLETE marker: a torn write
    (ck / ".tmp-step_00000010").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000002"


def test_non_finite_loss_raises(tmp_path):
    eng = TrainEngine(_Net(), OptimConfig(), EngineConfig(), 2, tmp_path)

    def bad(model, mb):
        return model(mb[0]).sum() * float("nan"), {}
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        eng.train_step([_batch(0, 0)], bad)


def test_metrics_logged_to_tracker(tmp_path):
    rec = _Recorder()
    eng = TrainEngine(_Net(), OptimConfig(), EngineConfig(log_every=2), 4, tmp_path, tracker=rec)
    for step in eng.steps():
        eng.train_step([_batch(step, 0)], _mse)
    steps = [s for s, _ in rec.metrics]
    assert steps == [1, 2, 4]
    assert {"train/mse", "train/lr", "train/grad_norm"} <= set(rec.metrics[-1][1])
