"""HyGRPO trainer: rollout -> rewards -> advantages -> mu clipped updates, from the SFT policy.

``run_rft(model_cfg, rft_cfg, sft_dir, reward_model_dir, split_paths, out_dir, tracker)``
writes::

    out_dir/model.safetensors, config.json, tokenizer.json   the RFT policy (save_policy;
                                                              load with load_policy(out_dir))
    out_dir/rft_summary.json     held-out rewards before (SFT start) and after RFT, deltas,
                                 paired per-prompt deltas with standard errors and t
                                 (``heldout_paired``), last training metrics (rank 0's),
                                 world_size, prompts_per_step (rft.batch_size, global),
                                 prompts_per_rank
    checkpoint_dir/checkpoints/step_*/   resumable engine checkpoints (default:
                                 ``<out_dir>_checkpoints``; out_dir itself is replaced
                                 atomically by the export, so checkpoints live beside it)

``run_rft`` is :func:`setup_rft` (policy, reference, prompts, reward models, engine,
resume, held-out "before"), :func:`train_rft` (the RL loop, checkpoints) and
:func:`finalise_rft` (held-out "after", export, summary).

One RL step (:func:`rft_step`): ``rft.batch_size`` prompts in total (the global batch),
each of the R ranks taking its disjoint share B = batch_size / R of the step's draw ->
G candidates each (``generate`` calls of ``rft.rollout_chunk_size`` prompts; the prompt
prefix is encoded once per prompt) -> rewards per candidate -> discrete advantages F over
the G candidates of a prompt and continuous advantages Delta over its V candidates with a
valid pose (per prompt group, so rank-local) -> reference log-probs (:class:`Reference`:
the frozen SFT policy) -> ``mu`` optimizer steps, each accumulating exact micro-batch shares
of the rank's HyGRPO loss. DDP/DeepSpeed average the ranks' gradients: the global loss is
the mean of the ranks' losses, exactly the full-batch loss for the per-sequence and
per-group aggregations (every rank holds the same number of sequences and groups) and its
data-parallel approximation for ``token-mean`` / ``candidate-mean`` (token and valid-pose
counts differ between ranks).

The reference (:class:`Reference`) is, without LoRA, a frozen copy of the SFT policy on the
rank's own training device (``rft.reference_device: auto``) in the policy's training
dtype, scored under the engine's autocast like the policy; with LoRA adapters it is the
policy itself with its adapters disabled (no second copy of the weights).

The "old" log-probs (pi_old, the policy that sampled the rollout) are an explicit
:class:`OldLogProbs` the update loop owns. The first of the ``mu`` passes runs on the
rollout's own weights, so it is on-policy: its loss takes old = its own detached log-probs
(ratios exactly 1) and records them; passes 2..mu read them. This needs no extra forward
(TRL spends a separate pass on it). The rollout's sampling-time log-probs are the same
quantities computed incrementally; their gap to the teacher-forced ones is logged
(``rollout/*_logprob_gap``), the rollout-training mismatch that low precision widens.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from poserft.atomic import write_json
from poserft.rl import core
from poserft.rl.config import HELDOUT_REWARDS, REWARD_DECLS, RFTConfig
from poserft.rl.rewards import REWARDS, RewardContext, RewardResult, compute_rewards
from poserft.rl.rollout import PromptBatch, PromptSampler, generate_group, reward_inputs

__all__ = ["run_rft", "setup_rft", "train_rft", "finalise_rft", "RFTRun", "rft_step", "Reference",
           "prepare_micro_batches", "make_loss_fn", "OldLogProbs", "heldout_rewards",
           "build_reward_context", "MicroBatch", "paired_heldout_deltas", "rft_task_data"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reference

class Reference:
    """The frozen reference policy pi_ref of the KL terms.

    ``score(prompts, images, rollout)`` -> the teacher-forced
    :class:`~poserft.model.policy.ScoreOutput` of ``rollout`` under pi_ref, without
    gradient, on the reference's device (the caller moves what it needs). Two kinds:

    * :meth:`frozen_copy`: a separate, frozen (``requires_grad False``, eval mode) module;
    * :meth:`adapters_off`: the training policy itself, scored inside its
      ``adapters_disabled()`` context (LoRA: the base weights are the SFT policy, so the LLM
      needs no copy), in eval mode (restored afterwards). ``adapters_disabled()`` only
      switches the LLM's adapters off; the parameters that train outside the LLM (vision
      projections, pose head, a trainable pose encoder: small next to the LLM) would follow
      training, so their SFT values are kept (a detached snapshot) and swapped in for the
      reference forward.

    ``autocast``: a callable returning the context the policy's forward runs under
    (``TrainEngine.autocast``), so that pi_ref and pi_theta are computed alike and the KL
    starts at 0.
    """

    def __init__(self, model, shares_policy: bool = False, autocast=None,
                 snapshot: list | None = None):
        self.model = model
        self.shares_policy = bool(shares_policy)
        self._autocast = autocast or contextlib.nullcontext
        self._snapshot = snapshot or []     # [(parameter, its SFT value)] swapped in to score

    @classmethod
    def frozen_copy(cls, model, device=None, like=None, autocast=None) -> "Reference":
        """Freeze ``model`` (already a copy of the policy) and move it to ``device``; with
        ``like`` (the training policy, as the engine holds it) each parameter and buffer
        takes the dtype of the same-named tensor of ``like``: the policy's training dtype
        (e.g. bf16 after DeepSpeed converted the policy)."""
        model.eval().requires_grad_(False)
        if like is not None:
            _match_dtypes(model, like)
        if device is not None:
            model.to(device)
        return cls(model, shares_policy=False, autocast=autocast)

    @classmethod
    def adapters_off(cls, policy, autocast=None) -> "Reference":
        """The policy with its (LoRA) adapters disabled: needs ``policy.adapters_disabled()``.
        Call it before training starts: the trainable parameters outside the LLM
        (``policy.language_model``) are snapshotted now, as the reference's values."""
        if not hasattr(policy, "adapters_disabled"):
            raise TypeError(f"{type(policy).__name__} has no adapters_disabled(); a reference "
                            "without adapters needs a LoRA policy")
        llm = getattr(policy, "language_model", None)
        in_llm = set() if llm is None else {id(p) for p in llm.parameters()}
        outside = [p for p in policy.parameters() if p.requires_grad and id(p) not in in_llm]
        if any(hasattr(p, "ds_id") for p in outside):   # ZeRO-3 partitions: no swap possible
            log.warning("LoRA reference under ZeRO-3: the trainable parameters outside the LLM "
                        "(projections, pose head) are not snapshotted; the reference uses their "
                        "current values")
            outside = []
        snapshot = [(p, p.detach().clone()) for p in outside]
        return cls(policy, shares_policy=True, autocast=autocast, snapshot=snapshot)

    @classmethod
    def wrap(cls, reference) -> "Reference | None":
        """A :class:`Reference` as is; None as None; a bare module (tests, benchmarks): a
        frozen copy where it is."""
        if reference is None or isinstance(reference, Reference):
            return reference
        return cls(reference.eval().requires_grad_(False))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, prompts, images, rollout):
        model = self.model
        adapters = model.adapters_disabled() if self.shares_policy else contextlib.nullcontext()
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad(), self._sft_values(), adapters, self._autocast():
                return model.score(prompts, images, rollout.to(self.device))
        finally:
            model.train(was_training)

    @contextlib.contextmanager
    def _sft_values(self):
        """The snapshot's values in place of the trained ones (storage swapped, not copied;
        the very same storages are put back, so optimizer views stay valid)."""
        current = [p.data for p, _ in self._snapshot]
        try:
            for p, sft in self._snapshot:
                p.data = sft
            yield
        finally:
            for (p, _), data in zip(self._snapshot, current):
                p.data = data


def _match_dtypes(module: torch.nn.Module, like: torch.nn.Module) -> None:
    """Cast each floating parameter/buffer of ``module`` to the dtype of ``like``'s tensor
    of the same name (a copy taken before the engine converted ``like``)."""
    want = {n: t.dtype for n, t in (*like.named_parameters(), *like.named_buffers())}
    with torch.no_grad():
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            dtype = want.get(name)
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)


def build_reference(cfg: RFTConfig, policy, engine, copy_of_policy=None) -> Reference | None:
    """The reference of ``cfg``'s KL terms, or None without one (both betas 0 / terms off).

    ``policy``: the training policy (``engine.module``), before any update. With fresh LoRA
    adapters (``policy.has_lora``; :func:`_lora_reference_ok`) the reference is ``policy``
    with its adapters disabled (:meth:`Reference.adapters_off`). Otherwise it is
    ``copy_of_policy`` (a deep copy taken before the engine wrapped the policy; None: copy
    it now), frozen, on ``rft.reference_device`` (auto: ``engine.device``) in the dtypes
    the engine trains the policy in, scored under ``engine.autocast``.
    """
    if not _needs_reference(cfg):
        return None
    autocast = getattr(engine, "autocast", None)
    if copy_of_policy is None and _lora_reference_ok(policy):
        if cfg.reference_device != "auto":
            log.warning("rft.reference_device=%s is ignored: the policy has LoRA adapters, so the "
                        "reference is the policy itself with its adapters disabled",
                        cfg.reference_device)
        return Reference.adapters_off(policy, autocast=autocast)
    device = engine.device if cfg.reference_device == "auto" else torch.device(cfg.reference_device)
    ref = copy_of_policy if copy_of_policy is not None else copy.deepcopy(policy)
    return Reference.frozen_copy(ref, device=device, like=policy, autocast=autocast)


def _needs_reference(cfg: RFTConfig) -> bool:
    return (cfg.uses_tokens and cfg.beta_token > 0) or (cfg.uses_pose and cfg.beta_pose > 0)


def _lora_reference_ok(policy) -> bool:
    """The policy has LoRA adapters and switching them off gives the SFT policy: they are
    fresh (every ``lora_B`` zero, as ``load_policy`` puts them on a merged export). Trained
    SFT adapters (an ``adapter`` export) would be switched off too, leaving the pre-SFT
    base: then a frozen copy is the reference (with a warning)."""
    if not getattr(policy, "has_lora", False):
        return False
    trained = [n for n, p in policy.named_parameters() if "lora_B" in n and bool(p.detach().any())]
    if trained:
        log.warning("the SFT policy carries trained LoRA adapters (%s, ...: an adapter export); "
                    "disabling them would not give the SFT policy, so the RFT reference is a "
                    "frozen copy (export SFT with model.lora.export: merged to avoid the copy)",
                    trained[0])
        return False
    return True


# --------------------------------------------------------------------------- update data

@dataclass
class MicroBatch:
    """One slice of the rollout for gradient accumulation (m rows)."""
    rollout: object                       # Rollout.select(rows)
    index: int                            # position among the step's micro-batches
    token_advantages: torch.Tensor        # (m,) F
    pose_advantages: torch.Tensor         # (m,) Delta (0 outside pose_valid)
    pose_valid: torch.Tensor              # (m,) bool: in the continuous branch's V set
    token_weight: float                   # share of the full-batch discrete term
    pose_weight: float                    # share of the full-batch continuous term
    pose_agg_weights: torch.Tensor | None = None     # (m,) continuous-term weights, sum 1 or 0
    ref_token_logprobs: torch.Tensor | None = None   # (m,Tc)
    ref_pose_dist: object | None = None              # reference PoseGaussian over m rows


@dataclass
class OldLogProbs:
    """pi_old of one rollout, per micro-batch: token log-probs ``(m,Tc)`` and pose
    log-densities ``(m,)``, detached. Recorded by the on-policy first update pass."""
    token: list[torch.Tensor | None]
    pose: list[torch.Tensor | None]

    @classmethod
    def empty(cls, n_micro: int) -> "OldLogProbs":
        return cls([None] * n_micro, [None] * n_micro)


def prepare_micro_batches(batch: PromptBatch, rollout, rewards: RewardResult, cfg: RFTConfig,
                          reference=None, device=None) -> tuple[list[MicroBatch], dict]:
    """Advantages for the whole rollout, then contiguous micro-batches with their exact loss
    shares and (when a KL term is on) the reference's log-probs / pose distribution.

    ``reference``: a :class:`Reference` (or a bare frozen module, wrapped as one), or None."""
    reference = Reference.wrap(reference)
    dev = device if device is not None else rollout.prompt_index.device
    groups = rollout.prompt_index.cpu()
    estimator = core.ADVANTAGE_ESTIMATORS.get(cfg.advantage_estimator)
    f_adv, f_m = estimator(rewards.discrete, groups, None, norm_by_std=cfg.norm_adv_by_std,
                           eps=cfg.adv_eps)
    valid = rewards.continuous_valid if cfg.uses_pose else torch.zeros_like(rewards.continuous_valid)
    d_adv, d_m = estimator(rewards.continuous, groups, valid, norm_by_std=cfg.norm_adv_by_std,
                           eps=cfg.adv_eps)
    metrics = {f"adv_token/{k[4:]}": v for k, v in f_m.items()}
    if cfg.uses_pose:
        metrics.update({f"adv_pose/{k[4:]}": v for k, v in d_m.items()})
    mask_full = rollout.completion_mask.cpu()
    need_ref_tok = cfg.uses_tokens and cfg.beta_token > 0
    need_ref_pose = cfg.uses_pose and cfg.beta_pose > 0
    # full-batch weights of the continuous term, so each micro-batch carries its exact share
    pose_w = core.pose_agg_weights(valid, groups, cfg.pose_loss_agg_mode)
    out = []
    for index, rows in enumerate(torch.arange(len(rollout)).split(cfg.micro_batch_size)):
        wt, _ = core.micro_batch_weights(mask_full[rows], mask_full, None, None, cfg.loss_agg_mode)
        pw, wp = core.split_agg_weights(pose_w[rows])
        sub = rollout.select(rows)
        mb = MicroBatch(rollout=sub, index=index, token_advantages=f_adv[rows].to(dev),
                        pose_advantages=d_adv[rows].to(dev), pose_valid=valid[rows].to(dev),
                        token_weight=wt, pose_weight=wp, pose_agg_weights=pw.to(dev))
        if reference is not None and (need_ref_tok or need_ref_pose):
            ref = reference.score(batch.prompts, batch.images, sub)
            if need_ref_tok:
                mb.ref_token_logprobs = ref.token_logprobs.detach().to(dev)
            if need_ref_pose:
                mb.ref_pose_dist = _dist_to(ref.pose_dist.detach(), dev)
        out.append(mb)
    return out, metrics


def _dist_to(dist, device):
    """Move a PoseGaussian-like (mean/std/factor) to ``device``."""
    if device is None or dist.mean.device == torch.device(device):
        return dist
    from poserft.model.heads import PoseGaussian
    f = None if dist.factor is None else dist.factor.to(device)
    return PoseGaussian(dist.mean.to(device), dist.std.to(device), f)


def make_loss_fn(batch: PromptBatch, cfg: RFTConfig, n_micro: int, old: OldLogProbs,
                 on_policy: bool):
    """``loss_fn(model, micro_batch) -> (loss, metrics)`` for ``TrainEngine.train_step``.

    ``on_policy`` (the first update pass, weights still those of the rollout): pi_old is the
    model's own detached log-probs, so every ratio is 1, and they are recorded into ``old``
    for the later passes; otherwise they are read from ``old``. The engine backpropagates
    ``loss / n_micro``; we return ``n_micro * (w_d L_d + w_c L_c)`` so the accumulated
    gradient is the full-batch HyGRPO gradient.
    """
    from poserft.model.policy import PoseMLLM

    params = core.HyGRPOParams.from_config(cfg)

    def loss_fn(model, mb: MicroBatch):
        r = mb.rollout
        out = model(PoseMLLM.score, batch.prompts, batch.images, r, with_entropy=True)
        kwargs: dict = {}
        metrics: dict[str, float] = {}
        tok_mask = r.completion_mask > 0
        if cfg.uses_tokens:
            if on_policy:
                old.token[mb.index] = out.token_logprobs.detach()
                if bool(tok_mask.any()):
                    metrics["rollout/token_logprob_gap"] = (
                        out.token_logprobs.detach() - r.token_logprobs)[tok_mask].abs().mean().item()
            kwargs.update(token_logprobs=out.token_logprobs, old_token_logprobs=old.token[mb.index],
                          ref_token_logprobs=mb.ref_token_logprobs, completion_mask=tok_mask,
                          token_advantages=mb.token_advantages)
        if cfg.uses_pose:
            dist = out.pose_dist if cfg.learn_pose_std else out.pose_dist.with_fixed_scale()
            pose_lp = dist.log_prob(r.pose_sample)
            v = mb.pose_valid
            if on_policy:
                old.pose[mb.index] = pose_lp.detach()
                if bool(v.any()):
                    metrics["rollout/pose_logprob_gap"] = (
                        pose_lp.detach() - r.pose_logprob)[v].abs().mean().item()
            pose_kl = None
            if mb.ref_pose_dist is not None:
                pose_kl = core.pose_kl(cfg.pose_kl_estimator, dist, mb.ref_pose_dist, r.pose_sample)
            kwargs.update(pose_logprob=pose_lp, old_pose_logprob=old.pose[mb.index],
                          pose_kl_to_ref=pose_kl, pose_valid=v,
                          pose_advantages=mb.pose_advantages, pose_agg_weights=mb.pose_agg_weights,
                          pose_group_index=r.prompt_index)
            if bool(v.any()):
                metrics["pose/std"] = dist.std[v].mean().item()
                metrics["pose/entropy"] = dist.entropy()[v].mean().item()
        loss, m = core.hygrpo_loss(params=params, token_weight=mb.token_weight,
                                   pose_weight=mb.pose_weight, **kwargs)
        metrics.update(m)
        if out.entropy is not None and bool(tok_mask.any()):
            metrics["token/entropy"] = out.entropy[tok_mask].mean().item()
        return n_micro * loss, metrics

    return loss_fn


# --------------------------------------------------------------------------- one step

def rft_step(engine, sampler: PromptSampler, step: int, ctx: RewardContext, cfg: RFTConfig,
             reference=None, batch: PromptBatch | None = None) -> dict[str, float]:
    """One RL step at ``step``: rollout, rewards, advantages, ``cfg.mu`` optimizer steps.

    ``engine`` is a :class:`poserft.train.engine.TrainEngine` wrapping the policy. This
    rank samples its share ``cfg.batch_size / world_size`` of the step's global prompt draw
    (:meth:`PromptSampler.rank_items`). Pass ``batch`` to reuse a fixed prompt batch
    (benchmarks). ``reference``: a :class:`Reference` (or a bare frozen module) or None.
    Returns flat float metrics (``rollout/prompts``: this rank's prompts).
    """
    policy = engine.module
    rank, world = engine.dist.rank, engine.dist.world_size
    if batch is None:
        cfg.prompts_per_rank(world)          # a clear error before sampling an uneven share
        batch = sampler.sample(step, cfg.batch_size, rank, world)
    gen = torch.Generator(device=policy.device).manual_seed(
        int(np.random.default_rng([cfg.engine.seed, 104729, step, rank]).integers(2 ** 62)))
    t0 = time.perf_counter()
    rollout = generate_group(policy, batch, cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                             gen, chunk_size=cfg.rollout_chunk_size)
    t_gen = time.perf_counter() - t0
    pose_source = "mean" if cfg.mode == "grpo" else "sample"
    rewards = compute_rewards(reward_inputs(batch, rollout, pose_source), ctx, cfg.reward_weights,
                              cfg.discrete_rewards, cfg.continuous_rewards,
                              pose_rewards_to_discrete=cfg.mode == "grpo" and cfg.grpo_pose_rewards_to_text)
    t_rew = time.perf_counter() - t0 - t_gen
    micro, adv_metrics = prepare_micro_batches(batch, rollout, rewards, cfg, reference, policy.device)
    old = OldLogProbs.empty(len(micro))
    update: dict[str, float] = {}
    for it in range(cfg.mu):
        # pass 0 runs on the rollout's weights: on-policy, it records pi_old for passes 1..
        m = engine.train_step(micro, make_loss_fn(batch, cfg, len(micro), old, on_policy=it == 0))
        for k, v in m.items():
            update[k] = update.get(k, 0.0) + v / (1 if k.startswith("rollout/") else cfg.mu)
    metrics = {**rewards.metrics("reward"), **adv_metrics, **update}
    lengths = rollout.completion_mask.sum(-1).float()
    metrics.update({"rollout/prompts": float(len(batch)),
                    "data/skipped_images": float(getattr(sampler, "last_skipped", 0) or 0),
                    "rollout/response_length": lengths.mean().item(),
                    "rollout/pose_valid_frac": rollout.pose_valid.float().mean().item(),
                    "time/generate_s": t_gen, "time/reward_s": t_rew,
                    "time/step_s": time.perf_counter() - t0})
    for task in sorted(set(batch.tasks)):
        rows = torch.tensor([batch.tasks[i] == task for i in rollout.prompt_index.cpu().tolist()])
        for name, (v, ok) in rewards.per_reward.items():
            sel = ok & rows
            if sel.any():
                metrics[f"reward_{task}/{name}"] = v[sel].mean().item()
    return metrics


# --------------------------------------------------------------------------- held-out

@torch.no_grad()
def heldout_rewards(policy, sampler: PromptSampler | None, ctx: RewardContext, cfg: RFTConfig,
                    chunk: int | None = None, per_prompt: dict | None = None) -> dict[str, float]:
    """Mean joint (image->pose) and semantic (text->pose) reward on the first
    ``cfg.eval_prompts`` prompts of the split, ``cfg.eval_samples`` sampled candidates each,
    with a fixed seed (so "before" and "after" see the same prompts and noise streams).

    Keys per task: ``{task}/{reward}`` (sampled pose: the quantity RL maximises, mean over
    candidates with a valid pose), ``{task}/{reward}_mean_pose`` (the head's mean pose of
    the same candidates), ``{task}/pose_valid_rate``, ``{task}/pose_std`` (mean std of the
    head over the valid candidates), ``*_se`` standard errors over candidates; image2pose
    also ``mpjpe_mm_mean_pose``.

    ``chunk``: prompts per generate call (default 16, or ``rft.rollout_chunk_size`` when
    that is set and smaller).

    ``per_prompt``: if a dict is given, it receives ``{task}/{reward}[_mean_pose]`` -> list
    of per-prompt means over that prompt's valid candidates (NaN where none is valid), in
    prompt order, for :func:`paired_heldout_deltas`.
    """
    out: dict[str, float] = {}
    if sampler is None or cfg.eval_prompts == 0:
        return out
    from poserft.body.metrics import mpjpe
    if chunk is None:
        chunk = min(16, cfg.rollout_chunk_size) if cfg.rollout_chunk_size else 16
    gen = torch.Generator(device=policy.device).manual_seed(cfg.engine.seed + 2 ** 20)
    for task, reward in HELDOUT_REWARDS.items():
        if sampler.data.task_sizes.get(task, 0) == 0:
            continue
        if getattr(ctx, REWARD_DECLS[reward].needs) is None:
            continue
        batch_all = sampler.first(task, cfg.eval_prompts)
        if batch_all is None:
            continue
        sums = {"sampled": [], "mean": [], "valid": [], "mpjpe": [], "std": []}
        prompt_means: dict[str, list[torch.Tensor]] = {"sampled": [], "mean": []}
        for s in range(0, len(batch_all), chunk):
            b = _slice_batch(batch_all, slice(s, s + chunk))
            r = generate_group(policy, b, cfg.eval_samples, cfg.max_new_tokens, cfg.temperature, gen)
            sums["valid"].append(r.pose_valid.float().cpu())
            for which, key in (("sample", "sampled"), ("mean", "mean")):
                v, ok = REWARDS.get(reward).fn(reward_inputs(b, r, which), ctx)
                sums[key].append(v[ok])
                prompt_means[key].append(_group_means(v, ok, r.prompt_index.cpu(), len(b)))
            if r.pose_std is not None and bool(r.pose_valid.any()):
                sums["std"].append(r.pose_std[r.pose_valid].mean(-1).cpu())
            if reward == "joint" and bool(r.pose_valid.any()):
                inp = reward_inputs(b, r, "mean")
                ok = inp.pose_valid
                body = ctx.body_model
                jp = body.forward_vec6d(inp.poses[ok])
                jg = body.forward_vec6d(inp.gt_poses[ok])
                sums["mpjpe"].append(torch.as_tensor(mpjpe(jp, jg, root=0)).float())
        valid = torch.cat(sums["valid"])
        out[f"{task}/pose_valid_rate"] = valid.mean().item()
        out[f"{task}/n_candidates"] = float(valid.numel())
        for key, name in (("sampled", reward), ("mean", f"{reward}_mean_pose")):
            vals = torch.cat(sums[key]).double()
            if vals.numel():
                out[f"{task}/{name}"] = vals.mean().item()
                # standard error over candidates (candidates of one prompt are correlated,
                # so this is a lower bound; the paired per-prompt test is the honest one)
                out[f"{task}/{name}_se"] = (vals.std().item() / vals.numel() ** 0.5
                                            if vals.numel() > 1 else 0.0)
            if per_prompt is not None:
                per_prompt[f"{task}/{name}"] = torch.cat(prompt_means[key]).tolist()
        if sums["std"]:
            out[f"{task}/pose_std"] = torch.cat(sums["std"]).mean().item()
        if sums["mpjpe"]:
            out[f"{task}/mpjpe_mm_mean_pose"] = torch.cat(sums["mpjpe"]).mean().item()
    return out


def _group_means(values: torch.Tensor, ok: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) values valid where ``ok``, grouped by ``group`` (N,) in [0,n) -> (n,) float64
    per-group means over the valid members, NaN for a group without one."""
    v = torch.where(ok, values.double(), torch.zeros((), dtype=torch.float64))
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, group.long(), v)
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, group.long(), ok.double())
    return torch.where(count > 0, total / count.clamp_min(1), torch.full((), float("nan"),
                                                                          dtype=torch.float64))


def paired_heldout_deltas(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Paired before/after comparison on the same held-out prompts.

    ``before``/``after``: key -> per-prompt means (see ``heldout_rewards(per_prompt=...)``).
    For each key present in both with the same number of prompts: ``delta`` (mean over
    prompts of after - before), ``se`` (std of the per-prompt differences / sqrt(n)), ``t``
    (delta / se; inf when se is 0 and delta is not), ``n_prompts`` (prompts valid in both).
    Pairing removes the between-prompt spread, which dominates the unpaired standard error.
    """
    out: dict[str, dict[str, float]] = {}
    for key in sorted(set(before) & set(after)):
        b = np.asarray(before[key], dtype=np.float64)
        a = np.asarray(after[key], dtype=np.float64)
        if a.shape != b.shape:
            continue
        d = (a - b)[np.isfinite(a) & np.isfinite(b)]
        if d.size == 0:
            continue
        se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
        delta = float(d.mean())
        t = delta / se if se > 0 else (float("inf") * np.sign(delta) if delta else 0.0)
        out[key] = {"delta": delta, "se": se, "t": float(t), "n_prompts": float(d.size)}
    return out


def _slice_batch(batch: PromptBatch, sl: slice) -> PromptBatch:
    return PromptBatch(tasks=batch.tasks[sl], prompts=batch.prompts[sl],
                       images=None if batch.images is None else batch.images[sl],
                       gt_poses=batch.gt_poses[sl], captions=batch.captions[sl],
                       reference_answers=batch.reference_answers[sl])


# --------------------------------------------------------------------------- entry point

def build_reward_context(cfg: RFTConfig, needs: set[str], reward_model_dir=None, body_cfg=None,
                         text_embedder=None) -> RewardContext:
    """The frozen models of ``needs`` (:meth:`RFTConfig.needed_models`): ``semantic_model``
    (the retrieval model in ``reward_model_dir``), ``text_embedder`` (an object with
    ``encode``, or the ``text_embedder`` section), ``body_model`` (``body_cfg``; None: the
    skeleton model). Models not needed are not loaded."""
    import poserft.body as body

    semantic = None
    if "semantic_model" in needs:
        if reward_model_dir is None:
            raise ValueError("rft: the semantic reward needs reward_model_dir (the frozen "
                             "retrieval model, results/retrieval/reward)")
        from poserft.retrieval.reward import SemanticReward
        semantic = SemanticReward(reward_model_dir)
    embedder = None
    if "text_embedder" in needs:
        from poserft.text.config import TextEmbedderConfig
        if text_embedder is None or isinstance(text_embedder, TextEmbedderConfig):
            from poserft.text.embedder import build_text_embedder
            embedder = build_text_embedder(text_embedder)
        else:
            embedder = text_embedder
    return RewardContext(reward_tasks=cfg.reward_tasks, format_regex=cfg.format_regex,
                         joint_eps_m=cfg.joint_reward_eps_m, joint_cap=cfg.joint_reward_cap,
                         body_model=body.load(body_cfg).eval() if "body_model" in needs else None,
                         semantic_model=semantic, text_embedder=embedder)


# what save_policy + run_rft put into out_dir; anything else means out_dir is not ours
_OUT_DIR_FILES = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "rft_summary.json"}


def _check_out_dir(out_dir: Path) -> None:
    """The export replaces out_dir as a whole: refuse a directory holding anything else
    (e.g. a run directory with sft/ inside), which would be deleted."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"run_rft: out_dir {out_dir} exists and is not a directory")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.is_dir() or p.name not in _OUT_DIR_FILES)
    if foreign:
        raise ValueError(f"run_rft: out_dir {out_dir} holds {foreign[:5]}, which the policy export "
                         "would delete (it replaces the whole directory). Pass the RFT policy "
                         "directory itself (e.g. results/runs/<variant>/seed<k>/rft)")


# rft keys that may change between a run and its resume: where the reference lives, and
# the rollout's memory knob (it changes which random numbers a step draws, not their
# distribution, so a run that ran out of memory resumes with smaller chunks)
_RESUMABLE_KEYS = {"reference_device", "rollout_chunk_size"}


def _world_size() -> int:
    """Ranks of this run: the initialised process group's, else the environment's
    (torchrun / SLURM variables; 1 for a plain process), as TrainEngine will see them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    from poserft.train.distributed import resolve_dist_env
    return resolve_dist_env(os.environ)[0].world_size


def _resume_relevant(cfg: dict) -> dict:
    """The part of the rft section a checkpoint's trajectory depends on. ``steps`` is left
    out under a constant LR (min_lr_ratio 1), so that a longer run continues a shorter one;
    with a decaying LR the schedule spans ``steps`` and a change starts afresh."""
    out = {k: v for k, v in cfg.items() if k not in _RESUMABLE_KEYS}
    if cfg["optim"].get("min_lr_ratio", 1.0) == 1.0:
        out.pop("steps", None)
    from poserft.train.engine import RESUME_NEUTRAL_ENGINE_KEYS
    out["engine"] = {k: v for k, v in cfg["engine"].items() if k not in RESUME_NEUTRAL_ENGINE_KEYS}
    return out


def rft_task_data(sources, model_cfg, task_weights: dict[str, float], seed: int, loader=None):
    """Prompts and targets of RFT: the SFT task data (``sources``: a split file or
    ``{name: (path, weight)}``) with text->pose targets in the frame SFT trained them (root
    yaw removed: a caption never says which way the body faces), so a joint reward on
    text2pose prompts (``rft.reward_tasks``) compares like with like."""
    from poserft.train.data import SFTTaskData
    return SFTTaskData(sources, model_cfg, task_weights, seed, text2pose_remove_yaw=True,
                       loader=loader, stage="rft.loader")


@dataclass
class RFTRun:
    """Everything the RL loop and the finalisation need (built by :func:`setup_rft`)."""
    cfg: RFTConfig
    engine: object                    # TrainEngine around the policy
    reference: Reference | None       # pi_ref of the KL terms (None without a KL term)
    sampler: PromptSampler
    val_sampler: PromptSampler | None
    ctx: RewardContext
    sft_dir: Path
    out_dir: Path
    checkpoint_dir: Path
    tracker: object
    before: dict                      # held-out rewards of the SFT start
    before_per_prompt: dict
    t_start: float


def setup_rft(cfg: RFTConfig, sft_dir, reward_model_dir, split_paths: dict, out_dir,
              tracker=None, text_embedder=None, body_cfg=None, checkpoint_dir=None) -> RFTRun:
    """Check that ``rft.batch_size`` splits over the ranks; load the SFT policy, the prompts,
    the reward models the configured rewards need, the engine and the reference
    (:func:`build_reference`); resume from the newest matching checkpoint; measure the
    held-out rewards of the SFT start (or take them from the checkpoint)."""
    from poserft.model.io import load_policy, resolve_policy_dir
    from poserft.train.engine import TrainEngine, run_fingerprint, seed_everything

    from poserft.tracking import record_datasets
    from poserft.train.data import resolve_sources

    cfg = RFTConfig.expect(cfg, "run_rft: rft_cfg")
    sources = resolve_sources(split_paths, cfg.data, "run_rft")
    if tracker is None:
        from poserft.tracking import NullTracker
        tracker = NullTracker()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.with_name(out_dir.name + "_checkpoints")
    t_start = time.time()
    world_size = _world_size()
    per_rank = cfg.prompts_per_rank(world_size)      # fails here, before anything is loaded
    seed_everything(cfg.engine.seed)

    policy = load_policy(sft_dir)
    if cfg.uses_pose and policy.config.head != "gaussian":
        raise ValueError(f"rft.mode={cfg.mode} needs a stochastic pose (model.head=gaussian); the "
                         f"policy in {sft_dir} has head={policy.config.head!r}. Use rft.mode=grpo "
                         "for deterministic heads")
    # the frozen copy is taken before the engine wraps (DDP/ZeRO) and converts the policy;
    # build_reference then gives it the engine's device and the policy's training dtypes
    ref_copy = None
    if _needs_reference(cfg) and not _lora_reference_ok(policy):
        ref_copy = copy.deepcopy(policy)

    mix = cfg.sampled_tasks
    train_sources = {n: (sp["train"], w) for n, (w, sp) in sources.items()}
    val_sources = {n: (sp["val"], w) for n, (w, sp) in sources.items() if "val" in sp}
    sampler = PromptSampler(rft_task_data(train_sources, policy.config, mix, cfg.engine.seed,
                                          cfg.loader), mix, cfg.engine.seed)
    record_datasets(tracker, sampler.data.dataset_records("train"))
    val_sampler = None
    if val_sources and cfg.eval_prompts:
        val_data = rft_task_data(val_sources, policy.config,
                                 {t: 1.0 for t in HELDOUT_REWARDS}, cfg.engine.seed, cfg.loader)
        record_datasets(tracker, val_data.dataset_records("val"))
        val_sampler = PromptSampler(val_data, {t: 1.0 for t in val_data.tasks}, cfg.engine.seed)
    heldout_tasks = () if val_sampler is None else tuple(
        t for t in HELDOUT_REWARDS if val_sampler.data.task_sizes.get(t, 0) > 0
        and (t != "text2pose" or reward_model_dir is not None))
    ctx = build_reward_context(cfg, cfg.needed_models(heldout_tasks), reward_model_dir,
                               body_cfg, text_embedder)

    fingerprint = run_fingerprint(
        _resume_relevant(cfg.to_dict()),
        [resolve_policy_dir(sft_dir) / "model.safetensors",
         *(p for _, sp in sources.values() for p in sp.values()),
         *([Path(reward_model_dir) / "model.safetensors"] if reward_model_dir else [])])
    engine = TrainEngine(policy, cfg.optim, cfg.engine, cfg.steps * cfg.mu, checkpoint_dir,
                         grad_accum=per_rank * cfg.group_size // cfg.micro_batch_size,
                         micro_batch_size=cfg.micro_batch_size, tracker=tracker,
                         fingerprint=fingerprint)
    if engine.dist.world_size != world_size:
        raise RuntimeError(f"run_rft: the engine runs {engine.dist.world_size} ranks, the "
                           f"environment said {world_size}")
    reference = build_reference(cfg, engine.module, engine, ref_copy)
    del ref_copy
    if engine.is_main:
        tracker.log_params({f"rft_{k}": v for k, v in cfg.to_dict().items()
                            if not isinstance(v, dict)})
    extra = engine.resume()
    if engine.step % cfg.mu:
        raise RuntimeError(f"{checkpoint_dir}: checkpoint at optimizer step {engine.step} is not a "
                           f"multiple of rft.mu={cfg.mu}; it was written with another mu. Delete "
                           "the checkpoints or restore mu")
    before, before_pp = extra.get("before"), extra.get("before_per_prompt") or {}
    if before is None:
        before = heldout_rewards(policy, val_sampler, ctx, cfg, per_prompt=before_pp) \
            if engine.is_main else {}
        if engine.is_main and before:
            engine.log(before, prefix="heldout_before/")
    return RFTRun(cfg=cfg, engine=engine, reference=reference, sampler=sampler,
                  val_sampler=val_sampler, ctx=ctx, sft_dir=Path(sft_dir), out_dir=out_dir,
                  checkpoint_dir=checkpoint_dir, tracker=tracker, before=before,
                  before_per_prompt=before_pp, t_start=t_start)


def train_rft(run: RFTRun) -> dict[str, float]:
    """RL steps from the engine's step to ``rft.steps``; a resumable checkpoint every
    ``rft.engine.checkpoint_every`` RL steps and at the end. Returns the last step's metrics."""
    from tqdm.auto import tqdm

    cfg, engine = run.cfg, run.engine
    first = engine.step // cfg.mu
    last: dict[str, float] = {}
    for step in tqdm(range(first, cfg.steps), initial=first, total=cfg.steps, desc="rft",
                     disable=not engine.is_main, dynamic_ncols=True):
        last = rft_step(engine, run.sampler, step, run.ctx, cfg, run.reference)
        if engine.is_main and ((step + 1) % cfg.engine.log_every == 0 or step + 1 == cfg.steps):
            engine.log(last, prefix="rft/")
        every = cfg.engine.checkpoint_every
        if (every and (step + 1) % every == 0) or step + 1 == cfg.steps:
            engine.save_checkpoint(extra={"before": run.before,
                                          "before_per_prompt": run.before_per_prompt,
                                          "rl_step": step + 1})
    return last


def finalise_rft(run: RFTRun, last: dict[str, float]) -> dict:
    """Held-out rewards after RL, paired with the SFT start; export the policy to out_dir;
    write and return ``rft_summary.json``."""
    cfg, engine = run.cfg, run.engine
    after_pp: dict = {}
    after = heldout_rewards(engine.module, run.val_sampler, run.ctx, cfg, per_prompt=after_pp) \
        if engine.is_main else {}
    paired = paired_heldout_deltas(run.before_per_prompt, after_pp)
    engine.export_policy(run.out_dir)
    before = run.before
    world = engine.dist.world_size
    summary: dict = {"mode": cfg.mode, "rl_steps": cfg.steps, "optimizer_steps": engine.step,
                     "world_size": world, "prompts_per_step": cfg.batch_size,
                     "prompts_per_rank": cfg.batch_size // world,
                     "sft_dir": str(run.sft_dir), "policy_dir": str(run.out_dir),
                     "checkpoint_dir": str(run.checkpoint_dir), "wall_s": time.time() - run.t_start,
                     "heldout_before": before, "heldout_after": after,
                     "heldout_delta": {k: after[k] - before[k] for k in after
                                       if k in before and not k.endswith(("n_candidates", "_se"))},
                     "heldout_paired": paired,
                     "last_step": last}
    if engine.is_main:
        engine.log(after, prefix="heldout_after/")
        engine.log({f"{k}/{stat}": v for k, d in paired.items() for stat, v in d.items()
                    if stat in ("delta", "se", "t") and np.isfinite(v)}, prefix="heldout_paired/")
        write_json(run.out_dir / "rft_summary.json", summary, allow_nan=True)
        run.tracker.log_artifact(run.out_dir / "rft_summary.json")
    return summary


def run_rft(rft_cfg: RFTConfig, sft_dir, reward_model_dir, split_paths: dict, out_dir,
            tracker=None, text_embedder=None, body_cfg=None, checkpoint_dir=None) -> dict:
    """HyGRPO (or GRPO / continuous-only, by ``rft.mode``) from the SFT policy in ``sft_dir``.

    Args:
        rft_cfg: the ``rft`` section (:class:`RFTConfig`).
        sft_dir: SFT run or policy directory (``load_policy`` resolves ``final/``); the
            policy's own saved config is its model config.
        reward_model_dir: frozen retrieval model for the semantic reward.
        split_paths: the split files of ``rft.data``'s sources, ``{source: {"train": h5, "val": h5}}``
            (one source: just its ``{"train": h5, "val": h5}``; val optional: the held-out
            measurement).
        out_dir: policy export + ``rft_summary.json`` (see module docstring).
        text_embedder: object with ``encode``, or the ``text_embedder`` section
            (TextEmbedderConfig), for the text reward; built only when that reward runs.
        body_cfg: ``body`` section for the joint reward (None: skeleton model).
        checkpoint_dir: engine checkpoints (default ``<out_dir>_checkpoints``).
    Returns the summary dict written to ``out_dir/rft_summary.json``.
    """
    run = setup_rft(rft_cfg, sft_dir, reward_model_dir, split_paths, out_dir, tracker,
                    text_embedder, body_cfg, checkpoint_dir)
    return finalise_rft(run, train_rft(run))
