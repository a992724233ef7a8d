"""Semantic reward for RFT: cosine similarity between a prompt and a generated pose in the
frozen retrieval model's space."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from poserft.body.posevec import POSE_DIM
from poserft.retrieval.checkpoint import load_retrieval_model

__all__ = ["SemanticReward"]


class SemanticReward:
    """``reward(texts, poses_vec6d) -> (B,)`` cosine similarities in [-1, 1].

    The model is loaded once, in eval mode, and never receives gradients. Identical texts
    in a call (the G candidates of one prompt) are encoded once.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 batch_size: int = 256):
        self.model = load_retrieval_model(model_dir, device=device)
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], poses_vec6d: torch.Tensor) -> torch.Tensor:
        """texts (B strings), poses_vec6d (B, 144) -> (B,) float32 on the poses' device."""
        if isinstance(texts, str):
            raise TypeError("SemanticReward: texts must be a list of strings, got a str")
        texts = list(texts)
        if poses_vec6d.dim() != 2 or poses_vec6d.shape[1] != POSE_DIM:
            raise ValueError(f"SemanticReward: poses_vec6d must be (B, {POSE_DIM}), got "
                             f"{tuple(poses_vec6d.shape)}")
        if len(texts) != poses_vec6d.shape[0]:
            raise ValueError(f"SemanticReward: {len(texts)} texts but {poses_vec6d.shape[0]} "
                             "poses; pass one text per pose (repeat the prompt per candidate)")
        unique = list(dict.fromkeys(texts))
        row = {t: i for i, t in enumerate(unique)}
        text_emb = self.model.embed_texts(unique, self.batch_size)
        text_emb = text_emb[torch.tensor([row[t] for t in texts], device=text_emb.device)]
        pose_emb = self.model.embed_poses(poses_vec6d.detach().float(), self.batch_size)
        return (text_emb * pose_emb).sum(-1).to(poses_vec6d.device)
