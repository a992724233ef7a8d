"""Batched rotation conversions (torch, any leading shape ``...``).

Representations
* axis-angle (rotation vector) ``(..., 3)``: axis * angle in radians, angle in [0, pi];
* rotation matrix ``(..., 3, 3)``: acts on column vectors (``x' = R @ x``);
* continuous 6D (Zhou et al., CVPR 2019) ``(..., 6)``: the first two COLUMNS of the
  rotation matrix, concatenated ``[R[:,0], R[:,1]]``; mapped back by Gram-Schmidt
  (normalise column 1, remove its component from column 2 and normalise, third column =
  cross product). Any 6-vector with non-parallel halves maps to a rotation, which is why
  networks regress it.

The numerics come from ``roma`` (Rodrigues with a first-order branch near 0, and the
quaternion route with Taylor-expanded ``x/sin x`` for the inverse), so values are exact
near 0 and near pi and gradients stay finite at the identity.
"""

from __future__ import annotations

import roma
import torch

__all__ = [
    "axis_angle_to_matrix", "matrix_to_axis_angle", "matrix_to_rot6d", "rot6d_to_matrix",
    "axis_angle_to_rot6d", "rot6d_to_axis_angle",
]

# Clamp for Gram-Schmidt norms: a degenerate 6D input (zero or parallel halves) yields a
# non-rotation instead of NaNs that would poison a whole training batch.
_GRAM_SCHMIDT_EPS = 1e-8


def _check_last_dims(x: torch.Tensor, dims: tuple[int, ...], name: str, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape[x.dim() - len(dims):]) != dims or x.dim() < len(dims):
        want = "(..., " + ", ".join(map(str, dims)) + ")"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {tuple(x.shape)}")


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """(..., 3) rotation vectors -> (..., 3, 3) rotation matrices."""
    _check_last_dims(axis_angle, (3,), "axis_angle", "axis_angle_to_matrix")
    axis_angle = _float(axis_angle)
    if axis_angle.numel() == 0:
        return axis_angle.new_zeros(axis_angle.shape + (3,))
    return roma.rotvec_to_rotmat(axis_angle)


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 3) rotation vectors with angle in [0, pi]."""
    _check_last_dims(matrix, (3, 3), "matrix", "matrix_to_axis_angle")
    matrix = _float(matrix)
    if matrix.numel() == 0:
        return matrix.new_zeros(matrix.shape[:-1])
    return roma.rotmat_to_rotvec(matrix)


def matrix_to_rot6d(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 6): first column then second column."""
    _check_last_dims(matrix, (3, 3), "matrix", "matrix_to_rot6d")
    # transpose(-1,-2)[..., :2, :] are the first two columns as rows -> flatten col-major.
    return matrix.transpose(-1, -2)[..., :2, :].reshape(matrix.shape[:-2] + (6,))


def rot6d_to_matrix(rot6d: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3, 3) by Gram-Schmidt on the two 3-vectors (they become columns)."""
    _check_last_dims(rot6d, (6,), "rot6d", "rot6d_to_matrix")
    rot6d = _float(rot6d)
    columns = rot6d.reshape(rot6d.shape[:-1] + (2, 3)).transpose(-1, -2)  # (..., 3, 2)
    if rot6d.numel() == 0:
        return rot6d.new_zeros(rot6d.shape[:-1] + (3, 3))
    return roma.special_gramschmidt(columns, epsilon=_GRAM_SCHMIDT_EPS)


def axis_angle_to_rot6d(axis_angle: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 6)."""
    return matrix_to_rot6d(axis_angle_to_matrix(axis_angle))


def rot6d_to_axis_angle(rot6d: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3)."""
    return matrix_to_axis_angle(rot6d_to_matrix(rot6d))
