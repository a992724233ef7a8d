"""RL prompts and rollouts: draw prompt batches from a split, sample G candidates per prompt,
and expand the prompts' reference data (GT pose, caption, reference answer) per candidate.

Prompts are built exactly as in SFT (:class:`poserft.train.data.SFTTaskData`: same
templates from the policy's config, same GT conventions: image->pose targets use the
camera-frame root orientation), so RFT optimises the SFT policy on its own prompt format.
Batches are a pure function of ``(seed, step)``, so a resumed run sees the same prompts.
With several ranks, ``rft.batch_size`` prompts are drawn per step (the global batch, the
same draw on every rank) and rank r takes the r-th contiguous block of ``batch_size / ranks``
of them (:meth:`PromptSampler.rank_items`): the ranks together sample exactly the prompts a
one-rank run samples at that step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from poserft.rl.rewards import RewardInputs

__all__ = ["PromptBatch", "PromptSampler", "reward_inputs", "generate_group", "concat_rollouts"]


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
        self.last_skipped = 0        # prompts redrawn for an unreadable image in the last batch
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
        return [(self.tasks[k], self.data.draw(rng, self.tasks[k])) for k in tasks]

    def rank_items(self, step: int, batch_size: int, rank: int = 0,
                   world_size: int = 1) -> list[tuple[str, int]]:
        """Rank ``rank``'s share of step ``step``'s global draw of ``batch_size`` prompts:
        items ``rank * b .. (rank + 1) * b - 1`` with ``b = batch_size / world_size``
        (disjoint blocks, together the one-rank draw). ``batch_size`` must be a multiple of
        ``world_size`` (:meth:`poserft.rl.config.RFTConfig.prompts_per_rank` says so with
        the config keys; here a plain ValueError)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of world_size {world_size}")
        per = batch_size // world_size
        return self.items(step, batch_size)[rank * per:(rank + 1) * per]

    def sample(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> PromptBatch:
        """The prompts of :meth:`rank_items` (one rank: the whole draw of step ``step``)."""
        return self.batch(self.rank_items(step, batch_size, rank, world_size),
                          key=(7919, int(step), int(rank)))

    def first(self, task: str, n: int) -> PromptBatch | None:
        """The first ``n`` prompts of ``task`` (a fixed held-out set), or None if it has none."""
        m = min(n, self.data.task_sizes.get(task, 0))
        return self.batch([(task, i) for i in range(m)], key=(104729,)) if m else None

    def batch(self, items: list[tuple[str, int]], key: tuple[int, ...] = (0,)) -> PromptBatch:
        """The prompts of ``items``; one whose image cannot be read (``rft.loader.on_bad_image:
        skip``) is replaced by another draw of its task (:meth:`SFTTaskData.with_images`)."""
        data = self.data
        examples, images, self.last_skipped = data.with_images(
            [data.example(task, i) for task, i in items], key)
        col = data.collate(examples, images)
        captions = [e.caption if e.task == "text2pose" else None for e in examples]
        answers = [e.answer if e.task == "image2text" else None for e in examples]
        return PromptBatch(tasks=[e.task for e in examples], prompts=col["prompts"],
                           images=col["images"], gt_poses=col["poses"], captions=captions,
                           reference_answers=answers)


def generate_group(policy, batch: PromptBatch, group_size: int, max_new_tokens: int,
                   temperature: float, generator: torch.Generator | None = None,
                   do_sample: bool = True, chunk_size: int = 0):
    """G sampled candidates per prompt -> :class:`poserft.model.policy.Rollout` (N = B*G rows,
    the rows of prompt b are b*G .. b*G+G-1). Runs in eval mode without gradient.

    ``chunk_size`` (``rft.rollout_chunk_size``): prompts per ``policy.generate`` call (0 or
    >= B: one call). A call repeats its prompts' KV cache G times, so chunks bound the
    rollout's peak memory. The chunks run one after the other on the same ``generator``.
    Not bit-identical to one call for chunks smaller than B: a call draws each decoding
    step's tokens for all its rows at once, so chunking changes which random numbers a
    candidate gets (not their distribution); and the prompt batches are padded to other
    lengths, so even the greedy rollout (``do_sample=False``) matches the one-call rollout
    only up to float rounding. The result is :func:`concat_rollouts` of the chunks.
    """
    was_training = policy.training
    policy.eval()
    n = len(batch)
    bounds = [(0, n)] if chunk_size <= 0 or chunk_size >= n else \
        [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    try:
        with torch.no_grad():
            parts = [policy.generate(batch.prompts[a:b],
                                     None if batch.images is None else batch.images[a:b],
                                     num_samples=group_size, max_new_tokens=max_new_tokens,
                                     temperature=temperature, do_sample=do_sample,
                                     generator=generator)
                     for a, b in bounds]
    finally:
        policy.train(was_training)
    if len(parts) == 1:
        return parts[0]
    return concat_rollouts(parts, [a for a, _ in bounds], policy.pad_token_id)


def concat_rollouts(parts: list, offsets: list[int], pad_token_id: int):
    """Rollouts of consecutive prompt chunks -> one :class:`~poserft.model.policy.Rollout`.

    ``offsets[i]``: index of chunk i's first prompt in the whole batch (added to its
    ``prompt_index``). Per-token fields (``completion_ids``, ``completion_mask``,
    ``token_logprobs``) of chunks with shorter completions are right-padded the way
    ``policy.generate`` pads them (``pad_token_id``, mask 0, log-prob 0); other per-row
    tensors and lists are concatenated; scalar settings must agree.
    """
    import dataclasses

    import torch.nn.functional as F

    if len(parts) != len(offsets) or not parts:
        raise ValueError(f"concat_rollouts: {len(parts)} rollouts for {len(offsets)} offsets")
    per_token = {"completion_ids": pad_token_id, "completion_mask": 0.0, "token_logprobs": 0.0}
    tc = max(r.completion_ids.shape[1] for r in parts)
    out = {}
    for f in dataclasses.fields(parts[0]):
        vals = [getattr(r, f.name) for r in parts]
        if f.name == "prompt_index":
            out[f.name] = torch.cat([v + off for v, off in zip(vals, offsets)])
        elif f.name in per_token:
            out[f.name] = torch.cat([F.pad(v, (0, tc - v.shape[1]), value=per_token[f.name])
                                     for v in vals])
        elif all(v is None for v in vals):
            out[f.name] = None
        elif all(isinstance(v, torch.Tensor) for v in vals):
            out[f.name] = torch.cat(vals)
        elif all(isinstance(v, list) for v in vals):
            out[f.name] = [x for v in vals for x in v]
        elif all(v == vals[0] for v in vals):
            out[f.name] = vals[0]
        else:
            raise ValueError(f"concat_rollouts: chunks disagree on {f.name} ({vals})")
    return type(parts[0])(**out)


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
