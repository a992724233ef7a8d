"""Supervised task mixing over a weighted mixture of HDF5 splits (text->pose, image->pose,
image->text/VQA): the training data of SFT and the prompts of RFT.

Every micro-batch is a pure function of ``(seed, step, micro)``: the task of each example
is drawn by the configured task weights, then its source among the sources that provide
that task (in proportion to the sources' weights, ``sft.data`` / ``rft.data``), then the
row uniformly within that source's task, from a ``numpy`` generator seeded by that triple.
So a resumed run sees exactly the batches the uninterrupted run would have seen, with no
sampler state to checkpoint, every rank draws its own shard by folding its rank into
``micro``, and DataLoader workers can build any batch ahead (:class:`StepBatches`). With one
source the draws are those of the single-split sampler this replaced (same streams).

Files are read row by row: captions and VQA strings are held in memory, pose rows of a
large split (> ``INMEMORY_POSE_ROWS``) are read per batch from HDF5, images from
``/image_paths`` are decoded, cropped and resized per example (``poserft.data.images``).

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
from typing import Mapping

import numpy as np
import torch

from poserft.data.sources import resolve_sources  # noqa: F401 (re-exported)
from poserft.model.config import ModelConfig
from poserft.train.config import SFT_TASKS

__all__ = ["Example", "SFTTaskData", "SplitPoses", "StepBatches", "TASK_NEEDS",
           "resolve_sources", "INMEMORY_POSE_ROWS"]

log = logging.getLogger(__name__)

# what each task needs in the split file
TASK_NEEDS = {"text2pose": ("captions/text",), "image2pose": ("images",),
              "image2text": ("images", "vqa/question")}
_MAX_INMEMORY_IMAGE_BYTES = 1 << 30
# A split with at most this many pose rows keeps its 6D targets in memory (3 x 144 float32
# per row: 170 MB at this size); a larger one (H36M, BEDLAM) is read per batch.
INMEMORY_POSE_ROWS = 100_000
_MAX_REDRAWS = 20        # replacement draws for an example whose image could not be read


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
        canonical, text, image = cls.frames(reader, text2pose_remove_yaw)
        caption_pose = (np.asarray(reader.read("captions/pose_index"), dtype=np.int64)
                        if reader.has("captions/text") else np.zeros(0, np.int64))
        return cls(canonical, text, image, caption_pose)

    @staticmethod
    def frames(reader, text2pose_remove_yaw: bool, rows: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(canonical, text, image) (n,144) float32 of pose ``rows`` (sorted, unique; None:
        all), each as the class docstring defines it."""
        from poserft.body import smpl_to_vec6d
        from poserft.retrieval.features import pose6d_without_root_yaw

        go = torch.as_tensor(np.asarray(reader.read("poses/global_orient", rows)),
                             dtype=torch.float32).reshape(-1, 3)
        bp = torch.as_tensor(np.asarray(reader.read("poses/body_pose", rows)),
                             dtype=torch.float32).reshape(-1, 23, 3)
        canonical = smpl_to_vec6d(go, bp)                                     # (n,144)
        text = pose6d_without_root_yaw(canonical) if text2pose_remove_yaw else canonical
        if reader.has("image_pose/global_orient"):
            cam = torch.as_tensor(np.asarray(reader.read("image_pose/global_orient", rows)),
                                  dtype=torch.float32).reshape(-1, 3)
            image = smpl_to_vec6d(cam, bp)
        else:
            image = canonical
        return canonical, text, image

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
    pose_index: int          # row in its source's /poses (the image row for image tasks)
    has_pose: bool           # the answer's <POSE> has a pose target
    source: int = 0          # index of the source in SFTTaskData.sources
    caption: str | None = None   # text2pose: the caption (the semantic reward's query)


class _Source:
    """One split file of the mixture: its strings in memory, poses and images per row."""

    def __init__(self, name: str, path: Path, weight: float, text2pose_remove_yaw: bool,
                 loader=None, stage: str | None = None):
        from poserft.data.h5io import SplitReader

        self.name, self.path, self.weight = name, Path(path), float(weight)
        self.remove_yaw = text2pose_remove_yaw
        self.reader = r = SplitReader(self.path)
        self.num_poses = r.num_poses
        self.captions = [str(t) for t in r.read("captions/text")] if r.has("captions/text") else []
        self.caption_pose = (np.asarray(r.read("captions/pose_index"), dtype=np.int64)
                             if self.captions else np.zeros(0, np.int64))
        # VQA-only files (LLaVA-Instruct: N = 0 poses, one image path per question): the
        # "pose row" of question q is q itself, and its image comes from /vqa/image_paths
        self.vqa_only = r.has("vqa/image_paths") and not r.has("vqa/pose_index")
        if r.has("vqa/question") and (r.has("vqa/pose_index") or self.vqa_only):
            self.questions = [str(t) for t in r.read("vqa/question")]
            self.vqa_answers = [str(t) for t in r.read("vqa/answer")]
            self.vqa_pose = (np.arange(len(self.questions), dtype=np.int64) if self.vqa_only else
                             np.asarray(r.read("vqa/pose_index"), dtype=np.int64))
        else:
            self.questions, self.vqa_answers, self.vqa_pose = [], [], np.zeros(0, np.int64)
        # 6D targets: the whole split in memory when small (the embedded world), else per batch
        self.poses = (SplitPoses.read(r, text2pose_remove_yaw)
                      if 0 < self.num_poses <= INMEMORY_POSE_ROWS else None)
        self.has_images = r.has("images") or r.has("image_paths") or self.vqa_only
        self._images = None
        self.image_source = None
        size = loader.image_size if loader is not None else 336
        processor = loader.image_processor if loader is not None else None
        on_error = loader.on_bad_image if loader is not None else "fail"
        if self.vqa_only:
            from poserft.data.images import SplitImages
            self.image_source = SplitImages(r, size, processor=processor, on_error=on_error,
                                            stage=stage, key="vqa/image_paths")
        elif r.has("images"):
            if int(np.prod(r.image_shape)) * r.num_poses <= _MAX_INMEMORY_IMAGE_BYTES:
                self._images = np.asarray(r.read("images"))
            else:
                from poserft.data.images import SplitImages
                self.image_source = SplitImages(r, None, on_error="fail", stage=stage)
        elif r.has("image_paths"):
            from poserft.data.images import SplitImages
            self.image_source = SplitImages(r, size, processor=processor, on_error=on_error,
                                            stage=stage)
        self.sizes = {"text2pose": len(self.captions),
                      "image2pose": self.num_poses if self.has_images else 0,
                      "image2text": len(self.questions) if self.has_images else 0}

    def __getstate__(self) -> dict:
        # DataLoader workers: the in-memory image cache would be copied into every worker's
        # pickle; fork shares it, spawn re-reads it (see __setstate__)
        state = self.__dict__.copy()
        state["_images_cached"] = state.pop("_images") is not None
        return state

    def __setstate__(self, state: dict) -> None:
        cached = state.pop("_images_cached")
        self.__dict__.update(state)
        self._images = np.asarray(self.reader.read("images")) if cached else None

    @property
    def skipped_images(self) -> int:
        return self.image_source.skipped if self.image_source is not None else 0

    def images(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n,H,W,3) and ok (n,) bool (False: unreadable, skipped by config)."""
        idx = np.asarray(rows, dtype=np.int64)
        if self._images is not None:
            return self._images[idx], np.ones(len(idx), bool)
        return self.image_source.load_many(idx)

    def targets(self, task: str, rows: np.ndarray) -> torch.Tensor:
        """(n,144) float32 6D targets of pose rows ``rows`` in ``task``'s frame (text2pose:
        yaw removed when configured; image2pose: camera frame; else canonical)."""
        if self.num_poses == 0:      # a VQA-only file: its answers have no pose target
            return torch.zeros(len(rows), 144)
        if self.poses is not None:
            table = {"text2pose": self.poses.text, "image2pose": self.poses.image}
            return table.get(task, self.poses.canonical)[torch.as_tensor(rows)]
        return self._read_targets(task, np.asarray(rows, dtype=np.int64))

    def _read_targets(self, task: str, rows: np.ndarray) -> torch.Tensor:
        uniq, inverse = np.unique(rows, return_inverse=True)     # h5py wants sorted unique rows
        canonical, text, image = SplitPoses.frames(self.reader, self.remove_yaw, uniq)
        vec = {"text2pose": text, "image2pose": image}.get(task, canonical)
        return vec[torch.as_tensor(inverse.reshape(-1))]

    def task_rows(self, task: str) -> np.ndarray:
        """Pose row of every example of a pose task."""
        if task == "text2pose":
            return self.caption_pose
        if task == "image2pose":     # every pose row (as SplitPoses.task_targets)
            return np.arange(self.num_poses, dtype=np.int64)
        raise ValueError(f"task_targets: {task!r} has no pose targets")

    def target_sum(self, task: str) -> tuple[torch.Tensor, int]:
        """(144,) float64 sum and count of ``task``'s targets, read in blocks."""
        rows = self.task_rows(task)
        total = torch.zeros(144, dtype=torch.float64)
        for lo in range(0, len(rows), 8192):
            total += self.targets(task, rows[lo:lo + 8192]).double().sum(0)
        return total, len(rows)


class SFTTaskData:
    """Mixed-task examples of a weighted mixture of split files.

    ``sources``: one split file (a path; its examples only) or ``{name: (path, weight)}``.
    ``batch(step, micro, size)`` -> collated dict; :class:`StepBatches` runs it in
    DataLoader workers. ``loader``: a :class:`poserft.data.config.LoaderConfig` (how
    ``/image_paths`` images are cropped and resized, and whether an unreadable one fails
    or is skipped); ``stage``: its config key (``sft.loader``), named in errors.
    """

    def __init__(self, sources, model_cfg: ModelConfig, task_weights: dict[str, float],
                 seed: int = 0, text2pose_remove_yaw: bool = False, loader=None,
                 stage: str | None = None):
        if isinstance(sources, (str, os.PathLike)):
            sources = {Path(sources).parent.name or "data": (sources, 1.0)}
        if not sources:
            raise ValueError("SFTTaskData: no sources")
        self.cfg, self.seed = model_cfg, int(seed)
        self.sources = [_Source(name, path, weight, text2pose_remove_yaw, loader, stage)
                        for name, (path, weight) in sources.items()]
        self.path = self.sources[0].path if len(self.sources) == 1 else \
            "+".join(str(s.path) for s in self.sources)
        sizes = {t: sum(s.sizes[t] for s in self.sources) for t in SFT_TASKS}
        self.task_sizes = sizes
        # global example index of a task = offset of its source + index within the source
        self._offsets = {t: np.cumsum([0] + [s.sizes[t] for s in self.sources]) for t in SFT_TASKS}
        weights = {t: float(task_weights.get(t, 0.0)) for t in SFT_TASKS}
        dropped = [t for t, w in weights.items() if w > 0 and sizes[t] == 0]
        for t in dropped:
            log.warning("%s: task %s dropped from the mix: no source has %s", self.path, t,
                        " + ".join(TASK_NEEDS[t]))
            weights[t] = 0.0
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"{self.path}: none of the weighted SFT tasks {task_weights} has data "
                             f"here (sizes {sizes}); check the stage's task_weights and data")
        self.tasks = [t for t in SFT_TASKS if weights[t] > 0]
        self.probs = np.array([weights[t] / total for t in self.tasks])
        # per task: the sources that provide it and their normalised weights
        self._providers = {}
        for t in self.tasks:
            prov = [k for k, s in enumerate(self.sources) if s.sizes[t] > 0]
            w = np.array([self.sources[k].weight for k in prov])
            self._providers[t] = (prov, w / w.sum())

    def dataset_records(self, context: str) -> list[dict]:
        """One record per source for :func:`poserft.tracking.record_datasets` (MLflow run
        inputs): name ``<source>/<split file stem>``, path, context, weight, row counts."""
        return [{"name": f"{s.name}/{s.path.stem}", "path": s.path, "context": context,
                 "weight": s.weight, "profile": {"poses": s.num_poses, **s.sizes}}
                for s in self.sources]

    # ------------------------------------------------------------------ examples
    @property
    def skipped_images(self) -> int:
        """Examples dropped so far (in this process) because their image was unreadable."""
        return sum(s.skipped_images for s in self.sources)

    def locate(self, task: str, i: int) -> tuple[int, int]:
        """Global example index of ``task`` -> (source index, index within that source)."""
        off = self._offsets[task]
        if not 0 <= i < off[-1]:
            raise IndexError(f"{task} example {i} outside [0, {off[-1]})")
        k = int(np.searchsorted(off, i, side="right") - 1)
        return k, int(i - off[k])

    def example(self, task: str, i: int) -> Example:
        """The i-th example of ``task`` (global index over the sources, in source order)."""
        k, j = self.locate(task, i)
        s, c = self.sources[k], self.cfg
        if task == "text2pose":
            return Example(task, c.text2pose_prompt.format(caption=s.captions[j]), c.pose_answer,
                           int(s.caption_pose[j]), True, k, s.captions[j])
        if task == "image2pose":
            return Example(task, c.image2pose_prompt, c.pose_answer, j, True, k)
        if task == "image2text":
            return Example(task, c.vqa_prompt.format(question=s.questions[j]),
                           s.vqa_answers[j], int(s.vqa_pose[j]), False, k)
        raise ValueError(f"unknown SFT task {task!r}")

    def draw(self, rng: np.random.Generator, task: str) -> int:
        """One global example index of ``task``: its source by weight (no draw with one
        provider, so a one-source mixture keeps the single-split streams), then a row."""
        prov, p = self._providers[task]
        k = prov[0] if len(prov) == 1 else prov[int(rng.choice(len(prov), p=p))]
        return int(self._offsets[task][k] + rng.integers(self.sources[k].sizes[task]))

    def sample(self, step: int, micro: int, batch_size: int) -> list[Example]:
        """Deterministic examples for (seed, step, micro)."""
        rng = np.random.default_rng([self.seed, int(step), int(micro)])
        tasks = rng.choice(len(self.tasks), size=batch_size, p=self.probs)
        return [self.example(self.tasks[k], self.draw(rng, self.tasks[k])) for k in tasks]

    def images(self, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n,H,W,3) images of ``examples`` (all with an image) and ok (n,) bool."""
        out, ok = [None] * len(examples), np.ones(len(examples), bool)
        by_source: dict[int, list[int]] = {}
        for n, e in enumerate(examples):
            by_source.setdefault(e.source, []).append(n)
        for k, ns in by_source.items():
            got, good = self.sources[k].images([examples[n].pose_index for n in ns])
            for n, g, o in zip(ns, got, good):
                out[n], ok[n] = g, bool(o)
        shapes = {o.shape for o, g in zip(out, ok) if g}
        if len(shapes) > 1:
            raise ValueError(f"{self.path}: images of one batch differ in size {sorted(shapes)}; "
                             "set the stage's loader.image_size (or image_processor) so that "
                             "every source's crops have one size")
        shape = shapes.pop() if shapes else (1, 1, 3)
        return np.stack([o if g else np.zeros(shape, np.uint8) for o, g in zip(out, ok)]), ok

    def collate(self, examples: list[Example], images=None) -> dict:
        """-> prompts, answers, images (B,H,W,3) uint8 (zeros where unused), poses (B,144),
        has_pose (B,), tasks, captions. ``images``: those of the image examples, in order,
        when already loaded."""
        needs_img = ["<image>" in e.prompt for e in examples]
        batch_images = None
        if any(needs_img):
            if images is None:
                images, _ = self.images([e for e, n in zip(examples, needs_img) if n])
            batch_images = np.zeros((len(examples),) + images.shape[1:], dtype=np.uint8)
            batch_images[np.flatnonzero(needs_img)] = images
            batch_images = torch.from_numpy(batch_images)
        poses = torch.empty(len(examples), 144)
        groups: dict[tuple[int, str], list[int]] = {}
        for n, e in enumerate(examples):
            groups.setdefault((e.source, e.task), []).append(n)
        for (k, task), ns in groups.items():
            rows = np.array([examples[n].pose_index for n in ns], dtype=np.int64)
            poses[torch.as_tensor(ns)] = self.sources[k].targets(task, rows)
        return {"prompts": [e.prompt for e in examples], "answers": [e.answer for e in examples],
                "images": batch_images, "poses": poses,
                "has_pose": torch.tensor([e.has_pose for e in examples]),
                "tasks": [e.task for e in examples], "captions": [e.caption for e in examples]}

    def batch(self, step: int, micro: int, batch_size: int) -> dict:
        """The collated micro-batch of (seed, step, micro), with ``skipped_images``: how many
        examples were redrawn because their image could not be read."""
        examples, images, skipped = self.with_images(self.sample(step, micro, batch_size),
                                                     (int(step), int(micro)))
        return {**self.collate(examples, images), "skipped_images": skipped}

    def with_images(self, examples: list[Example], key: tuple[int, ...]
                    ) -> tuple[list[Example], np.ndarray | None, int]:
        """Load the images of ``examples``; an example whose image cannot be read
        (``loader.on_bad_image: skip``; 'fail' raises in the loader) is replaced by another
        draw of its task from a generator seeded by ``(seed, *key, attempt)``.
        -> (examples, images of the image examples in order or None, replaced count)."""
        examples = list(examples)
        slots = [n for n, e in enumerate(examples) if "<image>" in e.prompt]
        if not slots:
            return examples, None, 0
        imgs, ok = self.images([examples[n] for n in slots])
        skipped = 0
        for attempt in range(1, _MAX_REDRAWS + 1):
            if ok.all():
                return examples, imgs, skipped
            rng = np.random.default_rng([self.seed, *key, attempt])
            bad = np.flatnonzero(~ok)
            skipped += len(bad)
            for b in bad:
                task = examples[slots[b]].task
                examples[slots[b]] = self.example(task, self.draw(rng, task))
            new, new_ok = self.images([examples[slots[b]] for b in bad])
            imgs[bad], ok[bad] = new, new_ok
        raise ValueError(f"{self.path}: {int((~ok).sum())} images still unreadable after "
                         f"{_MAX_REDRAWS} redraws ({self.skipped_images} skipped so far); most "
                         "image files are missing: check the datasets' image_root")

    # ------------------------------------------------------------------ targets
    def task_targets(self, task: str) -> torch.Tensor:
        """(n,144) 6D targets of every example of a pose task, in global example order
        (text2pose one per caption, canonical frame, yaw removed when configured;
        image2pose camera frame)."""
        return torch.cat([s.targets(task, s.task_rows(task)) for s in self.sources])

    def mean_pose6d(self, task: str | None = None) -> torch.Tensor:
        """(144,) mean 6D target of one pose task (its 'mean pose' floor), or, with
        ``task=None``, over the rows of every pose task in the mix (the head's initial bias),
        pooled over the sources. One in-memory source: :meth:`SplitPoses.mean_pose6d`
        exactly (SFT is chaotic in this bias, docs there); otherwise a float64 block sum.
        """
        tasks = [task] if task is not None else \
            [t for t in ("text2pose", "image2pose") if t in self.tasks]
        if len(self.sources) == 1 and self.sources[0].poses is not None:
            return self.sources[0].poses.mean_pose6d(*tasks)
        total, count = torch.zeros(144, dtype=torch.float64), 0
        for s in self.sources:
            for t in tasks or ["canonical"]:
                if t == "canonical":
                    rows = np.arange(s.num_poses)
                    total += s.targets("canonical", rows).double().sum(0)
                    count += len(rows)
                else:
                    part, n = s.target_sum(t)
                    total, count = total + part, count + n
        if count == 0:
            raise ValueError(f"mean_pose6d: no targets for {tasks}")
        return (total / count).float()


class _BatchKeys(torch.utils.data.Dataset):
    """Map-style dataset whose item k is the k-th micro-batch of a run (DataLoader workers
    build them ahead; each is a pure function of (seed, step, micro))."""

    def __init__(self, data: SFTTaskData, keys: list[tuple[int, int]], batch_size: int):
        self.data, self.keys, self.batch_size = data, keys, batch_size

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, k: int) -> dict:
        step, micro = self.keys[k]
        return self.data.batch(step, micro, self.batch_size)


class StepBatches:
    """The micro-batches of steps ``start .. steps-1`` for one rank: a list of
    ``grad_accum`` collated micro-batches per step (micro index ``m * world + rank``), built
    in ``num_workers`` DataLoader worker processes ahead of the step (0: in-process, on
    demand). Deterministic in (seed, step, micro), so a resumed run restarts at its step."""

    def __init__(self, data: SFTTaskData, start: int, steps: int, grad_accum: int,
                 batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                 prefetch_batches: int = 2):
        self.data, self.grad_accum = data, grad_accum
        keys = [(s, m * world + rank) for s in range(start, steps) for m in range(grad_accum)]
        self.dataset = _BatchKeys(data, keys, batch_size)
        self.num_workers, self.prefetch = num_workers, prefetch_batches

    def __iter__(self):
        if self.num_workers == 0:
            items = (self.dataset[k] for k in range(len(self.dataset)))
        else:
            items = iter(torch.utils.data.DataLoader(
                self.dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
                prefetch_factor=self.prefetch, collate_fn=_identity,
                persistent_workers=False))
        step: list[dict] = []
        for item in items:
            step.append(item)
            if len(step) == self.grad_accum:
                yield step
                step = []


def _identity(x):
    return x
