"""The synthetic embedded world: sample poses -> joints -> captions, VQA, images -> HDF5.

``synthesize(cfg, {"train": p, "val": p, "test": p}, tracker)`` writes one split file per
split in the schema of :mod:`poserft.data.h5io`. Each split draws from its own random
stream (``SeedSequence(seed, spawn_key=(split,))``), so the splits are independent draws
(disjoint poses) and resizing one split leaves the others unchanged.

Poses are stored in the world frame (SMPL canonical, y up) with ``transl`` putting the
lowest joint on the ground plane y = 0; ``joints`` are the body model's joints of exactly
the stored (float32) pose. Images come with the camera (K, R, t world->camera), 2D
keypoints, and the root orientation in the camera frame (``image_pose/global_orient``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm import tqdm

from poserft.data.config import SynthConfig
from poserft.data.h5io import write_split
from poserft.data.synthetic.captioner import caption_poses, value_weights
from poserft.data.synthetic.posecodes import compute_posecodes
from poserft.data.synthetic.renderer import camera_global_orient, project, render, \
    sample_cameras
from poserft.data.synthetic.sampler import POSTURES, sample_poses
from poserft.data.synthetic.vqa import vqa_for_poses

__all__ = ["SPLITS", "GENERATOR_VERSION", "synthesize", "build_split", "pose_joints"]

SPLITS = ("train", "val", "test")
# Bump when the generator changes what it writes for a given config (recorded in the file).
GENERATOR_VERSION = 1


def pose_joints(body, global_orient: np.ndarray, body_pose: np.ndarray,
                transl: np.ndarray | None = None, chunk: int = 4096) -> np.ndarray:
    """Body-model joints (N,24,3) float32 of axis-angle poses, in chunks, no autograd."""
    out = []
    with torch.no_grad():
        for s in range(0, len(global_orient), chunk):
            go = torch.as_tensor(global_orient[s:s + chunk], dtype=torch.float32)
            bp = torch.as_tensor(body_pose[s:s + chunk], dtype=torch.float32)
            tr = None if transl is None else torch.as_tensor(transl[s:s + chunk],
                                                             dtype=torch.float32)
            out.append(body(go, bp, transl=tr).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 24, 3), np.float32)


def build_split(cfg: SynthConfig, split: str, body, progress: bool = True
                ) -> tuple[dict[str, Any], dict[str, float]]:
    """Generate one split in memory: (arrays for write_split, timing stats)."""
    n = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}[split]
    seq = np.random.SeedSequence(cfg.seed, spawn_key=(SPLITS.index(split),))
    rng_pose, rng_text, rng_vqa, rng_cam = (np.random.default_rng(s) for s in seq.spawn(4))
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    poses = sample_poses(n, rng_pose, archetypes=cfg.archetypes, noise_deg=cfg.joint_noise_deg,
                         max_yaw_deg=cfg.max_yaw_deg)
    joints = pose_joints(body, poses.global_orient, poses.body_pose)
    transl = np.zeros((n, 3), np.float32)
    transl[:, 1] = -joints[..., 1].min(axis=1)            # lowest joint on the ground
    joints = pose_joints(body, poses.global_orient, poses.body_pose, transl)
    timing["poses_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    codes = compute_posecodes(joints)
    weights = value_weights(codes)
    texts, cap_index = caption_poses(codes, rng_text, cfg.captions_per_pose,
                                     cfg.min_codes_per_caption, cfg.max_codes_per_caption,
                                     weights)
    items, vqa_index = vqa_for_poses(codes, rng_vqa, cfg.vqa_per_pose, weights)
    timing["text_s"] = time.perf_counter() - t0

    arrays: dict[str, Any] = {
        "poses/global_orient": poses.global_orient,
        "poses/body_pose": poses.body_pose,
        "poses/betas": np.zeros((n, 10), np.float32),
        "poses/transl": transl,
        "joints": joints,
        "captions/text": texts,
        "captions/pose_index": cap_index,
        "meta/posture": list(poses.posture),
        "meta/gesture_left": list(poses.gesture_left),
        "meta/gesture_right": list(poses.gesture_right),
    }
    if cfg.vqa_per_pose > 0:
        arrays["vqa/question"] = [it.question for it in items]
        arrays["vqa/answer"] = [it.answer for it in items]
        arrays["vqa/pose_index"] = vqa_index

    if cfg.render_images:
        t0 = time.perf_counter()
        cams = sample_cameras(joints.astype(np.float64), rng_cam, cfg.image_size,
                              focal_scale=cfg.focal_scale, focal_jitter=cfg.focal_jitter,
                              elevation_deg=(cfg.elevation_min_deg, cfg.elevation_max_deg),
                              fill=(cfg.fill_min, cfg.fill_max))
        images, _ = render(joints.astype(np.float64), cams, cfg.image_size, rng_cam,
                           background_noise=cfg.background_noise, progress=progress)
        uv, _ = project(joints.astype(np.float64), cams)
        arrays.update({
            "images": images, "keypoints2d": uv,
            "camera/K": cams.K, "camera/R": cams.R, "camera/t": cams.t,
            "image_pose/global_orient": camera_global_orient(poses.global_orient, cams),
        })
        timing["render_s"] = time.perf_counter() - t0
    return arrays, timing


def synthesize(cfg: SynthConfig | Mapping[str, Any], out_paths: Mapping[str, str | os.PathLike],
               tracker=None, *, body: Any = None) -> dict[str, Any]:
    """Generate the train/val/test split files of the synthetic world.

    cfg: the ``synth`` section (or its plain dict). out_paths: exactly ``train``, ``val``,
    ``test`` -> .h5 path. tracker: ``poserft.tracking`` tracker or None. body: the ``body``
    section (BodyConfig, dict or None = skeleton) whose model computes the stored joints;
    the sampler's archetypes are tuned on the skeleton, whose rest joints are within 1-2 cm
    of SMPL's.
    Returns stats: per split ``{num_poses, num_captions, num_vqa, bytes, seconds, …}``
    and ``total_seconds``.
    """
    cfg = SynthConfig.expect(cfg, "synthesize: cfg")
    cfg.check("synth")
    unknown = sorted(set(cfg.archetypes) - set(POSTURES))
    if unknown:
        from poserft.configbase import ConfigError
        raise ConfigError(f"synth.archetypes: unknown posture(s) {unknown}; known: "
                          f"{sorted(POSTURES)}")
    if set(out_paths) != set(SPLITS):
        raise ValueError(f"synthesize: out_paths must have exactly the keys {list(SPLITS)}, "
                         f"got {sorted(out_paths)}")
    import poserft.body as body_pkg
    body_model = body_pkg.load(body)

    start = time.perf_counter()
    stats: dict[str, Any] = {}
    for split in tqdm(SPLITS, desc="synthesize", unit="split"):
        t0 = time.perf_counter()
        arrays, timing = build_split(cfg, split, body_model)
        path = Path(out_paths[split])
        attrs = {"source": "synthetic", "split": split, "body_model": body_model.kind,
                 "converter_params": {"synth": cfg.to_dict(),
                                      "generator_version": GENERATOR_VERSION}}
        t1 = time.perf_counter()
        write_split(path, arrays, attrs, compression=cfg.compression)
        timing["write_s"] = time.perf_counter() - t1
        stats[split] = {
            "num_poses": int(len(arrays["joints"])),
            "num_captions": int(len(arrays["captions/text"])),
            "num_vqa": int(len(arrays.get("vqa/question", []))),
            "bytes": int(path.stat().st_size),
            "seconds": time.perf_counter() - t0,
            **timing,
        }
    stats["total_seconds"] = time.perf_counter() - start

    if tracker is not None:
        tracker.log_params({f"synth.{k}": v for k, v in cfg.to_dict().items()})
        tracker.log_metrics({f"{split}.{k}": float(v) for split in SPLITS
                             for k, v in stats[split].items()}
                            | {"total_seconds": stats["total_seconds"]})
    return stats
