"""Stage ``train_retrieval_{role}``: contrastive training of a text-pose retrieval model.

Each epoch visits every training pose of the role once, paired with one of its captions
drawn at random; validation Recall@K (both protocols of ``poserft.eval.metrics``) picks the
best epoch by protocol-1 mRecall. Outputs in ``out_dir``: the model directory
(``model.safetensors``, ``config.json``, tokenizer; see ``checkpoint``) and ``recall.json``
with the test split's recall ``{"full": {...}, "sampled": {...}}``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from poserft.atomic import write_json
from poserft.retrieval.checkpoint import save_retrieval_model
from poserft.retrieval.config import ROLES, RetrievalConfig
from poserft.retrieval.losses import symmetric_infonce
from poserft.retrieval.model import RetrievalArch, RetrievalModel

__all__ = ["RetrievalSplit", "load_retrieval_split", "role_pose_subset", "evaluate_recall",
           "chance_recall", "pair_accuracy", "build_model", "train_retrieval"]


@dataclass
class RetrievalSplit:
    """Poses and captions of one split: pose_vec6d (N,144), captions (M), caption_pose (M,)."""

    path: str
    pose_vec6d: torch.Tensor
    captions: list[str]
    caption_pose: np.ndarray


def load_retrieval_split(path: str | os.PathLike) -> RetrievalSplit:
    """Read one HDF5 split (``/poses/*``, ``/captions/*``) into memory."""
    from poserft.body.posevec import smpl_to_vec6d
    from poserft.data.h5io import SplitReader

    with SplitReader(path) as reader:
        if not reader.has("captions/text") or reader.num_captions == 0:
            raise ValueError(f"{path}: no captions (/captions/text); retrieval training and "
                             "evaluation need captioned poses — use a split with captions")
        poses = reader.poses()
        captions = [str(t) for t in reader.captions()]
        caption_pose = np.asarray(reader.caption_pose_index(), dtype=np.int64)
    n = poses["global_orient"].shape[0]
    if caption_pose.shape != (len(captions),) or caption_pose.min() < 0 or caption_pose.max() >= n:
        raise ValueError(f"{path}: /captions/pose_index must be {len(captions)} indices in "
                         f"[0, {n}); the file is inconsistent — regenerate it")
    with torch.no_grad():
        vec = smpl_to_vec6d(torch.as_tensor(poses["global_orient"], dtype=torch.float32),
                            torch.as_tensor(poses["body_pose"], dtype=torch.float32))
    return RetrievalSplit(str(path), vec.float(), captions, caption_pose)


def concat_splits(parts: list[RetrievalSplit]) -> RetrievalSplit:
    """The splits of several sources as one (pose rows and captions appended in order)."""
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [p.pose_vec6d.shape[0] for p in parts[:-1]])
    return RetrievalSplit("+".join(p.path for p in parts),
                          torch.cat([p.pose_vec6d for p in parts]),
                          [c for p in parts for c in p.captions],
                          np.concatenate([p.caption_pose + o for p, o in zip(parts, offsets)]))


def role_pose_subset(captioned_poses: np.ndarray, cfg: RetrievalConfig, role: str) -> np.ndarray:
    """The training poses of ``role`` (sorted pose ids) per ``cfg.role_subsets``."""
    pool = np.unique(captioned_poses)
    if cfg.role_subsets == "all" or cfg.share_evaluator_with_reward:
        return pool
    if cfg.role_subsets == "disjoint_halves":
        perm = np.random.default_rng(cfg.subset_seed).permutation(pool)
        half = len(pool) // 2
        chosen = perm[:half] if role == "reward" else perm[half:]
    else:  # random_fraction: independent draw per role
        rng = np.random.default_rng([cfg.subset_seed, cfg.seed_for(role)])
        size = max(2, int(round(cfg.subset_fraction * len(pool))))
        chosen = rng.choice(pool, size=min(size, len(pool)), replace=False)
    return np.sort(chosen)


def build_model(cfg: RetrievalConfig, tokenizer_path: str | os.PathLike | None) -> RetrievalModel:
    """Fresh model for ``cfg``: project tokenizer (transformer) or the checkpoint's own."""
    if cfg.text_encoder == "transformer":
        from poserft.text.tokenizer import load_tokenizer
        if tokenizer_path is None:
            raise ValueError("retrieval.text_encoder 'transformer' needs tokenizer_path "
                             "(the project tokenizer.json)")
        tokenizer = load_tokenizer(tokenizer_path)
        arch = RetrievalArch.from_config(cfg, len(tokenizer), tokenizer.pad_token_id,
                                         tokenizer.bos_token_id)
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained_text_model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else pad
        arch = RetrievalArch.from_config(cfg, len(tokenizer), pad, bos)
    return RetrievalModel(arch, tokenizer)


def _embed_split(model: RetrievalModel, split: RetrievalSplit, batch_size: int):
    """Captioned poses only: (M,D) text, (N',D) pose embeddings, (M,) caption->row."""
    poses_with_caption, caption_row = np.unique(split.caption_pose, return_inverse=True)
    text = model.embed_texts(split.captions, batch_size)
    pose = model.embed_poses(split.pose_vec6d[torch.as_tensor(poses_with_caption)], batch_size)
    return text.cpu(), pose.cpu(), torch.as_tensor(caption_row, dtype=torch.long)


def evaluate_recall(model: RetrievalModel, split: RetrievalSplit, cfg: RetrievalConfig
                    ) -> dict[str, dict[str, float]]:
    """``{"full": retrieval_recall(...), "sampled": ...}`` on ``split`` (eval mode)."""
    from poserft.retrieval.metrics import retrieval_recall

    was_training = model.training
    model.eval()
    text, pose, c2p = _embed_split(model, split, cfg.eval_batch_size)
    model.train(was_training)
    return {protocol: retrieval_recall(text, pose, c2p, ks=tuple(cfg.recall_ks),
                                       protocol=protocol, n_candidates=cfg.sampled_candidates,
                                       repeats=cfg.sampled_repeats, seed=cfg.recall_seed)
            for protocol in ("full", "sampled")}


def chance_recall(split: RetrievalSplit, cfg: RetrievalConfig, seed: int = 0
                  ) -> dict[str, dict[str, float]]:
    """Recall of random embeddings on ``split`` under the same protocols: the chance level."""
    from poserft.retrieval.metrics import retrieval_recall

    _, rows = np.unique(split.caption_pose, return_inverse=True)
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(len(split.captions), 64, generator=g)
    pose = torch.randn(int(rows.max()) + 1, 64, generator=g)
    c2p = torch.as_tensor(rows, dtype=torch.long)
    return {protocol: retrieval_recall(text, pose, c2p, ks=tuple(cfg.recall_ks),
                                       protocol=protocol, n_candidates=cfg.sampled_candidates,
                                       repeats=cfg.sampled_repeats, seed=cfg.recall_seed)
            for protocol in ("full", "sampled")}


def pair_accuracy(model: RetrievalModel, split: RetrievalSplit, seed: int = 0,
                  batch_size: int = 512) -> float:
    """Fraction of captions whose own pose scores above one random other pose."""
    model_was_training = model.training
    model.eval()
    text, pose, c2p = _embed_split(model, split, batch_size)
    model.train(model_was_training)
    n = pose.shape[0]
    if n < 2:
        raise ValueError(f"{split.path}: pair accuracy needs at least 2 captioned poses")
    rng = np.random.default_rng(seed)
    other = (c2p.numpy() + rng.integers(1, n, size=len(c2p))) % n  # never the own pose
    own = (text * pose[c2p]).sum(1)
    rand = (text * pose[torch.as_tensor(other)]).sum(1)
    return float((own > rand).float().mean())


def _metric_name(name: str) -> str:
    # MLflow metric names allow [\w./\- :] only
    return name.replace("@", "_at_")


def _flat(prefix: str, recall: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {_metric_name(f"{prefix}/{protocol}/{k}"): float(v)
            for protocol, values in recall.items() for k, v in values.items()}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_retrieval(cfg: RetrievalConfig | None, role: str,
                    split_paths: Mapping[str, str | os.PathLike],
                    tokenizer_path: str | os.PathLike | None, out_dir: str | os.PathLike,
                    tracker=None) -> dict:
    """Train the ``role`` ('reward' | 'evaluator') retrieval model; write it to ``out_dir``.

    ``split_paths``: the split files of ``cfg.data``'s sources, ``{source: {'train', 'val',
    'test'}}`` (one source: just its ``{'train', 'val', 'test'}``). Each split is the
    concatenation of the sources that have it; every source needs 'train', and val and test
    must come from at least one. Returns a summary:
    role, seed, best_epoch, val_mRecall, test recall (both protocols), chance recall,
    test pair accuracy, number of training poses, seconds.
    """
    cfg = RetrievalConfig.expect(cfg, "train_retrieval: cfg")
    if role not in ROLES:
        raise ValueError(f"train_retrieval: role {role!r} is not one of {list(ROLES)}")
    from poserft.data.sources import resolve_sources
    sources = resolve_sources(split_paths, cfg.data, "train_retrieval")
    for split in ("val", "test"):
        if not any(split in sp for _, sp in sources.values()):
            raise ValueError(f"train_retrieval: no source has a {split!r} split (sources "
                             f"{sorted(sources)}); model selection and recall.json need one")
    if tracker is None:
        from poserft.tracking import NullTracker
        tracker = NullTracker()
    previous_threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    try:
        return _train(cfg, role, sources, tokenizer_path, Path(out_dir), tracker)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: RetrievalConfig, role: str, sources: Mapping[str, tuple[float, dict[str, Path]]],
           tokenizer_path: str | os.PathLike | None, out_dir: Path, tracker) -> dict:
    started = time.time()
    seed = cfg.seed_for(role)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(cfg.device)

    from poserft.tracking import record_datasets
    splits, records, sizes = {}, [], []
    for split in ("train", "val", "test"):
        parts = []
        for name, (weight, paths) in sources.items():
            if split in paths:
                parts.append(load_retrieval_split(paths[split]))
                if split == "train":
                    sizes.append(int(parts[-1].pose_vec6d.shape[0]))
                records.append({"name": f"{name}/{split}", "path": paths[split], "context": split,
                                "weight": weight if split == "train" else None,
                                "profile": {"poses": int(parts[-1].pose_vec6d.shape[0]),
                                            "captions": len(parts[-1].captions)}})
        splits[split] = concat_splits(parts)
    record_datasets(tracker, records)
    train = splits["train"]
    train_poses = role_pose_subset(train.caption_pose, cfg, role)
    # several sources: each epoch draws its poses with replacement so that source s gets a
    # share weight_s / sum(weights) of them (one source: a plain permutation, as always)
    pose_prob = None
    if len(sources) > 1:
        source_of_pose = np.repeat(np.arange(len(sizes)), sizes)[train_poses]
        weights = np.array([w for w, _ in sources.values()], dtype=np.float64)
        per_source = np.bincount(source_of_pose, minlength=len(sizes)).astype(np.float64)
        pose_prob = weights[source_of_pose] / per_source[source_of_pose]
        pose_prob /= pose_prob.sum()
    # captions grouped by pose, so one caption per pose can be drawn with two lookups
    order = np.argsort(train.caption_pose, kind="stable")
    counts = np.bincount(train.caption_pose, minlength=train.pose_vec6d.shape[0])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    model = build_model(cfg, tokenizer_path).to(device)
    all_ids, all_mask = model.tokenize(train.captions)
    tracker.log_params({"retrieval": cfg.to_dict(), "role": role, "seed": seed,
                        "n_train_poses": len(train_poses)})

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name == "log_logit_scale" else decay).append(p)
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = max(1, len(train_poses) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: _lr_factor(s, total_steps, int(cfg.warmup_fraction * total_steps)))

    best = {"epoch": -1, "mRecall": -1.0, "state": None, "val": None}
    bar = tqdm(range(cfg.epochs), desc=f"retrieval[{role}]", unit="epoch")
    for epoch in bar:
        model.train()
        perm = (rng.permutation(train_poses) if pose_prob is None else
                rng.choice(train_poses, size=len(train_poses), replace=True, p=pose_prob))
        sums: dict[str, float] = {}
        for b in range(steps_per_epoch):  # the last incomplete batch is dropped
            pose_ids = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            pick = starts[pose_ids] + (rng.random(len(pose_ids)) * counts[pose_ids]).astype(np.int64)
            cap = torch.as_tensor(order[pick])
            mask = all_mask[cap]
            length = int(mask.sum(1).max())
            ids, mask = all_ids[cap, :length].to(device), mask[:, :length].to(device)
            text_emb, pose_emb = model(ids, mask, train.pose_vec6d[pose_ids].to(device))
            loss, metrics = symmetric_infonce(text_emb, pose_emb, model.logit_scale)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optim.step()
            sched.step()
            model.clamp_logit_scale()
            metrics["loss"] = loss.detach().item()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        train_metrics = {f"train/{k}": v / steps_per_epoch for k, v in sums.items()}
        val = evaluate_recall(model, splits["val"], cfg)
        tracker.log_metrics({**train_metrics, **_flat("val", val),
                             "train/lr": sched.get_last_lr()[0]}, step=epoch)
        bar.set_postfix(loss=f"{train_metrics['train/loss']:.3f}",
                        val_mR=f"{val['full']['mRecall']:.1f}")
        if val["full"]["mRecall"] > best["mRecall"]:
            best = {"epoch": epoch, "mRecall": val["full"]["mRecall"], "val": val,
                    "state": copy.deepcopy(model.state_dict())}

    model.load_state_dict(best["state"])
    model.eval()
    test = evaluate_recall(model, splits["test"], cfg)
    chance = chance_recall(splits["test"], cfg)
    pair_acc = pair_accuracy(model, splits["test"], seed=cfg.recall_seed)

    meta = {"role": role, "seed": seed, "best_epoch": best["epoch"],
            "val_recall": best["val"], "n_train_poses": int(len(train_poses)),
            "retrieval_config": cfg.to_dict(),
            "tokenizer": {"source_path": str(tokenizer_path) if tokenizer_path else
                          cfg.pretrained_text_model}}
    save_retrieval_model(model, out_dir, meta)
    write_json(out_dir / "recall.json", test, allow_nan=True)
    summary = {"role": role, "seed": seed, "best_epoch": best["epoch"],
               "val_mRecall": best["mRecall"], "test": test, "chance": chance,
               "test_pair_accuracy": pair_acc, "n_train_poses": int(len(train_poses)),
               "seconds": time.time() - started}
    tracker.log_metrics({**_flat("test", test), "test/pair_accuracy": pair_acc,
                         "best_epoch": best["epoch"]}, step=cfg.epochs)
    return summary
