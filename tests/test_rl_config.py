"""The rft config section: defaults, invariants and their messages."""

import pytest

from poserft.configbase import ConfigError
from poserft.rl import core
from poserft.rl.config import RFTConfig


def test_defaults_are_valid_and_match_the_core_registries():
    cfg = RFTConfig.from_dict({}, where="rft")
    assert cfg.batch_size * cfg.group_size % cfg.micro_batch_size == 0
    assert cfg.mode in core.HYGRPO_MODES
    assert cfg.token_kl_estimator in core.TOKEN_KL_ESTIMATORS
    assert cfg.pose_kl_estimator in core.POSE_KL_ESTIMATORS
    assert cfg.loss_agg_mode in core.LOSS_AGG_MODES
    assert cfg.advantage_estimator in core.ADVANTAGE_ESTIMATORS
    # every choice the config offers exists in the registries
    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(RFTConfig)}
    assert set(fields["loss_agg_mode"].metadata["choices"]) == set(core.LOSS_AGG_MODES)
    assert set(fields["token_kl_estimator"].metadata["choices"]) == set(core.TOKEN_KL_ESTIMATORS)
    assert set(fields["pose_kl_estimator"].metadata["choices"]) == set(core.POSE_KL_ESTIMATORS)
    assert set(fields["advantage_estimator"].metadata["choices"]) == set(core.ADVANTAGE_ESTIMATORS)


def test_micro_batch_must_divide_rollout_batch_and_message_names_keys():
    with pytest.raises(ConfigError) as e:
        RFTConfig.from_dict({"batch_size": 3, "group_size": 4, "micro_batch_size": 8}, where="rft")
    msg = str(e.value)
    assert "rft.micro_batch_size" in msg and "rft.batch_size" in msg and "rft.group_size" in msg


@pytest.mark.parametrize("override,needle", [
    ({"discrete_rewards": ["joint"]}, "rft.discrete_rewards"),
    ({"continuous_rewards": ["semantic", "cosine"]}, "unknown reward 'cosine'"),
    ({"reward_weights": {"bleu": 1.0}}, "rft.reward_weights"),
    ({"reward_tasks": {"format": ["pose2text"], "text": ["image2text"], "joint": ["image2pose"],
                       "semantic": ["text2pose"]}}, "unknown task 'pose2text'"),
    ({"task_mix": {"image2pose": 0.0, "text2pose": 0.0}}, "rft.task_mix"),
    ({"task_mix": {"image2text": 1.0}, "reward_weights": {"text": 0.0, "format": 1.0}}, "rft.task_mix.image2text"),
    ({"format_regex": "(unclosed"}, "rft.format_regex"),
    ({"group_size": 1}, "rft.group_size"),
    ({"mode": "ppo"}, "rft.mode"),
])
def test_bad_values_are_rejected_with_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        RFTConfig.from_dict(override, where="rft")
