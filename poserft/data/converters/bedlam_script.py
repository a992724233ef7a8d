"""BEDLAM-Script (BEDLAM renders + SMPL-X labels + pose captions) -> image/pose/text split files.

No public release layout of BEDLAM-Script could be checked, so poserft ASSUMES this one
(built from BEDLAM's processed per-scene label npz files plus one caption file per split)::

    labels/<split name>/<scene>.npz   BEDLAM processed labels, N person crops:
        imgname   (N,)      image path relative to the image folder
        pose_cam  (N,165)   SMPL-X axis-angle (55 joints), root in the CAMERA frame
        shape     (N,>=10)  SMPL-X betas (first 10 used)
        trans_cam (N,3)     SMPL-X translation, camera-ROTATED but without the camera offset
        cam_ext   (N,4,4)   extrinsics; cam_ext[:3, 3] is the offset to add to trans_cam
        cam_int   (N,3,3)   intrinsics
    captions/<split name>.json        {"<scene>.npz:<row>": caption | [captions]}
    images/<imgname>                  (or under `image_root`)

The full camera-frame translation is ``trans_cam + cam_ext[:3, 3]`` (stored as
``/poses/transl``; ``/joints`` and ``/keypoints2d`` use it). Verified against BEDLAM's own
code (pixelite1201/BEDLAM): data_processing/df_full_body.py writes
``cam_ext_[:, 3] = cam_ext_trans`` (camera offset ``cam_trans``), ``trans_cam.append(c_trans)``
and projects the label joints with ``project(joints3d, torch.tensor(cam_trans), CAM_INT)``,
where ``project`` starts with ``points = points + cam_trans``; train/dataset/dataset.py
builds the training translation as ``item['translation'] = self.cam_ext[index][:, 3]`` then
``item['translation'][:3] += self.trans_cam[index]``. ``pose_cam`` already carries the
camera rotation, so ``cam_ext[:3, :3]`` is not applied again.

SMPL-X shares joints 0..21 with SMPL (SMPL hand joints 22, 23 set to zero); SMPL-X betas
are used as SMPL betas, an approximation (different shape spaces) that only affects
``/joints``. Everything is in the camera frame: ``/camera`` holds K with R = I, t = 0, and
``/keypoints2d`` are our body model's joints projected with K.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from poserft.data.converters.common import (
    ConversionError, SplitArrays, checked_array, compute_joints, fit_betas, load_npz, require,
    smpl_family_to_smpl)
from poserft.data.converters.posescript import read_json
from poserft.data.converters.pw3d import project_points

__all__ = ["build_bedlam_script", "read_bedlam_labels"]


def read_bedlam_labels(path: Path) -> dict[str, np.ndarray]:
    """One BEDLAM label npz -> checked arrays."""
    data = load_npz(path, ("imgname", "pose_cam", "shape", "trans_cam", "cam_ext", "cam_int"))
    names = np.asarray(require(data, "imgname", path))
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise ConversionError(path, "imgname", f"expected (N,) strings, got {names.dtype} {names.shape}")
    n = len(names)
    shape = checked_array(require(data, "shape", path), path, "shape", (n, None))
    if shape.shape[1] < 10:
        raise ConversionError(path, "shape", f"need at least 10 betas, got {shape.shape[1]}")
    trans_cam = checked_array(require(data, "trans_cam", path), path, "trans_cam", (n, 3))
    cam_ext = checked_array(require(data, "cam_ext", path), path, "cam_ext", (n, 4, 4))
    return {"imgname": names.astype(str),
            "pose": checked_array(require(data, "pose_cam", path), path, "pose_cam", (n, 165)),
            "betas": fit_betas(shape),
            # full camera-frame translation = trans_cam + camera offset (module docstring)
            "transl": (trans_cam + cam_ext[:, :3, 3]).astype(trans_cam.dtype),
            "K": checked_array(require(data, "cam_int", path), path, "cam_int", (n, 3, 3))}


def build_bedlam_script(source: Any, raw_dir: Path, splits: list[str], body: Any, cfg: Any = None,
                        progress: bool = True) -> dict[str, SplitArrays]:
    """Read BEDLAM-Script labels and captions per split; see the module docstring."""
    image_root = str(source.image_root or raw_dir / "images")
    out = {}
    for split in splits:
        parts, keys, texts_by_key = [], [], {}
        for name in source.splits[split]:
            label_dir = raw_dir / "labels" / name
            files = sorted(label_dir.glob("*.npz"))
            if not files:
                raise ConversionError(label_dir, f"splits.{split}", "no label .npz files")
            for f in files:
                part = read_bedlam_labels(f)
                parts.append(part)
                keys.extend(f"{f.name}:{row}" for row in range(len(part["imgname"])))
            cap_file = raw_dir / "captions" / f"{name}.json"
            captions = read_json(cap_file)
            if not isinstance(captions, dict):
                raise ConversionError(cap_file, "/", "expected {'<scene>.npz:<row>': caption(s)}")
            for key, value in captions.items():
                texts = [value] if isinstance(value, str) else value
                if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                    raise ConversionError(cap_file, key, "caption must be a string or a list of strings")
                texts_by_key.setdefault(key, []).extend(texts)
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        row_of_key = {k: i for i, k in enumerate(keys)}
        unknown = sorted(set(texts_by_key) - set(row_of_key))
        if unknown:
            raise ConversionError(raw_dir / "captions", unknown[0], "caption key names no label row "
                                  "('<scene>.npz:<row>' with a scene of this split and row < N)")
        n = len(keys) if not source.max_samples else min(len(keys), source.max_samples)
        cat = {k: v[:n] for k, v in cat.items()}
        text, pose_index = [], []
        for key, texts in sorted(texts_by_key.items(), key=lambda kv: row_of_key[kv[0]]):
            if row_of_key[key] < n:
                text.extend(texts)
                pose_index.extend([row_of_key[key]] * len(texts))
        go, bp = smpl_family_to_smpl(cat["pose"])
        joints = compute_joints(body, go, bp, cat["betas"], cat["transl"], progress=progress)
        eye = np.repeat(np.eye(3, dtype=np.float32)[None], n, axis=0)
        zeros = np.zeros((n, 3), np.float32)
        arrays = {"poses/global_orient": go, "poses/body_pose": bp, "poses/betas": cat["betas"],
                  "poses/transl": cat["transl"], "joints": joints,
                  "camera/K": cat["K"], "camera/R": eye, "camera/t": zeros,
                  "image_pose/global_orient": go,
                  "keypoints2d": project_points(joints, cat["K"], eye, zeros),
                  "image_paths": [os.path.join(image_root, s) for s in cat["imgname"]],
                  "captions/text": text, "captions/pose_index": np.asarray(pose_index, np.int64),
                  "meta/label_key": keys[:n]}
        out[split] = SplitArrays(arrays, params={"frame": "camera",
                                                 "layout": "assumed (see converters/bedlam_script.py)"},
                                 stats={"n_captions": len(text),
                                        "n_uncaptioned": n - len(set(pose_index))})
    return out
