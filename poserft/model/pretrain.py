"""Optional stage: pretrain the pose-aware ViT on 2D keypoints (ViTPose-style heatmaps).

The encoder's patch tokens (B, h*w, C) go through a linear "pixel-shuffle" head to 24
keypoint heatmaps at ``image_size / heatmap_stride`` resolution; the target is a Gaussian
blob (``heatmap_sigma`` cells) at each keypoint, the loss the mean squared error over
keypoints inside the image. Only the encoder is kept; the head is a training device.

``pretrain_pose_encoder(cfg, split_paths, out_dir, tracker)`` writes ``out_dir`` atomically:
``config.json`` + ``model.safetensors`` (a HF VitPoseBackbone, loadable by
``model.pose_vit.checkpoint``) and ``metrics.json`` (val mean keypoint error in pixels,
against the error of always predicting the mean training keypoints).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poserft.model.config import PoseEncoderConfig
from poserft.model.vision import PoseViTEncoder, build_pose_vit, save_pose_vit

__all__ = ["pretrain_pose_encoder", "gaussian_heatmaps", "soft_argmax", "HeatmapHead"]


def gaussian_heatmaps(keypoints: torch.Tensor, size: tuple[int, int], stride: int,
                      sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for pixel keypoints (B,K,2) as (x=col, y=row), continuous pixel coords.

    Cell (r, c) covers pixels [c*stride, (c+1)*stride) x [r*stride, ...), so its centre is
    pixel ((c+0.5)*stride, (r+0.5)*stride). Returns heatmaps (B,K,H,W) with peak 1 and a
    visibility mask (B,K) (keypoint inside the image).
    """
    h, w = size
    cx = keypoints[..., 0] / stride - 0.5                                    # (B,K) cell units
    cy = keypoints[..., 1] / stride - 0.5
    cols = torch.arange(w, dtype=keypoints.dtype, device=keypoints.device)
    rows = torch.arange(h, dtype=keypoints.dtype, device=keypoints.device)
    gx = torch.exp(-((cols.view(1, 1, w) - cx.unsqueeze(-1)) ** 2) / (2 * sigma ** 2))
    gy = torch.exp(-((rows.view(1, 1, h) - cy.unsqueeze(-1)) ** 2) / (2 * sigma ** 2))
    heat = gy.unsqueeze(-1) * gx.unsqueeze(-2)                               # (B,K,H,W)
    visible = ((keypoints[..., 0] >= 0) & (keypoints[..., 0] < w * stride)
               & (keypoints[..., 1] >= 0) & (keypoints[..., 1] < h * stride))
    return heat, visible


def soft_argmax(heat: torch.Tensor, stride: int, eps: float = 1e-6) -> torch.Tensor:
    """Heatmaps (B,K,H,W) -> pixel keypoints (B,K,2) (x, y).

    Arg-max cell refined per axis by a parabola through the log-heat of the cell and its two
    neighbours (the DARK/Taylor refinement): exact for a Gaussian blob, and blind to noise
    in far cells. Offsets are clamped to one cell; at the border the neighbour is missing
    and the offset is 0.
    """
    b, k, h, w = heat.shape
    flat = heat.flatten(2)
    idx = flat.argmax(-1)                                                   # (B,K)
    r, c = idx // w, idx % w
    logh = heat.clamp(min=eps).log()

    def at(rr, cc):
        return logh.flatten(2).gather(-1, (rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1)).unsqueeze(-1)).squeeze(-1)

    def offset(minus, centre, plus, ok):
        curv = 2 * centre - minus - plus
        d = torch.where(curv > 1e-9, 0.5 * (plus - minus) / curv.clamp(min=1e-9), torch.zeros_like(curv))
        return torch.where(ok, d.clamp(-1.0, 1.0), torch.zeros_like(d))

    centre = at(r, c)
    dx = offset(at(r, c - 1), centre, at(r, c + 1), (c > 0) & (c < w - 1))
    dy = offset(at(r - 1, c), centre, at(r + 1, c), (r > 0) & (r < h - 1))
    x = (c.to(heat.dtype) + dx + 0.5) * stride
    y = (r.to(heat.dtype) + dy + 0.5) * stride
    return torch.stack([x, y], dim=-1)


class HeatmapHead(nn.Module):
    """Tokens (B, h*w, C) on an (h,w) grid -> heatmaps (B, K, h*u, w*u) (linear + pixel shuffle)."""

    def __init__(self, dim: int, grid: tuple[int, int], upsample: int, num_keypoints: int = 24):
        super().__init__()
        self.grid, self.u, self.k = grid, upsample, num_keypoints
        self.proj = nn.Linear(dim, num_keypoints * upsample * upsample)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        h, w = self.grid
        x = self.proj(tokens).transpose(1, 2).reshape(b, self.k * self.u * self.u, h, w)
        return F.pixel_shuffle(x, self.u)


def _load_split(path) -> tuple[np.ndarray, np.ndarray]:
    from poserft.data.h5io import SplitReader
    with SplitReader(path) as r:
        for key in ("images", "keypoints2d"):
            if not r.has(key):
                raise ValueError(f"{path}: pretrain_pose_encoder needs '/{key}' (rendered images with "
                                 "2D keypoints); disable the pretrain_pose_encoder stage for "
                                 "datasets without them")
        return np.asarray(r.read("images")), np.asarray(r.read("keypoints2d"), dtype=np.float32)


def _batch(images: np.ndarray, kps: np.ndarray, idx: np.ndarray, size: int):
    from poserft.model.vision import to_unit_images
    img = to_unit_images(images[idx])
    scale = size / images.shape[1]  # keypoints follow the resize to the encoder's input
    return img, torch.from_numpy(kps[idx] * scale)


def pretrain_pose_encoder(cfg: PoseEncoderConfig | dict | None, split_paths: dict[str, str],
                          out_dir: str | os.PathLike, tracker=None) -> dict:
    """Train the pose ViT on heatmaps from ``split_paths['train']``; evaluate on 'val'."""
    from tqdm.auto import tqdm

    if not isinstance(cfg, PoseEncoderConfig):
        cfg = PoseEncoderConfig.from_dict(cfg, where="pose_encoder")
    if tracker is None:
        from poserft.tracking import NullTracker
        tracker = NullTracker()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    images, kps = _load_split(split_paths["train"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder: PoseViTEncoder = build_pose_vit(cfg.vit)
        size = encoder.image_size[0]
        head = HeatmapHead(encoder.hidden_size, encoder.grid, cfg.vit.patch_size // cfg.heatmap_stride)
    hm_size = (encoder.grid[0] * head.u, encoder.grid[1] * head.u)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, cfg.steps),
                                                pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    encoder.train()
    loss_val = float("nan")
    for step in tqdm(range(cfg.steps), desc="pretrain_pose_encoder", dynamic_ncols=True):
        idx = rng.integers(0, len(images), size=cfg.batch_size)
        img, kp = _batch(images, kps, idx, size)
        target, vis = gaussian_heatmaps(kp, hm_size, cfg.heatmap_stride, cfg.heatmap_sigma)
        pred = head(encoder(img))
        per_kp = ((pred - target) ** 2).mean((-1, -2))                       # (B,K)
        loss = (per_kp * vis).sum() / vis.sum().clamp(min=1) * 100.0         # x100: readable scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_val = loss.item()
        if (step + 1) % 20 == 0 or step + 1 == cfg.steps:
            tracker.log_metrics({"pretrain/heatmap_loss": loss_val}, step=step + 1)

    metrics = {"steps": cfg.steps, "final_heatmap_loss": loss_val}
    if cfg.val_samples and split_paths.get("val"):
        v_img, v_kps = _load_split(split_paths["val"])
        n = min(cfg.val_samples, len(v_img))
        encoder.eval()
        with torch.no_grad():
            img, kp = _batch(v_img, v_kps, np.arange(n), size)
            pred = soft_argmax(head(encoder(img)), cfg.heatmap_stride)
            _, vis = gaussian_heatmaps(kp, hm_size, cfg.heatmap_stride, cfg.heatmap_sigma)
            err = (pred - kp).norm(dim=-1)
            mean_kp = torch.from_numpy(kps.mean(0) * size / images.shape[1])
            base = (mean_kp.expand_as(kp) - kp).norm(dim=-1)
        metrics.update(val_kp_error_px=float(err[vis].mean()), val_mean_kp_baseline_px=float(base[vis].mean()),
                       val_n=n)
        tracker.log_metrics({f"pretrain/{k}": float(v) for k, v in metrics.items()}, step=cfg.steps)

    dest = Path(out_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        save_pose_vit(encoder, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        from poserft.model.io import atomic_replace_dir
        atomic_replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics
