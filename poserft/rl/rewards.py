"""HyGRPO rewards: batched functions registered by name, and their per-branch sums.

Every reward maps a :class:`RewardInputs` batch of N candidates to ``(values (N,),
applies (N,) bool)``. ``applies`` is False where the reward is undefined: a task it does
not score (``rft.reward_tasks``), or a pose reward on a candidate that emitted no
``<POSE>``. Values there are NaN and never enter a sum.

Registered rewards (:data:`REWARDS`; each declared, with its branch, default tasks and the
frozen model it needs, in :data:`poserft.rl.config.REWARD_DECLS`):

* ``format`` (discrete): 1 if the whole stripped answer matches ``rft.format_regex``, else 0.
* ``text`` (discrete): cosine between the embeddings of the answer and the reference answer
  (``text_embedder``, unit vectors), in [-1, 1].
* ``joint`` (continuous): ``min(1 / (MPJPE + eps), cap)`` with MPJPE in **metres**
  (pelvis-aligned, the 24 SMPL joints of ``poserft.body``, neutral shape, both poses through
  the same forward kinematics), so the unit is 1/m: 10 at 10 cm, capped at ``cap``.
* ``semantic`` (continuous): the frozen retrieval reward model's cosine between the prompt
  caption and the pose, ``SemanticReward(texts, poses_vec6d)``.

:func:`compute_rewards` sums the weighted rewards of each branch into R_d (all candidates)
and R_c (the V candidates with a valid pose and at least one applicable pose reward).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from poserft.rl.config import DEFAULT_FORMAT_REGEX, REWARD_DECLS, RewardDecl
from poserft.rl.core import Registry

__all__ = ["RewardInputs", "RewardContext", "RewardSpec", "REWARDS", "RewardResult",
           "format_reward", "text_reward", "joint_reward", "semantic_reward", "compute_rewards",
           "joint_reward_from_mpjpe_m"]


@dataclass
class RewardInputs:
    """One batch of N scored candidates.

    tasks: N task names (image2pose | text2pose | image2text).
    texts: N generated answers (decoded completions).
    poses: (N,144) 6D pose used for the reward (the sampled pose; the mean in mode grpo),
        or None when no candidate has a pose.
    pose_valid: (N,) bool, the answer emitted <POSE> and ``poses`` holds its pose.
    gt_poses: (N,144) ground-truth 6D pose of the prompt (rows of image2pose prompts), or None.
    captions: N prompt captions (text2pose rows; None elsewhere).
    reference_answers: N reference answers (image2text rows; None elsewhere).
    """
    tasks: Sequence[str]
    texts: Sequence[str]
    pose_valid: torch.Tensor
    poses: torch.Tensor | None = None
    gt_poses: torch.Tensor | None = None
    captions: Sequence[str | None] | None = None
    reference_answers: Sequence[str | None] | None = None

    def __post_init__(self):
        n = len(self.texts)
        for name in ("tasks", "captions", "reference_answers"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"RewardInputs.{name} has {len(v)} entries, texts has {n}")
        for name in ("pose_valid", "poses", "gt_poses"):
            v = getattr(self, name)
            if v is not None and v.shape[0] != n:
                raise ValueError(f"RewardInputs.{name} has {v.shape[0]} rows, texts has {n}")

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class RewardContext:
    """Frozen models and parameters the rewards need (each only by the rewards using it).

    body_model: ``poserft.body`` model (forward_rotmats) for ``joint``.
    semantic_model: callable ``(texts list[str], poses (n,144)) -> (n,)`` for ``semantic``.
    text_embedder: object with ``encode(list[str]) -> np (n,D)`` unit rows for ``text``.
    reward_tasks: reward name -> tasks it applies to (``rft.reward_tasks``).
    """
    reward_tasks: dict[str, Sequence[str]]
    format_regex: str = DEFAULT_FORMAT_REGEX
    joint_eps_m: float = 1e-3
    joint_cap: float = 100.0
    body_model: object | None = None
    semantic_model: Callable | None = None
    text_embedder: object | None = None
    _compiled: dict = field(default_factory=dict, repr=False)

    def regex(self) -> re.Pattern:
        if self.format_regex not in self._compiled:
            self._compiled[self.format_regex] = re.compile(self.format_regex)
        return self._compiled[self.format_regex]

    def task_mask(self, name: str, tasks: Sequence[str]) -> torch.Tensor:
        allowed = set(self.reward_tasks.get(name, ()))
        return torch.tensor([t in allowed for t in tasks], dtype=torch.bool)

    def need(self, attr: str, reward: str):
        value = getattr(self, attr)
        if value is None:
            raise ValueError(f"reward '{reward}' needs RewardContext.{attr}; pass it to the "
                             f"trainer or remove '{reward}' from rft.reward_weights")
        return value


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its function and its declaration (branch, tasks, needs)."""
    fn: Callable[[RewardInputs, RewardContext], tuple[torch.Tensor, torch.Tensor]]
    decl: RewardDecl
    needs_pose: bool

    @property
    def kind(self) -> str:
        return self.decl.branch


REWARDS = Registry("reward")


def _register(name: str, needs_pose: bool):
    if name not in REWARD_DECLS:
        raise KeyError(f"reward {name!r} has no declaration in poserft.rl.config.REWARD_DECLS")

    def deco(fn):
        REWARDS.register(name)(RewardSpec(fn=fn, decl=REWARD_DECLS[name], needs_pose=needs_pose))
        return fn
    return deco


def _nan(n: int) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=torch.float32)


@_register("format", needs_pose=False)
def format_reward(batch: RewardInputs, ctx: RewardContext) -> tuple[torch.Tensor, torch.Tensor]:
    """1.0 where the stripped answer fully matches the template regex, else 0.0."""
    applies = ctx.task_mask("format", batch.tasks)
    pattern = ctx.regex()
    values = torch.tensor([1.0 if pattern.fullmatch(t.strip()) else 0.0 for t in batch.texts],
                          dtype=torch.float32)
    return torch.where(applies, values, _nan(len(batch))), applies


@_register("text", needs_pose=False)
def text_reward(batch: RewardInputs, ctx: RewardContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of the sentence embeddings of answer and reference answer."""
    applies = ctx.task_mask("text", batch.tasks)
    refs = batch.reference_answers or [None] * len(batch)
    applies &= torch.tensor([r is not None for r in refs], dtype=torch.bool)
    values = _nan(len(batch))
    rows = applies.nonzero()[:, 0].tolist()
    if rows:
        emb = ctx.need("text_embedder", "text")
        a = np.asarray(emb.encode([batch.texts[i] for i in rows]), dtype=np.float64)
        b = np.asarray(emb.encode([refs[i] for i in rows]), dtype=np.float64)
        values[rows] = torch.as_tensor((a * b).sum(-1), dtype=torch.float32)
    return values, applies


def joint_reward_from_mpjpe_m(mpjpe_m: torch.Tensor, eps_m: float, cap: float) -> torch.Tensor:
    """``min(1 / (mpjpe_m + eps_m), cap)``; finite for a perfect pose (mpjpe 0)."""
    return torch.clamp(1.0 / (mpjpe_m + eps_m), max=cap)


@_register("joint", needs_pose=True)
def joint_reward(batch: RewardInputs, ctx: RewardContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse pelvis-aligned MPJPE (1/m) between the candidate pose and the GT pose."""
    applies = ctx.task_mask("joint", batch.tasks) & batch.pose_valid.bool().cpu()
    values = _nan(len(batch))
    rows = applies.nonzero()[:, 0]
    if len(rows):
        if batch.gt_poses is None or batch.poses is None:
            raise ValueError("reward 'joint' needs RewardInputs.poses and gt_poses for "
                             f"{len(rows)} image2pose candidates")
        from poserft.body.metrics import mpjpe
        body = ctx.need("body_model", "joint")
        with torch.no_grad():
            pred = body.forward_vec6d(batch.poses[rows].detach().cpu())
            gt = body.forward_vec6d(batch.gt_poses[rows].cpu())
        err_m = mpjpe(pred, gt, root=0).to(torch.float64) / 1000.0  # mpjpe reports mm
        values[rows] = joint_reward_from_mpjpe_m(err_m, ctx.joint_eps_m, ctx.joint_cap).float()
    return values, applies


@_register("semantic", needs_pose=True)
def semantic_reward(batch: RewardInputs, ctx: RewardContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model cosine between the prompt caption and the candidate pose."""
    caps = batch.captions or [None] * len(batch)
    applies = (ctx.task_mask("semantic", batch.tasks) & batch.pose_valid.bool().cpu()
               & torch.tensor([c is not None for c in caps], dtype=torch.bool))
    values = _nan(len(batch))
    rows = applies.nonzero()[:, 0]
    if len(rows):
        if batch.poses is None:
            raise ValueError("reward 'semantic' needs RewardInputs.poses")
        model = ctx.need("semantic_model", "semantic")
        with torch.no_grad():
            out = model([caps[i] for i in rows.tolist()], batch.poses[rows].detach())
        values[rows] = torch.as_tensor(out, dtype=torch.float32).reshape(-1).cpu()
    return values, applies


@dataclass
class RewardResult:
    """per_reward: name -> (values (N,) NaN where undefined, applies (N,) bool).
    discrete: (N,) R_d. continuous: (N,) R_c (NaN outside continuous_valid).
    continuous_valid: (N,) bool, the V candidates of the continuous branch."""
    per_reward: dict[str, tuple[torch.Tensor, torch.Tensor]]
    discrete: torch.Tensor
    continuous: torch.Tensor
    continuous_valid: torch.Tensor

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Mean of each reward over the candidates it applies to (and the branch sums)."""
        out = {}
        for name, (v, ok) in self.per_reward.items():
            if ok.any():
                out[f"{prefix}/{name}"] = v[ok].mean().item()
        out[f"{prefix}/discrete"] = self.discrete.mean().item()
        if self.continuous_valid.any():
            out[f"{prefix}/continuous"] = self.continuous[self.continuous_valid].mean().item()
        out[f"{prefix}/pose_valid_frac"] = self.continuous_valid.float().mean().item()
        return out


def compute_rewards(batch: RewardInputs, ctx: RewardContext, weights: dict[str, float],
                    discrete: Sequence[str], continuous: Sequence[str],
                    pose_rewards_to_discrete: bool = False) -> RewardResult:
    """Evaluate the rewards with nonzero weight and sum them per branch.

    R_d[i] = sum_{k in discrete, applies} w_k r_k[i] (0 when none applies).
    R_c[i] = sum_{k in continuous, applies} w_k r_k[i] on the candidates where the pose is
    valid and at least one continuous reward applies (continuous_valid), NaN elsewhere.
    ``pose_rewards_to_discrete`` (GRPO ablation): R_c is also added to R_d, with 0 for
    candidates without a pose (the format reward already penalises those).
    """
    n = len(batch)
    per: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in list(discrete) + list(continuous):
        if weights.get(name, 0.0) == 0.0:
            continue
        values, applies = REWARDS.get(name).fn(batch, ctx)
        if values.shape != (n,) or applies.shape != (n,):
            raise RuntimeError(f"reward {name!r} returned shapes {tuple(values.shape)}, "
                               f"{tuple(applies.shape)}; expected ({n},)")
        if not torch.isfinite(values[applies]).all():
            raise ValueError(f"reward {name!r} produced NaN/inf on candidates it applies to")
        per[name] = (values, applies)

    def branch_sum(names):
        total = torch.zeros(n, dtype=torch.float32)
        any_applies = torch.zeros(n, dtype=torch.bool)
        for name in names:
            if name in per:
                v, ok = per[name]
                total = total + torch.where(ok, weights[name] * v, torch.zeros(()))
                any_applies |= ok
        return total, any_applies

    r_d, _ = branch_sum(discrete)
    r_c, c_ok = branch_sum(continuous)
    c_valid = c_ok & batch.pose_valid.bool().cpu()
    if pose_rewards_to_discrete:
        r_d = r_d + torch.where(c_valid, r_c, torch.zeros(()))
    r_c = torch.where(c_valid, r_c, torch.full((), float("nan")))
    return RewardResult(per_reward=per, discrete=r_d, continuous=r_c, continuous_valid=c_valid)
