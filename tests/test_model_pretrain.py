"""Pose-encoder pretraining: heatmap targets/decoding and a short end-to-end run."""

import json
import math

import pytest
import torch

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


def test_pretrain_learns_keypoints_and_writes_loadable_encoder(tmp_path):
    from poserft.model.config import PoseViTConfig
    from poserft.model.testing import make_test_split
    from poserft.model.vision import build_pose_vit
    torch.set_num_threads(1)
    train = make_test_split(tmp_path / "train.h5", 64)
    val = make_test_split(tmp_path / "val.h5", 16, seed=1, split="val")
    vit = dict(image_size=16, patch_size=8, hidden_size=16, num_layers=1, num_heads=2)
    cfg = {"vit": vit, "steps": 150, "batch_size": 16, "lr": 3e-3, "heatmap_stride": 2,
           "heatmap_sigma": 1.0, "val_samples": 16}
    out = tmp_path / "enc"
    metrics = pretrain_pose_encoder(cfg, {"train": train, "val": val}, out)
    assert metrics["val_kp_error_px"] < 0.6 * metrics["val_mean_kp_baseline_px"], metrics
    assert json.loads((out / "metrics.json").read_text())["steps"] == 150
    enc = build_pose_vit(PoseViTConfig(checkpoint=str(out)))
    assert enc(torch.rand(1, 3, 16, 16)).shape == (1, 4, 16)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".enc")] == []


def test_pretrain_rejects_split_without_keypoints(tmp_path):
    from poserft.data.h5io import SplitReader, write_split
    from poserft.model.testing import make_test_split
    src = SplitReader(make_test_split(tmp_path / "a.h5", 4))
    arrays = {k: src.read(k) for k in ("poses/global_orient", "poses/body_pose", "poses/betas", "joints", "images")}
    path = write_split(tmp_path / "nokp.h5", arrays, {"source": "t", "split": "train",
                                                      "body_model": "skeleton", "converter_params": {}})
    with pytest.raises(ValueError, match="keypoints2d"):
        pretrain_pose_encoder({"steps": 1}, {"train": path}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
