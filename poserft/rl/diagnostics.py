"""How much the continuous (pose) policy gradient knows about the direction it should move.

HyGRPO's continuous branch moves the head mean with the score-function estimator: for one
prompt, G sampled poses ``a_i = mu + std * eps_i``, group-normalised advantages ``A_i``
(:func:`poserft.rl.core.grpo_advantage`), and at ratio 1 (the first PPO pass)

    grad_mu  ~  (1/G) sum_i A_i * eps_i / std          (k,)

What it estimates is the gradient of the smoothed objective ``J(mu) = E_eps[R(mu + std*eps)]``.
:func:`score_gradient_alignment` measures the cosine between the two for one prompt. A
reference gradient of J is estimated with many antithetic pairs
``(R(mu + std*e) - R(mu - std*e)) / 2 * e / std`` (the even part of R cancels), in two
independent halves whose agreement says how noisy the reference itself is; the reported
``cos`` is corrected for that noise (Spearman's correction for attenuation, with the
Spearman-Brown reliability of the averaged halves). A cosine near 0 means one group's update
of the mean is almost all noise: the mean then random-walks under the KL term instead of
climbing the reward, whatever the step size.

:func:`policy_gradient_alignment` runs the measurement at a policy's own head mean and std
on the first prompts of a split, with the configured rewards; ``python -m
poserft.rl.diagnostics --help`` does the same from the command line (docs/embedded_world.md,
section 12, reports it for the embedded default).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable

import numpy as np
import torch

__all__ = ["score_gradient_alignment", "shift_alignment", "policy_gradient_alignment", "main"]

_MIN_RELIABILITY = 0.05      # below this the reference is too noisy to correct against


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def _one_group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(G,) rewards of one prompt -> the trainer's GRPO advantages (rft defaults)."""
    from poserft.rl.core import grpo_advantage

    adv, _ = grpo_advantage(rewards, torch.zeros(rewards.shape[0], dtype=torch.long))
    return adv


def _float64_sampling(reward_fn: Callable[[torch.Tensor], torch.Tensor], k: int,
                      generator: torch.Generator | None):
    """(reward: (M,k) -> (M,) float64, randn: n -> (n,k) float64 standard normal draws)."""
    def reward(x: torch.Tensor) -> torch.Tensor:
        return reward_fn(x).double().reshape(-1)

    def randn(n: int) -> torch.Tensor:
        return torch.randn(n, k, dtype=torch.float64, generator=generator)

    return reward, randn


def score_gradient_alignment(reward_fn: Callable[[torch.Tensor], torch.Tensor],
                             mean: torch.Tensor, std: torch.Tensor, *, group_size: int = 32,
                             trials: int = 40, reference_pairs: int = 4096,
                             antithetic: bool = False,
                             generator: torch.Generator | None = None) -> dict[str, float]:
    """Cosine between one group's score-function estimate of ``grad_mu J`` and ``grad_mu J``.

    reward_fn: (M,k) poses -> (M,) rewards of ONE prompt. mean, std: (k,) the head's
    Gaussian (diagonal). ``group_size`` G candidates per estimate (even when
    ``antithetic``: G/2 mirrored pairs), ``trials`` estimates, ``reference_pairs``
    antithetic pairs for the reference (split into two halves).

    Returns ``cos`` (mean over trials, corrected for the reference's noise; NaN when the
    reference halves agree less than 0.05), ``cos_raw`` (against the noisy reference),
    ``reference_reliability`` (the Spearman-Brown reliability of the averaged reference),
    ``odd_share`` (share of the reward's variance that is odd in eps, i.e. that carries
    information about the mean's direction; the even rest only tells the std to shrink or
    grow) and ``reward_at_mean``.
    """
    if mean.dim() != 1 or mean.shape != std.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} must be equal (k,)")
    if group_size < 2 or (antithetic and group_size % 2):
        raise ValueError(f"group_size {group_size}: need >= 2 (and even when antithetic)")
    if reference_pairs < 4 or trials < 1:
        raise ValueError(f"reference_pairs ({reference_pairs}) >= 4 and trials ({trials}) >= 1")
    mean, std = mean.double(), std.double()
    reward, randn = _float64_sampling(reward_fn, mean.shape[0], generator)
    reference, reliability, odd_share = _reference_gradient(reward, mean, std, reference_pairs, randn)
    raw = []
    for _ in range(trials):
        if antithetic:
            h = randn(group_size // 2)
            e = torch.cat([h, -h])
        else:
            e = randn(group_size)
        adv = _one_group_advantages(reward(mean + std * e))
        raw.append(_cos((adv[:, None] * e).mean(0) / std, reference))
    cos_raw = float(np.mean(raw))
    return {"cos": _corrected(cos_raw, reliability), "cos_raw": cos_raw,
            "reference_reliability": reliability, "odd_share": odd_share,
            "reward_at_mean": reward(mean[None]).item()}


def _corrected(cos_raw: float, reliability: float) -> float:
    return cos_raw / math.sqrt(reliability) if reliability >= _MIN_RELIABILITY else math.nan


def _reference_gradient(reward, mean, std, pairs: int, randn):
    """grad_mu J from ``pairs`` antithetic pairs in two halves -> (gradient (k,), Spearman-Brown
    reliability of the average of the halves, odd share of the reward variance)."""
    halves, odd_var, even_var = [], [], []
    for _ in range(2):
        e = randn(pairs // 2)
        r_plus, r_minus = reward(mean + std * e), reward(mean - std * e)
        odd, even = (r_plus - r_minus) / 2, (r_plus + r_minus) / 2
        halves.append((odd[:, None] * e).mean(0) / std)
        odd_var.append(odd.var().item())
        even_var.append(even.var().item())
    rho_half = _cos(halves[0], halves[1])
    reliability = 2 * rho_half / (1 + rho_half) if rho_half > 0 else 0.0
    total = np.mean(odd_var) + np.mean(even_var)
    odd_share = float(np.mean(odd_var) / total) if total > 0 else math.nan
    return (halves[0] + halves[1]) / 2, reliability, odd_share


def shift_alignment(reward_fn: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor,
                    std: torch.Tensor, new_mean: torch.Tensor, *, reference_pairs: int = 4096,
                    generator: torch.Generator | None = None) -> dict[str, float]:
    """Did a training run move the head mean up the reward, or at random?

    ``mean, std`` (k,): the head before (e.g. the SFT policy); ``new_mean`` (k,): after
    (the RFT policy) on the same prompt. Returns ``shift_cos`` (cosine of ``new_mean -
    mean`` with ``grad_mu J`` at the old mean, corrected for the reference's noise as in
    :func:`score_gradient_alignment`), ``shift_rms_std`` (RMS over dims of the shift in
    units of the old std), ``reward_before`` / ``reward_after`` (the reward at each mean).
    """
    if not mean.shape == std.shape == new_mean.shape or mean.dim() != 1:
        raise ValueError(f"mean {tuple(mean.shape)}, std {tuple(std.shape)} and new_mean "
                         f"{tuple(new_mean.shape)} must be equal (k,)")
    mean, std, new_mean = mean.double(), std.double(), new_mean.double()
    reward, randn = _float64_sampling(reward_fn, mean.shape[0], generator)
    reference, reliability, _ = _reference_gradient(reward, mean, std, reference_pairs, randn)
    shift = new_mean - mean
    return {"shift_cos": _corrected(_cos(shift, reference), reliability),
            "shift_cos_raw": _cos(shift, reference), "reference_reliability": reliability,
            "shift_rms_std": (shift / std).pow(2).mean().sqrt().item(),
            "reward_before": reward(mean[None]).item(), "reward_after": reward(new_mean[None]).item()}


def _prompt_reward_fn(reward: str, batch, p: int, ctx) -> Callable[[torch.Tensor], torch.Tensor]:
    """(M,k) poses -> (M,) values of reward ``reward`` for prompt ``p`` of ``batch``."""
    from poserft.rl.rewards import REWARDS, RewardInputs

    def fn(poses: torch.Tensor) -> torch.Tensor:
        n = poses.shape[0]
        inp = RewardInputs(tasks=[batch.tasks[p]] * n, texts=[""] * n,
                           pose_valid=torch.ones(n, dtype=torch.bool), poses=poses.float(),
                           gt_poses=batch.gt_poses[p:p + 1].expand(n, -1),
                           captions=[batch.captions[p]] * n,
                           reference_answers=[batch.reference_answers[p]] * n)
        values, applies = REWARDS.get(reward).fn(inp, ctx)
        if not bool(applies.all()):
            raise ValueError(f"reward {reward!r} does not apply to task {batch.tasks[p]!r} "
                             "(rft.reward_tasks)")
        return values
    return fn


def _greedy_heads(policy, batch):
    """(mean (P,k), std (P,k), valid (P,)) of ``policy``'s head on the greedy answers."""
    from poserft.rl.rollout import generate_group

    roll = generate_group(policy, batch, 1, 24, 1.0, do_sample=False)
    if roll.pose_std is None:
        raise ValueError("the policy's head is deterministic: there is no pose policy gradient")
    return roll.pose_mean.float().cpu(), roll.pose_std.float().cpu(), roll.pose_valid.cpu()


def _average(rows: list[dict[str, float]], extra: dict[str, float]) -> dict[str, float]:
    out = dict(extra)
    for key in rows[0]:
        vals = np.array([r[key] for r in rows], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[key] = float(vals.mean()) if vals.size else math.nan
        out[f"{key}_se"] = float(vals.std(ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else math.nan
    return out


def policy_gradient_alignment(policy, sampler, ctx, task: str, reward: str, prompts: int = 24,
                              seed: int = 0, compare=None, **kwargs) -> dict[str, float]:
    """:func:`score_gradient_alignment` at ``policy``'s greedy head mean and std on the first
    ``prompts`` prompts of ``task`` in ``sampler`` (a :class:`~poserft.rl.rollout.PromptSampler`),
    with reward ``reward`` from ``ctx``; the per-prompt results averaged (``*_se``: standard
    error over prompts) plus ``prompts`` and ``std_mean`` (the head's mean std).

    ``compare``: a second policy (e.g. the RFT policy trained from ``policy``): then
    :func:`shift_alignment` of its greedy mean instead, with ``reference_pairs`` from kwargs.
    """
    batch = sampler.first(task, prompts)
    if batch is None:
        raise ValueError(f"the split has no {task} prompts")
    mean, std, valid = _greedy_heads(policy, batch)
    if compare is not None:
        new_mean, _, new_valid = _greedy_heads(compare, batch)
        valid = valid & new_valid
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p in range(len(batch)):
        if not bool(valid[p]):
            continue
        fn = _prompt_reward_fn(reward, batch, p, ctx)
        if compare is None:
            rows.append(score_gradient_alignment(fn, mean[p], std[p], generator=gen, **kwargs))
        else:
            rows.append(shift_alignment(fn, mean[p], std[p], new_mean[p], generator=gen,
                                        reference_pairs=kwargs.get("reference_pairs", 4096)))
    if not rows:
        raise ValueError(f"no {task} prompt produced a <POSE> token")
    return _average(rows, {"prompts": float(len(rows)), "std_mean": std[valid].mean().item()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m poserft.rl.diagnostics",
        description="Cosine between HyGRPO's one-group estimate of the pose mean's gradient and "
                    "the gradient itself, at a policy's head mean/std (module docstring).")
    p.add_argument("--policy", required=True, help="policy directory (sft/final or rft output)")
    p.add_argument("--split", required=True, help="HDF5 split whose first prompts are used (val)")
    p.add_argument("--reward-model", help="semantic reward model directory (for text2pose)")
    p.add_argument("--prompts", type=int, default=24, help="prompts per task")
    p.add_argument("--group-sizes", default="32", help="comma-separated G values")
    p.add_argument("--trials", type=int, default=40, help="group estimates per prompt")
    p.add_argument("--reference-pairs", type=int, default=8192,
                   help="antithetic pairs of the reference gradient")
    p.add_argument("--antithetic", action="store_true", help="also measure mirrored groups")
    p.add_argument("--compare", help="a policy trained from --policy (e.g. its RFT output): "
                   "report how its greedy mean moved against the reward gradient instead")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from poserft.model.io import load_policy
    from poserft.rl.config import RFTConfig
    from poserft.rl.rollout import PromptSampler
    from poserft.rl.trainer import build_reward_context, rft_task_data

    policy = load_policy(args.policy)
    compare = load_policy(args.compare) if args.compare else None
    cfg = RFTConfig()
    pairs = [("image2pose", "joint")] + ([("text2pose", "semantic")] if args.reward_model else [])
    data = rft_task_data(args.split, policy.config, {t: 1.0 for t, _ in pairs}, args.seed)
    sampler = PromptSampler(data, {t: 1.0 for t, _ in pairs if data.task_sizes.get(t, 0)}, args.seed)
    needs = {"body_model"} | ({"semantic_model"} if args.reward_model else set())
    ctx = build_reward_context(cfg, needs, args.reward_model)
    report = {}
    for task, reward in pairs:
        if not data.task_sizes.get(task, 0):
            continue
        if compare is not None:
            key = f"{task}/{reward}/shift"
            report[key] = r = policy_gradient_alignment(
                policy, sampler, ctx, task, reward, prompts=args.prompts, seed=args.seed,
                compare=compare, reference_pairs=args.reference_pairs)
            print(f"{key}: shift cos {r['shift_cos']:.3f} ± {r['shift_cos_se']:.3f}, RMS shift "
                  f"{r['shift_rms_std']:.2f} std, reward at the mean {r['reward_before']:.3f} -> "
                  f"{r['reward_after']:.3f}", file=sys.stderr)
            continue
        for g in (int(x) for x in args.group_sizes.split(",")):
            for anti in ((False, True) if args.antithetic else (False,)):
                key = f"{task}/{reward}/G{g}" + ("/antithetic" if anti else "")
                report[key] = policy_gradient_alignment(
                    policy, sampler, ctx, task, reward, prompts=args.prompts, seed=args.seed,
                    group_size=g, trials=args.trials, reference_pairs=args.reference_pairs,
                    antithetic=anti)
                print(f"{key}: cos {report[key]['cos']:.3f} ± {report[key]['cos_se']:.3f} "
                      f"(raw {report[key]['cos_raw']:.3f}, reference reliability "
                      f"{report[key]['reference_reliability']:.2f}, odd share "
                      f"{report[key]['odd_share']:.2f})", file=sys.stderr)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
