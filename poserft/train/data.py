"""Supervised task mixing over one HDF5 split (text->pose, image->pose, image->text/VQA).

Every micro-batch is a pure function of ``(seed, step, micro)``: the task of each example
is drawn by the configured weights and the example uniformly within its task, from a
``numpy`` generator seeded by that triple. So a resumed run sees exactly the batches the
uninterrupted run would have seen, with no sampler state to checkpoint, and every rank can
draw its own shard by folding its rank into ``micro``.

Pose targets are 144-D 6D vectors (``poserft.body.smpl_to_vec6d``): text->pose uses
``/poses`` (dataset frame; optionally with the root's yaw removed, since a caption does not
say which way the body faces), image->pose uses the camera-frame root orientation
``/image_pose/global_orient`` when the split has it (the image shows the camera view).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from poserft.model.config import ModelConfig
from poserft.train.config import SFT_TASKS

__all__ = ["Example", "SFTTaskData", "SplitPoses", "TASK_NEEDS"]

log = logging.getLogger(__name__)

# what each task needs in the split file
TASK_NEEDS = {"text2pose": ("captions/text",), "image2pose": ("images",),
              "image2text": ("images", "vqa/question")}
_MAX_INMEMORY_IMAGE_BYTES = 1 << 30


@dataclass(frozen=True)
class SplitPoses:
    """The 6D poses of one split in the frame of each pose task: the targets of SFT and RFT,
    and the train-split mean pose that ``poserft.eval`` reports as the floor.

    Attributes (float32, one row per pose of ``/poses``):
        canonical: (N,144) ``/poses`` (dataset frame).
        text: (N,144) the text->pose frame: canonical, with the root's yaw removed when read
            with ``text2pose_remove_yaw`` (a caption does not say which way the body faces).
        image: (N,144) the image->pose frame: the camera-frame root
            ``/image_pose/global_orient`` when the split has it, else ``canonical``.
        caption_pose: (M,) int64, the pose row of each caption (empty without captions).
    """

    canonical: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor
    caption_pose: np.ndarray

    @classmethod
    def read(cls, reader, text2pose_remove_yaw: bool) -> "SplitPoses":
        """From an open :class:`poserft.data.h5io.SplitReader`."""
        from poserft.body import smpl_to_vec6d
        from poserft.retrieval.features import pose6d_without_root_yaw

        poses = reader.poses()
        go = torch.as_tensor(np.asarray(poses["global_orient"]), dtype=torch.float32)
        bp = torch.as_tensor(np.asarray(poses["body_pose"]), dtype=torch.float32)
        canonical = smpl_to_vec6d(go, bp)                                     # (N,144)
        text = pose6d_without_root_yaw(canonical) if text2pose_remove_yaw else canonical
        if reader.has("image_pose/global_orient"):
            cam = torch.as_tensor(np.asarray(reader.read("image_pose/global_orient")),
                                  dtype=torch.float32)
            image = smpl_to_vec6d(cam, bp)
        else:
            image = canonical
        caption_pose = (np.asarray(reader.read("captions/pose_index"), dtype=np.int64)
                        if reader.has("captions/text") else np.zeros(0, np.int64))
        return cls(canonical, text, image, caption_pose)

    def task_targets(self, task: str) -> torch.Tensor:
        """(n,144) 6D targets of every example of a pose task (text2pose: one per caption;
        image2pose: one per pose row)."""
        if task == "text2pose":
            return self.text[torch.as_tensor(self.caption_pose)]
        if task == "image2pose":
            return self.image
        raise ValueError(f"task_targets: {task!r} has no pose targets")

    def mean_pose6d(self, *tasks: str) -> torch.Tensor:
        """(144,) float32 mean of the targets of ``tasks`` pooled (float32, as the SFT head's
        initial bias has always been computed: SFT is chaotic enough that a 1e-7 change of
        this bias moves a 1500-step run's image PA-MPJPE by several mm, measured).

        A mean of 6D vectors is not itself a rotation; the 6D->rotation map (Gram-Schmidt)
        turns it into the rotation it stands for. The tasks' targets live in different
        frames, so only a one-task mean is a fair floor for that task. With no task (or no
        targets), the mean of ``canonical``.
        """
        parts = [self.task_targets(t) for t in tasks]
        rows = torch.cat(parts) if parts else self.canonical
        if rows.shape[0] == 0:
            raise ValueError(f"mean_pose6d: no targets for {list(tasks)}")
        return rows.mean(0)


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str
    pose_index: int          # row in /poses (the image row for image tasks)
    has_pose: bool           # the answer's <POSE> has a pose target


class SFTTaskData:
    """Mixed-task examples of one split file. ``batch(step, micro, size)`` -> collated dict."""

    def __init__(self, split_path: str | os.PathLike, model_cfg: ModelConfig,
                 task_weights: dict[str, float], seed: int = 0, text2pose_remove_yaw: bool = False):
        from poserft.data.h5io import SplitReader

        self.path, self.cfg, self.seed = Path(split_path), model_cfg, int(seed)
        self.reader = SplitReader(self.path)
        r = self.reader
        # targets per task frame (text->pose: a caption never says which way the body faces)
        self.poses = SplitPoses.read(r, text2pose_remove_yaw)
        self.pose6d = self.poses.canonical                                 # (N,144)
        self.text_pose6d = self.poses.text
        self.image_pose6d = self.poses.image
        self.caption_pose = self.poses.caption_pose
        self.captions = ([str(t) for t in r.read("captions/text")] if r.has("captions/text") else [])
        if r.has("vqa/question"):
            self.questions = [str(t) for t in r.read("vqa/question")]
            self.vqa_answers = [str(t) for t in r.read("vqa/answer")]
            self.vqa_pose = np.asarray(r.read("vqa/pose_index"), dtype=np.int64)
        else:
            self.questions, self.vqa_answers, self.vqa_pose = [], [], np.zeros(0, np.int64)
        self.has_images = r.has("images")
        self._images = None
        if self.has_images:
            shape = r.image_shape
            if int(np.prod(shape)) * r.num_poses <= _MAX_INMEMORY_IMAGE_BYTES:
                self._images = np.asarray(r.read("images"))
        sizes = {"text2pose": len(self.captions), "image2pose": r.num_poses if self.has_images else 0,
                 "image2text": len(self.questions) if self.has_images else 0}
        self.task_sizes = sizes
        weights = {t: float(task_weights.get(t, 0.0)) for t in SFT_TASKS}
        dropped = [t for t, w in weights.items() if w > 0 and sizes[t] == 0]
        for t in dropped:
            log.warning("%s: task %s dropped from the SFT mix: the split lacks %s", self.path, t,
                        " + ".join(TASK_NEEDS[t]))
            weights[t] = 0.0
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"{self.path}: none of the weighted SFT tasks {task_weights} has data "
                             f"here (sizes {sizes}); check sft.task_weights and the split file")
        self.tasks = [t for t in SFT_TASKS if weights[t] > 0]
        self.probs = np.array([weights[t] / total for t in self.tasks])

    # ------------------------------------------------------------------ examples
    def example(self, task: str, i: int) -> Example:
        """The i-th example of ``task``."""
        c = self.cfg
        if task == "text2pose":
            return Example(task, c.text2pose_prompt.format(caption=self.captions[i]), c.pose_answer,
                           int(self.caption_pose[i]), True)
        if task == "image2pose":
            return Example(task, c.image2pose_prompt, c.pose_answer, int(i), True)
        if task == "image2text":
            return Example(task, c.vqa_prompt.format(question=self.questions[i]),
                           self.vqa_answers[i], int(self.vqa_pose[i]), False)
        raise ValueError(f"unknown SFT task {task!r}")

    def sample(self, step: int, micro: int, batch_size: int) -> list[Example]:
        """Deterministic examples for (seed, step, micro)."""
        rng = np.random.default_rng([self.seed, int(step), int(micro)])
        tasks = rng.choice(len(self.tasks), size=batch_size, p=self.probs)
        out = []
        for k in tasks:
            task = self.tasks[k]
            out.append(self.example(task, int(rng.integers(self.task_sizes[task]))))
        return out

    def images(self, rows: list[int]) -> np.ndarray:
        """uint8 (len(rows),H,W,3)."""
        idx = np.asarray(rows, dtype=np.int64)
        if self._images is not None:
            return self._images[idx]
        return np.asarray(self.reader.read("images", idx))

    def collate(self, examples: list[Example]) -> dict:
        """-> prompts, answers, images (B,H,W,3) uint8 (zeros where unused), poses (B,144),
        has_pose (B,), tasks."""
        needs_img = ["<image>" in e.prompt for e in examples]
        images = None
        if any(needs_img):
            rows = [e.pose_index for e, n in zip(examples, needs_img) if n]
            got = self.images(rows)
            images = np.zeros((len(examples),) + got.shape[1:], dtype=np.uint8)
            images[np.flatnonzero(needs_img)] = got
            images = torch.from_numpy(images)
        table = {"image2pose": self.image_pose6d, "text2pose": self.text_pose6d}
        poses = torch.stack([table.get(e.task, self.pose6d)[e.pose_index] for e in examples])
        return {"prompts": [e.prompt for e in examples], "answers": [e.answer for e in examples],
                "images": images, "poses": poses,
                "has_pose": torch.tensor([e.has_pose for e in examples]),
                "tasks": [e.task for e in examples]}

    def batch(self, step: int, micro: int, batch_size: int) -> dict:
        return self.collate(self.sample(step, micro, batch_size))

    def task_targets(self, task: str) -> torch.Tensor:
        """(n,144) 6D targets of every example of a pose task (:meth:`SplitPoses.task_targets`:
        text2pose one per caption, canonical frame, yaw removed when configured; image2pose
        camera frame)."""
        return self.poses.task_targets(task)

    def mean_pose6d(self, task: str | None = None) -> torch.Tensor:
        """(144,) mean 6D target of one pose task (its 'mean pose' floor), or, with
        ``task=None``, over the rows of every pose task in the mix (the head's initial bias).
        See :meth:`SplitPoses.mean_pose6d`.
        """
        if task is not None:
            return self.poses.mean_pose6d(task)
        return self.poses.mean_pose6d(*(t for t in ("text2pose", "image2pose") if t in self.tasks))
