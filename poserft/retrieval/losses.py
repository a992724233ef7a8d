"""Contrastive loss of the retrieval model, as a pure function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["symmetric_infonce"]


def symmetric_infonce(text_emb: torch.Tensor, pose_emb: torch.Tensor,
                      logit_scale: torch.Tensor | float) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE (CLIP / PoseScript "batch-based classification") loss.

    Args:
        text_emb: (B, D) L2-normalised text embeddings; row i pairs with ``pose_emb[i]``.
        pose_emb: (B, D) L2-normalised pose embeddings.
        logit_scale: inverse temperature (already exponentiated, > 0); scalar.

    Returns:
        loss: scalar, mean of the text->pose and pose->text cross-entropies over the
            logits ``logit_scale * text_emb @ pose_emb.T`` with the diagonal as targets.
        metrics: floats ``loss_t2p``, ``loss_p2t``, ``acc_t2p``, ``acc_p2t`` (top-1
            in-batch accuracy), ``logit_scale``.
    """
    if text_emb.shape != pose_emb.shape or text_emb.dim() != 2:
        raise ValueError(f"text_emb {tuple(text_emb.shape)} and pose_emb "
                         f"{tuple(pose_emb.shape)} must both be (B, D)")
    logits = logit_scale * text_emb @ pose_emb.T  # (B, B): row = text, column = pose
    target = torch.arange(logits.shape[0], device=logits.device)
    loss_t2p = F.cross_entropy(logits, target)
    loss_p2t = F.cross_entropy(logits.T, target)
    loss = 0.5 * (loss_t2p + loss_p2t)
    with torch.no_grad():
        metrics = {
            "loss_t2p": float(loss_t2p), "loss_p2t": float(loss_p2t),
            "acc_t2p": float((logits.argmax(1) == target).float().mean()),
            "acc_p2t": float((logits.argmax(0) == target).float().mean()),
            "logit_scale": float(logit_scale),
        }
    return loss, metrics
