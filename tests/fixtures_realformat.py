"""Tiny fixtures written in each real dataset's own file layout (for converter tests).

Every writer takes a seed, writes a handful of rows and returns what it wrote (the raw
arrays), so a test can compare the converted file against the source values computed
independently. Layouts follow the converters' module docstrings.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = ["random_rotvecs", "write_amass_sequence", "write_amass_tree",
           "write_posescript_release", "write_pw3d_sequence", "write_spin_npz",
           "write_eft_json", "write_llava_json"]


def random_rotvecs(rng: np.random.Generator, shape: tuple, scale: float = 0.5) -> np.ndarray:
    """Small random axis-angle vectors, (*shape, 3) float32."""
    return (rng.normal(size=shape + (3,)) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- AMASS

def write_amass_sequence(path: Path, n_frames: int = 12, fps: float = 60.0, seed: int = 0,
                         width: int = 156) -> dict[str, np.ndarray]:
    """One AMASS SMPL+H G (width 156) or SMPL-X G (165) sequence npz."""
    rng = np.random.default_rng(seed)
    poses = random_rotvecs(rng, (n_frames, width // 3), 0.3).reshape(n_frames, width)
    # AMASS roots stand the body up in a z-up world: +90 deg about x, then a heading about z.
    heading = rng.uniform(-np.pi, np.pi, n_frames)
    root = (Rotation.from_euler("z", heading[:, None]) * Rotation.from_euler("x", np.pi / 2)
            * Rotation.from_rotvec(poses[:, :3] * 0.3))
    poses[:, :3] = root.as_rotvec().astype(np.float32)
    data = {"poses": poses, "trans": rng.normal(size=(n_frames, 3)).astype(np.float32),
            "betas": rng.normal(size=16).astype(np.float32), "gender": np.array("female"),
            "dmpls": np.zeros((n_frames, 8), np.float32)}
    data["mocap_framerate" if width == 156 else "mocap_frame_rate"] = np.array(fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


def write_amass_tree(root: Path, layout: dict[str, int], n_frames: int = 12, fps: float = 60.0,
                     seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``root/<sub>/subject1/seq<k>_poses.npz`` (+ a shape.npz per subject); returns rel path -> data."""
    written = {}
    for s, (sub, n_seq) in enumerate(sorted(layout.items())):
        subject = root / sub / "subject1"
        for k in range(n_seq):
            rel = f"{sub}/subject1/seq{k}_poses.npz"
            written[rel] = write_amass_sequence(root / rel, n_frames, fps, seed=seed + 100 * s + k)
        np.savez(subject / "shape.npz", betas=np.zeros(16), gender=np.array("female"))
    return written


# ----------------------------------------------------------------------------- PoseScript

def write_posescript_release(root: Path, amass_files: dict[str, dict], splits: dict[str, list[int]],
                             human: dict[int, str | list[str]], auto: dict[int, list[str]],
                             seed: int = 0) -> dict[int, list]:
    """PoseScript release files; pose ids 0..P-1 point at random frames of ``amass_files``.

    Returns the id map ``{pose id: ["AMASS", seq, frame]}``.
    """
    rng = np.random.default_rng(seed)
    n_ids = 1 + max(i for ids in splits.values() for i in ids)
    seqs = sorted(amass_files)
    id_map = {}
    for pid in range(n_ids):
        seq = seqs[pid % len(seqs)]
        frame = int(rng.integers(len(amass_files[seq]["poses"])))
        id_map[pid] = ["AMASS", seq, frame]
    root.mkdir(parents=True, exist_ok=True)
    (root / "ids_2_dataset_sequence_and_frame_index_100k.json").write_text(
        json.dumps({str(k): v for k, v in id_map.items()}))
    for split, ids in splits.items():
        (root / f"{split}_ids_100k.json").write_text(json.dumps(ids))
    (root / "posescript_human_6293.json").write_text(json.dumps({str(k): v for k, v in human.items()}))
    (root / "posescript_auto_100k.json").write_text(json.dumps({str(k): v for k, v in auto.items()}))
    return id_map


# ----------------------------------------------------------------------------- 3DPW

def write_pw3d_sequence(path: Path, name: str, n_frames: int = 6, n_actors: int = 2, seed: int = 0,
                        valid: list[np.ndarray] | None = None, betas_dim: int = 10) -> dict:
    """A 3DPW sequence pickle (dict of lists per actor, camera per frame)."""
    rng = np.random.default_rng(seed)
    cam = np.tile(np.eye(4), (n_frames, 1, 1))
    cam[:, :3, :3] = Rotation.from_rotvec(random_rotvecs(rng, (n_frames,), 0.2)).as_matrix()
    cam[:, :3, 3] = rng.normal(size=(n_frames, 3)) * 0.3 + np.array([0.0, 0.0, 4.0])
    data = {
        "sequence": name,
        "poses": [random_rotvecs(rng, (n_frames, 24), 0.3).reshape(n_frames, 72).astype(np.float64)
                  for _ in range(n_actors)],
        "trans": [rng.normal(size=(n_frames, 3)) * 0.5 for _ in range(n_actors)],
        "betas": [rng.normal(size=betas_dim) for _ in range(n_actors)],
        "jointPositions": [rng.normal(size=(n_frames, 72)) * 0.5 for _ in range(n_actors)],
        "cam_poses": cam,
        "cam_intrinsics": np.array([[1961.0, 0, 540.0], [0, 1969.0, 960.0], [0, 0, 1]]),
        "campose_valid": valid if valid is not None else [np.ones(n_frames) for _ in range(n_actors)],
        "img_frame_ids": np.arange(n_frames),
        "genders": ["m"] * n_actors,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(data, fh, protocol=2)
    return data


# ----------------------------------------------------------------------------- SPIN npz

def write_spin_npz(path: Path, n: int = 8, seed: int = 0, has_smpl: np.ndarray | None = None,
                   prefix: str = "images/S1_Walking.54138969", **overrides) -> dict[str, np.ndarray]:
    """A SPIN-style preprocessed npz (imgname, center, scale, pose, shape, S, part[, has_smpl])."""
    rng = np.random.default_rng(seed)
    data = {"imgname": np.array([f"{prefix}_{i:06d}.jpg" for i in range(n)]),
            "center": rng.uniform(200, 800, (n, 2)), "scale": rng.uniform(0.8, 2.0, n),
            "pose": random_rotvecs(rng, (n, 24), 0.3).reshape(n, 72).astype(np.float64),
            "shape": rng.normal(size=(n, 10)),
            "S": np.concatenate([rng.normal(size=(n, 24, 3)), np.ones((n, 24, 1))], -1),
            "part": np.concatenate([rng.uniform(0, 1000, (n, 24, 2)), np.ones((n, 24, 1))], -1)}
    if has_smpl is not None:
        data["has_smpl"] = has_smpl
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


# ----------------------------------------------------------------------------- EFT

def write_eft_json(path: Path, n: int = 5, seed: int = 0, coco: bool = True) -> dict:
    """An EFT fitting json: {'ver', 'data': [{parm_pose 24x3x3, parm_shape, parm_cam, ...}]}."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        rot = Rotation.from_rotvec(random_rotvecs(rng, (24,), 0.5)).as_matrix()
        item = {"parm_pose": rot.tolist(), "parm_shape": rng.normal(size=10).tolist(),
                "parm_cam": [0.9, 0.01 * i, -0.02], "bbox_scale": 1.5 + 0.1 * i,
                "bbox_center": [320.0 + i, 240.0 - i],
                "joint_validity_openpose18": [1] * 18, "smpltype": "smpl",
                "imageName": f"COCO_train2014_{i:012d}.jpg"}
        if coco:
            item["annotId"] = 1000 + i
        items.append(item)
    data = {"ver": 0.1, "data": items}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


# ----------------------------------------------------------------------------- BEDLAM-Script


def write_llava_json(path: Path, conversations: list[dict]) -> list[dict]:
    """llava_instruct_150k.json: a list of {id, image, conversations}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(conversations))
    return conversations
