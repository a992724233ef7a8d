"""Training fixtures for unit tests and benchmarks of RFT (not used by the pipeline).

The model-level fixtures (tiny policy, tokenizer, toy split) are in
:mod:`poserft.model.testing`; this one needs the SFT task data, a layer above the model.
"""

from __future__ import annotations

import os

__all__ = ["teach_answer_format"]


def teach_answer_format(policy, split_path: str | os.PathLike, steps: int = 25):
    """A few supervised steps so a tiny random policy emits 'The SMPL pose ... <POSE>.'
    (it almost never does by chance, which would leave RL nothing to optimise)."""
    import torch

    from poserft.train.data import SFTTaskData

    data = SFTTaskData(split_path, policy.config, {"text2pose": 1.0, "image2pose": 1.0})
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for s in range(steps):
        b = data.batch(s, 0, 8)
        loss, _ = policy.sft_loss(policy.sft_batch(b["prompts"], b["answers"], b["images"],
                                                   b["poses"], b["has_pose"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.eval()
