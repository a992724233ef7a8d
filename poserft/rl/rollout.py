"""RL prompts and rollouts: draw prompt batches from a split, sample G candidates per prompt,
and expand the prompts' reference data (GT pose, caption, reference answer) per candidate.

Prompts are built exactly as in SFT (:class:`poserft.train.data.SFTTaskData`: same
templates from the policy's config, same GT conventions: image->pose targets use the
camera-frame root orientation), so RFT optimises the SFT policy on its own prompt format.
Batches are a pure function of ``(seed, step)``, so a resumed run sees the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from poserft.rl.rewards import RewardInputs

__all__ = ["PromptBatch", "PromptSampler", "reward_inputs", "generate_group"]


@dataclass
class PromptBatch:
    """B prompts of mixed tasks.

    tasks, prompts: B strings. images: (B,H,W,3) uint8 (zeros in rows without <image>) or
    None. gt_poses: (B,144) 6D target pose (rows of pose tasks; the linked pose elsewhere).
    captions: B (text2pose rows; None elsewhere). reference_answers: B (image2text rows).
    """
    tasks: list[str]
    prompts: list[str]
    images: torch.Tensor | None
    gt_poses: torch.Tensor
    captions: list[str | None]
    reference_answers: list[str | None]

    def __len__(self) -> int:
        return len(self.prompts)


class PromptSampler:
    """RL prompt batches of one split, tasks mixed by ``task_weights``.

    ``data`` is a :class:`poserft.train.data.SFTTaskData` of the split (it owns the prompt
    templates, images and GT poses). A task with positive weight but no data in the split is
    an error (RL on a silently smaller mix would change the experiment).
    """

    def __init__(self, data, task_weights: dict[str, float], seed: int = 0):
        self.data, self.seed = data, int(seed)
        missing = [t for t, w in task_weights.items() if w > 0 and data.task_sizes.get(t, 0) == 0]
        if missing:
            raise ValueError(f"{data.path}: rft.task_weights gives weight to {missing} but the split "
                             f"has no data for them (sizes {data.task_sizes}); set their weight "
                             "to 0 or regenerate the split with that data")
        self.tasks = [t for t, w in task_weights.items() if w > 0]
        total = sum(task_weights[t] for t in self.tasks)
        self.probs = np.array([task_weights[t] / total for t in self.tasks])

    def items(self, step: int, batch_size: int) -> list[tuple[str, int]]:
        """(task, index within task) pairs for RL step ``step`` (deterministic)."""
        rng = np.random.default_rng([self.seed, 7919, int(step)])
        tasks = rng.choice(len(self.tasks), size=batch_size, p=self.probs)
        return [(self.tasks[k], int(rng.integers(self.data.task_sizes[self.tasks[k]])))
                for k in tasks]

    def sample(self, step: int, batch_size: int) -> PromptBatch:
        return self.batch(self.items(step, batch_size))

    def first(self, task: str, n: int) -> PromptBatch | None:
        """The first ``n`` prompts of ``task`` (a fixed held-out set), or None if it has none."""
        m = min(n, self.data.task_sizes.get(task, 0))
        return self.batch([(task, i) for i in range(m)]) if m else None

    def batch(self, items: list[tuple[str, int]]) -> PromptBatch:
        data = self.data
        examples = [data.example(task, i) for task, i in items]
        col = data.collate(examples)
        captions = [data.captions[i] if task == "text2pose" else None for task, i in items]
        answers = [data.vqa_answers[i] if task == "image2text" else None for task, i in items]
        return PromptBatch(tasks=[t for t, _ in items], prompts=col["prompts"],
                           images=col["images"], gt_poses=col["poses"], captions=captions,
                           reference_answers=answers)


def generate_group(policy, batch: PromptBatch, group_size: int, max_new_tokens: int,
                   temperature: float, generator: torch.Generator | None = None,
                   do_sample: bool = True):
    """G sampled candidates per prompt -> :class:`poserft.model.policy.Rollout` (N = B*G rows,
    the rows of prompt b are b*G .. b*G+G-1). Runs in eval mode without gradient."""
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            return policy.generate(batch.prompts, batch.images, num_samples=group_size,
                                   max_new_tokens=max_new_tokens, temperature=temperature,
                                   do_sample=do_sample, generator=generator)
    finally:
        policy.train(was_training)


def reward_inputs(batch: PromptBatch, rollout, pose_source: str = "sample") -> RewardInputs:
    """Per-candidate reward inputs: prompt data expanded through ``rollout.prompt_index``.

    ``pose_source``: "sample" (the Gaussian sample, HyGRPO's continuous action) or "mean"
    (the head mean: GRPO treats the pose as deterministic).
    """
    if pose_source not in ("sample", "mean"):
        raise ValueError(f"pose_source must be 'sample' or 'mean', got {pose_source!r}")
    idx = rollout.prompt_index.cpu().tolist()
    poses = rollout.pose_sample if pose_source == "sample" else rollout.pose_mean
    return RewardInputs(
        tasks=[batch.tasks[i] for i in idx], texts=list(rollout.texts),
        pose_valid=rollout.pose_valid.cpu(), poses=poses.detach().cpu(),
        gt_poses=batch.gt_poses[torch.as_tensor(idx, dtype=torch.long)],
        captions=[batch.captions[i] for i in idx],
        reference_answers=[batch.reference_answers[i] for i in idx])
