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

Rows without SMPL parameters (``has_smpl`` 0) are dropped (our files need a pose per row);
every ``frame_stride``-th remaining row is kept.

A file with no ``pose``/``shape`` at all, such as SPIN's ``h36m_valid_protocol2.npz``
(``imgname``, ``center``, ``scale``, ``S`` only), is an *evaluation* file: it needs ``S``,
all its rows are kept (no ``frame_stride``: the file already is the benchmark's frame
selection, and scores are comparable only on all of it), and since the split schema requires a
pose per row they get rest-pose placeholders (zero axis-angle and betas, ``/joints`` the
body model's rest joints, so ``/joints`` stays the model's joints of ``/poses``), flagged by
``/meta/has_smpl`` = 0. Image->pose evaluation scores such rows against ``S``
(``/meta/gt_joints3d_spin24``), see :func:`poserft.eval.runner.image2pose_targets`.
``/meta/has_smpl`` is written only for splits with such rows. Poses are in the camera frame, so
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
    """One SPIN-style npz -> checked arrays (optional keys only when present).

    A file without ``pose`` (an evaluation file) must have ``S``; it is returned without
    ``pose``/``shape`` and with ``has_smpl`` all False.
    """
    data = load_npz(path, _KEYS)
    fitted = "pose" in data
    if not fitted and "S" not in data:
        raise ConversionError(path, "pose", "neither SMPL parameters nor 3D joints in this file "
                              f"(available: {data.available}); poserft split files need a SMPL "
                              "pose ('pose', 'shape') or, for evaluation files, the 3D joints "
                              "'S' per row")
    names = np.asarray(require(data, "imgname", path))
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise ConversionError(path, "imgname", f"expected (N,) strings, got {names.dtype} {names.shape}")
    n = len(names)
    out = {"imgname": names.astype(str),
           "center": checked_array(require(data, "center", path), path, "center", (n, 2)),
           "scale": checked_array(require(data, "scale", path), path, "scale", (n,))}
    if fitted:
        out["pose"] = checked_array(data["pose"], path, "pose", (n, 72))
        out["shape"] = checked_array(require(data, "shape", path), path, "shape", (n, 10))
    if "S" in data:
        out["S"] = checked_array(data["S"], path, "S", (n, 24, 4))
    if "part" in data:
        out["part"] = checked_array(data["part"], path, "part", (n, 24, 3))
    if not fitted:
        out["has_smpl"] = np.zeros(n, bool)
    else:
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
            if "pose" in data:
                rows = np.flatnonzero(data["has_smpl"])
                dropped += len(data["has_smpl"]) - len(rows)
                rows = rows[stride_rows(len(rows), source.frame_stride)]
            else:                                   # evaluation file: keep every row
                n = len(data["imgname"])
                rows = np.arange(n)
                data["pose"] = np.zeros((n, 72), np.float32)
                data["shape"] = np.zeros((n, 10), np.float32)
            parts.append({k: v[rows] for k, v in data.items()})
        keys = set.intersection(*(set(p) for p in parts))
        cat = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        if source.max_samples:
            cat = {k: v[: source.max_samples] for k, v in cat.items()}
        if len(cat["pose"]) == 0:
            raise ConversionError(raw_dir, f"splits.{split}", f"no row with SMPL parameters in "
                                  f"{source.splits[split]} (has_smpl is 0 everywhere)")
        no_smpl = int((~cat["has_smpl"]).sum())
        if no_smpl and "S" not in cat:
            raise ConversionError(raw_dir, f"splits.{split}", f"{no_smpl} rows without SMPL "
                                  "parameters but not every file of "
                                  f"{source.splits[split]} has the 3D joints 'S' to score them by")
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
        if no_smpl:
            arrays["meta/has_smpl"] = cat["has_smpl"].astype(np.uint8)
        out[split] = SplitArrays(arrays, params={"frame": "camera"},
                                 stats={"n_dropped_without_smpl": dropped,
                                        "n_rows_without_smpl": no_smpl})
    return out
