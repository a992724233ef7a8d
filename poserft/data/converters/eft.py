"""COCO / MPII with EFT pseudo-ground-truth SMPL fits -> image/pose split files.

Raw layout (``root``; EFT fitting json, e.g. COCO2014-All-ver01.json, MPII_ver01.json)::

    {"ver": ..., "data": [
        {"parm_pose": 24x3x3 rotation matrices (root first, camera frame),
         "parm_shape": 10 betas,
         "parm_cam": [scale, tx, ty] weak-perspective camera of the crop,
         "bbox_center": [x, y], "bbox_scale": float (box size / 200),
         "imageName": basename of the image,
         "annotId": COCO annotation id (COCO only), ...}, ...]}

Rotation matrices are checked (orthonormal, det +1, within 1e-3) and turned into
axis-angle. Images are ``<image_root>/<image_subdir>/<imageName>``. The root orientation
is in the camera frame (also written to ``/image_pose/global_orient``); the crop's
weak-perspective camera, box and COCO annotation id (-1 if absent) go to ``/meta``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from poserft.data.converters.common import (
    ConversionError, SplitArrays, checked_array, compute_joints, matrix_to_axis_angle_np,
    require, stride_rows)
from poserft.data.converters.posescript import read_json

__all__ = ["build_eft", "read_eft_json"]

_ROTATION_TOL = 1e-3


def read_eft_json(path: Path) -> dict[str, np.ndarray]:
    """One EFT json -> checked arrays: rotmats (N,24,3,3), betas, cam, center, scale, names, annot."""
    data = read_json(path)
    items = require(data, "data", path) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ConversionError(path, "data", "expected a list of fits under key 'data'")
    cols: dict[str, list] = {k: [] for k in ("rot", "betas", "cam", "center", "scale", "name", "annot")}
    for i, item in enumerate(items):
        where = f"data[{i}]"
        if not isinstance(item, dict):
            raise ConversionError(path, where, "expected an object")
        cols["rot"].append(checked_array(require(item, "parm_pose", path, f"key of {where}"),
                                         path, f"{where}.parm_pose", (24, 3, 3)))
        cols["betas"].append(checked_array(require(item, "parm_shape", path, f"key of {where}"),
                                           path, f"{where}.parm_shape", (10,)))
        cols["cam"].append(checked_array(require(item, "parm_cam", path, f"key of {where}"),
                                         path, f"{where}.parm_cam", (3,)))
        name = require(item, "imageName", path, f"key of {where}")
        if not isinstance(name, str) or not name:
            raise ConversionError(path, f"{where}.imageName", "expected a non-empty string")
        cols["name"].append(name)
        cols["center"].append(checked_array(require(item, "bbox_center", path, f"key of {where}"),
                                            path, f"{where}.bbox_center", (2,)))
        cols["scale"].append(checked_array(require(item, "bbox_scale", path, f"key of {where}"),
                                           path, f"{where}.bbox_scale", ()))
        cols["annot"].append(int(item.get("annotId", -1)))
    if not items:
        raise ConversionError(path, "data", "no fits")
    rot = np.stack(cols["rot"]).astype(np.float64)
    err = np.abs(rot @ np.swapaxes(rot, -1, -2) - np.eye(3)).max(axis=(-1, -2))
    det = np.linalg.det(rot)
    bad = np.argwhere((err > _ROTATION_TOL) | (np.abs(det - 1) > _ROTATION_TOL))
    if len(bad):
        i, j = bad[0]
        raise ConversionError(path, f"data[{i}].parm_pose[{j}]", "not a rotation matrix "
                              f"(|R R^T - I| = {err[i, j]:.2g}, det = {det[i, j]:.3f})")
    return {"rot": rot, "betas": np.stack(cols["betas"]), "cam": np.stack(cols["cam"]),
            "center": np.stack(cols["center"]).astype(np.float32),
            "scale": np.stack(cols["scale"]).astype(np.float32), "name": np.asarray(cols["name"]),
            "annot": np.asarray(cols["annot"], np.int64)}


def build_eft(source: Any, raw_dir: Path, splits: list[str], body: Any, cfg: Any = None,
              progress: bool = True) -> dict[str, SplitArrays]:
    """Read EFT fits per split; see the module docstring."""
    image_dir = os.path.join(str(source.image_root or raw_dir), source.image_subdir)
    out = {}
    for split in splits:
        parts = [read_eft_json(raw_dir / name) for name in source.splits[split]]
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        rows = stride_rows(len(cat["rot"]), source.frame_stride, source.max_samples)
        cat = {k: v[rows] for k, v in cat.items()}
        aa = matrix_to_axis_angle_np(cat["rot"]).astype(np.float32)   # (N,24,3)
        go, bp = aa[:, 0], aa[:, 1:]
        betas = cat["betas"].astype(np.float32)
        arrays = {"poses/global_orient": go, "poses/body_pose": bp, "poses/betas": betas,
                  "joints": compute_joints(body, go, bp, betas, progress=progress),
                  "image_pose/global_orient": go,
                  "image_paths": [os.path.join(image_dir, n) for n in cat["name"]],
                  "meta/weak_cam": cat["cam"].astype(np.float32),
                  "meta/bbox_center": cat["center"], "meta/bbox_scale": cat["scale"],
                  "meta/annot_id": cat["annot"]}
        out[split] = SplitArrays(arrays, params={"frame": "camera"})
    return out
