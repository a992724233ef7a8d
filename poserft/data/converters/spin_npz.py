"""Human3.6M / MPI-INF-3DHP in the SPIN-style preprocessed npz layout -> image/pose split files.

Raw layout (``root``; one npz per source split, as written by SPIN's preprocessing)::

    imgname   (N,)      image path relative to the dataset's image folder
    center    (N,2)     person bounding-box centre (pixels)
    scale     (N,)      box size / 200
    pose      (N,72)    SMPL axis-angle, root in the CAMERA frame
    shape     (N,10)    SMPL betas
    S         (N,24,4)  3D joints (metres) + confidence, SPIN's 24-joint order (optional)
    part      (N,24,3)  2D keypoints (pixels) + confidence, SPIN's 24-joint order (optional)
    has_smpl  (N,)      1 where pose/shape are valid (optional; missing = all valid)

Rows without SMPL parameters are dropped (our files need a pose per row); every
``frame_stride``-th remaining row is kept. Poses are in the camera frame, so
``/image_pose/global_orient`` equals ``/poses/global_orient``. SPIN's joint order is not
SMPL's, so ``S`` and ``part`` are kept as ``/meta/gt_joints3d_spin24`` and
``/meta/keypoints2d_spin24`` (with their confidence column) instead of ``/keypoints2d``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from poserft.data.converters.common import (
    ConversionError, SplitArrays, checked_array, compute_joints, load_npz, require,
    smpl_family_to_smpl, stride_rows)

__all__ = ["build_spin_npz", "read_spin_npz"]

_KEYS = ("imgname", "center", "scale", "pose", "shape", "S", "part", "has_smpl")


def read_spin_npz(path: Path) -> dict[str, np.ndarray]:
    """One SPIN-style npz -> checked arrays (optional keys only when present)."""
    data = load_npz(path, _KEYS)
    if "pose" not in data:
        raise ConversionError(path, "pose", "no SMPL parameters in this file (available: "
                              f"{data.available}); poserft split files need a SMPL pose per "
                              "row: use a file with SPIN/EFT fits ('pose', 'shape')")
    names = np.asarray(require(data, "imgname", path))
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise ConversionError(path, "imgname", f"expected (N,) strings, got {names.dtype} {names.shape}")
    n = len(names)
    out = {"imgname": names.astype(str),
           "pose": checked_array(data["pose"], path, "pose", (n, 72)),
           "shape": checked_array(require(data, "shape", path), path, "shape", (n, 10)),
           "center": checked_array(require(data, "center", path), path, "center", (n, 2)),
           "scale": checked_array(require(data, "scale", path), path, "scale", (n,))}
    if "S" in data:
        out["S"] = checked_array(data["S"], path, "S", (n, 24, 4))
    if "part" in data:
        out["part"] = checked_array(data["part"], path, "part", (n, 24, 3))
    out["has_smpl"] = (checked_array(data["has_smpl"], path, "has_smpl", (n,)) > 0
                       if "has_smpl" in data else np.ones(n, bool))
    return out


def build_spin_npz(source: Any, raw_dir: Path, splits: list[str], body: Any, cfg: Any = None,
                   progress: bool = True) -> dict[str, SplitArrays]:
    """Read SPIN-style npz files per split; see the module docstring."""
    image_root = str(source.image_root or raw_dir)
    out = {}
    for split in splits:
        parts = []
        dropped = 0
        for name in source.splits[split]:
            data = read_spin_npz(raw_dir / name)
            rows = np.flatnonzero(data["has_smpl"])
            dropped += len(data["has_smpl"]) - len(rows)
            rows = rows[stride_rows(len(rows), source.frame_stride)]
            parts.append({k: v[rows] for k, v in data.items() if k != "has_smpl"})
        keys = set.intersection(*(set(p) for p in parts))
        cat = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        if source.max_samples:
            cat = {k: v[: source.max_samples] for k, v in cat.items()}
        if len(cat["pose"]) == 0:
            raise ConversionError(raw_dir, f"splits.{split}", f"no row with SMPL parameters in "
                                  f"{source.splits[split]} (has_smpl is 0 everywhere)")
        go, bp = smpl_family_to_smpl(cat["pose"])
        arrays = {"poses/global_orient": go, "poses/body_pose": bp, "poses/betas": cat["shape"],
                  "joints": compute_joints(body, go, bp, cat["shape"], progress=progress),
                  "image_pose/global_orient": go,
                  "image_paths": [os.path.join(image_root, n) for n in cat["imgname"]],
                  "meta/bbox_center": cat["center"], "meta/bbox_scale": cat["scale"]}
        if "S" in cat:
            arrays["meta/gt_joints3d_spin24"] = cat["S"]
        if "part" in cat:
            arrays["meta/keypoints2d_spin24"] = cat["part"]
        out[split] = SplitArrays(arrays, params={"frame": "camera"},
                                 stats={"n_dropped_without_smpl": dropped})
    return out
