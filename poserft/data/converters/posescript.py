"""PoseScript (captions) joined with AMASS (poses) -> text/pose split files.

Raw layout (PoseScript release v2, unpacked into ``root``; file names as read by the
official text2pose code)::

    ids_2_dataset_sequence_and_frame_index_100k.json  {"<pose id>": ["AMASS", "<seq path
                                                        relative to the AMASS root>", frame]}
    {train,val,test}_ids_100k.json                    [pose id, ...]
    posescript_human_6293.json                        {"<pose id>": caption | [captions]}
    posescript_auto_100k.json                         {"<pose id>": [captions]}  (automatic)

Each split lists pose ids; a pose's captions are the union over ``caption_files``. The
pose is frame ``frame`` of the AMASS sequence (poses (T,156), trans, betas), converted
like the AMASS converter does (y-up, SMPL joints) and, by default, with the root heading
removed as PoseScript does. Captions are flattened to ``/captions/text`` with
``/captions/pose_index``; ``/meta/posescript_id`` keeps the PoseScript pose id.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from poserft.data.converters.amass import amass_to_canonical, read_amass_sequence
from poserft.data.converters.common import ConversionError, SplitArrays, compute_joints

__all__ = ["build_posescript", "read_json", "load_captions", "ID_MAP_FILE", "SPLIT_FILE"]

log = logging.getLogger(__name__)

ID_MAP_FILE = "ids_2_dataset_sequence_and_frame_index_100k.json"
SPLIT_FILE = "{}_ids_100k.json"


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConversionError(path, "/", "file does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConversionError(path, "/", f"invalid JSON ({exc})") from None


def load_captions(paths: list[Path]) -> dict[int, list[str]]:
    """Union of caption files: pose id -> captions (a str value counts as one caption).

    Empty (or whitespace-only) captions are dropped, with one logged warning per file
    giving their count and the first pose ids that have them; a pose left without any
    caption is then dropped from its split when ``drop_uncaptioned`` is on.
    """
    captions: dict[int, list[str]] = {}
    for path in paths:
        empty_ids: list[int] = []
        n_empty = 0
        data = read_json(path)
        if not isinstance(data, dict):
            raise ConversionError(path, "/", "expected an object {pose id: caption(s)}")
        for key, value in data.items():
            texts = [value] if isinstance(value, str) else value
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ConversionError(path, str(key), "caption must be a string or a list of strings")
            try:
                pid = int(key)
            except ValueError:
                raise ConversionError(path, str(key), "pose id is not an integer") from None
            kept = [t.strip() for t in texts if t.strip()]
            if len(kept) < len(texts):
                n_empty += len(texts) - len(kept)
                empty_ids.append(pid)
            captions.setdefault(pid, []).extend(kept)
        if n_empty:
            shown = ", ".join(map(str, empty_ids[:5])) + (", ..." if len(empty_ids) > 5 else "")
            log.warning("%s: %d empty caption(s) dropped (pose ids %s); a pose left without any "
                        "caption is dropped from its split (drop_uncaptioned)", path, n_empty, shown)
    return captions


def _pose_location(id_map: dict, pid: int, file: Path) -> tuple[str, int]:
    entry = id_map.get(str(pid))
    if entry is None:
        raise ConversionError(file, str(pid), f"pose id of the split has no entry in {ID_MAP_FILE}")
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], str)
            and isinstance(entry[2], int)):
        raise ConversionError(file, str(pid), f"expected [dataset, sequence path, frame], got {entry!r}")
    if entry[0] != "AMASS":
        raise ConversionError(file, str(pid), f"poses from {entry[0]!r} are not supported (AMASS only)")
    return entry[1], entry[2]


def sequence_path(amass_root: Path, seq: str) -> Path:
    """The AMASS file of PoseScript's sequence ``seq``. The id map names sub-datasets as the
    older SMPL+H G release did (``BioMotionLab_NTroje/...``); an unpacked newer release
    (``BMLrub/...``) is found under its own folder name
    (:func:`poserft.data.converters.amass.find_subdataset`)."""
    from poserft.data.converters.amass import find_subdataset
    path = Path(amass_root) / seq
    if path.is_file():
        return path
    first, _, rest = seq.replace("\\", "/").partition("/")
    folder = find_subdataset(Path(amass_root), first) if rest else None
    return folder / rest if folder is not None else path


def build_posescript(source: Any, raw_dir: Path, splits: list[str], body: Any, cfg: Any = None,
                     progress: bool = True) -> dict[str, SplitArrays]:
    """Join PoseScript captions to AMASS poses per split; see the module docstring."""
    amass_root = Path(source.amass_root or (cfg.root_of("amass") if cfg is not None else ""))
    id_file = raw_dir / ID_MAP_FILE
    id_map = read_json(id_file)
    if not isinstance(id_map, dict):
        raise ConversionError(id_file, "/", "expected an object {pose id: [dataset, sequence, frame]}")
    captions = load_captions([raw_dir / f for f in source.caption_files])
    sequences: dict[str, dict] = {}  # seq path -> read_amass_sequence (shared by splits)

    out = {}
    for split in splits:
        ids: list[int] = []
        for name in source.splits[split]:
            split_file = raw_dir / SPLIT_FILE.format(name)
            listed = read_json(split_file)
            if not isinstance(listed, list) or not all(isinstance(i, int) for i in listed):
                raise ConversionError(split_file, "/", "expected a list of integer pose ids")
            ids.extend(listed)
        kept = [pid for pid in ids if captions.get(pid) or not source.drop_uncaptioned]
        if source.max_samples:
            kept = kept[: source.max_samples]
        if not kept:
            raise ConversionError(raw_dir, f"splits.{split}", "no pose of this split has a caption "
                                  f"in {source.caption_files}")
        # Read rows grouped by sequence (one file read per sequence), then restore split order.
        by_seq: dict[str, list[tuple[int, int]]] = {}
        for row, pid in enumerate(kept):
            seq, frame = _pose_location(id_map, pid, id_file)
            by_seq.setdefault(seq, []).append((row, frame))
        n = len(kept)
        go = np.zeros((n, 3), np.float32)
        bp = np.zeros((n, 23, 3), np.float32)
        betas = np.zeros((n, 10), np.float32)
        transl = np.zeros((n, 3), np.float32)
        seq_of_row = [""] * n
        frame_of_row = np.zeros(n, np.int64)
        for seq, items in tqdm(sorted(by_seq.items()), desc=f"posescript/{split}",
                               disable=not progress, leave=False):
            path = sequence_path(amass_root, seq)
            if seq not in sequences:
                if not path.is_file():
                    raise ConversionError(path, "amass_root", "AMASS sequence named by PoseScript "
                                          "is missing; set datasets.posescript.amass_root to the "
                                          "AMASS SMPL+H G root")
                sequences[seq] = read_amass_sequence(path)
            data = sequences[seq]
            rows = np.array([r for r, _ in items])
            frames = np.array([f for _, f in items])
            if frames.max() >= len(data["poses"]) or frames.min() < 0:
                raise ConversionError(path, "poses", f"PoseScript frame {int(frames.max())} out of "
                                                     f"range for {len(data['poses'])} frames")
            canon = amass_to_canonical(data["poses"][frames], data["trans"][frames], data["betas"],
                                       body, source.remove_root_yaw)
            go[rows], bp[rows] = canon["global_orient"], canon["body_pose"]
            betas[rows], transl[rows] = canon["betas"], canon["transl"]
            for r, f in items:
                seq_of_row[r], frame_of_row[r] = seq, f
        text, pose_index = [], []
        for row, pid in enumerate(kept):
            for caption in captions.get(pid, []):
                text.append(caption)
                pose_index.append(row)
        arrays = {"poses/global_orient": go, "poses/body_pose": bp, "poses/betas": betas,
                  "poses/transl": transl,
                  "joints": compute_joints(body, go, bp, betas, transl, progress=progress),
                  "captions/text": text, "captions/pose_index": np.asarray(pose_index, np.int64),
                  "meta/posescript_id": np.asarray(kept, np.int64),
                  "meta/sequence": seq_of_row, "meta/frame": frame_of_row}
        out[split] = SplitArrays(arrays, params={"amass_root": str(amass_root)},
                                 stats={"n_captions": len(text),
                                        "n_dropped_uncaptioned": len(ids) - len(kept)
                                        if not source.max_samples else 0})
    return out
