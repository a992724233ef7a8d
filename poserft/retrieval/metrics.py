"""Text<->pose Recall@K (percent) of retrieval embeddings: the 'full' protocol (rank against
the whole split) and the 'sampled' one (design.md, protocol 2).

Used by retrieval training (validation recall, chance level) and by ``poserft.eval``
(text->pose benchmarks), which re-exports these functions from ``poserft.eval.metrics``.
Batched torch; numpy inputs are accepted; internally float64.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from poserft.body.metrics import as_float64

__all__ = ["retrieval_recall", "sample_retrieval_candidates"]


# -------------------------------------------------------------------------- retrieval --
# Rows x candidates per scoring chunk: bounds memory at ~32 MB of float64 scores.
_CHUNK_ELEMENTS = 1 << 22
# Below this population size, sample without replacement by sorting random keys;
# above it, draw with replacement and redraw duplicates (much cheaper when pop >> count).
_KEYS_METHOD_MAX_POP = 1024


def _check_retrieval_inputs(text_emb, pose_emb, caption_to_pose
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    text = as_float64(text_emb, "text_emb")
    pose = as_float64(pose_emb, "pose_emb")
    for name, x in (("text_emb", text), ("pose_emb", pose)):
        if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name} must have shape (rows > 0, D > 0), got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf")
    if text.shape[1] != pose.shape[1]:
        raise ValueError(f"embedding widths differ: text_emb D={text.shape[1]}, "
                         f"pose_emb D={pose.shape[1]}")
    c2p = caption_to_pose
    c2p = c2p.detach().cpu() if isinstance(c2p, torch.Tensor) else torch.as_tensor(np.asarray(c2p))
    if c2p.dim() != 1 or c2p.shape[0] != text.shape[0]:
        raise ValueError(f"caption_to_pose must have shape ({text.shape[0]},) (one pose index "
                         f"per caption), got {tuple(c2p.shape)}")
    if c2p.is_floating_point() or c2p.dtype == torch.bool:
        raise ValueError(f"caption_to_pose must hold integer pose indices, got {c2p.dtype}")
    c2p = c2p.long()
    if bool((c2p < 0).any()) or bool((c2p >= pose.shape[0]).any()):
        raise ValueError(f"caption_to_pose values must lie in [0, {pose.shape[0]}) "
                         f"(number of poses); got min {int(c2p.min())}, max {int(c2p.max())}")
    return text, pose.to(text.device), c2p.to(text.device)


def _sample_distinct(pop_sizes: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """For each row r, ``count`` distinct integers drawn uniformly from [0, pop_sizes[r]).

    Args: pop_sizes (R,) long, all >= count. Returns (R, count) long.
    """
    rows = pop_sizes.shape[0]
    pop_max = int(pop_sizes.max()) if rows else 0
    out = torch.empty(rows, count, dtype=torch.long)
    if rows == 0:
        return out
    if pop_max <= _KEYS_METHOD_MAX_POP:
        # The `count` smallest of i.i.d. uniform keys form a uniform random subset.
        step = max(1, _CHUNK_ELEMENTS // pop_max)
        positions = torch.arange(pop_max)
        for lo in range(0, rows, step):
            pops = pop_sizes[lo:lo + step]
            keys = torch.rand(pops.shape[0], pop_max, generator=gen)
            keys.masked_fill_(positions[None, :] >= pops[:, None], 2.0)
            out[lo:lo + step] = keys.topk(count, dim=1, largest=False).indices
        return out
    # Draw with replacement, then redraw the repeated values until all are distinct. The
    # procedure is invariant to relabelling the population, so the final subset is uniform.
    out = (torch.rand(rows, count, generator=gen, dtype=torch.float64)
           * pop_sizes[:, None]).long().clamp_max_(pop_sizes[:, None] - 1)
    for _ in range(10_000):
        out, _ = out.sort(dim=1)
        dup = torch.zeros_like(out, dtype=torch.bool)
        dup[:, 1:] = out[:, 1:] == out[:, :-1]
        n_dup = int(dup.sum())
        if n_dup == 0:
            return out
        dup_rows = dup.nonzero()[:, 0]
        redraw = torch.rand(n_dup, generator=gen, dtype=torch.float64) * pop_sizes[dup_rows]
        out[dup] = torch.minimum(redraw.long(), pop_sizes[dup_rows] - 1)
    raise RuntimeError("sampling distinct candidates did not converge")  # pragma: no cover


def sample_retrieval_candidates(caption_to_pose, num_poses: int, n_candidates: int = 32,
                                repeats: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random candidate sets of the 'sampled' Recall@K protocol (design.md, protocol 2).

    Per query and repeat, ``n_candidates - 1`` distinct distractors are drawn uniformly:
    * text->pose: query = every caption m; distractors = poses other than its pose.
    * pose->text: query = every pose with at least one caption; its ground truth is one of
      its captions drawn uniformly per repeat; distractors = captions of other poses.

    Returns a dict of long tensors (L = n_candidates - 1, Q = poses with captions):
    ``t2p_distractors (M,R,L)`` pose ids, ``p2t_poses (Q,)``, ``p2t_gt (Q,R)`` caption ids,
    ``p2t_distractors (Q,R,L)`` caption ids. Deterministic given ``seed``.
    """
    if isinstance(caption_to_pose, torch.Tensor):
        c2p = caption_to_pose.detach().cpu().long()
    else:
        c2p = torch.as_tensor(np.asarray(caption_to_pose)).long()
    if c2p.dim() != 1 or (c2p.numel() and (int(c2p.min()) < 0 or int(c2p.max()) >= num_poses)):
        raise ValueError(f"caption_to_pose must be a 1-D array of pose indices in "
                         f"[0, {num_poses}), got shape {tuple(c2p.shape)}")
    num_captions = c2p.shape[0]
    n_distract = n_candidates - 1
    if n_candidates < 2 or repeats < 1:
        raise ValueError(f"n_candidates must be >= 2 and repeats >= 1, got {n_candidates}, "
                         f"{repeats}")
    if num_poses - 1 < n_distract:
        raise ValueError(
            f"sampled Recall@K (text->pose) needs n_candidates-1={n_distract} distractor poses "
            f"but only {num_poses - 1} other poses exist; use protocol='full' or a smaller "
            f"n_candidates")
    counts = torch.bincount(c2p, minlength=num_poses)
    poses = counts.nonzero()[:, 0]
    other_captions = num_captions - counts[poses]
    if bool((other_captions < n_distract).any()):
        worst = int(poses[other_captions.argmin()])
        raise ValueError(
            f"sampled Recall@K (pose->text) needs n_candidates-1={n_distract} captions of other "
            f"poses for every pose, but pose {worst} has only {int(other_captions.min())}; use "
            f"protocol='full' or a smaller n_candidates")
    gen = torch.Generator().manual_seed(int(seed))

    gt_pose = c2p.repeat_interleave(repeats)                              # (M*R,)
    pick = _sample_distinct(torch.full_like(gt_pose, num_poses - 1), n_distract, gen)
    pick += (pick >= gt_pose[:, None]).long()                             # skip the gt pose
    t2p = pick.reshape(num_captions, repeats, n_distract)

    order = torch.argsort(c2p, stable=True)            # captions grouped by pose
    starts = torch.cumsum(counts, 0) - counts
    q_count = counts[poses].repeat_interleave(repeats)                    # (Q*R,)
    q_start = starts[poses].repeat_interleave(repeats)
    gt_pos = q_start + torch.minimum(
        (torch.rand(q_count.shape[0], generator=gen, dtype=torch.float64) * q_count).long(),
        q_count - 1)
    pos = _sample_distinct(num_captions - q_count, n_distract, gen)
    pos += q_count[:, None] * (pos >= q_start[:, None]).long()            # skip own block
    return {
        "t2p_distractors": t2p,
        "p2t_poses": poses,
        "p2t_gt": order[gt_pos].reshape(-1, repeats),
        "p2t_distractors": order[pos].reshape(-1, repeats, n_distract),
    }


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def retrieval_recall(text_emb, pose_emb, caption_to_pose, ks: Sequence[int] = (5, 10, 20),
                     protocol: str = "full", n_candidates: int = 32, repeats: int = 10,
                     seed: int = 0, normalize: bool = True, pose_groups=None) -> dict[str, float]:
    """Text<->pose Recall@K in percent (0..100), plus ``mRecall`` (mean of all values).

    Args:
        text_emb: (M,D) caption embeddings; pose_emb: (N,D) pose embeddings.
        caption_to_pose: (M,) int, the pose each caption describes.
        ks: the K values; keys are ``t2p_R@K`` and ``p2t_R@K`` for each K.
        protocol: 'full' ranks every query against the whole set: t2p, the rank of the
            caption's pose among all N poses; p2t (poses that have captions), a hit if any
            of the pose's captions is among the top K of all M captions. 'sampled' uses
            ``n_candidates`` candidates (ground truth + random distractors) per query,
            ``repeats`` times, seeded (see :func:`sample_retrieval_candidates`); the value
            is the mean hit rate over repeats and queries.
        normalize: L2-normalise embeddings first (cosine similarity); else dot products.
        pose_groups: (N,) int or None, 'full' only: poses of one group are the same pose
            (e.g. one generated per caption of a pose); a query's ground truth then competes
            with no other pose of its group (t2p), and a pose with no caption of another
            pose of its group (p2t): neither hits nor distractors.
    Ties count against the query (a distractor scoring equal to the ground truth beats it).
    """
    if protocol not in ("full", "sampled"):
        raise ValueError(f"protocol must be 'full' or 'sampled', got {protocol!r}")
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if protocol == "sampled" and max(ks) > n_candidates:
        raise ValueError(f"K={max(ks)} exceeds n_candidates={n_candidates}: every query "
                         f"would trivially hit")
    text, pose, c2p = _check_retrieval_inputs(text_emb, pose_emb, caption_to_pose)
    groups = None
    if pose_groups is not None:
        if protocol != "full":
            raise ValueError("pose_groups is supported by protocol='full' only")
        groups = torch.as_tensor(np.asarray(pose_groups), dtype=torch.long, device=text.device)
        if groups.shape != (pose.shape[0],):
            raise ValueError(f"pose_groups must have shape ({pose.shape[0]},), got "
                             f"{tuple(groups.shape)}")
    if normalize:
        text, pose = _normalise(text), _normalise(pose)
    num_captions, num_poses = text.shape[0], pose.shape[0]
    k_tensor = torch.tensor(ks, device=text.device)

    if protocol == "full":
        t2p_beaten = torch.empty(num_captions, dtype=torch.long, device=text.device)
        step = max(1, _CHUNK_ELEMENTS // num_poses)
        for lo in range(0, num_captions, step):
            scores = text[lo:lo + step] @ pose.T                                 # (n,N)
            gt_ids = c2p[lo:lo + step, None]
            gt = scores.gather(1, gt_ids)
            competes = scores >= gt
            if groups is not None:  # same-group poses other than the ground truth sit out
                sibling = groups[None, :] == groups[gt_ids]
                sibling.scatter_(1, gt_ids, False)
                competes &= ~sibling
            t2p_beaten[lo:lo + step] = competes.sum(1) - 1                       # minus itself
        poses = torch.unique(c2p)
        p2t_beaten = torch.empty(poses.shape[0], dtype=torch.long, device=text.device)
        step = max(1, _CHUNK_ELEMENTS // num_captions)
        for lo in range(0, poses.shape[0], step):
            ids = poses[lo:lo + step]
            scores = pose[ids] @ text.T                                          # (n,M)
            own = c2p[None, :] == ids[:, None]
            best_own = scores.masked_fill(~own, -torch.inf).amax(1, keepdim=True)
            rivals = ~own
            if groups is not None:  # captions of another pose of the same group sit out
                rivals &= groups[c2p][None, :] != groups[ids][:, None]
            p2t_beaten[lo:lo + step] = ((scores >= best_own) & rivals).sum(1)
        t2p_hits = (t2p_beaten[:, None] < k_tensor).double().mean(0)
        p2t_hits = (p2t_beaten[:, None] < k_tensor).double().mean(0)
    else:
        cand = {k: v.to(text.device) for k, v in sample_retrieval_candidates(
            c2p.cpu(), num_poses, n_candidates, repeats, seed).items()}
        n_distract = n_candidates - 1
        t2p_sum = torch.zeros(len(ks), dtype=torch.float64, device=text.device)
        step = max(1, _CHUNK_ELEMENTS // max(num_poses, repeats * n_distract))
        for lo in range(0, num_captions, step):
            scores = text[lo:lo + step] @ pose.T                                 # (n,N)
            n = scores.shape[0]
            gt = scores.gather(1, c2p[lo:lo + step, None])                       # (n,1)
            dis = scores.gather(1, cand["t2p_distractors"][lo:lo + step].reshape(n, -1))
            beaten = (dis.reshape(n, repeats, n_distract) >= gt[:, :, None]).sum(-1)  # (n,R)
            t2p_sum += (beaten[..., None] < k_tensor).double().sum((0, 1))
        t2p_hits = t2p_sum / (num_captions * repeats)
        poses = cand["p2t_poses"]
        p2t_sum = torch.zeros(len(ks), dtype=torch.float64, device=text.device)
        step = max(1, _CHUNK_ELEMENTS // max(num_captions, repeats * n_distract))
        for lo in range(0, poses.shape[0], step):
            scores = pose[poses[lo:lo + step]] @ text.T                          # (n,M)
            n = scores.shape[0]
            gt = scores.gather(1, cand["p2t_gt"][lo:lo + step])                  # (n,R)
            dis = scores.gather(1, cand["p2t_distractors"][lo:lo + step].reshape(n, -1))
            beaten = (dis.reshape(n, repeats, n_distract) >= gt[:, :, None]).sum(-1)
            p2t_sum += (beaten[..., None] < k_tensor).double().sum((0, 1))
        p2t_hits = p2t_sum / (poses.shape[0] * repeats)

    result = {}
    for direction, hits in (("t2p", t2p_hits), ("p2t", p2t_hits)):
        for k, value in zip(ks, hits.tolist()):
            result[f"{direction}_R@{k}"] = 100.0 * value
    result["mRecall"] = float(np.mean(list(result.values())))
    return result
