"""Pose MLLM: LLaVA-style backbone (checkpoint or tiny), CLIP + pose-aware ViT with
fusion, Gaussian / deterministic pose heads, and the policy API used by SFT, RFT and eval.

Import-light: the heavy modules (torch, transformers) load on first attribute access, so
``poserft.model.config`` stays importable by the Snakefile.
"""

from __future__ import annotations

import importlib

__all__ = ["ModelConfig", "PoseEncoderConfig", "PoseViTConfig", "PoseMLLM", "Rollout",
           "ScoreOutput", "build_policy", "save_policy", "load_policy", "PoseGaussian",
           "PointPose", "pretrain_pose_encoder"]

_WHERE = {
    "ModelConfig": "config", "PoseEncoderConfig": "config", "PoseViTConfig": "config",
    "PoseMLLM": "policy", "Rollout": "policy", "ScoreOutput": "policy", "build_policy": "policy",
    "save_policy": "io", "load_policy": "io", "PoseGaussian": "heads", "PointPose": "heads",
    "pretrain_pose_encoder": "pretrain",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"poserft.model.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'poserft.model' has no attribute {name!r}")
