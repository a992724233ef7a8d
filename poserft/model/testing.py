"""Tiny fixtures for unit tests of code that needs a policy (model, SFT, RFT tests).

``tiny_policy(tmp_dir)`` builds a seconds-fast random PoseMLLM (16x16 images -> 4 image
tokens by default, a 1-layer LLM) with a small byte-level BPE tokenizer trained on the
prompt templates plus :data:`TEST_TEXTS`. Not used by the pipeline. Training fixtures
(e.g. teaching a tiny policy the answer format) are in :mod:`poserft.train.testing`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TEST_TEXTS", "make_test_tokenizer", "tiny_model_config", "tiny_policy",
           "make_test_split"]

TEST_TEXTS = [
    "The person is standing with both arms raised above the head.",
    "The person is squatting with the knees completely bent.",
    "The person is lunging forward with the left leg in front.",
    "Is the left arm raised? yes", "Is the person sitting? no",
    "The person is sitting on the floor with crossed legs.",
]


def make_test_tokenizer(out_dir: str | os.PathLike, extra_texts: list[str] = ()):
    """Train a small project tokenizer (templates + TEST_TEXTS) into out_dir; load it."""
    from poserft.model.config import ModelConfig
    from poserft.text.tokenizer import load_tokenizer, train_tokenizer

    cfg = ModelConfig()
    templates = [cfg.prompt_format, cfg.text2pose_prompt, cfg.image2pose_prompt,
                 cfg.vqa_prompt, cfg.pose_answer]
    path = Path(out_dir) / "tokenizer.json"
    train_tokenizer((templates + TEST_TEXTS + list(extra_texts)) * 3, 400, path)
    return load_tokenizer(path)


def tiny_model_config(**overrides):
    """A ModelConfig several times smaller than the embedded default (for unit tests)."""
    from poserft.model.config import ModelConfig

    d = dict(text_hidden_size=32, text_layers=1, text_heads=2, text_kv_heads=2,
             text_intermediate_size=64, max_positions=128, clip_image_size=16,
             clip_patch_size=8, clip_hidden_size=16, clip_layers=1, clip_heads=2,
             pose_vit=dict(image_size=16, patch_size=8, hidden_size=16, num_layers=1,
                           num_heads=2, mlp_ratio=2),
             head_hidden_size=32,
             # toy tests train the encoders from scratch (the embedded default freezes them
             # because its pose encoder comes pretrained)
             freeze_vision=False,
             # float32 whatever the machine (dtype auto would be bfloat16 where a GPU is
             # visible); tests compare outputs to float32 precision
             dtype="float32")
    d.update(overrides)
    return ModelConfig.from_dict(d, where="model")


def tiny_policy(tmp_dir: str | os.PathLike, **overrides):
    """(policy, tokenizer) for tests; ``overrides`` go into the ModelConfig."""
    from poserft.model.policy import build_policy

    tok = make_test_tokenizer(tmp_dir)
    return build_policy(tiny_model_config(**overrides), tok), tok


_KIND_CAPTIONS = ["The person is standing with both arms raised above the head.",
                  "The person is squatting with the knees completely bent.",
                  "The person is lunging forward with the left leg in front.",
                  "The person is sitting on the floor with crossed legs."]


def make_test_split(path: str | os.PathLike, n: int = 32, image_size: int = 16, seed: int = 0,
                    split: str = "train"):
    """A toy HDF5 split: 4 pose kinds (fixed random poses + small noise), each with its own
    caption and a flat image colour + bright square at a kind-specific place, one caption
    and one VQA pair per pose. Learnable in a few dozen steps; returns the path."""
    import numpy as np
    import torch

    from poserft.body import load, smpl_to_rotmats
    from poserft.data.h5io import write_split

    rng = np.random.default_rng(seed)
    base_rng = np.random.default_rng(1234)  # kinds are identical across splits
    base = base_rng.normal(0, 0.5, size=(4, 24, 3)).astype(np.float32)
    kinds = np.arange(n) % 4
    aa = base[kinds] + rng.normal(0, 0.05, size=(n, 24, 3)).astype(np.float32)
    go, bp = aa[:, 0], aa[:, 1:]
    body = load(None)
    with torch.no_grad():
        joints = body.forward_rotmats(smpl_to_rotmats(torch.from_numpy(go), torch.from_numpy(bp)))
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    q = image_size // 2
    for i, k in enumerate(kinds):
        images[i] = (40 + 50 * k, 80, 200 - 40 * k)
        r, c = divmod(int(k), 2)
        images[i, r * q:(r + 1) * q, c * q:(c + 1) * q] = 255
    # 2D keypoints cluster around the bright square (fixed per-joint offsets), so an encoder
    # can learn to find them from the image
    offsets = base_rng.uniform(-q / 4, q / 4, size=(24, 2)).astype(np.float32)
    centres = np.array([[(k % 2 + 0.5) * q, (k // 2 + 0.5) * q] for k in kinds], np.float32)
    keypoints = centres[:, None, :] + offsets[None] + rng.normal(0, 0.3, size=(n, 24, 2)).astype(np.float32)
    arrays = {
        "keypoints2d": keypoints,
        "poses/global_orient": go, "poses/body_pose": bp,
        "poses/betas": np.zeros((n, 10), np.float32), "joints": joints.numpy(),
        "captions/text": [_KIND_CAPTIONS[k] for k in kinds],
        "captions/pose_index": np.arange(n),
        "images": images, "image_pose/global_orient": go,
        "vqa/question": ["Is the person sitting?"] * n,
        "vqa/answer": ["yes" if k == 3 else "no" for k in kinds],
        "vqa/pose_index": np.arange(n),
    }
    return write_split(path, arrays, {"source": "test", "split": split, "body_model": "skeleton",
                                      "converter_params": {"seed": seed}})
