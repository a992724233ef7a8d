"""Fusion of CLIP and pose-ViT tokens into LLM input embeddings (paper, appendix A).

Three modes (``model.fusion``); all give the SAME number of image tokens, the CLIP patch
grid (64 on the 64x64 embedded images, 576 for LLaVA-1.5), so prompts and the KV-cache
layout do not depend on the fusion:

* ``separate`` (the paper's): CLIP tokens ``a`` (B,Na,Ca) -> ``W_a`` (2-layer MLP) and pose
  tokens ``b`` (B,Nb,Cb) -> bilinearly resampled to the CLIP grid -> ``W_b`` (2-layer MLP);
  the two projections are summed token-wise: ``W_a(a) + W_b(resample(b))`` (B,Na,D).
  ``W_b``'s output layer starts at zero, so a pretrained LLaVA starts exactly as released.
* ``concat``: ``W([a ; resample(b)])`` -- channel-wise concatenation, ONE projector.
* ``clip_only``: ``W_a(a)``; no pose encoder at all (ablation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLPProjector", "resample_tokens", "VisionFusion", "FUSION_MODES"]

FUSION_MODES = ("separate", "concat", "clip_only")


class MLPProjector(nn.Module):
    """LLaVA-1.5's 'mlp2x_gelu': Linear(in, D) -> GELU -> Linear(D, D)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def resample_tokens(tokens: torch.Tensor, src_grid: tuple[int, int],
                    dst_grid: tuple[int, int]) -> torch.Tensor:
    """(B, hs*ws, C) tokens on a (hs,ws) grid -> (B, hd*wd, C) on (hd,wd), bilinear."""
    b, n, c = tokens.shape
    if n != src_grid[0] * src_grid[1]:
        raise ValueError(f"resample_tokens: {n} tokens do not form a {src_grid} grid")
    if tuple(src_grid) == tuple(dst_grid):
        return tokens
    x = tokens.transpose(1, 2).reshape(b, c, *src_grid)
    x = F.interpolate(x, size=tuple(dst_grid), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


class VisionFusion(nn.Module):
    """Project (and fuse) encoder tokens to LLM embeddings: -> (B, Na, llm_dim).

    ``clip_projector``: an existing projector to use as ``W_a`` (LLaVA's pretrained one);
    in ``concat`` mode its weights initialise the CLIP columns of the joint projector.
    """

    def __init__(self, mode: str, clip_dim: int, pose_dim: int | None, llm_dim: int,
                 clip_grid: tuple[int, int], pose_grid: tuple[int, int] | None,
                 clip_projector: nn.Module | None = None):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"model.fusion: {mode!r} is not one of {FUSION_MODES}")
        if mode != "clip_only" and (pose_dim is None or pose_grid is None):
            raise ValueError(f"model.fusion={mode} needs a pose encoder (pose_dim/pose_grid)")
        self.mode, self.clip_grid, self.pose_grid = mode, tuple(clip_grid), pose_grid
        self.num_tokens = clip_grid[0] * clip_grid[1]
        if mode in ("separate", "clip_only"):
            self.proj_clip = clip_projector if clip_projector is not None else MLPProjector(clip_dim, llm_dim)
        if mode == "separate":
            self.proj_pose = MLPProjector(pose_dim, llm_dim)
            nn.init.zeros_(self.proj_pose.linear_2.weight)
            nn.init.zeros_(self.proj_pose.linear_2.bias)
        if mode == "concat":
            self.proj = MLPProjector(clip_dim + pose_dim, llm_dim)
            if clip_projector is not None:
                self._init_concat_from(clip_projector, clip_dim)

    @torch.no_grad()
    def _init_concat_from(self, pretrained: nn.Module, clip_dim: int) -> None:
        # Copy the pretrained CLIP projector into the CLIP columns; pose columns start at
        # zero so the concat model also starts as the released LLaVA.
        self.proj.linear_1.weight.zero_()
        self.proj.linear_1.weight[:, :clip_dim].copy_(pretrained.linear_1.weight)
        self.proj.linear_1.bias.copy_(pretrained.linear_1.bias)
        self.proj.linear_2.load_state_dict(pretrained.linear_2.state_dict())

    def forward(self, clip_tokens: torch.Tensor, pose_tokens: torch.Tensor | None = None
                ) -> torch.Tensor:
        if clip_tokens.shape[1] != self.num_tokens:
            raise ValueError(f"VisionFusion: expected {self.num_tokens} CLIP tokens, got "
                             f"{clip_tokens.shape[1]}")
        # the projectors' dtype (the policy's): encoders of another dtype meet it here
        clip_tokens = clip_tokens.to(next(self.parameters()).dtype)
        if self.mode == "clip_only":
            return self.proj_clip(clip_tokens)
        if pose_tokens is None:
            raise ValueError(f"VisionFusion: fusion={self.mode} needs pose tokens")
        pose_tokens = resample_tokens(pose_tokens, self.pose_grid, self.clip_grid)
        pose_tokens = pose_tokens.to(clip_tokens.dtype)
        if self.mode == "separate":
            return self.proj_clip(clip_tokens) + self.proj_pose(pose_tokens)
        return self.proj(torch.cat([clip_tokens, pose_tokens], dim=-1))
