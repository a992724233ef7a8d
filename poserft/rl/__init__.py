"""HyGRPO reinforcement fine-tuning of the pose MLLM.

* :mod:`poserft.rl.core` - pure tensor math: group advantages, PPO-clipped token and
  Gaussian-pose surrogates, KL estimators, :func:`~poserft.rl.core.hygrpo_loss` (registries).
* :mod:`poserft.rl.rewards` - format / text / joint / semantic rewards (``REWARDS``).
* :mod:`poserft.rl.rollout` - RL prompt batches and G-candidate rollouts.
* :mod:`poserft.rl.trainer` - :func:`~poserft.rl.trainer.run_rft`, the stage entry point.
* :mod:`poserft.rl.config` - the ``rft`` config section (stdlib only).

Import-light: the Snakefile imports ``poserft.rl.config`` at parse time, so this package
loads torch-based modules only on attribute access.
"""

from __future__ import annotations

import importlib

__all__ = ["RFTConfig", "run_rft", "hygrpo_loss", "REWARDS"]

_WHERE = {"RFTConfig": "config", "run_rft": "trainer", "hygrpo_loss": "core", "REWARDS": "rewards"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"poserft.rl.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'poserft.rl' has no attribute {name!r}")
