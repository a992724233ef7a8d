"""Helpers shared by the converters: input checks, SMPL-family mappings, frames, joints.

Frames
------
Our canonical frame is SMPL's: y up, a body with zero root rotation faces +z, metres.
AMASS (and so PoseScript) is z up: its root orientations include the +90 deg rotation
about x that stands the SMPL body up in a z-up world. :data:`ZUP_TO_YUP` (a -90 deg
rotation about x: (x, y, z) -> (x, z, -y)) maps that world to ours; :func:`rotate_world`
applies such a rigid rotation to SMPL parameters *exactly*, i.e. so that the new joints
are the rotated old joints (the root rotates about the rest pelvis, so the translation
needs a pelvis correction).

:func:`remove_root_yaw` removes the heading (rotation about the vertical y axis): the
root's left-right axis (its local x axis) is turned into the x-y plane, pointing to +x.
That is PoseScript's normalisation (Euler ZYX in the z-up frame with the z angle set to
0, which zeroes the ground-plane heading of the same axis) expressed in the y-up frame.
It is undefined only when that axis is vertical (a body lying on its side, head or feet
pointing sideways); there the yaw falls back to 0.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["ConversionError", "SplitArrays", "require", "checked_array", "ZUP_TO_YUP",
           "axis_angle_to_matrix_np", "matrix_to_axis_angle_np", "rotation_about_y",
           "smpl_family_to_smpl", "rotate_world", "root_yaw", "remove_root_yaw",
           "pelvis_rest_positions", "compute_joints", "subsample_by_fps", "stride_rows",
           "fit_betas", "load_npz"]


class ConversionError(ValueError):
    """A raw file is malformed; the message names the file, the field and the fix."""

    def __init__(self, file: str | os.PathLike, field_name: str, problem: str):
        self.file, self.field, self.problem = str(file), field_name, problem
        super().__init__(f"{self.file}: '{field_name}': {problem}")


@dataclass
class SplitArrays:
    """What a builder returns per split: h5io arrays plus split-specific attributes."""

    arrays: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)   # merged into converter_params
    stats: dict[str, float] = field(default_factory=dict)  # logged as metrics

    @property
    def n_poses(self) -> int:
        return int(np.asarray(self.arrays["poses/global_orient"]).shape[0])


# ----------------------------------------------------------------------------- input checks

def require(mapping: Mapping[str, Any], key: str, file: str | os.PathLike, what: str = "key") -> Any:
    """``mapping[key]`` or a ConversionError naming the file, the key and what is there."""
    try:
        return mapping[key]
    except (KeyError, IndexError, TypeError):
        keys = sorted(map(str, getattr(mapping, "available", None) or (
            mapping.keys() if hasattr(mapping, "keys") else [])))
        shown = keys[:20] + (["..."] if len(keys) > 20 else [])
        raise ConversionError(file, key, f"missing {what}; present: {shown}") from None


def checked_array(value: Any, file: str | os.PathLike, field_name: str,
                  shape: Sequence[int | None], dtype: Any = np.float32,
                  finite: bool = True) -> np.ndarray:
    """``value`` as an array of ``shape`` (None = any size) and ``dtype``, or ConversionError."""
    try:
        a = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ConversionError(file, field_name, f"cannot be read as {np.dtype(dtype).name} "
                                                f"array ({exc})") from None
    if a.ndim != len(shape) or any(w is not None and g != w for g, w in zip(a.shape, shape)):
        want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
        raise ConversionError(file, field_name, f"shape {a.shape} != expected {want}")
    if finite and a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ConversionError(file, field_name, f"contains NaN/inf (first at index {tuple(bad)})")
    return a


def fit_betas(betas: np.ndarray, n: int = 10) -> np.ndarray:
    """(..., B) -> (..., n): the first n shape coefficients, zero-padded if B < n."""
    betas = np.asarray(betas, dtype=np.float32)
    if betas.shape[-1] >= n:
        return betas[..., :n]
    pad = np.zeros(betas.shape[:-1] + (n - betas.shape[-1],), np.float32)
    return np.concatenate([betas, pad], axis=-1)


# ----------------------------------------------------------------------------- rotations

# (x, y, z) z-up -> (x, z, -y) y-up: rotation by -90 deg about x.
ZUP_TO_YUP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=np.float64)


def axis_angle_to_matrix_np(aa: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 3, 3) through poserft.body.rotations (float64)."""
    import torch
    from poserft.body.rotations import axis_angle_to_matrix
    return axis_angle_to_matrix(torch.as_tensor(np.asarray(aa, np.float64))).numpy()


def matrix_to_axis_angle_np(mat: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (..., 3) through poserft.body.rotations (float64)."""
    import torch
    from poserft.body.rotations import matrix_to_axis_angle
    return matrix_to_axis_angle(torch.as_tensor(np.asarray(mat, np.float64))).numpy()


def rotation_about_y(angle: np.ndarray) -> np.ndarray:
    """(N,) radians -> (N,3,3) rotations about +y (right-handed)."""
    c, s = np.cos(angle), np.sin(angle)
    z, o = np.zeros_like(angle), np.ones_like(angle)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1),
                     np.stack([-s, z, c], -1)], -2)


def smpl_family_to_smpl(poses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SMPL / SMPL-H / SMPL-X axis-angle (T, 3*J), J >= 22 -> (global_orient (T,3), body_pose (T,23,3)).

    All three share joints 0..21 (pelvis .. wrists). SMPL's joints 22, 23 (hands) are kept
    for SMPL input (J = 24) and set to zero for SMPL-H (52 joints: 22.. are finger joints)
    and SMPL-X (55 joints: 22 = jaw); callers say which by the width.
    """
    poses = np.asarray(poses, dtype=np.float32)
    t, width = poses.shape
    joints = poses.reshape(t, width // 3, 3)
    body = np.zeros((t, 23, 3), np.float32)
    if width == 72:                       # SMPL: all 24 joints are SMPL joints
        body[:] = joints[:, 1:24]
    else:                                 # SMPL-H (156) / SMPL-X (165): body joints 1..21
        body[:, :21] = joints[:, 1:22]
    return joints[:, 0].copy(), body


def rotate_world(global_orient: np.ndarray, transl: np.ndarray, rotation: np.ndarray,
                 pelvis_rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rigidly rotate SMPL bodies about the world origin.

    global_orient (N,3), transl (N,3), rotation (3,3) or (N,3,3), pelvis_rest (N,3) or (3,)
    (the rest-pose pelvis position J0 for the row's betas). SMPL rotates the body about J0,
    so joints = R_g (J - J0) + J0 + t; rotating them by A gives R_g' = A R_g and
    t' = A (J0 + t) - J0. Returns (global_orient' (N,3), transl' (N,3)) as float32.
    """
    rot = np.broadcast_to(np.asarray(rotation, np.float64), (len(global_orient), 3, 3))
    mats = rot @ axis_angle_to_matrix_np(global_orient)
    j0 = np.broadcast_to(np.asarray(pelvis_rest, np.float64), (len(global_orient), 3))
    new_t = np.einsum("nij,nj->ni", rot, j0 + np.asarray(transl, np.float64)) - j0
    return matrix_to_axis_angle_np(mats).astype(np.float32), new_t.astype(np.float32)


def root_yaw(global_orient: np.ndarray) -> np.ndarray:
    """(N,3) y-up root orientations -> (N,) heading angle about +y (radians).

    The heading of the root's local x axis a = R e_x: a rotation Ry(psi) maps e_x to
    (cos psi, 0, -sin psi), so psi = atan2(-a_z, a_x); 0 when a is (nearly) vertical.
    """
    a = axis_angle_to_matrix_np(global_orient)[:, :, 0]
    horizontal = np.hypot(a[:, 0], a[:, 2])
    yaw = np.arctan2(-a[:, 2], a[:, 0])
    return np.where(horizontal > 1e-6, yaw, 0.0)


def remove_root_yaw(global_orient: np.ndarray, transl: np.ndarray | None = None,
                    pelvis_rest: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Turn each body about the vertical axis so that its heading is 0.

    global_orient (N,3) in the y-up frame; transl (N,3) optional (rotated with the body
    about the world origin, which needs ``pelvis_rest`` (N,3)/(3,)). Returns
    (global_orient' (N,3), transl' (N,3) or None, yaw (N,) that was removed).
    """
    yaw = root_yaw(global_orient)
    undo = rotation_about_y(-yaw)
    if transl is None:
        mats = undo @ axis_angle_to_matrix_np(global_orient)
        return matrix_to_axis_angle_np(mats).astype(np.float32), None, yaw
    if pelvis_rest is None:
        raise ValueError("remove_root_yaw: rotating transl needs pelvis_rest (the rest-pose J0)")
    go, t = rotate_world(global_orient, transl, undo, pelvis_rest)
    return go, t, yaw


# ----------------------------------------------------------------------------- body model

def compute_joints(body: Any, global_orient: np.ndarray, body_pose: np.ndarray,
                   betas: np.ndarray, transl: np.ndarray | None = None,
                   batch_size: int = 4096, progress: bool = False, desc: str = "joints") -> np.ndarray:
    """(N,24,3) float32 joints from ``body`` (a poserft.body.load model), in batches."""
    import torch
    from tqdm.auto import tqdm

    n = len(global_orient)
    out = np.zeros((n, 24, 3), np.float32)
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
            rows = slice(start, min(n, start + batch_size))
            t = None if transl is None else torch.as_tensor(transl[rows], dtype=torch.float32)
            joints = body(torch.as_tensor(global_orient[rows], dtype=torch.float32),
                          torch.as_tensor(body_pose[rows], dtype=torch.float32),
                          betas=torch.as_tensor(betas[rows], dtype=torch.float32), transl=t)
            out[rows] = joints.detach().cpu().numpy()
    return out


def pelvis_rest_positions(body: Any, betas: np.ndarray) -> np.ndarray:
    """(N,10) betas -> (N,3): the pelvis J0 of the rest pose (zero rotations, zero transl)."""
    n = len(betas)
    zeros_go = np.zeros((n, 3), np.float32)
    zeros_bp = np.zeros((n, 23, 3), np.float32)
    return compute_joints(body, zeros_go, zeros_bp, betas)[:, 0].astype(np.float64)


# ----------------------------------------------------------------------------- subsampling

def subsample_by_fps(n_frames: int, source_fps: float, target_fps: float) -> np.ndarray:
    """Frame indices that resample ``n_frames`` at ``source_fps`` to ~``target_fps``.

    target_fps <= 0 or >= source_fps keeps every frame. Otherwise frames nearest to the
    times 0, 1/target, 2/target, ... (an integer stride when the ratio is an integer).
    """
    if n_frames <= 0:
        return np.zeros(0, np.int64)
    if target_fps <= 0 or target_fps >= source_fps:
        return np.arange(n_frames, dtype=np.int64)
    step = source_fps / target_fps
    idx = np.unique(np.round(np.arange(0.0, n_frames, step)).astype(np.int64))
    return idx[idx < n_frames]


def stride_rows(n: int, stride: int, max_rows: int = 0) -> np.ndarray:
    """Every ``stride``-th index of range(n), truncated to ``max_rows`` (0: no cap)."""
    idx = np.arange(0, n, max(1, stride), dtype=np.int64)
    return idx[:max_rows] if max_rows else idx


class NpzContents(dict):
    """Arrays read from an .npz; ``available`` lists every key in the file."""

    available: list[str]


def load_npz(path: str | os.PathLike, keys: Iterable[str] | None = None) -> NpzContents:
    """Arrays of an ``.npz`` (all, or only ``keys`` that exist; no pickles).

    Missing keys are simply absent (``require`` then names them and lists ``available``).
    A file that cannot be read (truncated or corrupt download, not an ``.npz`` at all, an
    array of pickled objects) raises a one-line ConversionError naming it and the fix.
    """
    field_name = "/"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):      # a plain .npy array, not an .npz archive
            raise ConversionError(path, "/", "is a single .npy array, not an .npz archive of "
                                             "named arrays; delete it and download it again")
        with loaded as data:
            names = list(data.files)
            wanted = names if keys is None else [k for k in keys if k in names]
            out = NpzContents()
            for field_name in wanted:
                out[field_name] = data[field_name]
    except ConversionError:
        raise
    except FileNotFoundError:
        raise ConversionError(path, "/", "file does not exist") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ConversionError(path, field_name, f"truncated or corrupt .npz ({_one_line(exc)}); "
                              "delete it and download (unpack) it again from the dataset's site") from None
    except ValueError as exc:
        if field_name != "/" and "pickle" in str(exc):   # an object array inside the archive
            raise ConversionError(path, field_name, f"cannot be read without unpickling "
                                  f"({_one_line(exc)}); re-download the original release file, "
                                  "whose arrays are plain numbers/strings") from None
        if field_name != "/":
            raise ConversionError(path, field_name, f"truncated or corrupt array ({_one_line(exc)}); "
                                  "delete the file and download (unpack) it again") from None
        raise ConversionError(path, "/", "not an .npz archive (no zip or .npy header; numpy would "
                              "have to unpickle it, which is never done); it is truncated, corrupt "
                              "or another format: delete it and download it again") from None
    except OSError as exc:
        raise ConversionError(path, field_name, f"cannot be read ({_one_line(exc)}); check its "
                              "permissions, or delete it and download it again") from None
    out.available = names
    return out


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line (error messages here are one line each)."""
    return " ".join(str(exc).split()) or type(exc).__name__
