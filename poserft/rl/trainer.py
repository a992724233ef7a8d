"""HyGRPO trainer: rollout -> rewards -> advantages -> mu clipped updates, from the SFT policy.

``run_rft(model_cfg, rft_cfg, sft_dir, reward_model_dir, split_paths, out_dir, tracker)``
writes::

    out_dir/model.safetensors, config.json, tokenizer.json   the RFT policy (save_policy;
                                                              load with load_policy(out_dir))
    out_dir/rft_summary.json     held-out rewards before (SFT start) and after RFT, deltas,
                                 paired per-prompt deltas with standard errors and t
                                 (``heldout_paired``), last training metrics
    checkpoint_dir/checkpoints/step_*/   resumable engine checkpoints (default:
                                 ``<out_dir>_checkpoints``; out_dir itself is replaced
                                 atomically by the export, so checkpoints live beside it)

One RL step (:func:`rft_step`): B prompts -> G candidates each (one generate call; the
prompt prefix is encoded once per prompt) -> rewards per candidate -> discrete advantages F
over the G candidates of a prompt and continuous advantages Delta over its V candidates with
a valid pose -> reference log-probs (frozen SFT copy) -> ``mu`` optimizer steps, each
accumulating exact micro-batch shares of the HyGRPO loss. The "old" log-probs are those of
the first update pass (same weights as the rollout, recomputed by the same teacher-forced
forward, so the first ratios are exactly 1).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from poserft.atomic import write_json
from poserft.rl import core
from poserft.rl.config import RFTConfig
from poserft.rl.rewards import REWARDS, RewardContext, RewardResult, compute_rewards
from poserft.rl.rollout import PromptBatch, PromptSampler, generate_group, reward_inputs

__all__ = ["run_rft", "rft_step", "prepare_micro_batches", "make_loss_fn", "heldout_rewards",
           "hygrpo_params", "build_reward_context", "MicroBatch", "paired_heldout_deltas"]

log = logging.getLogger(__name__)

# held-out measurement: which reward each pose task is judged by
HELDOUT_REWARDS = {"image2pose": "joint", "text2pose": "semantic"}


def hygrpo_params(cfg: RFTConfig) -> core.HyGRPOParams:
    return core.HyGRPOParams(
        mode=cfg.mode, clip_eps_token=cfg.clip_eps_token, clip_eps_token_high=cfg.clip_eps_token_high,
        clip_eps_pose=cfg.clip_eps_pose, dual_clip_c=cfg.dual_clip_c, beta_token=cfg.beta_token,
        beta_pose=cfg.beta_pose, token_kl_estimator=cfg.token_kl_estimator,
        loss_agg_mode=cfg.loss_agg_mode, pose_loss_agg_mode=cfg.pose_loss_agg_mode)


def _uses_tokens(cfg: RFTConfig) -> bool:
    return cfg.mode in ("hygrpo", "grpo")


def _uses_pose(cfg: RFTConfig) -> bool:
    return cfg.mode in ("hygrpo", "continuous")


def _active_rewards(cfg: RFTConfig) -> set[str]:
    return {n for n in cfg.discrete_rewards + cfg.continuous_rewards
            if cfg.reward_weights.get(n, 0.0) != 0.0}


# --------------------------------------------------------------------------- update data

@dataclass
class MicroBatch:
    """One slice of the rollout for gradient accumulation (m rows)."""
    rollout: object                       # Rollout.select(rows)
    token_advantages: torch.Tensor        # (m,) F
    pose_advantages: torch.Tensor         # (m,) Delta (0 outside pose_valid)
    pose_valid: torch.Tensor              # (m,) bool: in the continuous branch's V set
    token_weight: float                   # share of the full-batch discrete term
    pose_weight: float                    # share of the full-batch continuous term
    pose_agg_weights: torch.Tensor | None = None     # (m,) continuous-term weights, sum 1 or 0
    ref_token_logprobs: torch.Tensor | None = None   # (m,Tc)
    ref_pose_dist: object | None = None              # reference PoseGaussian over m rows
    old_token_logprobs: torch.Tensor | None = None   # (m,Tc), set by the first update pass
    old_pose_logprob: torch.Tensor | None = None     # (m,)


def prepare_micro_batches(batch: PromptBatch, rollout, rewards: RewardResult, cfg: RFTConfig,
                          reference=None, device=None) -> tuple[list[MicroBatch], dict]:
    """Advantages for the whole rollout, then contiguous micro-batches with their exact loss
    shares and (when a KL term is on) the frozen reference's log-probs / pose distribution."""
    dev = device if device is not None else rollout.prompt_index.device
    groups = rollout.prompt_index.cpu()
    estimator = core.ADVANTAGE_ESTIMATORS.get(cfg.advantage_estimator)
    f_adv, f_m = estimator(rewards.discrete, groups, None, norm_by_std=cfg.norm_adv_by_std,
                           eps=cfg.adv_eps)
    valid = rewards.continuous_valid if _uses_pose(cfg) else torch.zeros_like(rewards.continuous_valid)
    d_adv, d_m = estimator(rewards.continuous, groups, valid, norm_by_std=cfg.norm_adv_by_std,
                           eps=cfg.adv_eps)
    metrics = {f"adv_token/{k[4:]}": v for k, v in f_m.items()}
    if _uses_pose(cfg):
        metrics.update({f"adv_pose/{k[4:]}": v for k, v in d_m.items()})
    mask_full = rollout.completion_mask.cpu()
    need_ref_tok = _uses_tokens(cfg) and cfg.beta_token > 0
    need_ref_pose = _uses_pose(cfg) and cfg.beta_pose > 0
    # full-batch weights of the continuous term, so each micro-batch carries its exact share
    pose_w = core.pose_agg_weights(valid, groups, cfg.pose_loss_agg_mode)
    out = []
    for rows in torch.arange(len(rollout)).split(cfg.micro_batch_size):
        wt, _ = core.micro_batch_weights(mask_full[rows], mask_full, None, None, cfg.loss_agg_mode)
        pw, wp = core.split_agg_weights(pose_w[rows])
        sub = rollout.select(rows)
        mb = MicroBatch(rollout=sub, token_advantages=f_adv[rows].to(dev),
                        pose_advantages=d_adv[rows].to(dev), pose_valid=valid[rows].to(dev),
                        token_weight=wt, pose_weight=wp, pose_agg_weights=pw.to(dev))
        if reference is not None and (need_ref_tok or need_ref_pose):
            ref_dev = next(reference.parameters()).device
            with torch.no_grad():
                ref = reference.score(batch.prompts, batch.images, sub.to(ref_dev))
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


def make_loss_fn(batch: PromptBatch, cfg: RFTConfig, n_micro: int):
    """``loss_fn(model, micro_batch) -> (loss, metrics)`` for ``TrainEngine.train_step``.

    The engine backpropagates ``loss / n_micro``; we return ``n_micro * (w_d L_d + w_c L_c)``
    so the accumulated gradient is the full-batch HyGRPO gradient.
    """
    params = hygrpo_params(cfg)

    def loss_fn(model, mb: MicroBatch):
        r = mb.rollout
        out = model("score", batch.prompts, batch.images, r, with_entropy=True)
        first_pass = mb.old_token_logprobs is None and mb.old_pose_logprob is None
        kwargs: dict = {}
        metrics: dict[str, float] = {}
        tok_mask = r.completion_mask > 0
        if _uses_tokens(cfg):
            if first_pass:
                mb.old_token_logprobs = out.token_logprobs.detach()
            kwargs.update(token_logprobs=out.token_logprobs, old_token_logprobs=mb.old_token_logprobs,
                          ref_token_logprobs=mb.ref_token_logprobs, completion_mask=tok_mask,
                          token_advantages=mb.token_advantages)
        if _uses_pose(cfg):
            dist = out.pose_dist
            pose_lp = dist.log_prob(r.pose_sample)
            if first_pass:
                mb.old_pose_logprob = pose_lp.detach()
            pose_kl = None
            if mb.ref_pose_dist is not None:
                pose_kl = core.pose_kl(cfg.pose_kl_estimator, dist, mb.ref_pose_dist, r.pose_sample)
            kwargs.update(pose_logprob=pose_lp, old_pose_logprob=mb.old_pose_logprob,
                          pose_kl_to_ref=pose_kl, pose_valid=mb.pose_valid,
                          pose_advantages=mb.pose_advantages, pose_agg_weights=mb.pose_agg_weights,
                          pose_group_index=r.prompt_index)
            v = mb.pose_valid
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

    ``engine`` is a :class:`poserft.train.engine.TrainEngine` wrapping the policy. Pass
    ``batch`` to reuse a fixed prompt batch (benchmarks). Returns flat float metrics.
    """
    policy = engine.module
    rank = engine.dist.rank
    if batch is None:
        batch = sampler.sample(step * engine.dist.world_size + rank, cfg.batch_size)
    gen = torch.Generator(device=policy.device).manual_seed(
        int(np.random.default_rng([cfg.engine.seed, 104729, step, rank]).integers(2 ** 62)))
    t0 = time.perf_counter()
    rollout = generate_group(policy, batch, cfg.group_size, cfg.max_new_tokens, cfg.temperature, gen)
    t_gen = time.perf_counter() - t0
    pose_source = "mean" if cfg.mode == "grpo" else "sample"
    rewards = compute_rewards(reward_inputs(batch, rollout, pose_source), ctx, cfg.reward_weights,
                              cfg.discrete_rewards, cfg.continuous_rewards,
                              pose_rewards_to_discrete=cfg.mode == "grpo" and cfg.grpo_pose_rewards_to_text)
    t_rew = time.perf_counter() - t0 - t_gen
    micro, adv_metrics = prepare_micro_batches(batch, rollout, rewards, cfg, reference, policy.device)
    loss_fn = make_loss_fn(batch, cfg, len(micro))
    update: dict[str, float] = {}
    for it in range(cfg.mu):
        m = engine.train_step(micro, loss_fn)
        for k, v in m.items():
            update[k] = update.get(k, 0.0) + v / cfg.mu
    metrics = {**rewards.metrics("reward"), **adv_metrics, **update}
    lengths = rollout.completion_mask.sum(-1).float()
    metrics.update({"rollout/response_length": lengths.mean().item(),
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
                    chunk: int = 16, per_prompt: dict | None = None) -> dict[str, float]:
    """Mean joint (image->pose) and semantic (text->pose) reward on the first
    ``cfg.eval_prompts`` prompts of the split, ``cfg.eval_samples`` sampled candidates each,
    with a fixed seed (so "before" and "after" see the same prompts and noise streams).

    Keys per task: ``{task}/{reward}`` (sampled pose: the quantity RL maximises, mean over
    candidates with a valid pose), ``{task}/{reward}_mean_pose`` (the head's mean pose of
    the same candidates), ``{task}/pose_valid_rate``, ``{task}/pose_std`` (mean std of the
    head over the valid candidates), ``*_se`` standard errors over candidates; image2pose
    also ``mpjpe_mm_mean_pose``.

    ``per_prompt``: if a dict is given, it receives ``{task}/{reward}[_mean_pose]`` -> list
    of per-prompt means over that prompt's valid candidates (NaN where none is valid), in
    prompt order, for :func:`paired_heldout_deltas`.
    """
    out: dict[str, float] = {}
    if sampler is None or cfg.eval_prompts == 0:
        return out
    from poserft.body import vec6d_to_rotmats
    from poserft.eval.metrics import mpjpe
    gen = torch.Generator(device=policy.device).manual_seed(cfg.engine.seed + 2 ** 20)
    for task, reward in HELDOUT_REWARDS.items():
        if sampler.data.task_sizes.get(task, 0) == 0:
            continue
        needs = {"joint": "body_model", "semantic": "semantic_model"}[reward]
        if getattr(ctx, needs) is None:
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
                jp = body.forward_rotmats(vec6d_to_rotmats(inp.poses[ok].float()))
                jg = body.forward_rotmats(vec6d_to_rotmats(inp.gt_poses[ok].float()))
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

def build_reward_context(cfg: RFTConfig, reward_model_dir, body_cfg=None, text_embedder=None,
                         need_semantic: bool = True, need_text: bool = True) -> RewardContext:
    """Load the frozen reward models the configured rewards need."""
    import poserft.body as body

    semantic = None
    if need_semantic:
        if reward_model_dir is None:
            raise ValueError("rft: the semantic reward needs reward_model_dir (the frozen "
                             "retrieval model, results/retrieval/reward)")
        from poserft.retrieval.reward import SemanticReward
        semantic = SemanticReward(reward_model_dir)
    embedder = None
    if need_text:
        if text_embedder is None or isinstance(text_embedder, dict) or \
                type(text_embedder).__name__ == "TextEmbedderConfig":
            from poserft.text.embedder import build_text_embedder
            embedder = build_text_embedder(text_embedder)
        else:
            embedder = text_embedder
    return RewardContext(reward_tasks=cfg.reward_tasks, format_regex=cfg.format_regex,
                         joint_eps_m=cfg.joint_reward_eps_m, joint_cap=cfg.joint_reward_cap,
                         body_model=body.load(body_cfg).eval(), semantic_model=semantic,
                         text_embedder=embedder)


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


# rft keys that may change between a run and its resume without changing its trajectory
_RESUMABLE_KEYS = {"reference_device"}


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


def rft_task_data(path, model_cfg, task_weights: dict[str, float], seed: int):
    """Prompts and targets of RFT: the SFT task data with text->pose targets in the frame SFT
    trained them (root yaw removed: a caption never says which way the body faces), so a
    joint reward on text2pose prompts (``rft.reward_tasks``) compares like with like."""
    from poserft.train.data import SFTTaskData
    return SFTTaskData(path, model_cfg, task_weights, seed, text2pose_remove_yaw=True)


def run_rft(model_cfg, rft_cfg: RFTConfig | dict | None, sft_dir, reward_model_dir,
            split_paths: dict, out_dir, tracker=None, text_embedder=None, body_cfg=None,
            checkpoint_dir=None) -> dict:
    """HyGRPO (or GRPO / continuous-only, by ``rft.mode``) from the SFT policy in ``sft_dir``.

    Args:
        model_cfg: the variant's model section (the loaded policy's own config is
            authoritative; a differing one is logged).
        rft_cfg: :class:`RFTConfig` or its plain dict.
        sft_dir: SFT run or policy directory (``load_policy`` resolves ``final/``).
        reward_model_dir: frozen retrieval model for the semantic reward.
        split_paths: ``{"train": h5, "val": h5}`` (val optional: held-out measurement).
        out_dir: policy export + ``rft_summary.json`` (see module docstring).
        text_embedder: object with ``encode``, or the ``text_embedder`` section (dict/
            TextEmbedderConfig), for the text reward; built only when that reward is active.
        body_cfg: ``body`` section for the joint reward (None: skeleton model).
        checkpoint_dir: engine checkpoints (default ``<out_dir>_checkpoints``).
    Returns the summary dict written to ``out_dir/rft_summary.json``.
    """
    from poserft.model.io import load_policy, resolve_policy_dir
    from poserft.train.engine import TrainEngine, run_fingerprint, seed_everything

    cfg = rft_cfg if isinstance(rft_cfg, RFTConfig) else RFTConfig.from_dict(rft_cfg, where="rft")
    if "train" not in split_paths:
        raise ValueError(f"run_rft: split_paths needs a 'train' entry, got {sorted(split_paths)}")
    if tracker is None:
        from poserft.tracking import NullTracker
        tracker = NullTracker()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.with_name(out_dir.name + "_checkpoints")
    t_start = time.time()
    seed_everything(cfg.engine.seed)

    policy = load_policy(sft_dir)
    if _uses_pose(cfg) and policy.config.head != "gaussian":
        raise ValueError(f"rft.mode={cfg.mode} needs a stochastic pose (model.head=gaussian); the "
                         f"policy in {sft_dir} has head={policy.config.head!r}. Use rft.mode=grpo "
                         "for deterministic heads")
    if model_cfg is not None:
        given = model_cfg if isinstance(model_cfg, dict) else model_cfg.to_dict()
        own = policy.config.to_dict()
        diff = sorted(k for k in given if k != "checkpoint" and given.get(k) != own.get(k))
        if diff:
            log.warning("rft: model section differs from the SFT policy's own config in %s; "
                        "using the policy's", diff)
    reference = None
    if (_uses_tokens(cfg) and cfg.beta_token > 0) or (_uses_pose(cfg) and cfg.beta_pose > 0):
        reference = copy.deepcopy(policy).to(cfg.reference_device).eval().requires_grad_(False)

    active = _active_rewards(cfg)
    mix = {t: w for t, w in cfg.task_mix.items() if w > 0}
    data = rft_task_data(split_paths["train"], policy.config, mix, cfg.engine.seed)
    sampler = PromptSampler(data, mix, cfg.engine.seed)
    val_sampler = None
    if split_paths.get("val") and cfg.eval_prompts:
        eval_tasks = {t: 1.0 for t in HELDOUT_REWARDS}
        val_data = rft_task_data(split_paths["val"], policy.config, eval_tasks, cfg.engine.seed)
        val_sampler = PromptSampler(val_data, {t: 1.0 for t in val_data.tasks}, cfg.engine.seed)
    need_semantic = ("semantic" in active and mix.get("text2pose", 0) > 0) or (
        val_sampler is not None and val_sampler.data.task_sizes.get("text2pose", 0) > 0
        and reward_model_dir is not None)
    need_text = "text" in active and mix.get("image2text", 0) > 0
    ctx = build_reward_context(cfg, reward_model_dir, body_cfg, text_embedder, need_semantic, need_text)

    fingerprint = run_fingerprint(
        _resume_relevant(cfg.to_dict()),
        [resolve_policy_dir(sft_dir) / "model.safetensors",
         *(Path(p) for p in split_paths.values() if p),
         *([Path(reward_model_dir) / "model.safetensors"] if reward_model_dir else [])])
    engine = TrainEngine(policy, cfg.optim, cfg.engine, cfg.steps * cfg.mu, checkpoint_dir,
                         grad_accum=cfg.batch_size * cfg.group_size // cfg.micro_batch_size,
                         micro_batch_size=cfg.micro_batch_size, tracker=tracker,
                         fingerprint=fingerprint)
    if engine.is_main:
        tracker.log_params({f"rft_{k}": v for k, v in cfg.to_dict().items()
                            if not isinstance(v, dict)})
    extra = engine.resume()
    before = extra.get("before")
    before_pp = extra.get("before_per_prompt") or {}
    if before is None:
        before = heldout_rewards(policy, val_sampler, ctx, cfg, per_prompt=before_pp) \
            if engine.is_main else {}
        if engine.is_main and before:
            engine.log(before, prefix="heldout_before/")
    first = engine.step // cfg.mu
    if engine.step % cfg.mu:
        raise RuntimeError(f"{checkpoint_dir}: checkpoint at optimizer step {engine.step} is not a "
                           f"multiple of rft.mu={cfg.mu}; it was written with another mu. Delete "
                           "the checkpoints or restore mu")
    from tqdm.auto import tqdm
    last: dict[str, float] = {}
    for step in tqdm(range(first, cfg.steps), initial=first, total=cfg.steps, desc="rft",
                     disable=not engine.is_main, dynamic_ncols=True):
        last = rft_step(engine, sampler, step, ctx, cfg, reference)
        if engine.is_main and ((step + 1) % cfg.engine.log_every == 0 or step + 1 == cfg.steps):
            engine.log(last, prefix="rft/")
        every = cfg.engine.checkpoint_every
        if (every and (step + 1) % every == 0) or step + 1 == cfg.steps:
            engine.save_checkpoint(extra={"before": before, "before_per_prompt": before_pp,
                                          "rl_step": step + 1})

    after_pp: dict = {}
    after = heldout_rewards(policy, val_sampler, ctx, cfg, per_prompt=after_pp) \
        if engine.is_main else {}
    paired = paired_heldout_deltas(before_pp, after_pp)
    engine.export_policy(out_dir)
    summary: dict = {"mode": cfg.mode, "rl_steps": cfg.steps, "optimizer_steps": engine.step,
                     "sft_dir": str(sft_dir), "policy_dir": str(out_dir),
                     "checkpoint_dir": str(checkpoint_dir), "wall_s": time.time() - t_start,
                     "heldout_before": before, "heldout_after": after,
                     "heldout_delta": {k: after[k] - before[k] for k in after
                                       if k in before and not k.endswith(("n_candidates", "_se"))},
                     "heldout_paired": paired,
                     "last_step": last}
    if engine.is_main:
        engine.log(after, prefix="heldout_after/")
        engine.log({f"{k}/{stat}": v for k, d in paired.items() for stat, v in d.items()
                    if stat in ("delta", "se", "t") and np.isfinite(v)}, prefix="heldout_paired/")
        write_json(out_dir / "rft_summary.json", summary, allow_nan=True)
        tracker.log_artifact(out_dir / "rft_summary.json")
    return summary
