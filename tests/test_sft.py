"""SFT stage: task mixing, run_sft outputs, resume after a kill."""

import json
import logging

import numpy as np
import pytest
import torch

from poserft.model.testing import make_test_split, make_test_tokenizer, tiny_model_config
from poserft.train.config import SFTConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    return {"dir": d, "train": make_test_split(d / "train.h5", 48, seed=0),
            "val": make_test_split(d / "val.h5", 16, seed=1, split="val"),
            "tokenizer": (make_test_tokenizer(d), d / "tokenizer.json")[1]}


class _Recorder:
    def __init__(self, kill_at=None):
        self.metrics, self.params, self.kill_at = {}, {}, kill_at

    def log_metrics(self, m, step=None):
        self.metrics.setdefault(step, {}).update(m)
        if step == self.kill_at and "train/loss" in m:
            raise KeyboardInterrupt("simulated kill")

    def log_params(self, p):
        self.params.update(p)

    def log_artifact(self, p): ...
    def set_tags(self, t): ...


# ----------------------------------------------------------------------------- data

def test_task_mixing_is_deterministic_and_follows_weights(world):
    from poserft.train.data import SFTTaskData
    cfg = tiny_model_config()
    data = SFTTaskData(world["train"], cfg, {"text2pose": 3.0, "image2pose": 1.0, "image2text": 0.0}, seed=5)
    assert data.tasks == ["text2pose", "image2pose"]
    a, b = data.sample(7, 1, 16), data.sample(7, 1, 16)
    assert a == b and a != data.sample(8, 1, 16) and a != data.sample(7, 2, 16)
    tasks = [e.task for s in range(200) for e in data.sample(s, 0, 16)]
    frac = np.mean([t == "text2pose" for t in tasks])
    assert abs(frac - 0.75) < 0.03          # 3200 draws: sd ~ 0.008
    ex = data.example("text2pose", 5)
    assert ex.prompt == cfg.text2pose_prompt.format(caption=data.sources[0].captions[5]) and ex.answer == cfg.pose_answer


def test_collate_targets_and_images(world):
    from poserft.body import smpl_to_vec6d
    from poserft.data.h5io import SplitReader
    from poserft.train.data import SFTTaskData
    data = SFTTaskData(world["train"], tiny_model_config(), {"text2pose": 1, "image2pose": 1, "image2text": 1})
    exs = [data.example("image2pose", 3), data.example("text2pose", 4), data.example("image2text", 5)]
    b = data.collate(exs)
    r = SplitReader(world["train"])
    go, bp = (torch.as_tensor(r.read("image_pose/global_orient")), torch.as_tensor(r.read("poses/body_pose")))
    torch.testing.assert_close(b["poses"][0], smpl_to_vec6d(go[3:4], bp[3:4])[0])
    assert b["has_pose"].tolist() == [True, True, False]
    assert b["images"].shape == (3, 16, 16, 3) and b["images"].dtype == torch.uint8
    assert torch.equal(b["images"][0], torch.as_tensor(r.read("images")[3]))
    assert int(b["images"][1].sum()) == 0               # the text prompt gets no image
    assert b["answers"][2] == r.read("vqa/answer")[5].decode() if isinstance(r.read("vqa/answer")[5], bytes) \
        else str(r.read("vqa/answer")[5])


def test_text2pose_targets_have_no_root_yaw(world):
    from poserft.body.rotations import rot6d_to_matrix
    from poserft.retrieval.features import rotation_about_y, yaw_angle
    from poserft.train.data import SFTTaskData
    cfg = tiny_model_config()
    keep = SFTTaskData(world["train"], cfg, {"text2pose": 1})
    drop = SFTTaskData(world["train"], cfg, {"text2pose": 1}, text2pose_remove_yaw=True)
    r_keep, r_drop = rot6d_to_matrix(keep.sources[0].poses.text[:, :6]), rot6d_to_matrix(drop.sources[0].poses.text[:, :6])
    assert yaw_angle(r_keep).abs().max() > 0.3                 # the toy roots do have yaw
    torch.testing.assert_close(yaw_angle(r_drop), torch.zeros(len(r_drop)), atol=1e-5, rtol=0)
    # only the yaw changed: R_keep = R_y(yaw) @ R_drop, and the body joints are untouched
    torch.testing.assert_close(rotation_about_y(yaw_angle(r_keep)) @ r_drop, r_keep, atol=1e-5, rtol=0)
    torch.testing.assert_close(drop.sources[0].poses.text[:, 6:], keep.sources[0].poses.text[:, 6:])
    ex = drop.example("text2pose", 2)
    torch.testing.assert_close(drop.collate([ex])["poses"][0], drop.sources[0].poses.text[ex.pose_index])


def test_missing_task_data_is_dropped_or_rejected(tmp_path, caplog):
    from poserft.data.h5io import SplitReader, write_split
    from poserft.train.data import SFTTaskData
    src = SplitReader(make_test_split(tmp_path / "full.h5", 8))
    arrays = {k: src.read(k) for k in ("poses/global_orient", "poses/body_pose", "poses/betas", "joints")}
    arrays["captions/text"] = [str(t) for t in src.read("captions/text")]
    arrays["captions/pose_index"] = src.read("captions/pose_index")
    path = write_split(tmp_path / "text_only.h5", arrays, {"source": "t", "split": "train",
                                                           "body_model": "skeleton", "converter_params": {}})
    with caplog.at_level(logging.WARNING):
        data = SFTTaskData(path, tiny_model_config(), {"text2pose": 1, "image2pose": 1})
    assert data.tasks == ["text2pose"] and "image2pose dropped" in caplog.text
    with pytest.raises(ValueError, match="none of the weighted SFT tasks"):
        SFTTaskData(path, tiny_model_config(), {"image2pose": 1.0, "text2pose": 0.0})


def test_sft_config_invariants():
    from poserft.configbase import ConfigError
    with pytest.raises(ConfigError, match="sft.task_weights: unknown task"):
        SFTConfig.from_dict({"task_weights": {"pose2text": 1.0}}, where="sft")
    with pytest.raises(ConfigError, match="at least one > 0"):
        SFTConfig.from_dict({"task_weights": {"text2pose": 0.0}}, where="sft")
    with pytest.raises(ConfigError, match="sft.optim.betas"):
        SFTConfig.from_dict({"optim": {"betas": [0.9]}}, where="sft")
    assert SFTConfig().optim.betas == [0.9, 0.95]


# ----------------------------------------------------------------------------- run_sft

def test_run_sft_outputs_and_learning(world, tmp_path):
    from poserft.model.io import load_policy
    from poserft.train.sft import run_sft
    rec = _Recorder()
    summary = run_sft(tiny_model_config(),
                      SFTConfig.from_dict(
                          {"steps": 40, "batch_size": 8, "eval_samples": 8, "max_new_tokens": 14,
                           "optim": {"lr": 1e-2, "warmup_steps": 5},
                           "engine": {"checkpoint_every": 20, "log_every": 1}}, where="sft"),
                      {"train": world["train"], "val": world["val"]}, world["tokenizer"],
                      tmp_path / "out", tracker=rec)
    logged = [rec.metrics[s] for s in sorted(rec.metrics) if "train/loss" in rec.metrics[s]]
    assert len(logged) == 40

    def early_late(key):
        return np.mean([m[key] for m in logged[:5]]), np.mean([m[key] for m in logged[-5:]])
    lm0, lm1 = early_late("train/lm_loss")
    assert lm1 < 0.3 * lm0                             # answers learnt
    nll0, nll1 = early_late("train/pose_nll")
    assert nll1 < nll0 - 0.5                           # pose density sharpened
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["steps"] == 40 and on_disk["val/image2pose/format_rate"] == summary["val/image2pose/format_rate"]
    assert summary["val/image2pose/format_rate"] == 1.0
    assert summary["val/image2pose/mpjpe_mm"] < summary["val/image2pose/mean_pose_mpjpe_mm"]
    assert rec.params["sft_tasks"] == "text2pose,image2pose,image2text"
    assert any("val/image2pose/mpjpe_mm" in m for m in rec.metrics.values())
    policy = load_policy(tmp_path / "out")
    assert policy.config.head == "gaussian"
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == \
        ["step_00000020", "step_00000040"]


def test_run_sft_resume_after_kill_matches_uninterrupted(world, tmp_path, caplog):
    import logging

    from poserft.train.sft import run_sft
    args = (tiny_model_config(),
            SFTConfig.from_dict({"steps": 6, "batch_size": 4, "grad_accum": 2, "eval_samples": 0,
                                 "engine": {"checkpoint_every": 2, "log_every": 1}}, where="sft"),
            {"train": world["train"]}, world["tokenizer"])
    full = _Recorder()
    run_sft(*args, tmp_path / "full", tracker=full)
    with pytest.raises(KeyboardInterrupt):
        run_sft(*args, tmp_path / "run", tracker=_Recorder(kill_at=5))   # checkpoint at 4
    resumed = _Recorder()
    with caplog.at_level(logging.INFO, logger="poserft.train.engine"):
        run_sft(*args, tmp_path / "run", tracker=resumed)
    assert [r.getMessage().split(" (")[0] for r in caplog.records
            if r.getMessage().startswith("resumed")] == ["resumed from step 4"]
    steps = sorted(s for s in resumed.metrics if "train/loss" in resumed.metrics[s])
    assert steps == [5, 6]
    for s in steps:
        assert resumed.metrics[s]["train/loss"] == pytest.approx(full.metrics[s]["train/loss"], rel=1e-6)


def test_run_sft_requires_tokenizer_for_tiny_model(world, tmp_path):
    from poserft.train.sft import run_sft
    with pytest.raises(ValueError, match="tokenizer_path is required"):
        run_sft(tiny_model_config(), SFTConfig.from_dict({"steps": 1}, where="sft"),
                {"train": world["train"]}, None, tmp_path)
    with pytest.raises(ValueError, match="'train' entry"):
        run_sft(tiny_model_config(), SFTConfig.from_dict({"steps": 1}, where="sft"),
                {"val": world["val"]}, world["tokenizer"], tmp_path)
