"""Torch datasets over split files (each DataLoader worker opens its own HDF5 handle
through :class:`SplitReader`).

The constructor validates the split once (``SplitReader``'s check on open: schema, row
counts, shapes, finite float datasets), so a NaN in ``/joints`` or ``/keypoints2d``, a
``body_pose`` of the wrong shape or a truncated file fails there with a one-line
``DataValidationError`` naming the file, the dataset, the first bad row and the fix,
instead of reaching a batch. Items themselves are read lazily.

* :class:`CaptionPoseDataset` — one item per caption: text, 144-D pose vector, joints.
* :class:`ImagePoseDataset` — one item per pose with an image: image tensor, the pose
  vector in the camera frame, root-relative camera-frame joints, 2D keypoints.
* :class:`VQADataset` — one item per question/answer pair (+ pose vector, optional image).

Pose vectors follow ``poserft.body.smpl_to_vec6d`` (24 joints x 6D, joint 0 = root).
Items are dicts; the default ``collate_fn`` batches tensors and makes lists of strings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from poserft.data.h5io import SplitReader

__all__ = ["CaptionPoseDataset", "ImagePoseDataset", "VQADataset", "pose_vector",
           "image_to_tensor"]


def pose_vector(global_orient: np.ndarray, body_pose: np.ndarray) -> torch.Tensor:
    """Axis-angle (3,), (23,3) -> (144,) float32 6D pose vector."""
    from poserft.body import smpl_to_vec6d
    go = torch.as_tensor(np.asarray(global_orient, np.float32)).reshape(1, 3)
    bp = torch.as_tensor(np.asarray(body_pose, np.float32)).reshape(1, 23, 3)
    return smpl_to_vec6d(go, bp)[0].float()


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8 -> (3,H,W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def _require(reader: SplitReader, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if not reader.has(k)]
    if missing:
        raise KeyError(f"{reader.path}: {what} needs dataset(s) {missing}, which this split "
                       f"file does not have (has: {reader.keys()})")


class _SplitDataset(Dataset):
    def __init__(self, path: str | os.PathLike):
        self.reader = SplitReader(path)

    @property
    def path(self) -> Path:
        return self.reader.path


class CaptionPoseDataset(_SplitDataset):
    """Items: ``{"text": str, "pose": (144,), "joints": (24,3), "pose_index": int,
    "caption_index": int}`` for every caption of the split."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._len: int | None = None

    def __len__(self) -> int:
        if self._len is None:
            _require(self.reader, ("captions/text", "captions/pose_index"), "CaptionPoseDataset")
            self._len = self.reader.num_captions
        return self._len

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.reader
        text = r.captions(i)
        p = int(r.caption_pose_index(i))
        go, bp = r.read("poses/global_orient", p), r.read("poses/body_pose", p)
        return {"text": text, "pose": pose_vector(go, bp),
                "joints": torch.from_numpy(np.asarray(r.joints(p), np.float32)),
                "pose_index": p, "caption_index": int(i)}


class ImagePoseDataset(_SplitDataset):
    """Items: ``{"image": (3,H,W) float in [0,1], "pose": (144,) camera-frame pose vector,
    "joints": (24,3) camera-frame joints relative to the pelvis, "keypoints2d": (24,2)
    (if stored), "pose_index": int}``.

    The camera-frame root orientation is ``image_pose/global_orient`` when stored (then
    joints are rotated by ``R_img_root @ R_root^T``); otherwise the file's poses are taken
    to be in the camera frame already. Images come from ``images`` or, failing that, from
    ``image_paths`` (relative to the split file's folder), resized to ``image_size``.
    """

    def __init__(self, path: str | os.PathLike, image_size: int | None = None):
        super().__init__(path)
        self.image_size = image_size
        self._len: int | None = None

    def __len__(self) -> int:
        if self._len is None:
            if not (self.reader.has("images") or self.reader.has("image_paths")):
                _require(self.reader, ("images",), "ImagePoseDataset")
            self._len = self.reader.num_poses
        return self._len

    def _image(self, i: int) -> np.ndarray:
        r = self.reader
        if r.has("images"):
            image = r.images(i)
        else:
            from PIL import Image
            file = self.path.parent / r.read("image_paths", i)
            with Image.open(file) as im:
                image = np.asarray(im.convert("RGB"))
        if self.image_size and image.shape[:2] != (self.image_size, self.image_size):
            from PIL import Image
            image = np.asarray(Image.fromarray(image).resize(
                (self.image_size, self.image_size), Image.BILINEAR))
        return image

    def __getitem__(self, i: int) -> dict[str, Any]:
        from poserft.body.rotations import axis_angle_to_matrix
        r = self.reader
        go = np.asarray(r.read("poses/global_orient", i), np.float32)
        bp = r.read("poses/body_pose", i)
        joints = torch.from_numpy(np.asarray(r.joints(i), np.float32))
        joints = joints - joints[0]
        if r.has("image_pose/global_orient"):
            go_cam = np.asarray(r.image_global_orient(i), np.float32)
            rot = axis_angle_to_matrix(torch.from_numpy(go_cam)) @ \
                axis_angle_to_matrix(torch.from_numpy(go)).T
            joints = joints @ rot.T
        else:
            go_cam = go
        item = {"image": image_to_tensor(self._image(i)), "pose": pose_vector(go_cam, bp),
                "joints": joints.float(), "pose_index": int(i)}
        if r.has("keypoints2d"):
            item["keypoints2d"] = torch.from_numpy(np.asarray(r.keypoints2d(i), np.float32))
        return item


class VQADataset(_SplitDataset):
    """Items: ``{"question": str, "answer": str, "pose": (144,), "pose_index": int}`` and
    ``"image"`` (3,H,W) when ``with_images`` and the file has images."""

    def __init__(self, path: str | os.PathLike, with_images: bool = False):
        super().__init__(path)
        self.with_images = with_images
        self._len: int | None = None

    def __len__(self) -> int:
        if self._len is None:
            _require(self.reader, ("vqa/question", "vqa/answer", "vqa/pose_index"),
                     "VQADataset")
            if self.with_images:
                _require(self.reader, ("images",), "VQADataset(with_images=True)")
            self._len = self.reader.num_vqa
        return self._len

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.reader
        qa = r.vqa(i)
        p = int(qa["pose_index"])
        item = {"question": qa["question"], "answer": qa["answer"], "pose_index": p,
                "pose": pose_vector(r.read("poses/global_orient", p),
                                    r.read("poses/body_pose", p))}
        if self.with_images:
            item["image"] = image_to_tensor(r.images(p))
        return item
