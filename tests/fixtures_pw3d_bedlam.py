"""Fixtures in the real 3DPW / BEDLAM file layouts that exercise issue #15's pairing and
camera-offset conventions (kept apart from fixtures_realformat.py).

3DPW: the released sequence pickles hold ``poses``/``trans``/``cam_poses`` at the IMAGE rate
(row i <-> imageFiles/<seq>/image_{i:05d}.jpg) plus ``poses_60Hz``/``trans_60Hz`` and
``img_frame_ids``, the index of each image frame into the 60 Hz arrays.
BEDLAM: processed label npz files (pixelite1201/BEDLAM data_processing/df_full_body.py) hold
``trans_cam`` WITHOUT the camera offset, which sits in ``cam_ext[:, :3, 3]``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = ["write_pw3d_sequence_60hz", "write_bedlam_labels"]


def _rotvecs(rng: np.random.Generator, shape: tuple, scale: float) -> np.ndarray:
    return (rng.normal(size=shape + (3,)) * scale).astype(np.float32)


def write_pw3d_sequence_60hz(path: Path, name: str, n_frames: int = 5, n_actors: int = 1,
                             seed: int = 0, offset: int = 3) -> dict:
    """A 3DPW pickle whose ``img_frame_ids`` (= offset + 2*i, into the 60 Hz arrays) differ
    from ``arange(n_frames)``; ``poses``/``trans`` are the 60 Hz rows at those ids."""
    rng = np.random.default_rng(seed)
    ids = offset + 2 * np.arange(n_frames)
    n60 = int(ids[-1]) + 4
    poses60 = [_rotvecs(rng, (n60, 24), 0.3).reshape(n60, 72).astype(np.float64)
               for _ in range(n_actors)]
    trans60 = [rng.normal(size=(n60, 3)) * 0.5 for _ in range(n_actors)]
    cam = np.tile(np.eye(4), (n_frames, 1, 1))
    cam[:, :3, :3] = Rotation.from_rotvec(_rotvecs(rng, (n_frames,), 0.2)).as_matrix()
    cam[:, :3, 3] = rng.normal(size=(n_frames, 3)) * 0.3 + np.array([0.0, 0.0, 4.0])
    data = {
        "sequence": name,
        "poses": [p[ids] for p in poses60],
        "trans": [t[ids] for t in trans60],
        "poses_60Hz": poses60,
        "trans_60Hz": trans60,
        "betas": [rng.normal(size=(10, 1)) for _ in range(n_actors)],
        "jointPositions": [rng.normal(size=(n_frames, 72)) * 0.5 for _ in range(n_actors)],
        "poses2d": [rng.uniform(0, 1000, (n_frames, 3, 18)) for _ in range(n_actors)],
        "cam_poses": cam,
        "cam_intrinsics": np.array([[1961.0, 0, 540.0], [0, 1969.0, 960.0], [0, 0, 1]]),
        "campose_valid": [np.ones(n_frames) for _ in range(n_actors)],
        "img_frame_ids": ids,
        "genders": ["m"] * n_actors,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(data, fh, protocol=2)
    return data


def write_bedlam_labels(root: Path, split_name: str, scenes: dict[str, int],
                        captions: dict[str, str | list[str]], seed: int = 0,
                        with_cam_ext: bool = True) -> dict[str, dict]:
    """labels/<split>/<scene>.npz in the BEDLAM processed-label layout (with a camera offset
    ``cam_ext[:, :3, 3]`` of several metres) + captions/<split>.json."""
    rng = np.random.default_rng(seed)
    written = {}
    for s, (scene, n) in enumerate(sorted(scenes.items())):
        K = np.tile(np.array([[1500.0, 0, 640], [0, 1500.0, 360], [0, 0, 1]]), (n, 1, 1))
        cam_ext = np.tile(np.eye(4), (n, 1, 1))
        cam_ext[:, :3, :3] = Rotation.from_rotvec(_rotvecs(rng, (n,), 0.2)).as_matrix()
        cam_ext[:, :3, 3] = rng.normal(size=(n, 3)) * 0.5 + np.array([0.3, 1.2, 5.0])
        data = {"imgname": np.array([f"{scene}/png/seq_{s:06d}/seq_{s:06d}_{i:04d}.png"
                                     for i in range(n)]),
                "pose_cam": _rotvecs(rng, (n, 55), 0.3).reshape(n, 165),
                "pose_world": _rotvecs(rng, (n, 55), 0.3).reshape(n, 165),
                "shape": rng.normal(size=(n, 11)),
                "trans_cam": rng.normal(size=(n, 3)) * 0.2,
                "trans_world": rng.normal(size=(n, 3)),
                "cam_int": K, "cam_ext": cam_ext,
                "center": rng.uniform(100, 500, (n, 2)), "scale": np.ones(n),
                "gender": np.array(["male"] * n)}
        if not with_cam_ext:
            del data["cam_ext"]
        path = root / "labels" / split_name / f"{scene}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **data)
        written[f"{scene}.npz"] = data
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"{split_name}.json").write_text(json.dumps(captions))
    return written
