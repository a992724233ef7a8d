"""Joint-position errors: MPJPE and PA-MPJPE (millimetres) between two sets of 3D joints.

The pose-error metrics every stage uses (SFT and pose-encoder validation, the RL joint
reward's logging, the benchmarks of ``poserft.eval``); they live in the body layer, beside
the joint sets, so that every layer above can import them. ``poserft.eval.metrics``
re-exports them.

Batched torch; numpy inputs are accepted (the errors are then numpy). Joints are in metres,
errors in millimetres; internally float64 so that reported numbers do not depend on the
caller's dtype.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["mpjpe", "pa_mpjpe", "similarity_procrustes", "as_float64"]

_MM_PER_M = 1000.0


# ----------------------------------------------------------------------------- joints --
def as_float64(x, name: str) -> torch.Tensor:
    """A detached float64 tensor of a torch tensor, numpy array or (nested) list; TypeError
    naming ``name`` otherwise."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    if isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")


def _check_joint_pair(pred, gt) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """-> pred, gt as float64 (B,J,3) tensors on one device, and whether to return numpy."""
    as_numpy = not isinstance(pred, torch.Tensor) and not isinstance(gt, torch.Tensor)
    pred_t, gt_t = as_float64(pred, "pred"), as_float64(gt, "gt")
    for name, x in (("pred", pred_t), ("gt", gt_t)):
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"{name} must have shape (B, J, 3) (joints in metres), "
                             f"got {tuple(x.shape)}")
    if pred_t.shape != gt_t.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred_t.shape)} vs "
                         f"{tuple(gt_t.shape)} (same joint set and batch needed; see "
                         f"poserft.body.kinematics.JOINT_SETS)")
    if pred_t.shape[0] == 0 or pred_t.shape[1] == 0:
        raise ValueError(f"empty input: pred/gt have shape {tuple(pred_t.shape)}")
    for name, x in (("pred", pred_t), ("gt", gt_t)):
        finite = torch.isfinite(x).reshape(x.shape[0], -1).all(-1)
        if not bool(finite.all()):
            bad = (~finite).nonzero()[:5, 0].tolist()
            raise ValueError(f"{name} contains NaN or inf joints (first bad samples: {bad})")
    gt_t = gt_t.to(pred_t.device)
    return pred_t, gt_t, as_numpy


def _output(err_mm: torch.Tensor, like, as_numpy: bool):
    if as_numpy:
        return err_mm.cpu().numpy()
    dtype = like.dtype if isinstance(like, torch.Tensor) and like.is_floating_point() \
        else torch.float64
    return err_mm.to(dtype)


def _root_of(joints: torch.Tensor, root: int | Sequence[int]) -> torch.Tensor:
    """(B,J,3) -> (B,1,3): one joint, or the mean of several (e.g. the hips of LSP-14)."""
    index = [root] if isinstance(root, (int, np.integer)) else list(root)
    num_joints = joints.shape[1]
    if not index or any(not (0 <= int(i) < num_joints) for i in index):
        raise ValueError(f"root={root!r} is not a valid joint index (or list of indices) "
                         f"for {num_joints} joints")
    return joints[:, [int(i) for i in index]].mean(dim=1, keepdim=True)


def mpjpe(pred, gt, root: int | Sequence[int] | None = 0):
    """Mean per-joint position error, (B,) millimetres.

    Args:
        pred, gt: (B,J,3) joints in metres (torch or numpy).
        root: joint index (or indices, averaged: use ``(2, 3)``, the hips, for LSP-14)
            subtracted from both before comparing; ``None`` compares absolute positions.
    """
    pred_t, gt_t, as_numpy = _check_joint_pair(pred, gt)
    if root is not None:
        pred_t = pred_t - _root_of(pred_t, root)
        gt_t = gt_t - _root_of(gt_t, root)
    err = torch.linalg.vector_norm(pred_t - gt_t, dim=-1).mean(dim=-1) * _MM_PER_M
    return _output(err, pred, as_numpy)


def similarity_procrustes(pred: torch.Tensor, gt: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best similarity transform of ``pred`` onto ``gt`` per sample (Umeyama / Kabsch).

    Minimises ``|| s * pred @ R + t - gt ||`` over scale s > 0, proper rotation R
    (det +1: a reflection is never used, the last singular direction is flipped instead)
    and translation t, in row-vector convention.

    Args:
        pred, gt: (B,J,3) float tensors.
    Returns:
        aligned pred (B,J,3), scale (B,), R (B,3,3), t (B,3).
    """
    mu_pred = pred.mean(dim=1, keepdim=True)
    mu_gt = gt.mean(dim=1, keepdim=True)
    x = pred - mu_pred
    y = gt - mu_gt
    cross = x.transpose(1, 2) @ y                                      # (B,3,3)
    u, sing, vh = torch.linalg.svd(cross)
    # Flip the weakest direction when U @ Vh would be a reflection.
    # det(U Vh) = det(U) det(Vh); elementwise 3x3 products beat batched tiny matmuls on CPU.
    sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    flip = torch.ones_like(sing)
    flip[:, -1] = sign
    rot = ((u * flip[:, None, :])[:, :, :, None] * vh[:, None, :, :]).sum(2)
    var_pred = x.square().sum(dim=(1, 2))
    # All-coincident predictions have no scale: s = 0 maps them to gt's centroid.
    scale = (sing * flip).sum(-1) / var_pred.clamp_min(torch.finfo(pred.dtype).tiny)
    aligned = scale[:, None, None] * (x @ rot) + mu_gt
    transl = mu_gt[:, 0] - scale[:, None] * (mu_pred @ rot)[:, 0]
    return aligned, scale, rot, transl


def pa_mpjpe(pred, gt):
    """Procrustes-aligned MPJPE, (B,) millimetres: per sample, ``pred`` is aligned to
    ``gt`` by the best similarity transform (:func:`similarity_procrustes`) first."""
    pred_t, gt_t, as_numpy = _check_joint_pair(pred, gt)
    aligned, _, _, _ = similarity_procrustes(pred_t, gt_t)
    err = torch.linalg.vector_norm(aligned - gt_t, dim=-1).mean(dim=-1) * _MM_PER_M
    return _output(err, pred, as_numpy)
