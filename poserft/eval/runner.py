"""Benchmark one variant's policy: image->pose, text->pose, answer format, VQA text reward;
and the bounds every variant is read against (floor and ceiling).

:func:`evaluate_variant` writes ``results/runs/{variant}/seed{seed}/metrics.json``::

    image2pose.<dataset>: mpjpe, pa_mpjpe (mm, greedy answer, the head's mean/mode pose),
                          best_of_n, best_of_n_mpjpe, best_of_n_pa_mpjpe (oracle min over N
                          sampled poses, each metric separately), pose_valid_rate, num_samples
    text2pose.<dataset>:  protocol1.{t2p_R@K, p2t_R@K, mRecall}, protocol2.{...} (%, the
                          EVALUATOR retrieval model), mpjpe, pa_mpjpe (mm, the generated pose
                          against the caption's ground-truth pose, both with the root's yaw
                          removed), pose_valid_rate, num_samples
    format_rate           fraction of greedy answers to pose prompts (image2pose and
                          text2pose of the synthetic test split) matching eval.format_regex;
                          format.{image2pose, text2pose, num_prompts}
    text_reward           mean cosine (text embedder) between greedy VQA answers and the
                          reference answers of the held-out VQA; vqa.num_samples
    meta                  joint_set, device, directories, seconds

:func:`evaluate_reference` writes ``results/reference/metrics.json`` (design.md, "Floors and
ceilings"), on the same test rows of the synthetic test split, through the same scoring
functions as the variants (:func:`image2pose_pose_metrics`, :func:`score_text2pose`)::

    image2pose.synthetic.mean_pose.{mpjpe, pa_mpjpe}  the train split's mean pose (camera-
                          frame root) predicted for every test image (floor)
    image2pose.synthetic.oracle.{mpjpe, pa_mpjpe}     the ground-truth pose predicted (0 when
                          eval.pred_betas=gt; else the error of the shape alone)
    text2pose.synthetic.mean_pose.{mpjpe, pa_mpjpe, protocol1.*, protocol2.*}
                          the train mean of the text targets (yaw removed) for every caption
    text2pose.synthetic.oracle.{mpjpe, pa_mpjpe, protocol1.*, protocol2.*}
                          each caption's ground-truth pose as the "generated" pose (ceiling)
    text2pose.synthetic.chance.{protocol1.*, protocol2.*}
                          exact chance recall (:func:`chance_recall`)
    {image2pose,text2pose}.synthetic.num_samples, meta

Conventions (design.md, "Evaluation protocols"):

* image->pose follows HMR2.0/4D-Humans: joints of ``eval.joint_set`` (LSP-14), both
  skeletons translated so that the H36M pelvis (row 0 of the body model's ``h36m17`` set;
  the SMPL pelvis for the skeleton model) is at the origin, errors in millimetres;
  PA-MPJPE after a per-sample similarity Procrustes. Ground truth is the split's SMPL pose
  in the image (camera) frame (``/image_pose/global_orient`` when present) through the same
  body model.
* text->pose errors use the same joints and alignment, in SMPL's canonical frame with the
  root's twist about the vertical axis removed from both poses (a caption never says
  which way the body faces; the text->pose training targets are yaw-free too). Both
  skeletons get the same shape (the mean shape; the ground-truth betas with
  ``eval.pred_betas: gt``): a caption says nothing about body shape.
* A completion without ``<POSE>`` has no pose; it is scored as the rest pose (identity
  rotations) so that a model cannot improve its error by not answering. Its rate is
  ``pose_valid_rate``.
* Test subsets (``eval.max_*_samples``, default 0 = the whole split) are seeded by
  ``eval.subset_seed`` only, so every variant, seed and the reference are scored on the
  same samples.
* The policy and the evaluator run on ``eval.device`` (auto: the job's GPU when it has one),
  ``eval.batch_size`` prompts per generate call; joint errors are computed on the CPU.
  Greedy metrics do not depend on the device or the batch size beyond float rounding; the
  best-of-N draws share one seeded generator per batch, so they depend on both.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from poserft.atomic import write_json
from poserft.data.images import SplitImages, person_boxes
from poserft.eval.config import EvalConfig

__all__ = ["subset_indices", "person_boxes", "fill_invalid_poses", "pose_joints", "joint_errors",
           "best_of_n_errors", "format_matches", "embedding_cosine", "tracker_metrics",
           "chance_recall", "PoseTargets", "image2pose_targets", "text2pose_targets",
           "pose_errors", "image2pose_pose_metrics", "text2pose_recall", "score_text2pose",
           "normalise_pose6d", "train_mean_poses", "evaluate_image2pose", "evaluate_text2pose",
           "evaluate_vqa", "evaluate_variant", "evaluate_reference", "SYNTHETIC",
           "resolve_device", "load_policy_on"]

log = logging.getLogger(__name__)
SYNTHETIC = "synthetic"


# --------------------------------------------------------------------- devices --
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when a GPU is visible, else cpu; otherwise the named device, which
    must exist (a RuntimeError naming the fix, not a late CUDA error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r}: no CUDA device is visible; use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r}: only {torch.cuda.device_count()} CUDA "
                               "device(s) are visible")
    return dev


def load_policy_on(path: str | os.PathLike, device: torch.device | str):
    """:func:`poserft.model.io.load_policy` onto ``device`` (loaded there directly when
    load_policy takes a device, else moved after loading), in eval mode."""
    import inspect

    from poserft.model.io import load_policy

    if "device" in inspect.signature(load_policy).parameters:
        policy = load_policy(path, device=device)
    else:
        policy = load_policy(path).to(device)
    return policy.eval()


# --------------------------------------------------------------------- pure helpers --
def subset_indices(n: int, max_n: int, seed: int) -> np.ndarray:
    """Sorted row indices: all ``n`` rows (``max_n`` 0 or >= n), else a seeded subset."""
    if max_n <= 0 or max_n >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_n, replace=False)).astype(np.int64)


def fill_invalid_poses(vec6d: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,144) poses, (B,) bool -> poses with rows lacking ``<POSE>`` set to the rest pose."""
    from poserft.model.heads import identity_pose_vec

    rest = identity_pose_vec(vec6d.dtype).to(vec6d.device)
    return torch.where(valid.to(vec6d.device)[:, None], vec6d, rest[None, :])


def pose_joints(body, vec6d: torch.Tensor, joint_set: str, betas: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,144) 6D poses -> joints of ``joint_set`` (B,J,3) and the H36M pelvis (B,3), metres."""
    from poserft.body import vec6d_to_rotmats

    rotmats = vec6d_to_rotmats(vec6d.float())
    joints = body.joint_set_from_rotmats(joint_set, rotmats, betas)
    pelvis = body.joint_set_from_rotmats("h36m17", rotmats, betas)[:, 0]
    return joints, pelvis


def joint_errors(pred: torch.Tensor, pred_pelvis: torch.Tensor, gt: torch.Tensor,
                 gt_pelvis: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Pelvis-aligned MPJPE and PA-MPJPE per sample, (B,) mm each.

    pred, gt: (B,J,3) metres; pred_pelvis, gt_pelvis: (B,3) metres.
    """
    from poserft.eval.metrics import mpjpe, pa_mpjpe

    pred_c = (pred - pred_pelvis[:, None, :]).double().cpu().numpy()
    gt_c = (gt - gt_pelvis[:, None, :]).double().cpu().numpy()
    return np.asarray(mpjpe(pred_c, gt_c, root=None)), np.asarray(pa_mpjpe(pred_c, gt_c))


def best_of_n_errors(errors: np.ndarray, n: int) -> np.ndarray:
    """(B*n,) errors, rows of sample b at b*n .. b*n+n-1 -> (B,) minimum over the n."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 1 or errors.size % n:
        raise ValueError(f"best_of_n_errors: {errors.shape} errors is not B*{n}")
    return errors.reshape(-1, n).min(axis=1)


def format_matches(texts: Sequence[str], regex: str) -> np.ndarray:
    """(n,) bool: the stripped answer fully matches ``regex`` (same rule as the RFT format
    reward, poserft.rl.rewards.format_reward)."""
    pattern = re.compile(regex)
    return np.array([bool(pattern.fullmatch(t.strip())) for t in texts], dtype=bool)


def embedding_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n,D) embedding arrays -> (n,)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1).clip(min=1e-12)
    nb = np.linalg.norm(b, axis=1).clip(min=1e-12)
    return (a * b).sum(1) / (na * nb)


def chance_recall(num_captions: int, ks: Sequence[int], n_candidates: int,
                  pose_rows: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Exact chance Recall@K (%) of :func:`poserft.eval.metrics.retrieval_recall` for
    ``num_captions`` captions paired one-to-one with as many poses (caption i <-> pose i, the
    text->pose evaluation's pairs), for embeddings carrying no information (no ties).

    Protocol 1 ('full'): the ground truth's rank among the candidates of either direction is
    uniform. Without ``pose_rows`` there are M candidates, R@K = min(K, M) / M; with them
    (:func:`text2pose_recall`'s groups) caption i competes against the M_i = M - (g_i - 1)
    candidates outside its group of g_i same-pose captions, and R@K is the mean over i of
    min(K, M_i) / M_i. Protocol 2 ('sampled'): uniform among the N candidates (ground truth +
    N-1 distractors), R@K = min(K, N) / N, for every repeat. ``mRecall`` is the mean of the
    2 x len(ks) values, as in ``retrieval_recall``.
    """
    if num_captions < 1 or n_candidates < 2:
        raise ValueError(f"chance_recall: needs >= 1 caption and >= 2 candidates, got "
                         f"{num_captions}, {n_candidates}")
    m = int(num_captions)
    pools1 = np.full(m, m, dtype=np.float64)
    if pose_rows is not None:
        rows = np.asarray(pose_rows)
        if rows.shape != (m,):
            raise ValueError(f"chance_recall: pose_rows must have shape ({m},), got {rows.shape}")
        _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
        pools1 = m - (counts[inverse] - 1).astype(np.float64)
    out = {}
    for protocol, pools in (("protocol1", pools1), ("protocol2", np.full(1, float(n_candidates)))):
        values = {f"{d}_R@{int(k)}": 100.0 * float(np.mean(np.minimum(int(k), pools) / pools))
                  for d in ("t2p", "p2t") for k in ks}
        values["mRecall"] = float(np.mean(list(values.values())))
        out[protocol] = values
    return out


_MLFLOW_BAD = re.compile(r"[^\w.\- :/]")


def tracker_metrics(metrics: Mapping[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """Nested metrics -> flat MLflow-safe names (``R@5`` -> ``R_5``; '/'-joined)."""
    from poserft.eval.tables import flatten_metrics

    return {prefix + _MLFLOW_BAD.sub("_", k.replace(".", "/")): v
            for k, v in flatten_metrics(metrics).items()}


# ------------------------------------------------------------------------- pieces --
def _batches(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


def _progress(iterable, desc: str, total: int | None = None):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=2.0)


def _read_images(reader, idx: np.ndarray, size: int) -> np.ndarray:
    """(n,H,W,3) uint8 images of rows ``idx`` through :class:`poserft.data.images.SplitImages`:
    the split's /images as stored (already person crops; the model resizes them), or its
    /image_paths loaded, cropped to :func:`person_boxes` (black outside the frame, as in
    HMR-style preprocessing) and resized to ``size`` x ``size`` (PIL bilinear). A bad image
    file is an error, never a skipped row: every variant must be scored on the same rows."""
    images = SplitImages(reader, None if reader.has("images") else size, on_error="fail")
    return images.load_many(idx)[0]


@dataclass
class PoseTargets:
    """Ground truth of the scored test rows (one entry per row, in scoring order).

    idx: the scored rows (image rows, or caption rows for text->pose).
    vec6d (n,144): the ground-truth poses (what the oracle "predicts").
    joints (n,J,3), pelvis (n,3): their skeletons (``eval.joint_set``), metres.
    pred_betas (n,B) or None: the shape every predicted pose of a row gets (None: mean shape).
    pose_rows (n,) or None: text->pose only, the ground-truth pose row of each caption
    (captions of one pose are the recall protocol's groups).
    """

    idx: np.ndarray
    vec6d: torch.Tensor
    joints: torch.Tensor
    pelvis: torch.Tensor
    pred_betas: torch.Tensor | None
    pose_rows: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.idx))


def _joints_in_batches(body, vec6d: torch.Tensor, joint_set: str, betas: torch.Tensor | None,
                       batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pose_joints` over a whole test split, ``batch_size`` rows at a time (an SMPL
    forward pass over tens of thousands of rows at once would not fit in memory)."""
    joints, pelvis = [], []
    for sl in _batches(vec6d.shape[0], batch_size):
        j, p = pose_joints(body, vec6d[sl], joint_set, None if betas is None else betas[sl])
        joints.append(j)
        pelvis.append(p)
    return torch.cat(joints), torch.cat(pelvis)


# SPIN's 24-joint order (``S`` of its preprocessed npz files, kept as
# /meta/gt_joints3d_spin24): rows 0-13 are the LSP-14 joints in our ``lsp14`` order; SPIN's
# H36M preprocessing writes the H36M pelvis to row 14 (``global_idx[0] == 14`` in
# datasets/preprocess/h36m*.py).
_SPIN24_TO_LSP14 = list(range(14))
_SPIN24_PELVIS = 14


def _stored_joint_targets(reader, idx: np.ndarray, cfg: EvalConfig, orient: np.ndarray,
                          poses: Mapping[str, np.ndarray]) -> PoseTargets:
    """Targets of a split whose rows have no SMPL fit (``/meta/has_smpl`` 0): the stored 3D
    joints (``/meta/gt_joints3d_spin24``, metres) and their H36M pelvis. ``vec6d`` holds the
    rows' placeholder poses (only the reference's oracle uses it); predictions get the mean
    shape (no ground-truth betas)."""
    from poserft.body import smpl_to_vec6d

    if not reader.has("meta/gt_joints3d_spin24"):
        raise ValueError(f"{reader.path}: rows without SMPL fits (/meta/has_smpl 0) but no "
                         "/meta/gt_joints3d_spin24 to score them by; reconvert the split")
    if cfg.joint_set != "lsp14":
        raise ValueError(f"{reader.path}: rows without SMPL fits are scored on their stored "
                         f"SPIN joints, which give eval.joint_set 'lsp14' only (got "
                         f"{cfg.joint_set!r})")
    s24 = torch.as_tensor(np.asarray(reader.read("meta/gt_joints3d_spin24", idx))[..., :3],
                          dtype=torch.float32)
    vec = smpl_to_vec6d(torch.as_tensor(orient, dtype=torch.float32),
                        torch.as_tensor(poses["body_pose"], dtype=torch.float32))
    return PoseTargets(idx, vec, s24[:, _SPIN24_TO_LSP14], s24[:, _SPIN24_PELVIS], None)


def image2pose_targets(body, reader, cfg: EvalConfig) -> PoseTargets:
    """Image->pose ground truth of the scored image rows: the split's pose with the camera-
    frame root (``/image_pose/global_orient`` when present), with its betas; for a split
    with rows without SMPL fits (``/meta/has_smpl`` 0, e.g. Human3.6M protocol 2), the
    stored 3D joints of every scored row (:func:`_stored_joint_targets`)."""
    from poserft.body import smpl_to_vec6d

    idx = subset_indices(reader.num_poses, cfg.max_image_samples, cfg.subset_seed)
    poses = reader.poses(idx)
    if reader.has("meta/has_smpl") and not np.asarray(reader.read("meta/has_smpl", idx)).all():
        orient = (reader.image_global_orient(idx) if reader.has("image_pose/global_orient")
                  else poses["global_orient"])
        return _stored_joint_targets(reader, idx, cfg, orient, poses)
    orient = (reader.image_global_orient(idx) if reader.has("image_pose/global_orient")
              else poses["global_orient"])
    gt_betas = torch.as_tensor(poses["betas"], dtype=torch.float32)
    gt_vec = smpl_to_vec6d(torch.as_tensor(orient, dtype=torch.float32),
                           torch.as_tensor(poses["body_pose"], dtype=torch.float32))
    joints, pelvis = _joints_in_batches(body, gt_vec, cfg.joint_set, gt_betas, cfg.batch_size)
    return PoseTargets(idx, gt_vec, joints, pelvis, gt_betas if cfg.pred_betas == "gt" else None)


def text2pose_targets(body, reader, cfg: EvalConfig) -> tuple[list[str], PoseTargets]:
    """Scored captions and their ground-truth poses (``/captions/pose_index``), in SMPL's
    canonical frame with the root's yaw removed. Both skeletons get the same shape."""
    from poserft.body import smpl_to_vec6d
    from poserft.retrieval.features import pose6d_without_root_yaw

    idx = subset_indices(reader.num_captions, cfg.max_text_samples, cfg.subset_seed)
    captions = [str(c) for c in reader.captions(idx)]
    if len(captions) <= cfg.protocol2_candidates:
        raise ValueError(f"{reader.path}: {len(captions)} test captions, but protocol 2 needs "
                         f"more than eval.protocol2_candidates={cfg.protocol2_candidates}")
    rows = np.asarray(reader.caption_pose_index(idx), dtype=np.int64)
    poses = reader.poses(rows)
    gt_vec = pose6d_without_root_yaw(smpl_to_vec6d(
        torch.as_tensor(poses["global_orient"], dtype=torch.float32),
        torch.as_tensor(poses["body_pose"], dtype=torch.float32)))
    betas = (torch.as_tensor(poses["betas"], dtype=torch.float32) if cfg.pred_betas == "gt"
             else None)
    joints, pelvis = _joints_in_batches(body, gt_vec, cfg.joint_set, betas, cfg.batch_size)
    return captions, PoseTargets(idx, gt_vec, joints, pelvis, betas, pose_rows=rows)


def pose_errors(body, pred_vec: torch.Tensor, target: PoseTargets, joint_set: str,
                rows: slice | np.ndarray = slice(None), repeat: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
    """MPJPE, PA-MPJPE (mm) per predicted pose: ``pred_vec`` (len(rows)*repeat, 144) holds
    ``repeat`` consecutive predictions for each of the target rows ``rows``."""
    betas = target.pred_betas
    gt_j, gt_p = target.joints[rows], target.pelvis[rows]
    if betas is not None:
        betas = betas[rows]
    if repeat > 1:
        gt_j, gt_p = gt_j.repeat_interleave(repeat, 0), gt_p.repeat_interleave(repeat, 0)
        betas = None if betas is None else betas.repeat_interleave(repeat, 0)
    j, p = pose_joints(body, pred_vec.cpu(), joint_set, betas)
    return joint_errors(j, p, gt_j, gt_p)


def _errors_in_batches(body, pred_vec: torch.Tensor, target: PoseTargets, cfg: EvalConfig
                       ) -> tuple[np.ndarray, np.ndarray]:
    if pred_vec.shape[0] != len(target):
        raise ValueError(f"{pred_vec.shape[0]} predicted poses for {len(target)} target rows")
    pred_vec = pred_vec.detach().float().cpu().contiguous()
    e, pa = [], []
    for sl in _batches(len(target), cfg.batch_size):
        a, b = pose_errors(body, pred_vec[sl], target, cfg.joint_set, sl)
        e.append(a)
        pa.append(b)
    return np.concatenate(e), np.concatenate(pa)


def image2pose_pose_metrics(body, pred_vec: torch.Tensor, target: PoseTargets, cfg: EvalConfig
                            ) -> dict[str, float]:
    """{mpjpe, pa_mpjpe} (mm, means over rows) of one predicted pose per target row: the
    scoring of a variant's greedy answers and of the references alike."""
    e, pa = _errors_in_batches(body, pred_vec, target, cfg)
    return {"mpjpe": float(e.mean()), "pa_mpjpe": float(pa.mean())}


def text2pose_recall(evaluator, captions: Sequence[str], pred_vec: torch.Tensor, cfg: EvalConfig,
                     text_emb: torch.Tensor | None = None, pose_rows: np.ndarray | None = None
                     ) -> dict[str, dict[str, float]]:
    """Recall@K of (caption i, pose i) pairs with the evaluator model, protocol 1 (full) and
    protocol 2 (sampled). ``text_emb``: the captions' embeddings when already computed.
    ``pose_rows``: each caption's ground-truth pose; in protocol 1 the poses generated from
    the other captions of the same pose are neither hits nor distractors (with 3 captions
    per pose, a perfect generator's 3 identical poses would otherwise beat each other)."""
    from poserft.eval.metrics import retrieval_recall

    if text_emb is None:
        text_emb = evaluator.embed_texts(list(captions)).cpu()
    pose_emb = evaluator.embed_poses(pred_vec.to(evaluator.log_logit_scale.device)).cpu()
    pairs = np.arange(len(captions))      # caption i <-> the pose generated from it
    return {
        "protocol1": retrieval_recall(text_emb, pose_emb, pairs, ks=cfg.recall_ks, protocol="full",
                                      pose_groups=pose_rows),
        "protocol2": retrieval_recall(text_emb, pose_emb, pairs, ks=cfg.recall_ks,
                                      protocol="sampled", n_candidates=cfg.protocol2_candidates,
                                      repeats=cfg.protocol2_repeats, seed=cfg.recall_seed)}


def score_text2pose(evaluator, body, captions: Sequence[str], pred_vec: torch.Tensor,
                    target: PoseTargets, cfg: EvalConfig, text_emb: torch.Tensor | None = None
                    ) -> dict[str, Any]:
    """One pose per caption -> {protocol1, protocol2, mpjpe, pa_mpjpe}: the scoring of a
    variant's generated poses and of the references (mean pose, ground truth) alike.
    Errors compare yaw-free poses (the target's are yaw-free already)."""
    from poserft.retrieval.features import pose6d_without_root_yaw

    pred_vec = pred_vec.detach().float().cpu().contiguous()
    e, pa = _errors_in_batches(body, pose6d_without_root_yaw(pred_vec), target, cfg)
    out: dict[str, Any] = text2pose_recall(evaluator, captions, pred_vec, cfg, text_emb,
                                           target.pose_rows)
    out.update(mpjpe=float(e.mean()), pa_mpjpe=float(pa.mean()))
    return out


def evaluate_image2pose(policy, body, reader, cfg: EvalConfig, generator: torch.Generator
                        ) -> tuple[dict[str, float], list[str]]:
    """Image->pose metrics on one split (greedy + best-of-N); also the greedy answers."""
    target = image2pose_targets(body, reader, cfg)
    idx = target.idx
    size = policy.config.clip_image_size
    prompt = policy.image2pose_prompt()
    n = len(idx)
    greedy, bon_mpjpe, bon_pa, valid, texts = [], [], [], [], []
    for sl in _progress(list(_batches(n, cfg.batch_size)), f"image2pose {reader.path.parent.name}"):
        images = _read_images(reader, idx[sl], size)
        b = images.shape[0]
        roll = policy.generate([prompt] * b, images=images, num_samples=1,
                               max_new_tokens=cfg.max_new_tokens, do_sample=False)
        texts += roll.texts
        valid.append(roll.pose_valid.cpu().numpy())
        greedy.append(fill_invalid_poses(roll.pose_mean, roll.pose_valid).cpu())
        if cfg.best_of_n:
            k = cfg.best_of_n
            roll = policy.generate([prompt] * b, images=images, num_samples=k,
                                   max_new_tokens=cfg.max_new_tokens, do_sample=True,
                                   temperature=cfg.sample_temperature, generator=generator)
            vec = fill_invalid_poses(roll.pose_sample, roll.pose_valid)
            e, pa = pose_errors(body, vec, target, cfg.joint_set, sl, repeat=k)
            bon_mpjpe.append(best_of_n_errors(e, k))
            bon_pa.append(best_of_n_errors(pa, k))
    out = image2pose_pose_metrics(body, torch.cat(greedy), target, cfg)
    out.update(pose_valid_rate=float(np.concatenate(valid).mean()), num_samples=int(n))
    if cfg.best_of_n:
        out.update(best_of_n=int(cfg.best_of_n),
                   best_of_n_mpjpe=float(np.concatenate(bon_mpjpe).mean()),
                   best_of_n_pa_mpjpe=float(np.concatenate(bon_pa).mean()))
    return out, texts


def evaluate_text2pose(policy, evaluator, body, reader, cfg: EvalConfig
                       ) -> tuple[dict[str, Any], list[str]]:
    """Greedy pose per test caption, then Recall@K of (caption, generated pose) pairs with
    the evaluator model under protocol 1 (full) and 2 (sampled), and MPJPE / PA-MPJPE
    against the caption's ground-truth pose (yaw-free); also the greedy answers."""
    captions, target = text2pose_targets(body, reader, cfg)
    poses, valid, texts = [], [], []
    for sl in _progress(list(_batches(len(captions), cfg.batch_size)),
                        f"text2pose {reader.path.parent.name}"):
        prompts = [policy.text2pose_prompt(c) for c in captions[sl]]
        roll = policy.generate(prompts, num_samples=1, max_new_tokens=cfg.max_new_tokens,
                               do_sample=False)
        texts += roll.texts
        valid.append(roll.pose_valid.cpu())
        poses.append(fill_invalid_poses(roll.pose_mean, roll.pose_valid).cpu())
    out = score_text2pose(evaluator, body, captions, torch.cat(poses), target, cfg)
    out.update(pose_valid_rate=float(torch.cat(valid).float().mean()), num_samples=len(captions))
    return out, texts


def evaluate_vqa(policy, embedder, reader, cfg: EvalConfig) -> dict[str, float] | None:
    """Mean cosine between greedy answers and reference answers of held-out VQA (None when
    the split has no VQA or no images)."""
    if reader.num_vqa == 0 or not (reader.has("images") or reader.has("image_paths")):
        return None
    idx = subset_indices(reader.num_vqa, cfg.max_vqa_samples, cfg.subset_seed)
    vqa = reader.vqa(idx)
    questions = [str(q) for q in vqa["question"]]
    answers = [str(a) for a in vqa["answer"]]
    pose_rows = np.asarray(vqa["pose_index"], dtype=np.int64)
    size = policy.config.clip_image_size
    generated = []
    for sl in _progress(list(_batches(len(idx), cfg.batch_size)), "vqa"):
        images = _read_images(reader, pose_rows[sl], size)
        roll = policy.generate([policy.vqa_prompt(q) for q in questions[sl]], images=images,
                               num_samples=1, max_new_tokens=cfg.max_new_tokens, do_sample=False)
        generated += roll.texts
    cos = embedding_cosine(embedder.encode(generated), embedder.encode(answers))
    return {"text_reward": float(cos.mean()), "num_samples": len(idx)}


# ------------------------------------------------------------------------ the stage --
def _split_roles(split_paths: Mapping[str, str | os.PathLike], cfg: EvalConfig
                 ) -> tuple[dict[str, Path], dict[str, Path]]:
    """-> (image datasets, text datasets): name -> test split file.

    ``split_paths["test"]`` is the synthetic test split (required); ``"<dataset>_test"``
    keys add real datasets listed in eval.image_benchmarks / eval.text_benchmarks. Other
    keys (train/val splits passed by the rule) are ignored.
    """
    if "test" not in split_paths:
        raise ValueError(f"evaluate_variant: split_paths needs 'test' (the synthetic test "
                         f"split), got keys {sorted(split_paths)}")
    image = {SYNTHETIC: Path(split_paths["test"])}
    text = {SYNTHETIC: Path(split_paths["test"])}
    for key, path in split_paths.items():
        if not key.endswith("_test"):
            continue
        name = key[: -len("_test")]
        if name not in cfg.image_benchmarks and name not in cfg.text_benchmarks:
            raise ValueError(f"evaluate_variant: split '{key}' ({path}) is not a benchmark of "
                             f"eval.image_benchmarks {cfg.image_benchmarks} or "
                             f"eval.text_benchmarks {cfg.text_benchmarks}")
        if name in cfg.image_benchmarks:
            image[name] = Path(path)
        if name in cfg.text_benchmarks:
            text[name] = Path(path)
    return image, text


def evaluate_variant(eval_cfg: EvalConfig, policy_dir: str | os.PathLike,
                     evaluator_dir: str | os.PathLike, split_paths: Mapping[str, str | os.PathLike],
                     out_json: str | os.PathLike, body_cfg: Any = None,
                     text_embedder_cfg: Any = None, tracker: Any = None, *,
                     text_embedder: Any = None) -> dict[str, Any]:
    """Benchmark the policy in ``policy_dir``; write ``out_json`` atomically; return the metrics.

    Args:
        eval_cfg: the ``eval`` section (or its plain dict).
        policy_dir: a saved policy (:func:`poserft.model.io.save_policy`).
        evaluator_dir: the EVALUATOR retrieval model (``results/retrieval/evaluator``).
        split_paths: ``{"test": data/synthetic/test.h5, "pw3d_test": ..., ...}``.
        body_cfg: the ``body`` section (None: skeleton model).
        text_embedder_cfg: the ``text_embedder`` section (VQA text reward).
        tracker: :class:`poserft.tracking.Tracker` or None.
        text_embedder: an already built embedder (``encode(list[str]) -> (n,D)``) to use
            instead of building one from ``text_embedder_cfg`` (reuse across calls, tests).
    """
    from poserft.body import load as load_body
    from poserft.data.h5io import SplitReader
    from poserft.retrieval.checkpoint import load_retrieval_model

    cfg = EvalConfig.expect(eval_cfg, "evaluate_variant: eval_cfg")
    cfg.check("eval")
    image_splits, text_splits = _split_roles(split_paths, cfg)
    for path in {*image_splits.values(), *text_splits.values()}:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: test split does not exist (run the rule that "
                                    f"produces it, e.g. `snakemake {path}`)")
    if tracker is not None:     # the test splits scored, as MLflow run inputs
        from poserft.tracking import record_datasets
        record_datasets(tracker, [{"name": f"{name}/{Path(path).stem}", "path": path,
                                   "context": "test"}
                                  for name, path in {**image_splits, **text_splits}.items()])
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    policy = load_policy_on(policy_dir, device)
    evaluator = load_retrieval_model(evaluator_dir, device=device).eval()
    body = load_body(body_cfg)
    log.info("evaluating %s on %s, %d prompts per generate call", policy_dir, device,
             cfg.batch_size)
    generator = torch.Generator(device=policy.device).manual_seed(cfg.subset_seed)
    timings["load"] = time.perf_counter() - start

    metrics: dict[str, Any] = {"image2pose": {}, "text2pose": {}}
    format_texts: dict[str, list[str]] = {}
    with torch.inference_mode():
        for name, path in image_splits.items():
            t0 = time.perf_counter()
            with SplitReader(path) as reader:
                if name == SYNTHETIC and not (reader.has("images") or reader.has("image_paths")):
                    log.warning("%s: no images; image->pose skipped", path)
                    continue
                metrics["image2pose"][name], texts = evaluate_image2pose(policy, body, reader, cfg,
                                                                         generator)
            if name == SYNTHETIC:
                format_texts["image2pose"] = texts
            timings[f"image2pose_{name}"] = time.perf_counter() - t0
        for name, path in text_splits.items():
            t0 = time.perf_counter()
            with SplitReader(path) as reader:
                metrics["text2pose"][name], texts = evaluate_text2pose(policy, evaluator, body,
                                                                       reader, cfg)
            if name == SYNTHETIC:
                format_texts["text2pose"] = texts
            timings[f"text2pose_{name}"] = time.perf_counter() - t0

        all_texts = [t for texts in format_texts.values() for t in texts]
        if all_texts:
            metrics["format_rate"] = float(format_matches(all_texts, cfg.format_regex).mean())
            metrics["format"] = {task: float(format_matches(texts, cfg.format_regex).mean())
                                 for task, texts in format_texts.items() if texts}
            metrics["format"]["num_prompts"] = len(all_texts)

        t0 = time.perf_counter()
        with SplitReader(image_splits[SYNTHETIC]) as reader:
            if reader.num_vqa:
                if text_embedder is None:
                    from poserft.text.embedder import build_text_embedder
                    text_embedder = build_text_embedder(text_embedder_cfg)
                vqa = evaluate_vqa(policy, text_embedder, reader, cfg)
            else:
                vqa = None
        if vqa is not None:
            metrics["text_reward"] = vqa["text_reward"]
            metrics["vqa"] = {"num_samples": vqa["num_samples"]}
            timings["vqa"] = time.perf_counter() - t0

    timings["total"] = time.perf_counter() - start
    metrics["meta"] = {"joint_set": cfg.joint_set, "device": str(device),
                       "policy_dir": str(policy_dir), "evaluator_dir": str(evaluator_dir),
                       "seconds": timings}
    write_json(out_json, metrics)
    if tracker is not None:
        tracker.log_metrics(tracker_metrics({k: v for k, v in metrics.items() if k != "meta"}))
        tracker.log_artifact(out_json)
    log.info("evaluation of %s done in %.1f s", policy_dir, timings["total"])
    return metrics


# ----------------------------------------------------------------- floors and ceilings --
def normalise_pose6d(vec6d: torch.Tensor) -> torch.Tensor:
    """(...,144) -> the same poses as valid 6D rotations: each joint's two columns through
    the model's 6D->rotation map (Gram-Schmidt, :func:`poserft.body.vec6d_to_rotmats`) and
    back. A mean of 6D vectors is not a rotation; this is the rotation it stands for."""
    from poserft.body import rotmats_to_vec6d, vec6d_to_rotmats

    return rotmats_to_vec6d(vec6d_to_rotmats(vec6d.float()))


def train_mean_poses(reader) -> dict[str, torch.Tensor]:
    """The train split's mean poses (144,), normalised (:func:`normalise_pose6d`): the mean
    of each pose task's targets (:class:`poserft.train.data.SplitPoses`, the targets SFT
    trains on):

    * ``image2pose``: over the rows, the 6D pose with the camera-frame root
      (``/image_pose/global_orient`` when present) and ``/poses/body_pose``;
    * ``text2pose`` (splits with captions): over the captions, their pose in the canonical
      frame with the root's yaw removed.
    """
    from poserft.train.data import SplitPoses

    poses = SplitPoses.read(reader, text2pose_remove_yaw=True)
    out = {"image2pose": normalise_pose6d(poses.mean_pose6d("image2pose"))}
    if reader.num_captions:
        out["text2pose"] = normalise_pose6d(poses.mean_pose6d("text2pose"))
    return out


def _bound_images(body, reader, cfg: EvalConfig, mean_vec: torch.Tensor) -> dict[str, Any]:
    target = image2pose_targets(body, reader, cfg)
    n = len(target)
    return {"mean_pose": image2pose_pose_metrics(body, mean_vec[None].expand(n, -1), target, cfg),
            "oracle": image2pose_pose_metrics(body, target.vec6d, target, cfg),
            "num_samples": n}


def _bound_texts(evaluator, body, reader, cfg: EvalConfig, mean_vec: torch.Tensor
                 ) -> dict[str, Any]:
    captions, target = text2pose_targets(body, reader, cfg)
    n = len(captions)
    text_emb = evaluator.embed_texts(captions).cpu()
    return {"mean_pose": score_text2pose(evaluator, body, captions, mean_vec[None].expand(n, -1),
                                         target, cfg, text_emb),
            "oracle": score_text2pose(evaluator, body, captions, target.vec6d, target, cfg,
                                      text_emb),
            "chance": chance_recall(n, cfg.recall_ks, cfg.protocol2_candidates, target.pose_rows),
            "num_samples": n}


def evaluate_reference(eval_cfg: EvalConfig, train_split: str | os.PathLike,
                       test_split: str | os.PathLike, evaluator_dir: str | os.PathLike,
                       out_json: str | os.PathLike, body_cfg: Any = None, tracker: Any = None
                       ) -> dict[str, Any]:
    """Floor and ceiling of every table, on the synthetic test split's scored rows (the
    same as :func:`evaluate_variant`'s), through the same scoring functions; write
    ``out_json`` atomically; return the metrics (layout: module docstring).

    Args:
        eval_cfg: the ``eval`` section (or its plain dict).
        train_split: the synthetic train split (its mean poses are the floor).
        test_split: the synthetic test split.
        evaluator_dir: the EVALUATOR retrieval model (the one that scores the variants).
        body_cfg: the ``body`` section (None: skeleton model).
    """
    from poserft.body import load as load_body
    from poserft.data.h5io import SplitReader
    from poserft.retrieval.checkpoint import load_retrieval_model

    cfg = EvalConfig.expect(eval_cfg, "evaluate_reference: eval_cfg")
    cfg.check("eval")
    for path in (Path(train_split), Path(test_split)):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: split does not exist (run the rule that produces "
                                    f"it, e.g. `snakemake {path}`)")
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    evaluator = load_retrieval_model(evaluator_dir, device=device).eval()
    body = load_body(body_cfg)
    with SplitReader(train_split) as reader:
        means = train_mean_poses(reader)
    metrics: dict[str, Any] = {"image2pose": {}, "text2pose": {}}
    with torch.inference_mode(), SplitReader(test_split) as reader:
        if reader.has("images") or reader.has("image_paths"):
            metrics["image2pose"][SYNTHETIC] = _bound_images(body, reader, cfg, means["image2pose"])
        else:
            log.warning("%s: no images; image->pose bounds skipped (as for the variants)",
                        test_split)
        if reader.num_captions:
            if "text2pose" not in means:
                raise ValueError(f"{train_split}: no /captions; the text->pose mean pose needs "
                                 "the train captions")
            metrics["text2pose"][SYNTHETIC] = _bound_texts(evaluator, body, reader, cfg,
                                                           means["text2pose"])
    metrics["meta"] = {"joint_set": cfg.joint_set, "device": str(device),
                       "train_split": str(train_split),
                       "test_split": str(test_split), "evaluator_dir": str(evaluator_dir),
                       "seconds": time.perf_counter() - start}
    write_json(out_json, metrics)
    if tracker is not None:
        tracker.log_metrics(tracker_metrics({k: v for k, v in metrics.items() if k != "meta"},
                                            prefix="reference/"))
        tracker.log_artifact(out_json)
    log.info("reference bounds done in %.1f s", metrics["meta"]["seconds"])
    return metrics
