"""HyGRPO math: group advantages, clipped policy losses, KL estimators.

Every function here is a pure tensor function (no module state, no I/O) in the style of
verl's ``core_algos``: losses return ``(loss, metrics)`` where ``loss`` is a scalar tensor
that carries the graph and ``metrics`` is a flat ``dict[str, float]`` of detached values.

Notation (per RL step): ``B`` prompts, ``G`` candidates per prompt, ``N = B*G`` candidates,
``T`` completion tokens (padded), ``D`` pose dimension (144 = 24 joints x 6D).

* Discrete action a_i: the completion tokens; per-token log-probs ``(N,T)`` and a mask.
* Continuous action p_i: a pose drawn from the Gaussian head; its log-prob ``(N,)`` is the
  joint log-density over all D dimensions. ``pose_valid (N,)`` marks candidates whose text
  contains the ``<POSE>`` token (only those have a pose; V = number of valid candidates).

The two branches get separately group-normalised advantages (F for tokens, Delta for the
pose) and separate PPO-clipped surrogates (optionally dual-clipped); :func:`hygrpo_loss`
sums them so the shared backbone receives the summed gradient. With ``mode="grpo"`` and no
dual clip it is exactly GRPO. The defaults of :class:`HyGRPOParams` are read from the ``rft``
config section (:class:`poserft.rl.config.RFTConfig`), the single source of truth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from poserft.rl.config import RFT_MODES, RFTConfig

__all__ = [
    "Registry", "ADVANTAGE_ESTIMATORS", "LOSS_AGG_MODES", "POSE_LOSS_AGG_MODES",
    "TOKEN_KL_ESTIMATORS", "POSE_KL_ESTIMATORS", "group_stats", "grpo_advantage",
    "rloo_advantage", "aggregate_loss", "agg_units", "micro_batch_weights", "pose_agg_weights",
    "split_agg_weights", "ppo_clip_loss", "gaussian_ppo_clip_loss", "kl_k1", "kl_k2", "kl_k3",
    "diag_gaussian_kl", "pose_kl", "HyGRPOParams", "hygrpo_loss",
]

# Log-ratios are clamped before exp so that one wild sample cannot produce inf/NaN; beyond
# +-20 the ratio is far outside any clip range, so the clamp only removes gradient that the
# clip would have removed anyway (except for the unclipped negative-advantage side, where
# verl makes the same trade-off).
_LOG_RATIO_LIMIT = 20.0
# The k3 KL estimator clamps its log-ratio tighter (exp(10) ~ 2.2e4): one token whose
# reference probability is vastly above the policy's cannot dominate the KL term. The
# estimate is then at most exp(10) - 11 and its gradient is 0 beyond the clamp.
_KL_LOG_RATIO_LIMIT = 10.0


class Registry(dict):
    """Name -> callable map with a decorator and errors that list the known names. Only for
    variants the ``rft`` config selects by name (the names are declared, stdlib-only, in
    :mod:`poserft.rl.config`; a test checks each registry against its declaration)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable:
        def deco(fn: Callable) -> Callable:
            if name in self:
                raise KeyError(f"{self.what} '{name}' is registered twice")
            self[name] = fn
            return fn
        return deco

    def get(self, name: str) -> Callable:  # type: ignore[override]
        if name not in self:
            raise KeyError(f"unknown {self.what} '{name}'; known: {sorted(self)}")
        return self[name]


ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
LOSS_AGG_MODES = Registry("loss aggregation mode")
POSE_LOSS_AGG_MODES = Registry("pose loss aggregation mode")
TOKEN_KL_ESTIMATORS = Registry("token KL estimator")
POSE_KL_ESTIMATORS = Registry("pose KL estimator")


def _stat_metrics(prefix: str, x: torch.Tensor) -> dict[str, float]:
    """mean/std/min/max of a 1-D tensor (empty -> zeros), detached, as floats."""
    x = x.detach().float()
    if x.numel() == 0:
        return {f"{prefix}/mean": 0.0, f"{prefix}/std": 0.0, f"{prefix}/min": 0.0, f"{prefix}/max": 0.0}
    return {f"{prefix}/mean": x.mean().item(),
            f"{prefix}/std": x.std(correction=0).item(),
            f"{prefix}/min": x.min().item(), f"{prefix}/max": x.max().item()}


# --------------------------------------------------------------------------- advantages

@dataclass(frozen=True)
class GroupStats:
    """Per-group statistics over the valid members. All tensors are ``(n_groups,)``."""
    count: torch.Tensor   # number of valid members
    mean: torch.Tensor
    std: torch.Tensor     # unbiased (Bessel) std, 0 for groups with < 2 members
    constant: torch.Tensor  # bool: all valid members have exactly the same reward


def group_stats(values: torch.Tensor, group_index: torch.Tensor,
                valid: torch.Tensor | None = None, n_groups: int | None = None) -> GroupStats:
    """Statistics of ``values (N,)`` per group ``group_index (N,)`` over ``valid (N,)`` members.

    Invalid members may hold NaN; they are never read arithmetically.
    """
    if values.dim() != 1 or group_index.shape != values.shape:
        raise ValueError(f"values and group_index must both be (N,), got {tuple(values.shape)} "
                         f"and {tuple(group_index.shape)}")
    valid = torch.ones_like(values, dtype=torch.bool) if valid is None else valid.bool()
    if valid.shape != values.shape:
        raise ValueError(f"valid must be (N,)={tuple(values.shape)}, got {tuple(valid.shape)}")
    if not torch.isfinite(values[valid]).all():
        raise ValueError("rewards of valid candidates must be finite (got NaN/inf); "
                         "mark undefined rewards invalid instead")
    group_index = group_index.long()
    if n_groups is None:
        n_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    dtype = values.dtype if values.is_floating_point() else torch.float32
    x = torch.where(valid, values.to(dtype), torch.zeros((), dtype=dtype))
    w = valid.to(dtype)
    count = torch.zeros(n_groups, dtype=dtype).index_add_(0, group_index, w)
    mean = torch.zeros(n_groups, dtype=dtype).index_add_(0, group_index, x) / count.clamp_min(1)
    dev = (x - mean[group_index]) * w
    sq = torch.zeros(n_groups, dtype=dtype).index_add_(0, group_index, dev * dev)
    std = torch.where(count > 1, (sq / (count - 1).clamp_min(1)).sqrt(), torch.zeros((), dtype=dtype))
    # Exact constancy via max == min: the floating mean of equal numbers can differ from them
    # by one ulp, and dividing that residue by (std + eps) would invent a nonzero advantage.
    inf = torch.tensor(float("inf"), dtype=dtype)
    gmax = torch.full((n_groups,), -float("inf"), dtype=dtype).scatter_reduce(
        0, group_index, torch.where(valid, x, -inf), reduce="amax")
    gmin = torch.full((n_groups,), float("inf"), dtype=dtype).scatter_reduce(
        0, group_index, torch.where(valid, x, inf), reduce="amin")
    return GroupStats(count=count, mean=mean, std=std, constant=gmax <= gmin)


def _advantage_metrics(adv: torch.Tensor, valid: torch.Tensor, stats: GroupStats) -> dict[str, float]:
    populated = stats.count > 0
    informative = populated & (stats.count > 1) & ~stats.constant
    out = _stat_metrics("adv", adv[valid])
    out["adv/valid_frac"] = valid.float().mean().item() if valid.numel() else 0.0
    out["adv/zero_var_group_frac"] = (
        1.0 - informative.sum().item() / populated.sum().item() if populated.any() else 1.0)
    return out


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantage(rewards: torch.Tensor, group_index: torch.Tensor,
                   valid: torch.Tensor | None = None, *, norm_by_std: bool = True,
                   eps: float = 1e-6) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO outcome advantage: ``(r_i - mean_g) / (std_g + eps)`` within each prompt group.

    Args:
        rewards: ``(N,)`` scalar reward per candidate.
        group_index: ``(N,)`` int, the prompt each candidate belongs to.
        valid: ``(N,)`` bool or None (all valid). Statistics use valid members only
            (the continuous branch: the V candidates with a pose); invalid ones get 0.
        norm_by_std: divide by the group std (GRPO) or only centre (Dr. GRPO).
        eps: added to the std.
    Returns:
        ``advantages (N,)`` (no grad) and metrics. Groups with fewer than two valid members
        or with identical rewards give exactly zero advantage (never NaN).
    """
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    stats = group_stats(rewards, group_index, valid)
    g = group_index.long()
    r = torch.where(valid, rewards, torch.zeros((), dtype=rewards.dtype)).detach()
    adv = r - stats.mean[g]
    if norm_by_std:
        adv = adv / (stats.std[g] + eps)
    informative = (stats.count[g] > 1) & ~stats.constant[g] & valid
    adv = torch.where(informative, adv, torch.zeros((), dtype=adv.dtype))
    return adv, _advantage_metrics(adv, valid, stats)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantage(rewards: torch.Tensor, group_index: torch.Tensor,
                   valid: torch.Tensor | None = None, *, norm_by_std: bool = False,
                   eps: float = 1e-6) -> tuple[torch.Tensor, dict[str, float]]:
    """Leave-one-out baseline: ``r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean_g)``.

    Same arguments and zero-advantage rules as :func:`grpo_advantage`; ``norm_by_std``
    additionally divides by the group std.
    """
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    stats = group_stats(rewards, group_index, valid)
    g = group_index.long()
    n = stats.count[g]
    r = torch.where(valid, rewards, torch.zeros((), dtype=rewards.dtype)).detach()
    adv = (r - stats.mean[g]) * n / (n - 1).clamp_min(1)
    if norm_by_std:
        adv = adv / (stats.std[g] + eps)
    informative = (n > 1) & ~stats.constant[g] & valid
    adv = torch.where(informative, adv, torch.zeros((), dtype=adv.dtype))
    return adv, _advantage_metrics(adv, valid, stats)


# --------------------------------------------------------------------------- aggregation

@LOSS_AGG_MODES.register("token-mean")
def _agg_token_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over all tokens / total number of tokens (long answers weigh more)."""
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1)


@LOSS_AGG_MODES.register("seq-mean-token-mean")
def _agg_seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's 1/G sum_i 1/|o_i| sum_t: mean per sequence, then mean over the sequences that
    have at least one token (an empty completion has no token to credit)."""
    m = mask.to(loss.dtype)
    n_tok = m.sum(-1)
    has = n_tok > 0
    per_seq = (loss * m).sum(-1) / n_tok.clamp_min(1)
    return (per_seq * has).sum() / has.sum().clamp_min(1)


@LOSS_AGG_MODES.register("seq-mean-token-sum")
def _agg_seq_mean_token_sum(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over each sequence's tokens, mean over sequences with at least one token."""
    m = mask.to(loss.dtype)
    has = m.sum(-1) > 0
    return ((loss * m).sum(-1) * has).sum() / has.sum().clamp_min(1)


@LOSS_AGG_MODES.register("seq-mean-token-sum-norm")
def _agg_seq_mean_token_sum_norm(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: total token sum / (N * T) with T the padded length (a constant budget)."""
    m = mask.to(loss.dtype)
    return (loss * m).sum() / max(loss.shape[0] * loss.shape[-1], 1)


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss ``(N,T)`` under ``mask (N,T)`` to a scalar by ``mode``."""
    if loss.shape != mask.shape:
        raise ValueError(f"loss {tuple(loss.shape)} and mask {tuple(mask.shape)} differ")
    return LOSS_AGG_MODES.get(mode)(loss, mask)


def agg_units(mask: torch.Tensor, mode: str) -> float:
    """What ``mode`` divides by, counted on ``mask (n,T)``: tokens (token-mean), sequences
    with a token (seq-mean-*), or rows (seq-mean-token-sum-norm, same padded T)."""
    LOSS_AGG_MODES.get(mode)  # validates the name
    if mode == "token-mean":
        return float(mask.float().sum())
    if mode == "seq-mean-token-sum-norm":
        return float(mask.shape[0])
    return float((mask.float().sum(-1) > 0).sum())


def micro_batch_weights(token_mask_micro: torch.Tensor, token_mask_full: torch.Tensor,
                        pose_valid_micro: torch.Tensor | None, pose_valid_full: torch.Tensor | None,
                        loss_agg_mode: str) -> tuple[float, float]:
    """Weights ``(w_token, w_pose)`` such that summing ``w_token * L_d + w_pose * L_c`` over
    micro-batches gives exactly the full-batch loss (gradient accumulation that is not
    biased by uneven token/valid counts per micro-batch). Masks: ``(m,T)``/``(N,T)`` and
    ``(m,)``/``(N,)``."""
    full = agg_units(token_mask_full, loss_agg_mode)
    w_tok = agg_units(token_mask_micro, loss_agg_mode) / full if full > 0 else 0.0
    w_pose = 0.0
    if pose_valid_full is not None and pose_valid_micro is not None:
        v_full = float(pose_valid_full.float().sum())
        w_pose = float(pose_valid_micro.float().sum()) / v_full if v_full > 0 else 0.0
    return w_tok, w_pose


# The continuous term is a weighted sum ``sum_i w_i l_i`` over candidates; each
# POSE_LOSS_AGG_MODES entry maps ``(valid (N,) bool, group_index (N,) | None, dtype)`` to the
# weights ``w (N,)``: 0 outside ``valid``, summing to 1 (or 0 when nothing contributes).

@POSE_LOSS_AGG_MODES.register("candidate-mean")
def _pose_agg_candidate_mean(valid: torch.Tensor, group_index: torch.Tensor | None,
                             dtype: torch.dtype) -> torch.Tensor:
    """``1/V`` for each of the V valid candidates of the whole batch (prompts with more
    valid candidates weigh more; the analogue of token-mean)."""
    w = valid.to(dtype)
    return w / w.sum().clamp_min(1)


@POSE_LOSS_AGG_MODES.register("group-mean-candidate-mean")
def _pose_agg_group_mean(valid: torch.Tensor, group_index: torch.Tensor | None,
                         dtype: torch.dtype) -> torch.Tensor:
    """``1/(B V_g)``: mean over the V_g valid candidates of each prompt group, then mean over
    the B groups present (eq. (6) of Pose-RFT read per prompt). A group with V_g = 0
    contributes 0 and still counts in B."""
    if group_index is None:
        raise ValueError("pose loss aggregation 'group-mean-candidate-mean' needs the "
                         "candidates' group_index (the prompt of each candidate)")
    if group_index.shape != valid.shape:
        raise ValueError(f"group_index {tuple(group_index.shape)} and valid "
                         f"{tuple(valid.shape)} must both be (N,)")
    if valid.numel() == 0:
        return valid.to(dtype)
    _, inv = torch.unique(group_index, return_inverse=True)
    n_groups = int(inv.max().item()) + 1
    w = valid.to(dtype)
    v_g = torch.zeros(n_groups, dtype=dtype, device=w.device).index_add_(0, inv, w)
    return w / (v_g[inv].clamp_min(1) * n_groups)


def pose_agg_weights(valid: torch.Tensor, group_index: torch.Tensor | None = None,
                     mode: str = "candidate-mean", dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
    """Per-candidate weights ``(N,)`` of the continuous term under a
    :data:`POSE_LOSS_AGG_MODES` key, from ``valid (N,)`` and ``group_index (N,)``. Compute
    them on the full rollout batch and slice them per micro-batch (:func:`split_agg_weights`)
    so that group-mean stays exact when a group straddles micro-batches."""
    return POSE_LOSS_AGG_MODES.get(mode)(valid.bool(), group_index, dtype)


def split_agg_weights(weights_micro: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A micro-batch's slice ``(m,)`` of full-batch aggregation weights -> ``(w, share)``
    with ``w`` summing to 1 (all 0 if the slice is) and ``share`` its sum, so that
    ``share * sum_i w_i l_i == sum_i weights_micro_i l_i`` (the ``pose_weight`` of
    :func:`hygrpo_loss`)."""
    share = float(weights_micro.sum())
    if share <= 0.0:
        return torch.zeros_like(weights_micro), 0.0
    return weights_micro / share, share


# --------------------------------------------------------------------------- policy losses

def _check_dual_clip(dual_clip_c: float | None) -> None:
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (or None to disable), got {dual_clip_c}")


def _clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                       clip_low: float, clip_high: float, dual_clip_c: float | None = None):
    """Per-element PPO loss ``max(-A r, -A clip(r))``; with ``dual_clip_c = c`` the loss of
    elements with ``A < 0`` is further capped at ``-A c`` (dual clip, Ye et al. 2020; verl's
    ``clip_ratio_c``). Returns ``(loss, ratio, log_ratio, clipped, dual_clipped)``; the last
    two are bool indicators (``dual_clipped``: A < 0 and the cap is active)."""
    log_ratio = (logp - old_logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip_c is None:
        return loss, ratio, log_ratio, clipped > unclipped, torch.zeros_like(loss, dtype=torch.bool)
    cap = -adv * dual_clip_c
    dual = (adv < 0) & (loss > cap)
    return torch.where(dual, cap, loss), ratio, log_ratio, clipped > unclipped, dual


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.detach()[mask.bool()]


def _surrogate_metrics(pg_loss: torch.Tensor, ratio: torch.Tensor, log_ratio: torch.Tensor,
                       clipped: torch.Tensor, dual: torch.Tensor, mask: torch.Tensor
                       ) -> dict[str, float]:
    """pg_loss, clipfrac, dual_clipfrac, approx_kl and ratio stats over ``mask``."""
    r = _masked(ratio, mask)
    has = r.numel() > 0
    metrics = {"pg_loss": pg_loss.item(),
               "clipfrac": _masked(clipped.float(), mask).mean().item() if has else 0.0,
               "dual_clipfrac": _masked(dual.float(), mask).mean().item() if has else 0.0,
               "approx_kl": (-_masked(log_ratio, mask)).mean().item() if has else 0.0}
    metrics.update(_stat_metrics("ratio", r))
    return metrics


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, *, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                  dual_clip_c: float | None = None, loss_agg_mode: str = "seq-mean-token-mean",
                  extra_token_loss: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped token surrogate (the discrete branch), optionally dual-clipped.

    Args:
        logp, old_logp: ``(N,T)`` log-probs of the sampled tokens under the current and the
            rollout policy (old is constant).
        advantages: ``(N,)`` one advantage per sequence (outcome reward), broadcast over T.
        mask: ``(N,T)`` 1 for completion tokens.
        clip_eps, clip_eps_high: ratio clipped to ``[1-clip_eps, 1+clip_eps_high]``
            (high defaults to clip_eps; a larger high is DAPO's clip-higher).
        dual_clip_c: None, or c > 1: per-token loss ``min(max(-A r, -A clip(r)), -A c)`` where
            ``A < 0`` (unchanged where ``A >= 0``).
        loss_agg_mode: key of :data:`LOSS_AGG_MODES`.
        extra_token_loss: optional ``(N,T)`` term added per token before aggregation
            (the KL penalty), so both are aggregated the same way.
    Returns:
        scalar loss, metrics ``pg_loss``, ``clipfrac``, ``dual_clipfrac`` (fraction of masked
        tokens where the dual clip is active; verl's ``pg_clipfrac_lower``), ``approx_kl``
        (E[log old - log new]), ``ratio/{mean,std,min,max}``.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must all be (N,T)")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (N,)={tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")
    _check_dual_clip(dual_clip_c)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    per_tok, ratio, log_ratio, clipped, dual = _clipped_surrogate(
        logp, old_logp.detach(), advantages.detach()[:, None].to(logp.dtype), clip_eps, high,
        dual_clip_c)
    pg_loss = aggregate_loss(per_tok, mask, loss_agg_mode)
    loss = pg_loss if extra_token_loss is None else aggregate_loss(per_tok + extra_token_loss, mask, loss_agg_mode)
    return loss, _surrogate_metrics(pg_loss, ratio, log_ratio, clipped, dual, mask)


def gaussian_ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, *, clip_eps: float = 0.2,
                           clip_eps_high: float | None = None, dual_clip_c: float | None = None,
                           agg_weights: torch.Tensor | None = None,
                           extra_token_loss: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped surrogate of the continuous pose action (the continuous branch).

    ``r_c = exp(log N(p | mu_new, s_new) - log N(p | mu_old, s_old))`` with the joint
    log-density over all D dims, and
    ``L_c = sum_{i valid} w_i * -min(r_c Delta_i, clip(r_c, 1-eps, 1+eps) Delta_i)``, with
    the dual-clip cap ``-Delta_i c`` where ``Delta_i < 0`` when ``dual_clip_c`` is set.

    Args:
        logp, old_logp: ``(N,)`` pose log-densities (current, rollout).
        advantages: ``(N,)`` Delta (0 where invalid).
        mask: ``(N,)`` bool, the valid candidates (V = mask.sum()).
        agg_weights: ``(N,)`` constant weights w (see :func:`pose_agg_weights`); None =
            candidate-mean, ``1/V`` per valid candidate. Ignored outside ``mask``.
        extra_token_loss: optional ``(N,)`` per-candidate term (the pose KL penalty),
            weighted like the surrogate.
    Returns:
        scalar loss (0 but differentiable when V = 0) and the metrics of
        :func:`ppo_clip_loss` (unweighted, over the valid candidates).
    """
    if logp.dim() != 1 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must all be (N,)")
    if advantages.shape != logp.shape:
        raise ValueError(f"advantages must be (N,)={tuple(logp.shape)}, got {tuple(advantages.shape)}")
    _check_dual_clip(dual_clip_c)
    m = mask.bool()
    if agg_weights is None:
        agg_weights = _pose_agg_candidate_mean(m, None, logp.dtype)
    elif agg_weights.shape != logp.shape:
        raise ValueError(f"agg_weights must be (N,)={tuple(logp.shape)}, got {tuple(agg_weights.shape)}")
    w = agg_weights.detach().to(logp.dtype)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    per, ratio, log_ratio, clipped, dual = _clipped_surrogate(
        logp, old_logp.detach(), advantages.detach().to(logp.dtype), clip_eps, high, dual_clip_c)
    zero = torch.zeros((), dtype=per.dtype)
    pg_loss = torch.where(m, per * w, zero).sum()
    loss = pg_loss if extra_token_loss is None else \
        torch.where(m, (per + extra_token_loss) * w, zero).sum()
    return loss, _surrogate_metrics(pg_loss, ratio, log_ratio, clipped, dual, m)


# --------------------------------------------------------------------------- KL estimators
# All estimate KL(pi_theta || pi_ref) from samples x ~ pi_theta (Schulman's k1/k2/k3):
# with log_r = log pi_ref(x) - log pi_theta(x):  k1 = -log_r (unbiased, high variance, can be
# negative), k2 = log_r^2 / 2 (biased, low variance), k3 = exp(log_r) - log_r - 1 (unbiased,
# always >= 0).

@TOKEN_KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``logp - ref_logp``, elementwise (any shape)."""
    return logp - ref_logp


@TOKEN_KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``0.5 (logp - ref_logp)^2``, elementwise."""
    return 0.5 * (logp - ref_logp) ** 2


@TOKEN_KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``exp(l) - l - 1`` with ``l = clamp(ref - logp, -10, 10)`` elementwise; >= 0 by
    convexity of exp, at most ``exp(10) - 11`` (finite for any input; zero gradient where
    the clamp is active, as in verl)."""
    log_r = (ref_logp - logp).clamp(-_KL_LOG_RATIO_LIMIT, _KL_LOG_RATIO_LIMIT)
    return torch.exp(log_r) - log_r - 1.0


def diag_gaussian_kl(mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor,
                     std_q: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mean_p, diag std_p^2) || N(mean_q, diag std_q^2)), inputs ``(...,D)``
    -> ``(...)``: sum_d log(s_q/s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2."""
    var_p, var_q = std_p ** 2, std_q ** 2
    return (torch.log(std_q / std_p) + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)


@POSE_KL_ESTIMATORS.register("analytic")
def _pose_kl_analytic(dist, ref_dist, sample: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi_theta(.|s) || pi_ref(.|s)) per candidate ``(N,)``; ignores the sample."""
    return dist.kl(ref_dist)


@POSE_KL_ESTIMATORS.register("k3")
def _pose_kl_k3(dist, ref_dist, sample: torch.Tensor) -> torch.Tensor:
    """k3 on the sampled pose ``(N,D)`` -> ``(N,)`` (one-sample estimate)."""
    return kl_k3(dist.log_prob(sample), ref_dist.log_prob(sample).detach())


def pose_kl(estimator: str, dist, ref_dist, sample: torch.Tensor) -> torch.Tensor:
    """Per-candidate pose KL ``(N,)`` by a :data:`POSE_KL_ESTIMATORS` key. ``dist`` and
    ``ref_dist`` are batched distributions over ``(N,D)`` with ``log_prob(x) -> (N,)``."""
    return POSE_KL_ESTIMATORS.get(estimator)(dist, ref_dist, sample)


# --------------------------------------------------------------------------- HyGRPO

_RFT_FIELDS = {f.name: f for f in dataclasses.fields(RFTConfig)}


def _rft_default(name: str):
    """Default of ``rft.<name>``: the config section is the single source of truth."""
    return _RFT_FIELDS[name].default


@dataclass(frozen=True)
class HyGRPOParams:
    """Hyperparameters of :func:`hygrpo_loss`; every field named like an ``rft`` config key
    mirrors it and takes its default from :class:`~poserft.rl.config.RFTConfig`."""
    mode: str = _rft_default("mode")                                # hygrpo | grpo | continuous
    clip_eps_token: float = _rft_default("clip_eps_token")
    clip_eps_token_high: float | None = _rft_default("clip_eps_token_high")
    clip_eps_pose: float = _rft_default("clip_eps_pose")
    dual_clip_c: float | None = _rft_default("dual_clip_c")         # None: no dual clip
    beta_token: float = _rft_default("beta_token")
    beta_pose: float = _rft_default("beta_pose")
    token_kl_estimator: str = _rft_default("token_kl_estimator")
    loss_agg_mode: str = _rft_default("loss_agg_mode")
    pose_loss_agg_mode: str = _rft_default("pose_loss_agg_mode")

    @classmethod
    def from_config(cls, cfg: RFTConfig) -> "HyGRPOParams":
        """The loss hyperparameters of an ``rft`` section (every field shares its name)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def hygrpo_loss(*, params: HyGRPOParams,
                token_logprobs: torch.Tensor | None = None,
                old_token_logprobs: torch.Tensor | None = None,
                ref_token_logprobs: torch.Tensor | None = None,
                completion_mask: torch.Tensor | None = None,
                token_advantages: torch.Tensor | None = None,
                pose_logprob: torch.Tensor | None = None,
                old_pose_logprob: torch.Tensor | None = None,
                pose_kl_to_ref: torch.Tensor | None = None,
                pose_valid: torch.Tensor | None = None,
                pose_advantages: torch.Tensor | None = None,
                pose_group_index: torch.Tensor | None = None,
                pose_agg_weights: torch.Tensor | None = None,
                token_weight: float = 1.0, pose_weight: float = 1.0,
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """HyGRPO objective (to minimise) = discrete term + continuous term.

    Discrete (modes hygrpo, grpo): ``agg_t[ -min(r A, clip(r) A) + beta_token KL_t ]`` over
    tokens ``(N,T)`` with advantages F ``(N,)``; ``ref_token_logprobs`` may be None when
    ``beta_token == 0``.
    Continuous (modes hygrpo, continuous): ``sum_valid w_i [ -min(r_c D, clip(r_c) D) +
    beta_pose KL_pose ]`` with pose log-densities ``(N,)``, advantages Delta ``(N,)``,
    ``pose_valid (N,)`` and ``pose_kl_to_ref (N,)`` from :func:`pose_kl` (may be None when
    ``beta_pose == 0``). The weights ``w`` are ``pose_agg_weights (N,)`` when given (a
    micro-batch's share of full-batch weights, see :func:`split_agg_weights`), else
    :func:`pose_agg_weights` of ``params.pose_loss_agg_mode`` on these rows: candidate-mean
    ``1/V``, or group-mean-candidate-mean ``1/(B V_g)`` (needs ``pose_group_index (N,)``).
    V == 0 gives a zero continuous term (still differentiable).
    Both terms are dual-clipped at ``-A c`` for negative advantages when
    ``params.dual_clip_c = c`` is not None.

    ``token_weight``/``pose_weight`` scale the two terms (micro-batch accumulation, see
    :func:`micro_batch_weights`); metrics report the unscaled terms.

    Returns the scalar loss and metrics prefixed ``token/``, ``pose/`` and ``loss/``.
    """
    if params.mode not in RFT_MODES:
        raise ValueError(f"mode must be one of {RFT_MODES}, got {params.mode!r}")
    metrics: dict[str, float] = {}
    total = None
    if params.mode in ("hygrpo", "grpo"):
        for name, t in (("token_logprobs", token_logprobs), ("old_token_logprobs", old_token_logprobs),
                        ("completion_mask", completion_mask), ("token_advantages", token_advantages)):
            if t is None:
                raise ValueError(f"mode {params.mode!r} needs {name}")
        kl_tok = None
        if params.beta_token != 0.0:
            if ref_token_logprobs is None:
                raise ValueError("beta_token != 0 needs ref_token_logprobs")
            kl_tok = TOKEN_KL_ESTIMATORS.get(params.token_kl_estimator)(
                token_logprobs, ref_token_logprobs.detach())
        loss_d, m = ppo_clip_loss(
            token_logprobs, old_token_logprobs, token_advantages, completion_mask,
            clip_eps=params.clip_eps_token, clip_eps_high=params.clip_eps_token_high,
            dual_clip_c=params.dual_clip_c, loss_agg_mode=params.loss_agg_mode,
            extra_token_loss=None if kl_tok is None else params.beta_token * kl_tok)
        metrics.update({f"token/{k}": v for k, v in m.items()})
        if kl_tok is not None:
            metrics["token/kl_ref"] = _masked(kl_tok, completion_mask).mean().item() \
                if completion_mask.any() else 0.0
        metrics["loss/discrete"] = loss_d.item()
        total = loss_d if token_weight == 1.0 else token_weight * loss_d
    if params.mode in ("hygrpo", "continuous"):
        for name, t in (("pose_logprob", pose_logprob), ("old_pose_logprob", old_pose_logprob),
                        ("pose_valid", pose_valid), ("pose_advantages", pose_advantages)):
            if t is None:
                raise ValueError(f"mode {params.mode!r} needs {name}")
        if params.beta_pose != 0.0 and pose_kl_to_ref is None:
            raise ValueError("beta_pose != 0 needs pose_kl_to_ref")
        valid = pose_valid.bool()
        # Invalid candidates have no pose; their log-densities may be garbage -> zero them so
        # that NaN * 0 cannot leak into the gradient.
        zero = torch.zeros((), dtype=pose_logprob.dtype)
        lp = torch.where(valid, pose_logprob, zero)
        old_lp = torch.where(valid, old_pose_logprob.detach(), zero)
        kl_pose = None
        if params.beta_pose != 0.0:
            kl_pose = torch.where(valid, pose_kl_to_ref, zero)
        if pose_agg_weights is None:
            pose_agg_weights = POSE_LOSS_AGG_MODES.get(params.pose_loss_agg_mode)(
                valid, pose_group_index, pose_logprob.dtype)
        loss_c, m = gaussian_ppo_clip_loss(
            lp, old_lp, torch.where(valid, pose_advantages, zero), valid,
            clip_eps=params.clip_eps_pose, dual_clip_c=params.dual_clip_c,
            agg_weights=pose_agg_weights,
            extra_token_loss=None if kl_pose is None else params.beta_pose * kl_pose)
        metrics.update({f"pose/{k}": v for k, v in m.items()})
        if kl_pose is not None:
            metrics["pose/kl_ref"] = kl_pose.detach()[valid].mean().item() if valid.any() else 0.0
        metrics["pose/valid_frac"] = valid.float().mean().item() if valid.numel() else 0.0
        metrics["loss/continuous"] = loss_c.item()
        loss_c = loss_c if pose_weight == 1.0 else pose_weight * loss_c
        total = loss_c if total is None else total + loss_c
    metrics["loss/total"] = metrics.get("loss/discrete", 0.0) + metrics.get("loss/continuous", 0.0)
    return total, metrics

