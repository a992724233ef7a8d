"""Stage pretrain_pose_encoder: the pose-aware encoder pretrained on pose estimation.

Two heads, both training devices (only the encoder is kept):

* 2D keypoints (ViTPose-style): the tokens (B, h*w, C) go through a linear "pixel-shuffle"
  head to 24 keypoint heatmaps at ``image_size / heatmap_stride`` resolution; the target is
  a Gaussian blob (``heatmap_sigma`` cells) at each keypoint, the loss the mean squared
  error over keypoints inside the image.
* 3D pose: the MEAN of the tokens through a small MLP to the 144-D 6D pose in the camera
  frame; loss = 6D MSE + mean joint distance (metres) through the body model's FK, with
  and without the root rotation. Reading the mean is deliberate: an untrained LLM's
  attention is close to uniform, so what the mean of the tokens carries is what the MLLM
  can use from its first SFT step.

``pretrain_pose_encoder(cfg, split_paths, out_dir, tracker)`` writes ``out_dir`` atomically:
``config.json`` + ``model.safetensors`` (a HF VitPoseBackbone, loadable by
``model.pose_vit.checkpoint``) and ``metrics.json`` (val mean keypoint error in pixels,
against the error of always predicting the mean training keypoints).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poserft.atomic import apply_umask, make_temp_dir
from poserft.model.config import PoseEncoderConfig
from poserft.model.vision import build_pose_vit, save_pose_vit

__all__ = ["pretrain_pose_encoder", "gaussian_heatmaps", "soft_argmax", "HeatmapHead",
           "PoseReadout", "pose_regression_loss"]


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


class PoseReadout(nn.Module):
    """Tokens (B, N, C) -> (B, 144) 6D pose from their mean (MLP; bias starts at ``init``)."""

    def __init__(self, dim: int, init: torch.Tensor, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, init.numel()))
        with torch.no_grad():
            self.mlp[-1].weight.mul_(0.01)
            self.mlp[-1].bias.copy_(init)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.mean(1))


def pose_regression_loss(body, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """6D MSE + mean joint distance (metres) of FK with and without the root rotation
    (:func:`poserft.model.heads.joint_distances`, frame "both"). pred, target: (B,144) -> scalar.
    """
    from poserft.model.heads import joint_distances
    return F.mse_loss(pred, target) + joint_distances(body, pred, target, "both").mean()


def _load_split(path) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """-> images (N,H,W,3) uint8, keypoints (N,24,2), camera-frame 6D poses (N,144)."""
    from poserft.body import smpl_to_vec6d
    from poserft.data.h5io import SplitReader
    with SplitReader(path) as r:
        for key in ("images", "keypoints2d"):
            if not r.has(key):
                raise ValueError(f"{path}: pretrain_pose_encoder needs '/{key}' (rendered images with "
                                 "2D keypoints); disable the pretrain_pose_encoder stage for "
                                 "datasets without them")
        poses = r.poses()
        orient = (np.asarray(r.read("image_pose/global_orient")) if r.has("image_pose/global_orient")
                  else np.asarray(poses["global_orient"]))
        vec = smpl_to_vec6d(torch.as_tensor(orient, dtype=torch.float32),
                            torch.as_tensor(np.asarray(poses["body_pose"]), dtype=torch.float32))
        return np.asarray(r.read("images")), np.asarray(r.read("keypoints2d"), dtype=np.float32), vec


def _batch(images: np.ndarray, kps: np.ndarray, idx: np.ndarray, size: int):
    from poserft.model.vision import to_unit_images
    img = to_unit_images(images[idx])
    scale = size / images.shape[1]  # keypoints follow the resize to the encoder's input
    return img, torch.from_numpy(kps[idx] * scale)


@torch.no_grad()
def _validate(encoder, head, readout, body, val_path, cfg: PoseEncoderConfig, mean_kp: np.ndarray,
              mean_pose: torch.Tensor, size: int, hm_size: tuple[int, int]) -> dict:
    """Val keypoint error (px) and 3D pose error (mm, 24 joints, root-aligned; PA) of the
    pretraining heads, each beside the train-mean baseline."""
    from poserft.body.metrics import mpjpe, pa_mpjpe
    v_img, v_kps, v_poses = _load_split(val_path)
    n = min(cfg.val_samples, len(v_img))
    encoder.eval()
    img, kp = _batch(v_img, v_kps, np.arange(n), size)
    tokens = encoder(img)
    pred = soft_argmax(head(tokens), cfg.heatmap_stride)
    _, vis = gaussian_heatmaps(kp, hm_size, cfg.heatmap_stride, cfg.heatmap_sigma)
    base = (torch.from_numpy(mean_kp).expand_as(kp) - kp).norm(dim=-1)
    out = {"val_n": n, "val_mean_kp_baseline_px": float(base[vis].mean())}
    if cfg.heatmap_weight:
        out["val_kp_error_px"] = float((pred - kp).norm(dim=-1)[vis].mean())

    gt = body.forward_vec6d(v_poses[:n])
    guesses = {"mean_pose_": mean_pose.expand(n, -1)}
    if cfg.pose_weight:
        guesses[""] = readout(tokens)
    for prefix, vec in guesses.items():
        j = body.forward_vec6d(vec)
        out[f"val_{prefix}mpjpe_mm"] = float(mpjpe(j, gt, root=0).mean())
        out[f"val_{prefix}pa_mpjpe_mm"] = float(pa_mpjpe(j, gt).mean())
    return out


def pretrain_pose_encoder(cfg: PoseEncoderConfig | None, split_paths: dict[str, str],
                          out_dir: str | os.PathLike, tracker=None) -> dict:
    """Train the pose encoder on ``split_paths['train']`` (heatmaps + 3D pose); score 'val'."""
    from tqdm.auto import tqdm

    cfg = PoseEncoderConfig.expect(cfg, "pretrain_pose_encoder: cfg")
    if tracker is None:
        from poserft.tracking import NullTracker
        tracker = NullTracker()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    from poserft.body import load as load_body
    images, kps, poses = _load_split(split_paths["train"])
    body = load_body(None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = build_pose_vit(cfg.vit)
        size = encoder.image_size[0]
        cell = size // encoder.grid[0]
        head = HeatmapHead(encoder.hidden_size, encoder.grid, cell // cfg.heatmap_stride)
        readout = PoseReadout(encoder.hidden_size, poses.mean(0))
    hm_size = (encoder.grid[0] * head.u, encoder.grid[1] * head.u)
    params = list(encoder.parameters()) + list(head.parameters()) + list(readout.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    # OneCycleLR divides by its warm-up length: at least 2 steps of it, even for short runs
    total = max(3, cfg.steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                pct_start=max(0.1, 2.5 / total))
    rng = np.random.default_rng(cfg.seed)
    encoder.train()
    losses = {"heatmap_loss": float("nan"), "pose_loss": float("nan")}
    for step in tqdm(range(cfg.steps), desc="pretrain_pose_encoder", dynamic_ncols=True,
                     mininterval=5.0):
        idx = rng.integers(0, len(images), size=cfg.batch_size)
        img, kp = _batch(images, kps, idx, size)
        tokens = encoder(img)
        loss = torch.zeros(())
        if cfg.heatmap_weight:
            target, vis = gaussian_heatmaps(kp, hm_size, cfg.heatmap_stride, cfg.heatmap_sigma)
            per_kp = ((head(tokens) - target) ** 2).mean((-1, -2))          # (B,K)
            hm = (per_kp * vis).sum() / vis.sum().clamp(min=1) * 100.0       # x100: readable scale
            loss = loss + cfg.heatmap_weight * hm
            losses["heatmap_loss"] = hm.item()
        if cfg.pose_weight:
            pl = pose_regression_loss(body, readout(tokens), poses[torch.as_tensor(idx)])
            loss = loss + cfg.pose_weight * pl
            losses["pose_loss"] = pl.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 20 == 0 or step + 1 == cfg.steps:
            tracker.log_metrics({f"pretrain/{k}": v for k, v in losses.items() if v == v},
                                step=step + 1)

    metrics = {"steps": cfg.steps, **{f"final_{k}": v for k, v in losses.items()}}
    if cfg.val_samples and split_paths.get("val"):
        metrics.update(_validate(encoder, head, readout, body, split_paths["val"], cfg,
                                 kps.mean(0) * size / images.shape[1], poses.mean(0), size, hm_size))
        tracker.log_metrics({f"pretrain/{k}": float(v) for k, v in metrics.items()
                             if v == v}, step=cfg.steps)

    dest = Path(out_dir)
    tmp = make_temp_dir(dest.parent, prefix=f".{dest.name}.tmp-")   # umask applied
    try:
        save_pose_vit(encoder, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        from poserft.model.io import atomic_replace_dir
        apply_umask(tmp, recursive=True)         # safetensors writes 0600 files
        atomic_replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics
