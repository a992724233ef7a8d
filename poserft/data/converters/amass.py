"""AMASS (SMPL+H G / SMPL-X G npz per sequence) -> pose-only split files.

Raw layout (``root``)::

    <SubDataset>/<subject>/<sequence>_poses.npz    SMPL+H G release
        poses (T,156) axis-angle: root, 21 body joints, 2 x 15 finger joints
        trans (T,3) metres, betas (16,), gender, mocap_framerate
    <SubDataset>/<subject>/<sequence>_stageii.npz  SMPL-X G release (also accepted)
        poses (T,165), trans, betas, mocap_frame_rate
    <SubDataset>/<subject>/shape.npz               betas only: skipped

Each sequence is resampled to ``target_fps``; the 22 shared body joints become SMPL's
(SMPL hand joints 22, 23 zero), betas are cut to 10, and the z-up AMASS world is rotated
to our y-up frame (see ``common``), optionally removing the root heading. The sequence
path and original frame index of every row are kept in ``/meta/sequence`` and
``/meta/frame``.

Sub-dataset folder names differ between AMASS releases (the SMPL+H G archives that
PoseScript's id map and the AMASS paper / VPoser split name, e.g. ``BioMotionLab_NTroje``,
``MPI_HDM05``; and the current download page, e.g. ``BMLrub``, ``HDM05``). A split may list
either name: :func:`find_subdataset` looks for the listed folder, then for its other
release's names (``AMASS_RELEASE_NAMES``). Listed sub-datasets that are absent under
``root`` (under every alias) are skipped with a logged warning and counted in the split's
``n_missing_subdatasets`` metric (their names are in ``converter_params``); only when *none*
of a split's sub-datasets is present does the conversion fail, with a ConversionError naming
the root and the folder names it looked for.

Empty sequences (``poses`` with 0 frames, e.g. from a failed export or unpack) are
skipped, each with a logged warning naming the file, and counted in the split's
``n_empty_sequences`` metric: one bad take should not stop a conversion of thousands.
Only when *no* frame at all is left in a split does the conversion fail, with a
ConversionError naming the empty files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from poserft.data.converters.common import (
    ZUP_TO_YUP, ConversionError, SplitArrays, checked_array, compute_joints, fit_betas,
    load_npz, pelvis_rest_positions, remove_root_yaw, require, rotate_world,
    smpl_family_to_smpl, subsample_by_fps)

__all__ = ["build_amass", "read_amass_sequence", "amass_to_canonical", "list_sequences",
           "AMASS_RELEASE_NAMES", "subdataset_aliases", "find_subdataset"]

log = logging.getLogger(__name__)

_FPS_KEYS = ("mocap_framerate", "mocap_frame_rate")

# Sub-dataset folder names of the two AMASS releases: (older SMPL+H G name, used by
# PoseScript's id map, BABEL and the AMASS/VPoser split) -> (current download-page name).
# Sources: BABEL's AMASS loaders (``ddir_map = {'BioMotionLab_NTroje': 'BMLrub',
# 'DFaust_67': 'DFaust'}``) and NVlabs/ProtoMotions
# data/scripts/create_motion_fps_yaml.py (``SMPL_DATASETS_NAME_DICT``: MPI_HDM05 -> HDM05,
# MPI_mosh -> MoSh, MPI_Limits -> PosePrior, SSM_synced -> SSM, Transitions_mocap ->
# Transitions, TCD_handMocap -> TCDHands, DFaust_67 -> DFaust; ACCAD, BMLmovi, CMU, EKUT,
# Eyes_Japan_Dataset, HumanEva, KIT, SFU, TotalCapture unchanged), several public BABEL
# converters agreeing; some SMPL-X G archives unpack Eyes_Japan_Dataset as
# ``EyesJapanDataset``, accepted too.
AMASS_RELEASE_NAMES: tuple[tuple[str, ...], ...] = (
    ("BioMotionLab_NTroje", "BMLrub"),
    ("MPI_HDM05", "HDM05"),
    ("MPI_Limits", "PosePrior"),
    ("MPI_mosh", "MoSh"),
    ("Transitions_mocap", "Transitions"),
    ("SSM_synced", "SSM"),
    ("TCD_handMocap", "TCDHands"),
    ("DFaust_67", "DFaust"),
    ("Eyes_Japan_Dataset", "EyesJapanDataset"),
)
_ALIASES = {name: group for group in AMASS_RELEASE_NAMES for name in group}


def subdataset_aliases(name: str) -> tuple[str, ...]:
    """``name`` first, then its other AMASS release's folder names (``AMASS_RELEASE_NAMES``)."""
    return (name,) + tuple(n for n in _ALIASES.get(name, ()) if n != name)


def find_subdataset(root: Path, name: str) -> Path | None:
    """The folder of sub-dataset ``name`` under ``root`` under any release's name, or None."""
    for alias in subdataset_aliases(name):
        if (Path(root) / alias).is_dir():
            return Path(root) / alias
    return None


def list_sequences(root: Path, subdataset: str) -> list[Path]:
    """Sorted sequence files of one AMASS sub-dataset (``shape.npz`` excluded), found under
    either release's folder name."""
    folder = find_subdataset(root, subdataset)
    if folder is None:
        raise ConversionError(Path(root) / subdataset, "splits",
                              f"AMASS sub-dataset folder is missing under {root} (looked for "
                              f"{' or '.join(subdataset_aliases(subdataset))}); unpack its "
                              f"SMPL+H G archive there or remove '{subdataset}' from the split")
    return sorted(p for p in folder.rglob("*.npz") if p.name != "shape.npz")


def _split_folders(raw_dir: Path, split: str, subs: list[str]) -> tuple[list[Path], list[str]]:
    """Present folders of a split's sub-datasets, and the names of the absent ones.

    Raises ConversionError naming ``raw_dir`` and the names looked for when none is present.
    """
    found, missing = [], []
    for sub in subs:
        folder = find_subdataset(raw_dir, sub)
        if folder is None:
            missing.append(sub)
        else:
            found.append(folder)
    if not found:
        expected = "; ".join(" or ".join(subdataset_aliases(s)) for s in subs)
        raise ConversionError(raw_dir, f"splits.{split}", f"none of the AMASS sub-dataset "
                              f"folders of split {split!r} is under this root (expected at "
                              f"least one of: {expected}); unpack the sub-datasets' SMPL+H G "
                              "archives there or fix datasets.amass.root / splits")
    if missing:
        log.warning("AMASS split %r: sub-datasets %s are not under %s (looked for %s); "
                    "converting the %d present one(s): %s", split, missing, raw_dir,
                    "; ".join(" or ".join(subdataset_aliases(s)) for s in missing),
                    len(found), [f.name for f in found])
    return found, missing


def read_amass_sequence(path: Path) -> dict[str, Any]:
    """One AMASS npz -> ``{"poses" (T,W), "trans" (T,3), "betas" (B,), "fps" float}``, checked."""
    data = load_npz(path, ("poses", "trans", "betas") + _FPS_KEYS)
    poses = np.asarray(require(data, "poses", path))
    if poses.ndim != 2 or poses.shape[1] not in (156, 165):
        raise ConversionError(path, "poses", f"shape {poses.shape} != expected (T, 156) "
                                             "(SMPL+H) or (T, 165) (SMPL-X)")
    poses = checked_array(poses, path, "poses", (None, poses.shape[1]))
    trans = checked_array(require(data, "trans", path), path, "trans", (len(poses), 3))
    betas = checked_array(require(data, "betas", path), path, "betas", (None,))
    fps_key = next((k for k in _FPS_KEYS if k in data), _FPS_KEYS[0])
    fps = float(checked_array(require(data, fps_key, path), path, fps_key, ()))
    if fps <= 0:
        raise ConversionError(path, fps_key, f"frame rate must be positive, got {fps}")
    return {"poses": poses, "trans": trans, "betas": betas, "fps": fps}


def amass_to_canonical(poses: np.ndarray, trans: np.ndarray, betas: np.ndarray, body: Any,
                       remove_yaw: bool) -> dict[str, np.ndarray]:
    """AMASS rows (z-up) -> canonical SMPL rows (y-up).

    poses (T,156|165), trans (T,3), betas (B,) -> global_orient (T,3), body_pose (T,23,3),
    betas (T,10), transl (T,3); the body's joints are the AMASS joints rotated by ZUP_TO_YUP
    (then about the vertical axis per row when ``remove_yaw``).
    """
    go, bp = smpl_family_to_smpl(poses)
    b10 = np.repeat(fit_betas(betas)[None], len(go), axis=0)
    pelvis = pelvis_rest_positions(body, b10[:1])[0] if len(go) else np.zeros(3)
    go, tr = rotate_world(go, trans, ZUP_TO_YUP, pelvis)
    if remove_yaw and len(go):
        go, tr, _ = remove_root_yaw(go, tr, pelvis)
    return {"global_orient": go, "body_pose": bp, "betas": b10, "transl": tr}


def build_amass(source: Any, raw_dir: Path, splits: list[str], body: Any, cfg: Any = None,
                progress: bool = True) -> dict[str, SplitArrays]:
    """Read the AMASS sub-datasets of each split; see the module docstring."""
    out = {}
    for split in splits:
        rows: dict[str, list[np.ndarray]] = {k: [] for k in ("global_orient", "body_pose", "betas", "transl")}
        seq_names: list[str] = []
        frames: list[np.ndarray] = []
        folders, missing = _split_folders(raw_dir, split, list(source.splits[split]))
        files = [p for folder in folders
                 for p in sorted(q for q in folder.rglob("*.npz") if q.name != "shape.npz")]
        if not files:
            raise ConversionError(raw_dir, f"splits.{split}", f"no sequence .npz files under "
                                  f"{[f.name for f in folders]}")
        total = 0
        empty: list[str] = []
        for path in tqdm(files, desc=f"amass/{split}", disable=not progress, leave=False):
            seq = read_amass_sequence(path)
            if len(seq["poses"]) == 0:
                empty.append(os.path.relpath(path, raw_dir))
                log.warning("%s: 'poses': 0 frames; skipping this sequence (split %r). Re-download "
                            "or re-unpack it if it should have frames.", path, split)
                continue
            idx = subsample_by_fps(len(seq["poses"]), seq["fps"], source.target_fps)
            if source.max_samples:
                idx = idx[: max(0, source.max_samples - total)]
            if len(idx) == 0:
                continue
            canon = amass_to_canonical(seq["poses"][idx], seq["trans"][idx], seq["betas"], body,
                                       source.remove_root_yaw)
            for k in rows:
                rows[k].append(canon[k])
            rel = os.path.relpath(path, raw_dir)
            seq_names.extend([rel] * len(idx))
            frames.append(idx)
            total += len(idx)
            if source.max_samples and total >= source.max_samples:
                break
        if not total:
            shown = ", ".join(empty[:5]) + (f", ... ({len(empty)} files)" if len(empty) > 5 else "")
            raise ConversionError(raw_dir / empty[0] if empty else raw_dir, "poses", f"0 frames, as in every sequence of "
                                  f"split {split!r} ({shown}); nothing is left to convert: "
                                  "re-download or re-unpack these sequences, or remove their "
                                  f"sub-dataset from datasets.amass.splits.{split}")
        arrays = {f"poses/{k}": np.concatenate(v) for k, v in rows.items()}
        arrays["joints"] = compute_joints(body, arrays["poses/global_orient"], arrays["poses/body_pose"],
                                          arrays["poses/betas"], arrays["poses/transl"],
                                          progress=progress, desc=f"amass/{split} joints")
        arrays["meta/sequence"] = seq_names
        arrays["meta/frame"] = np.concatenate(frames).astype(np.int64)
        out[split] = SplitArrays(arrays, params={"frame": "y-up (AMASS z-up rotated by -90 deg about x)",
                                         "subdataset_folders": [f.name for f in folders],
                                         "missing_subdatasets": missing},
                                 stats={"n_sequences": len(set(seq_names)),
                                        "n_empty_sequences": len(empty),
                                        "n_missing_subdatasets": len(missing)})
    return out
