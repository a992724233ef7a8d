"""SFT stage: supervised mixed-task training of the pose MLLM from the HDF5 splits.

``run_sft(model_cfg, sft_cfg, split_paths, tokenizer_path, out_dir, tracker)`` writes::

    out_dir/checkpoints/step_*/   resumable checkpoints (a restarted job continues)
    out_dir/final/                the policy (save_policy; load with load_policy(out_dir))
    out_dir/metrics.json          end-of-training check on the val split (when enabled)

Loss per micro-batch (weights in ``sft``): answer next-token cross-entropy + pose loss
(Gaussian NLL per dimension, or 6D MSE for the deterministic head) + FK joint-position
loss through the body model; see :meth:`PoseMLLM.sft_loss`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from poserft.atomic import write_json
from poserft.model.config import ModelConfig
from poserft.train.config import SFTConfig

__all__ = ["run_sft", "quick_eval", "mpjpe_mm"]

log = logging.getLogger(__name__)


def _tracker_or_null(tracker):
    if tracker is not None:
        return tracker
    from poserft.tracking import NullTracker
    return NullTracker()


def mpjpe_mm(body, pred6d: torch.Tensor, gt6d: torch.Tensor) -> torch.Tensor:
    """(B,) root-aligned MPJPE (mm, 24 SMPL joints) between two (B,144) 6D poses."""
    from poserft.body.metrics import mpjpe
    return mpjpe(body.forward_vec6d(pred6d), body.forward_vec6d(gt6d), root=0)


@torch.no_grad()
def quick_eval(policy, data, mean_pose6d: dict[str, torch.Tensor], n: int,
               max_new_tokens: int = 24, batch_size: int = 32) -> dict:
    """Greedy generations on the first ``n`` examples of each task of ``data`` (SFTTaskData).

    A quick check at the end of SFT, not the paper's protocol (that is ``poserft.eval``):
    ``{task}/format_rate`` (completion == the configured answer exactly),
    ``{task}/pose_valid_rate`` (contains <POSE>), and over rows with a <POSE>:
    ``{task}/mpjpe_mm`` (root-aligned, 24 SMPL joints) and ``{task}/pa_mpjpe_mm``
    (Procrustes-aligned), each with the ``mean_pose_`` baseline (the training split's mean
    6D pose of THAT task, ``mean_pose6d[task]``, predicted for every row);
    ``image2text/exact_match``.
    """
    from poserft.body.metrics import mpjpe, pa_mpjpe
    policy.eval()
    body = policy.body_model().to("cpu")
    out: dict[str, float] = {}
    for task in data.tasks:
        m = min(n, data.task_sizes[task])
        if m == 0:
            continue
        exs = [data.example(task, i) for i in range(m)]
        texts, valid, pred = [], [], []
        for s in range(0, m, batch_size):
            b = data.collate(exs[s:s + batch_size])
            r = policy.generate(b["prompts"], b["images"], num_samples=1,
                                max_new_tokens=max_new_tokens, do_sample=False)
            texts += r.texts
            valid.append(r.pose_valid.cpu())
            pred.append(r.pose_mean.cpu())
        valid, pred = torch.cat(valid), torch.cat(pred)
        exact = float(np.mean([t.strip() == e.answer.strip() for t, e in zip(texts, exs)]))
        if task == "image2text":
            out[f"{task}/exact_match"] = exact
            continue
        out[f"{task}/format_rate"] = exact
        out[f"{task}/pose_valid_rate"] = float(valid.float().mean())
        out[f"{task}/n"] = float(m)
        if valid.any():
            gt = body.forward_vec6d(data.collate(exs)["poses"][valid])
            guesses = {"": pred[valid],
                       "mean_pose_": mean_pose6d[task].cpu().expand(int(valid.sum()), -1)}
            for prefix, vec in guesses.items():
                joints = body.forward_vec6d(vec)
                out[f"{task}/{prefix}mpjpe_mm"] = float(mpjpe(joints, gt, root=0).mean())
                out[f"{task}/{prefix}pa_mpjpe_mm"] = float(pa_mpjpe(joints, gt).mean())
    return out


def run_sft(model_cfg: ModelConfig | None, sft_cfg: SFTConfig | None,
            split_paths: dict[str, str], tokenizer_path: str | os.PathLike | None,
            out_dir: str | os.PathLike, tracker=None) -> dict:
    """Train the policy with SFT; returns the summary written to ``out_dir/metrics.json``.

    ``split_paths``: the split files of ``sft.data``'s sources, ``{source: {"train": ...,
    "val": ...}}`` (or, with one source, just its ``{"train": ..., "val": ...}``; val
    optional: the sources that have one make the end-of-training check). ``tokenizer_path``: the project tokenizer (ignored when
    ``model.checkpoint`` is set: the checkpoint's tokenizer is extended instead).
    """
    from poserft.model.heads import GaussianPoseHead
    from poserft.model.policy import PoseMLLM, build_policy
    from poserft.tracking import record_datasets
    from poserft.train.data import SFTTaskData, StepBatches, resolve_sources
    from poserft.train.engine import (RESUME_NEUTRAL_ENGINE_KEYS, TrainEngine, run_fingerprint,
                                      seed_everything)

    model_cfg = ModelConfig.expect(model_cfg, "run_sft: model_cfg")
    sft_cfg = SFTConfig.expect(sft_cfg, "run_sft: sft_cfg")
    sources = resolve_sources(split_paths, sft_cfg.data, "run_sft")
    tracker = _tracker_or_null(tracker)
    out_dir = Path(out_dir)
    seed_everything(sft_cfg.engine.seed)

    tokenizer = None
    if not model_cfg.checkpoint:
        if tokenizer_path is None:
            raise ValueError("run_sft: tokenizer_path is required for the tiny model "
                             "(model.checkpoint is null)")
        from poserft.text.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_path)
    policy = build_policy(model_cfg, tokenizer)
    data = SFTTaskData({n: (sp["train"], w) for n, (w, sp) in sources.items()}, policy.config,
                       sft_cfg.task_weights, sft_cfg.engine.seed,
                       text2pose_remove_yaw=sft_cfg.text2pose_remove_yaw, loader=sft_cfg.loader,
                       stage="sft.loader")
    val_sources = {n: (sp["val"], w) for n, (w, sp) in sources.items() if "val" in sp}
    mean_pose = data.mean_pose6d()
    if sft_cfg.init_pose_bias_from_data:
        with torch.no_grad():  # overwritten by resume() when a checkpoint exists
            policy.pose_head.mean_out.bias.copy_(mean_pose)

    # the LR schedule spans sft.steps, so (unlike RFT's constant LR) steps is part of it
    sft_dict = sft_cfg.to_dict()
    sft_dict["engine"] = {k: v for k, v in sft_dict["engine"].items()
                          if k not in RESUME_NEUTRAL_ENGINE_KEYS}
    fingerprint = run_fingerprint(
        {"model": model_cfg.to_dict(), "sft": sft_dict},
        [*(p for _, sp in sources.values() for p in sp.values()),
         *([Path(tokenizer_path)] if tokenizer_path and not model_cfg.checkpoint else [])])
    engine = TrainEngine(policy, sft_cfg.optim, sft_cfg.engine, sft_cfg.steps, out_dir,
                         grad_accum=sft_cfg.grad_accum, micro_batch_size=sft_cfg.batch_size,
                         tracker=tracker, fingerprint=fingerprint)
    if engine.is_main:
        n_params = sum(p.numel() for p in policy.parameters())
        tracker.log_params({"sft_num_parameters": n_params,
                            "sft_tasks": ",".join(data.tasks),
                            **{f"sft_task_size_{k}": v for k, v in data.task_sizes.items()}})
        log.info("SFT: %d parameters, tasks %s (sizes %s, sources %s), %d steps", n_params,
                 data.tasks, data.task_sizes, {s.name: s.weight for s in data.sources}, sft_cfg.steps)
        record_datasets(tracker, data.dataset_records("train"))
    rank, world = engine.dist.rank, engine.dist.world_size
    weights = dict(lm_weight=sft_cfg.lm_weight, pose_weight=sft_cfg.pose_weight,
                   joint_weight=sft_cfg.joint_weight, joint_frame=sft_cfg.joint_frame,
                   nll_beta=sft_cfg.nll_beta, prompt_lm_weight=sft_cfg.prompt_lm_weight)

    def loss_fn(model, mb):
        batch = policy.sft_batch(mb["prompts"], mb["answers"], mb["images"], mb["poses"], mb["has_pose"])
        return model(PoseMLLM.sft_loss, batch, **weights)

    last: dict = {}
    batches, skipped = None, 0
    for step in engine.steps():
        if batches is None:   # the first step after a resume: workers build batches from here
            batches = iter(StepBatches(data, step, sft_cfg.steps, sft_cfg.grad_accum,
                                       sft_cfg.batch_size, rank, world,
                                       sft_cfg.loader.num_workers, sft_cfg.loader.prefetch_batches))
        micro_batches = next(batches)
        skipped += sum(mb.pop("skipped_images") for mb in micro_batches)
        last = engine.train_step(micro_batches, loss_fn)
        if skipped and engine.is_main and step % sft_cfg.engine.log_every == 0:
            engine.log({"skipped_images": skipped}, prefix="data/")
    final_dir = engine.export_policy(out_dir / "final")

    summary: dict = {"steps": engine.step, **{f"train/{k}": v for k, v in last.items()}}
    if skipped:
        log.warning("SFT: %d examples redrawn because their image was unreadable "
                    "(sft.loader.on_bad_image: skip)", skipped)
    summary["skipped_images"] = skipped
    if engine.is_main and sft_cfg.eval_samples and val_sources:
        val = SFTTaskData(val_sources, policy.config, sft_cfg.task_weights, sft_cfg.engine.seed,
                          text2pose_remove_yaw=sft_cfg.text2pose_remove_yaw, loader=sft_cfg.loader,
                       stage="sft.loader")
        record_datasets(tracker, val.dataset_records("val"))
        task_means = {t: data.mean_pose6d(t) for t in ("text2pose", "image2pose") if t in data.tasks}
        results = quick_eval(policy, val, task_means, sft_cfg.eval_samples, sft_cfg.max_new_tokens)
        engine.log(results, prefix="val/")
        summary.update({f"val/{k}": v for k, v in results.items()})
    if engine.is_main:
        summary["policy_dir"] = str(final_dir)
        summary["head"] = "gaussian" if isinstance(policy.pose_head, GaussianPoseHead) else "deterministic"
        write_json(out_dir / "metrics.json", summary, allow_nan=True)
    return summary
