"""3DPW sequence pickles -> image/pose split files.

Raw layout (``root``; the official release, Python-2 pickles read with latin1)::

    sequenceFiles/{train,validation,test}/<sequence>.pkl  dict with
        sequence        str
        poses           list per actor of (T,72) SMPL axis-angle (world frame)
        trans           list per actor of (T,3)
        betas           list per actor of (10,) (some releases: (300,); first 10 used)
        jointPositions  list per actor of (T,72) SMPL joint positions (world, metres)
        cam_poses       (T,4,4) world -> camera extrinsics per image frame
        cam_intrinsics  (3,3)
        campose_valid   list per actor of (T,) 0/1: camera pose aligned for that actor
        img_frame_ids   (T,) index into the 60 Hz ``poses_60Hz``/``trans_60Hz`` (not read)
    imageFiles/<sequence>/image_%05d.jpg

``poses``/``trans``/``cam_poses`` are already at the image frame rate: row ``i`` pairs with
``image_{i:05d}.jpg``. ``img_frame_ids`` is NOT an image file index; the official README
(3DPW readme_and_demo, mirrored e.g. in zhyjiang/mmhuman3d tools/depth_generate/readme.txt)
says "poses: SMPL body poses for each actor aligned with image data (... N = #frames)" and
"img_frame_ids: an index-array to down-sample 60 Hz 3D poses to corresponding image frame
ids", i.e. it maps image frames into ``poses_60Hz``. Public preprocessing names images by
the row index: SPIN (nkolot/SPIN datasets/preprocess/pw3d.py) builds
``'image_%s.jpg' % str(i).zfill(5) for i in range(num_frames)`` with
``num_frames = len(smpl_pose[0])``; VIBE (mkocabas/VIBE lib/data_utils/threedpw_utils.py)
uses ``'image_{:05d}.jpg'.format(i_frame)`` for ``i_frame in range(num_frames)`` with
``num_frames = len(data['img_frame_ids'])``.

One row per (actor, frame) with a valid camera pose, every ``frame_stride``-th frame.
``/poses/*`` stay in 3DPW's world frame (with ``transl``); ``/camera/{K,R,t}`` hold the
intrinsics and the world->camera extrinsics; ``/image_pose/global_orient`` is the root
orientation in the camera frame, R_cam @ R_root; ``/keypoints2d`` are the official joint
positions projected into the image (pixels, SMPL-24 order).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from poserft.data.converters.common import (
    ConversionError, SplitArrays, axis_angle_to_matrix_np, checked_array, compute_joints,
    fit_betas, matrix_to_axis_angle_np, require, smpl_family_to_smpl)

__all__ = ["build_pw3d", "read_pw3d_sequence", "project_points"]


def project_points(points: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """World points (N,J,3) -> pixels (N,J,2) with per-row K (N,3,3), R (N,3,3), t (N,3)."""
    cam = np.einsum("nij,nkj->nki", R, points) + t[:, None, :]
    uvw = np.einsum("nij,nkj->nki", K, cam)
    return (uvw[..., :2] / uvw[..., 2:3]).astype(np.float32)


def _per_actor(data: dict, key: str, path: Path, n_actors: int) -> list:
    value = require(data, key, path)
    if not isinstance(value, (list, tuple)) or len(value) != n_actors:
        raise ConversionError(path, key, f"expected a list with one entry per actor "
                                         f"({n_actors}), got {type(value).__name__}"
                                         f"{'' if not hasattr(value, '__len__') else ' of length ' + str(len(value))}")
    return list(value)


def read_pw3d_sequence(path: Path) -> dict[str, Any]:
    """One 3DPW pickle -> checked arrays: per-actor lists and per-frame camera data."""
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise ConversionError(path, "/", f"not a readable 3DPW pickle ({exc})") from None
    if not isinstance(data, dict):
        raise ConversionError(path, "/", f"expected a dict, got {type(data).__name__}")
    poses = require(data, "poses", path)
    n_actors = len(poses) if isinstance(poses, (list, tuple)) else 0
    if n_actors == 0:
        raise ConversionError(path, "poses", "expected a non-empty list of (T,72) arrays, one per actor")
    first = np.asarray(poses[0])
    t = first.shape[0] if first.ndim == 2 else -1
    out: dict[str, Any] = {"sequence": str(require(data, "sequence", path))}
    out["poses"] = [checked_array(p, path, f"poses[{a}]", (t, 72))
                    for a, p in enumerate(_per_actor(data, "poses", path, n_actors))]
    out["trans"] = [checked_array(p, path, f"trans[{a}]", (t, 3))
                    for a, p in enumerate(_per_actor(data, "trans", path, n_actors))]
    # betas: (10,), (10,1) or (300,) depending on the release: flatten, keep the first 10.
    out["betas"] = [fit_betas(checked_array(np.ravel(b), path, f"betas[{a}]", (None,)))
                    for a, b in enumerate(_per_actor(data, "betas", path, n_actors))]
    out["joint_positions"] = [checked_array(j, path, f"jointPositions[{a}]", (t, 72)).reshape(t, 24, 3)
                              for a, j in enumerate(_per_actor(data, "jointPositions", path, n_actors))]
    out["valid"] = [checked_array(v, path, f"campose_valid[{a}]", (t,), dtype=np.float32) > 0
                    for a, v in enumerate(_per_actor(data, "campose_valid", path, n_actors))]
    out["cam_poses"] = checked_array(require(data, "cam_poses", path), path, "cam_poses", (t, 4, 4))
    out["K"] = checked_array(require(data, "cam_intrinsics", path), path, "cam_intrinsics", (3, 3))
    return out


def build_pw3d(source: Any, raw_dir: Path, splits: list[str], body: Any, cfg: Any = None,
               progress: bool = True) -> dict[str, SplitArrays]:
    """Read 3DPW sequences per split; see the module docstring."""
    image_root = Path(source.image_root or raw_dir)
    out = {}
    for split in splits:
        files = []
        for folder in source.splits[split]:
            d = raw_dir / "sequenceFiles" / folder
            if not d.is_dir():
                raise ConversionError(d, f"splits.{split}", "3DPW sequence folder is missing; "
                                                            "unpack sequenceFiles.zip into root")
            files.extend(sorted(d.glob("*.pkl")))
        if not files:
            raise ConversionError(raw_dir / "sequenceFiles", f"splits.{split}", "no .pkl sequence files")
        cols: dict[str, list] = {k: [] for k in ("go", "bp", "betas", "transl", "K", "R", "t", "kp",
                                                 "paths", "seq", "frame", "actor")}
        total = 0
        for path in tqdm(files, desc=f"pw3d/{split}", disable=not progress, leave=False):
            seq = read_pw3d_sequence(path)
            for actor, poses in enumerate(seq["poses"]):
                frames = np.flatnonzero(seq["valid"][actor])[:: source.frame_stride]
                if source.max_samples:
                    frames = frames[: max(0, source.max_samples - total)]
                if len(frames) == 0:
                    continue
                total += len(frames)
                go, bp = smpl_family_to_smpl(poses[frames])
                cams = seq["cam_poses"][frames]
                R, t = cams[:, :3, :3], cams[:, :3, 3]
                K = np.repeat(seq["K"][None], len(frames), axis=0)
                cols["go"].append(go)
                cols["bp"].append(bp)
                cols["betas"].append(np.repeat(seq["betas"][actor][None], len(frames), axis=0))
                cols["transl"].append(seq["trans"][actor][frames])
                cols["K"].append(K)
                cols["R"].append(R)
                cols["t"].append(t)
                cols["kp"].append(project_points(seq["joint_positions"][actor][frames], K, R, t))
                # image file = pose row index (see the module docstring; not img_frame_ids)
                cols["paths"].extend(os.path.join(str(image_root), "imageFiles", seq["sequence"],
                                                  f"image_{int(i):05d}.jpg") for i in frames)
                cols["seq"].extend([seq["sequence"]] * len(frames))
                cols["frame"].append(frames)
                cols["actor"].append(np.full(len(frames), actor))
        if total == 0:
            raise ConversionError(raw_dir / "sequenceFiles", f"splits.{split}",
                                  "no frame with a valid camera pose (campose_valid)")
        cat = {k: np.concatenate(v) for k, v in cols.items() if k not in ("paths", "seq")}
        go_cam = matrix_to_axis_angle_np(cat["R"] @ axis_angle_to_matrix_np(cat["go"]))
        arrays = {"poses/global_orient": cat["go"], "poses/body_pose": cat["bp"],
                  "poses/betas": cat["betas"], "poses/transl": cat["transl"],
                  "joints": compute_joints(body, cat["go"], cat["bp"], cat["betas"], cat["transl"],
                                           progress=progress),
                  "camera/K": cat["K"], "camera/R": cat["R"], "camera/t": cat["t"],
                  "image_pose/global_orient": go_cam, "keypoints2d": cat["kp"],
                  "image_paths": cols["paths"], "meta/sequence": cols["seq"],
                  "meta/frame": cat["frame"].astype(np.int64), "meta/actor": cat["actor"].astype(np.int64)}
        out[split] = SplitArrays(arrays, params={"frame": "3DPW world; image_pose in camera frame"},
                                 stats={"n_sequences": len(files)})
    return out
