"""DeepSpeed backend on CPU (gloo): ZeRO-3 training, checkpoint, resume, gathered export.

Slow-marked (deselect with ``-m 'not slow'``): the first DeepSpeed init on a machine
compiles a small shared-memory comm extension (~25 s, cached afterwards).
"""

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


class _KillAfter:
    """Tracker that records train losses and raises once a given step has been logged."""

    def __init__(self, kill_at=None):
        self.losses, self.kill_at = {}, kill_at

    def log_metrics(self, m, step=None):
        if "train/loss" in m:
            self.losses[step] = m["train/loss"]
            if step == self.kill_at:
                raise KeyboardInterrupt("simulated kill")

    def log_params(self, p): ...
    def log_artifact(self, p): ...
    def set_tags(self, t): ...


def test_deepspeed_zero3_trains_resumes_and_exports(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    from poserft.model.io import load_policy
    from poserft.model.testing import make_test_split, make_test_tokenizer, tiny_model_config
    from poserft.train.config import SFTConfig
    from poserft.train.sft import run_sft

    for k, v in {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517",
                 "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    train = make_test_split(tmp_path / "train.h5", 32)
    make_test_tokenizer(tmp_path)
    sft = SFTConfig.from_dict(
        {"steps": 4, "batch_size": 4, "grad_accum": 2, "eval_samples": 0,
         "engine": {"backend": "deepspeed", "zero_stage": 3, "checkpoint_every": 2, "log_every": 1}},
        where="sft")
    args = (tiny_model_config(), sft, {"train": train}, tmp_path / "tokenizer.json")

    full = _KillAfter()
    run_sft(*args, tmp_path / "full", tracker=full)
    killed = _KillAfter(kill_at=3)                     # dies during step 3 (checkpoint at 2)
    with pytest.raises(KeyboardInterrupt):
        run_sft(*args, tmp_path / "run", tracker=killed)
    resumed = _KillAfter()
    run_sft(*args, tmp_path / "run", tracker=resumed)
    assert sorted(resumed.losses) == [3, 4]            # continued from the step-2 checkpoint
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5)

    # the exported policy (ZeRO-3 partitions gathered) loads without DeepSpeed
    a, b = load_policy(tmp_path / "full"), load_policy(tmp_path / "run")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)
    assert (tmp_path / "run" / "checkpoints" / "step_00000004" / "ds").is_dir()
