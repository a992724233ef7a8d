"""Pose features of the retrieval model: 6D rotations of the 22 body joints, root yaw removed.

Retrieval must not depend on which way the body faces in the world (a caption never says
"facing north"), so the root rotation's twist about the vertical axis is removed. Our frame
is SMPL canonical, y up, so "yaw" is rotation about y. SMPL joints 22, 23 (hands) carry no
information in our data and are dropped.
"""

from __future__ import annotations

import torch

from poserft.body.posevec import POSE_DIM
from poserft.body.rotations import matrix_to_rot6d, rot6d_to_matrix

__all__ = ["NUM_RETRIEVAL_JOINTS", "FEATURE_DIM", "yaw_angle", "rotation_about_y",
           "remove_root_yaw", "pose6d_without_root_yaw", "retrieval_pose_features"]

NUM_RETRIEVAL_JOINTS = 22
FEATURE_DIM = NUM_RETRIEVAL_JOINTS * 6


def yaw_angle(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (...,) twist angle about +y (radians, in (-pi, pi]).

    atan2(R02 - R20, R00 + R22) is the angle of the twist component of the swing-twist
    decomposition about y; it shifts by exactly phi when R is pre-multiplied by R_y(phi),
    which is the invariance we need. Undefined only for 180-degree turns about a horizontal
    axis (both arguments 0; atan2 then returns 0).
    """
    return torch.atan2(rotmat[..., 0, 2] - rotmat[..., 2, 0], rotmat[..., 0, 0] + rotmat[..., 2, 2])


def rotation_about_y(angle: torch.Tensor) -> torch.Tensor:
    """(...,) radians -> (..., 3, 3) rotation matrices about +y (right-handed)."""
    c, s = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    rows = [torch.stack([c, zero, s], -1), torch.stack([zero, one, zero], -1),
            torch.stack([-s, zero, c], -1)]
    return torch.stack(rows, -2)


def remove_root_yaw(root_rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) global orientation -> same orientation with its y-twist removed.

    Result is invariant to world yaw: ``remove_root_yaw(R_y(phi) @ R) == remove_root_yaw(R)``.
    """
    return rotation_about_y(-yaw_angle(root_rotmat)) @ root_rotmat


def pose6d_without_root_yaw(pose_vec6d: torch.Tensor) -> torch.Tensor:
    """(B, 144) pose vectors -> the same poses with the root's twist about +y removed.

    The canonical frame of text->pose targets (a caption never says which way the body
    faces). Only joint 0 changes (re-orthonormalised through ``rot6d_to_matrix``); the
    other joints' 6D values are returned untouched. Idempotent.
    """
    if pose_vec6d.dim() != 2 or pose_vec6d.shape[-1] != POSE_DIM:
        raise ValueError(f"pose vectors must have shape (B, {POSE_DIM}), got "
                         f"{tuple(pose_vec6d.shape)}")
    root = matrix_to_rot6d(remove_root_yaw(rot6d_to_matrix(pose_vec6d[:, :6])))
    return torch.cat([root.to(pose_vec6d.dtype), pose_vec6d[:, 6:]], dim=-1)


def retrieval_pose_features(pose_vec6d: torch.Tensor) -> torch.Tensor:
    """(B, 144) pose vectors (``poserft.body.posevec`` layout) -> (B, 132) features.

    Joint 0's 6D rotation is replaced by its yaw-free version; joints 1..21 are kept as is
    (local rotations are yaw-free already); joints 22, 23 are dropped.
    """
    if pose_vec6d.dim() != 2 or pose_vec6d.shape[-1] != POSE_DIM:
        raise ValueError(f"pose vectors must have shape (B, {POSE_DIM}), got "
                         f"{tuple(pose_vec6d.shape)}")
    joints = pose_vec6d.reshape(-1, POSE_DIM // 6, 6)[:, :NUM_RETRIEVAL_JOINTS]
    root = matrix_to_rot6d(remove_root_yaw(rot6d_to_matrix(joints[:, 0])))
    return torch.cat([root, joints[:, 1:].reshape(joints.shape[0], -1)], dim=-1)
