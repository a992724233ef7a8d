"""The flat pose vector networks predict: 24 joints x continuous 6D = 144 values.

Layout: ``vec[..., 6*j : 6*j+6]`` is joint ``j``'s 6D rotation (``rotations.matrix_to_rot6d``:
first column then second column of its local rotation matrix); joint 0 is the global
orientation, joints 1..23 the SMPL body pose.
"""

from __future__ import annotations

import torch

from poserft.body.kinematics import NUM_SMPL_JOINTS
from poserft.body.rotations import axis_angle_to_matrix, matrix_to_axis_angle, \
    matrix_to_rot6d, rot6d_to_matrix

__all__ = ["POSE_DIM", "smpl_to_rotmats", "rotmats_to_smpl", "rotmats_to_vec6d",
           "vec6d_to_rotmats", "smpl_to_vec6d", "vec6d_to_smpl", "check_smpl_pose"]

POSE_DIM = NUM_SMPL_JOINTS * 6


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x, dtype=torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected a tensor or array, got {type(x).__name__}") from exc


def _check_finite(x: torch.Tensor, name: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(-1).nonzero()[:5, 0].tolist() \
            if x.dim() else []
        raise ValueError(f"{name} contains NaN or inf (first bad rows: {bad})")


def check_smpl_pose(global_orient, body_pose) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and normalise an SMPL axis-angle pose.

    Accepts ``global_orient (B,3)`` and ``body_pose (B,23,3)`` or ``(B,69)`` (tensors or
    arrays); returns ``(B,3)``, ``(B,23,3)`` tensors. Raises ValueError naming the argument
    for wrong shapes, mismatched or empty batches and non-finite values.
    """
    global_orient = _as_tensor(global_orient, "global_orient")
    body_pose = _as_tensor(body_pose, "body_pose")
    if global_orient.dim() != 2 or global_orient.shape[-1] != 3:
        raise ValueError(f"global_orient must have shape (B, 3), got {tuple(global_orient.shape)}")
    if body_pose.dim() == 2 and body_pose.shape[-1] == (NUM_SMPL_JOINTS - 1) * 3:
        body_pose = body_pose.reshape(body_pose.shape[0], NUM_SMPL_JOINTS - 1, 3)
    if body_pose.dim() != 3 or tuple(body_pose.shape[1:]) != (NUM_SMPL_JOINTS - 1, 3):
        raise ValueError(f"body_pose must have shape (B, 23, 3) or (B, 69), got "
                         f"{tuple(body_pose.shape)} (SMPL-H sources: map the 21 body joints "
                         f"and set joints 22, 23 to zero)")
    if global_orient.shape[0] != body_pose.shape[0]:
        raise ValueError(f"batch sizes differ: global_orient has {global_orient.shape[0]} rows, "
                         f"body_pose {body_pose.shape[0]}")
    if global_orient.shape[0] == 0:
        raise ValueError("empty batch: global_orient and body_pose have 0 rows")
    _check_finite(global_orient, "global_orient")
    _check_finite(body_pose, "body_pose")
    return global_orient, body_pose


def smpl_to_rotmats(global_orient: torch.Tensor, body_pose: torch.Tensor) -> torch.Tensor:
    """global_orient (B,3), body_pose (B,23,3) -> local rotation matrices (B,24,3,3)."""
    global_orient, body_pose = check_smpl_pose(global_orient, body_pose)
    body_pose = body_pose.to(global_orient.dtype)
    return axis_angle_to_matrix(torch.cat([global_orient[:, None], body_pose], dim=1))


def rotmats_to_smpl(rotmats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,24,3,3) -> global_orient (B,3), body_pose (B,23,3)."""
    if rotmats.shape[-3:] != (NUM_SMPL_JOINTS, 3, 3):
        raise ValueError(f"rotmats must have shape (..., 24, 3, 3), got {tuple(rotmats.shape)}")
    aa = matrix_to_axis_angle(rotmats)
    return aa[..., 0, :], aa[..., 1:, :]


def rotmats_to_vec6d(rotmats: torch.Tensor) -> torch.Tensor:
    """(..., 24, 3, 3) -> (..., 144)."""
    if rotmats.shape[-3:] != (NUM_SMPL_JOINTS, 3, 3):
        raise ValueError(f"rotmats must have shape (..., 24, 3, 3), got {tuple(rotmats.shape)}")
    return matrix_to_rot6d(rotmats).reshape(rotmats.shape[:-3] + (POSE_DIM,))


def vec6d_to_rotmats(vec: torch.Tensor) -> torch.Tensor:
    """(..., 144) -> (..., 24, 3, 3) via Gram-Schmidt per joint."""
    if not isinstance(vec, torch.Tensor) or vec.shape[-1:] != (POSE_DIM,):
        shape = tuple(vec.shape) if hasattr(vec, "shape") else type(vec).__name__
        raise ValueError(f"pose vector must have shape (..., {POSE_DIM}), got {shape}")
    return rot6d_to_matrix(vec.reshape(vec.shape[:-1] + (NUM_SMPL_JOINTS, 6)))


def smpl_to_vec6d(global_orient: torch.Tensor, body_pose: torch.Tensor) -> torch.Tensor:
    """global_orient (B,3), body_pose (B,23,3) -> (B,144)."""
    return rotmats_to_vec6d(smpl_to_rotmats(global_orient, body_pose))


def vec6d_to_smpl(vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,144) -> global_orient (B,3), body_pose (B,23,3) axis-angle."""
    return rotmats_to_smpl(vec6d_to_rotmats(vec))
