"""LLaVA-Instruct-150K conversations -> VQA-only split files (no poses).

Raw layout (``root``)::

    llava_instruct_150k.json  [{"id": "000000033471",
                                "image": "000000033471.jpg",          (COCO train2017)
                                "conversations": [{"from": "human", "value": "<image>\\nWhat ..."},
                                                  {"from": "gpt", "value": "..."}, ...]}, ...]

Every human turn followed by a gpt turn becomes one VQA row: ``/vqa/question`` (the
``<image>`` placeholder removed: the model's prompt builder inserts its own image token),
``/vqa/answer``, ``/vqa/image_paths`` (``<image_root>/<image_subdir>/<image>``) and
``/vqa/conversation_index`` (rows of one conversation share it, turn order kept).

Schema: a VQA-only file has N = 0 pose rows (the required pose datasets are written with
zero rows) and Q VQA rows whose images are not pose rows, hence the schema's Q-sized
``vqa/image_paths`` and ``vqa/conversation_index`` and the optional ``vqa/pose_index``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from poserft.data.converters.common import ConversionError, SplitArrays, require
from poserft.data.converters.posescript import read_json

__all__ = ["build_llava", "read_llava_conversations", "IMAGE_TOKEN"]

IMAGE_TOKEN = "<image>"
def _clean_question(text: str) -> str:
    return " ".join(text.replace(IMAGE_TOKEN, " ").split())


def read_llava_conversations(path: Path) -> list[dict[str, Any]]:
    """One LLaVA json -> rows ``{"question", "answer", "image", "conversation"}`` in file order.

    ``conversation`` is the index of the conversation in the file.
    """
    data = read_json(path)
    if not isinstance(data, list):
        raise ConversionError(path, "/", "expected a list of conversations")
    rows = []
    for c, item in enumerate(data):
        where = f"[{c}]"
        if not isinstance(item, dict):
            raise ConversionError(path, where, "expected an object")
        image = require(item, "image", path, f"key of {where}")
        if not isinstance(image, str) or not image:
            raise ConversionError(path, f"{where}.image", "expected a non-empty image file name")
        turns = require(item, "conversations", path, f"key of {where}")
        if not isinstance(turns, list):
            raise ConversionError(path, f"{where}.conversations", "expected a list of turns")
        pending: str | None = None
        for t, turn in enumerate(turns):
            tw = f"{where}.conversations[{t}]"
            if not isinstance(turn, dict):
                raise ConversionError(path, tw, "expected an object {from, value}")
            role = require(turn, "from", path, f"key of {tw}")
            value = require(turn, "value", path, f"key of {tw}")
            if not isinstance(value, str):
                raise ConversionError(path, f"{tw}.value", "expected a string")
            if role == "human":
                pending = _clean_question(value)
            elif role == "gpt":
                if pending is None:
                    raise ConversionError(path, f"{tw}.from", "a 'gpt' turn without a preceding "
                                                              "'human' turn")
                rows.append({"question": pending, "answer": value.strip(), "image": image,
                             "conversation": c})
                pending = None
            else:
                raise ConversionError(path, f"{tw}.from", f"unknown role {role!r} (human|gpt)")
    return rows


def _in_val(image: str, fraction: float) -> bool:
    """Deterministic per-image assignment (hash of the file name), independent of order."""
    h = int.from_bytes(hashlib.sha256(image.encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def build_llava(source: Any, raw_dir: Path, splits: list[str], body: Any = None, cfg: Any = None,
                progress: bool = True) -> dict[str, SplitArrays]:
    """LLaVA conversations per split -> VQA-only arrays; see the module docstring."""
    image_dir = os.path.join(str(source.image_root or raw_dir), source.image_subdir)
    out = {}
    for split in splits:
        derived_val = split == "val" and "val" not in source.splits and source.val_fraction > 0
        names = source.splits["train" if derived_val else split]
        rows, offset = [], 0
        for name in names:
            file_rows = read_llava_conversations(raw_dir / name)
            for r in file_rows:
                r["conversation"] += offset
            offset = 1 + max((r["conversation"] for r in file_rows), default=offset - 1)
            rows.extend(file_rows)
        if source.val_fraction > 0 and "val" not in source.splits and split in ("train", "val"):
            rows = [r for r in rows if _in_val(r["image"], source.val_fraction) == derived_val]
        if source.max_samples:
            rows = rows[: source.max_samples]
        # renumber conversations 0..C-1 in order of appearance
        _, conv = np.unique([r["conversation"] for r in rows], return_inverse=True)
        arrays = {"poses/global_orient": np.zeros((0, 3), np.float32),
                  "poses/body_pose": np.zeros((0, 23, 3), np.float32),
                  "poses/betas": np.zeros((0, 10), np.float32),
                  "joints": np.zeros((0, 24, 3), np.float32),
                  "vqa/question": [r["question"] for r in rows],
                  "vqa/answer": [r["answer"] for r in rows],
                  "vqa/image_paths": [os.path.join(image_dir, r["image"]) for r in rows],
                  "vqa/conversation_index": conv.astype(np.int64).reshape(-1)}
        out[split] = SplitArrays(arrays, stats={"n_vqa": len(rows),
                                                "n_images": len({r["image"] for r in rows})})
    return out
