"""Pose-encoder pretraining: heatmap targets/decoding and a short end-to-end run."""

import json
import math

import pytest
import torch

from poserft.model.config import PoseEncoderConfig
from poserft.model.pretrain import HeatmapHead, gaussian_heatmaps, pretrain_pose_encoder, soft_argmax


def test_gaussian_heatmap_values_closed_form():
    kp = torch.tensor([[[10.0, 6.0], [-3.0, 5.0]]])          # second one outside the image
    heat, vis = gaussian_heatmaps(kp, (4, 4), stride=4, sigma=1.0)
    assert heat.shape == (1, 2, 4, 4) and vis.tolist() == [[True, False]]
    # cell (r, c) centre = ((c + .5) * 4, (r + .5) * 4); keypoint (10, 6) -> cell coords (2.0, 1.0)
    assert heat[0, 0, 1, 2].item() == pytest.approx(1.0)
    assert heat[0, 0, 1, 3].item() == pytest.approx(math.exp(-0.5))
    assert heat[0, 0, 3, 0].item() == pytest.approx(math.exp(-(4 + 4) / 2))


def test_soft_argmax_recovers_keypoints_from_targets():
    g = torch.Generator().manual_seed(0)
    kp = 6 + torch.rand(3, 24, 2, generator=g) * 52          # inside a 64x64 image, off the border cells
    heat, _ = gaussian_heatmaps(kp, (16, 16), stride=4, sigma=1.5)
    dec = soft_argmax(heat, stride=4)
    assert (dec - kp).norm(dim=-1).max() < 1e-3               # exact for Gaussian blobs (cells are 4 px)
    # far-away noise does not pull the estimate (unlike a global soft-argmax)
    noisy = heat.clone()
    noisy[..., 0, 0] += 0.3
    far = (kp[..., 0] > 24) & (kp[..., 1] > 24)
    assert (soft_argmax(noisy, stride=4) - kp).norm(dim=-1)[far].max() < 1e-3


def test_heatmap_head_shapes():
    head = HeatmapHead(dim=8, grid=(2, 3), upsample=2, num_keypoints=5)
    assert head(torch.randn(4, 6, 8)).shape == (4, 5, 4, 6)


@pytest.mark.parametrize("arch, tokens", [("vitpose", 4), ("conv", 16)])
def test_pretrain_learns_keypoints_and_writes_loadable_encoder(tmp_path, arch, tokens):
    from poserft.model.config import PoseViTConfig
    from poserft.model.testing import make_test_split
    from poserft.model.vision import build_pose_vit
    torch.set_num_threads(1)
    train = make_test_split(tmp_path / "train.h5", 64)
    val = make_test_split(tmp_path / "val.h5", 16, seed=1, split="val")
    vit = dict(arch=arch, image_size=16, patch_size=8, hidden_size=16, num_layers=1 if arch == "vitpose" else 2,
               num_heads=2, conv_width=8)
    cfg = PoseEncoderConfig.from_dict(
        {"vit": vit, "steps": 150, "batch_size": 16, "lr": 3e-3, "heatmap_stride": 2,
         "heatmap_sigma": 1.0, "val_samples": 16, "pose_weight": 0.0 if arch == "vitpose" else 1.0},
        where="pose_encoder")
    out = tmp_path / "enc"
    metrics = pretrain_pose_encoder(cfg, {"train": train, "val": val}, out)
    assert metrics["val_kp_error_px"] < 0.6 * metrics["val_mean_kp_baseline_px"], metrics
    if arch == "conv":  # the 3D pose head beats the train-mean pose on val
        assert metrics["val_mpjpe_mm"] < 0.8 * metrics["val_mean_pose_mpjpe_mm"], metrics
    else:
        assert "val_mpjpe_mm" not in metrics and math.isnan(metrics["final_pose_loss"])
    assert json.loads((out / "metrics.json").read_text())["steps"] == 150
    enc = build_pose_vit(PoseViTConfig(checkpoint=str(out)))
    x = torch.rand(2, 3, 16, 16)
    assert enc(x).shape == (2, tokens, 16)
    # the reloaded encoder is the trained one, not a fresh init
    fresh = build_pose_vit(PoseViTConfig(**vit))
    assert not torch.allclose(enc(x), fresh(x))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".enc")] == []


def test_conv_encoder_tokens_do_not_depend_on_the_batch():
    """GroupNorm, not BatchNorm: RL compares forwards of different batches, so a row's
    tokens must be the same alone and in a batch, in train and eval mode."""
    from poserft.model.vision import ConvPoseEncoder
    torch.manual_seed(0)
    enc = ConvPoseEncoder(image_size=32, hidden_size=16, num_layers=3, conv_width=4)
    assert enc.grid == (4, 4)
    x = torch.rand(5, 3, 32, 32)
    for mode in (enc.train, enc.eval):
        mode()
        torch.testing.assert_close(enc(x)[2:3], enc(x[2:3]), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        ConvPoseEncoder(image_size=36, hidden_size=16, num_layers=3, conv_width=4)


def test_pose_regression_loss_is_zero_at_target_and_matches_fk():
    from poserft.body import load, vec6d_to_rotmats
    from poserft.model.heads import identity_pose_vec
    from poserft.model.pretrain import pose_regression_loss
    body = load(None)
    g = torch.Generator().manual_seed(0)
    target = identity_pose_vec().expand(3, -1) + 0.3 * torch.randn(3, 144, generator=g)
    assert pose_regression_loss(body, target, target).item() == pytest.approx(0.0, abs=1e-6)
    pred = identity_pose_vec().expand(3, -1).clone()
    fk = lambda v: body.forward_rotmats(vec6d_to_rotmats(v))  # noqa: E731
    glob = (fk(pred) - fk(target)).norm(dim=-1).mean()
    rt, rp = vec6d_to_rotmats(target), vec6d_to_rotmats(pred)
    rt[:, 0] = torch.eye(3)
    rp[:, 0] = torch.eye(3)
    local = (body.forward_rotmats(rp) - body.forward_rotmats(rt)).norm(dim=-1).mean()
    expected = ((pred - target) ** 2).mean() + 0.5 * (glob + local)
    assert pose_regression_loss(body, pred, target).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_pretrain_runs_for_a_few_steps(tmp_path, steps):
    """Short runs (smoke configs) must not trip the one-cycle schedule's warm-up arithmetic."""
    from poserft.model.testing import make_test_split
    train = make_test_split(tmp_path / "train.h5", 16)
    vit = dict(image_size=16, hidden_size=8, num_layers=2, conv_width=4)
    cfg = PoseEncoderConfig.from_dict({"vit": vit, "steps": steps, "batch_size": 4,
                                       "heatmap_stride": 2, "val_samples": 0}, where="pose_encoder")
    m = pretrain_pose_encoder(cfg, {"train": train}, tmp_path / "enc")
    assert m["steps"] == steps and (tmp_path / "enc" / "model.safetensors").is_file()


def test_pretrain_rejects_split_without_keypoints(tmp_path):
    from poserft.data.h5io import SplitReader, write_split
    from poserft.model.testing import make_test_split
    src = SplitReader(make_test_split(tmp_path / "a.h5", 4))
    arrays = {k: src.read(k) for k in ("poses/global_orient", "poses/body_pose", "poses/betas", "joints", "images")}
    path = write_split(tmp_path / "nokp.h5", arrays, {"source": "t", "split": "train",
                                                      "body_model": "skeleton", "converter_params": {}})
    with pytest.raises(ValueError, match="keypoints2d"):
        pretrain_pose_encoder(PoseEncoderConfig.from_dict({"steps": 1}, where="pose_encoder"),
                              {"train": path}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
