"""The rft config section: defaults, invariants and their messages."""

import pytest

from poserft.configbase import ConfigError
from poserft.rl import core
from poserft.rl import config as C
from poserft.rl.config import RFTConfig


def test_defaults_are_valid_and_match_the_core_registries():
    cfg = RFTConfig.from_dict({}, where="rft")
    assert cfg.batch_size * cfg.group_size % cfg.micro_batch_size == 0
    # each name the config offers has exactly one registered function, and no more
    assert set(C.TOKEN_KL_ESTIMATOR_NAMES) == set(core.TOKEN_KL_ESTIMATORS)
    assert set(C.POSE_KL_ESTIMATOR_NAMES) == set(core.POSE_KL_ESTIMATORS)
    assert set(C.LOSS_AGG_MODE_NAMES) == set(core.LOSS_AGG_MODES)
    assert set(C.POSE_LOSS_AGG_MODE_NAMES) == set(core.POSE_LOSS_AGG_MODES)
    assert set(C.ADVANTAGE_ESTIMATOR_NAMES) == set(core.ADVANTAGE_ESTIMATORS)
    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(RFTConfig)}
    assert fields["token_kl_estimator"].metadata["choices"] is C.TOKEN_KL_ESTIMATOR_NAMES
    assert cfg.mode in C.RFT_MODES


def test_rewards_follow_their_declarations():
    cfg = RFTConfig()
    assert cfg.discrete_rewards == ["format", "text"] and cfg.continuous_rewards == ["joint", "semantic"]
    assert cfg.reward_tasks == {n: list(d.tasks) for n, d in C.REWARD_DECLS.items()}
    assert C.HELDOUT_REWARDS == {"image2pose": "joint", "text2pose": "semantic"}
    # the trainer builds only the frozen models of the rewards that will run
    assert cfg.needed_models() == {"body_model", "semantic_model"}   # image2text weight 0
    cfg = RFTConfig.from_dict({"task_weights": {"image2text": 1.0}}, where="rft")
    assert cfg.needed_models() == {"text_embedder"}
    assert cfg.needed_models(("text2pose",)) == {"text_embedder", "semantic_model"}
    cfg = RFTConfig.from_dict({"reward_weights": {"format": 1.0, "joint": 1.0}}, where="rft")
    assert cfg.needed_models() == {"body_model"}


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
    ({"task_weights": {"image2pose": 0.0, "text2pose": 0.0}}, "rft.task_weights"),
    ({"task_weights": {"image2text": 1.0}, "reward_weights": {"text": 0.0, "format": 1.0}}, "rft.task_weights.image2text"),
    ({"format_regex": "(unclosed"}, "rft.format_regex"),
    ({"group_size": 1}, "rft.group_size"),
    ({"mode": "ppo"}, "rft.mode"),
    ({"dual_clip_c": 1.0}, "rft.dual_clip_c"),
    ({"dual_clip_c": 0.5}, "rft.dual_clip_c"),
    ({"dual_clip_c": 0}, "rft.dual_clip_c"),
    ({"pose_loss_agg_mode": "group-mean"}, "rft.pose_loss_agg_mode"),
])
def test_bad_values_are_rejected_with_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        RFTConfig.from_dict(override, where="rft")


def test_dual_clip_is_on_by_default_and_null_disables_it():
    assert RFTConfig.from_dict({}, where="rft").dual_clip_c == 3.0
    assert RFTConfig.from_dict({"dual_clip_c": None}, where="rft").dual_clip_c is None
    assert RFTConfig.from_dict({"dual_clip_c": 1.01}, where="rft").dual_clip_c == 1.01


def test_hygrpo_params_defaults_are_the_config_defaults():
    import dataclasses
    cfg = RFTConfig()
    assert core.HyGRPOParams().beta_pose == cfg.beta_pose == 0.01
    shared = [f.name for f in dataclasses.fields(core.HyGRPOParams)
              if f.name in {g.name for g in dataclasses.fields(RFTConfig)}]
    assert {"beta_pose", "beta_token", "dual_clip_c", "pose_loss_agg_mode", "loss_agg_mode",
            "clip_eps_pose", "mode"} <= set(shared)
    for name in shared:
        assert getattr(core.HyGRPOParams(), name) == getattr(cfg, name), name


def test_trainer_passes_every_shared_field_through():
    import dataclasses
    cfg = RFTConfig.from_dict({"mode": "grpo", "clip_eps_token": 0.1, "clip_eps_token_high": 0.3,
                               "clip_eps_pose": 0.15, "dual_clip_c": 2.5, "beta_token": 0.02,
                               "beta_pose": 0.07, "token_kl_estimator": "k2",
                               "loss_agg_mode": "token-mean",
                               "pose_loss_agg_mode": "group-mean-candidate-mean"}, where="rft")
    params = core.HyGRPOParams.from_config(cfg)
    for f in dataclasses.fields(core.HyGRPOParams):
        if hasattr(cfg, f.name):
            assert getattr(params, f.name) == getattr(cfg, f.name), f.name
            assert getattr(params, f.name) != f.default, f.name  # the override is exercised
