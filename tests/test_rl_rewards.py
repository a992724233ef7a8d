"""HyGRPO rewards on hand-built cases."""

import math

import numpy as np
import pytest
import torch

import poserft.body as body
from poserft.rl.config import REWARD_DECLS, RFTConfig
from poserft.rl.rewards import REWARDS, RewardContext, RewardInputs, compute_rewards

TASKS = {"format": ["image2pose", "text2pose"], "text": ["image2text"], "joint": ["image2pose"],
         "semantic": ["text2pose"]}


def rest_pose(n):
    return body.smpl_to_vec6d(torch.zeros(n, 3), torch.zeros(n, 23, 3))


def bent_pose(n, joint=18, angle=1.0):
    bp = torch.zeros(n, 23, 3)
    bp[:, joint - 1, 2] = angle  # rotate one joint (default: left elbow) about z
    return body.smpl_to_vec6d(torch.zeros(n, 3), bp)


def test_registry_matches_the_declarations():
    assert set(REWARDS) == set(REWARD_DECLS)
    for name, spec in REWARDS.items():
        assert spec.decl is REWARD_DECLS[name]
        assert spec.needs_pose == (spec.kind == "continuous")


@pytest.mark.parametrize("text", [
    "The SMPL pose of this person is <POSE>.",
    "  The SMPL pose of this person is <POSE> .  ",
    "The  SMPL\tpose of this\nperson is<POSE>.",
])
def test_format_positive(text):
    ctx = RewardContext(reward_tasks=TASKS)
    v, ok = REWARDS.get("format").fn(RewardInputs(tasks=["text2pose"], texts=[text],
                                                  pose_valid=torch.ones(1, dtype=torch.bool)), ctx)
    assert ok.tolist() == [True] and v.tolist() == [1.0]


@pytest.mark.parametrize("text", [
    "The SMPL pose of this person is .",               # no pose token
    "The SMPL pose of this person is <POSE>",           # no full stop
    "The SMPL pose of this person is <POSE>. extra",    # trailing words
    "TheSMPL pose of this person is <POSE>.",           # words glued
    "The SMPL pose of this person is <POSE><POSE>.",
    "",
])
def test_format_negative(text):
    ctx = RewardContext(reward_tasks=TASKS)
    v, ok = REWARDS.get("format").fn(RewardInputs(tasks=["image2pose"], texts=[text],
                                                  pose_valid=torch.zeros(1, dtype=torch.bool)), ctx)
    assert ok.tolist() == [True] and v.tolist() == [0.0]


def test_format_not_applied_to_vqa_and_custom_regex():
    ctx = RewardContext(reward_tasks=TASKS, format_regex=r"pose:\s*<POSE>")
    batch = RewardInputs(tasks=["image2text", "image2pose"], texts=["pose: <POSE>", "pose:<POSE>"],
                         pose_valid=torch.ones(2, dtype=torch.bool))
    v, ok = REWARDS.get("format").fn(batch, ctx)
    assert ok.tolist() == [False, True] and math.isnan(v[0]) and v[1] == 1.0


def test_joint_reward_perfect_pose_is_capped_and_finite():
    ctx = RewardContext(reward_tasks=TASKS, body_model=body.load(None), joint_eps_m=1e-9,
                        joint_cap=100.0)
    pose = bent_pose(1)
    v, ok = REWARDS.get("joint").fn(RewardInputs(
        tasks=["image2pose"], texts=["x"], pose_valid=torch.ones(1, dtype=torch.bool),
        poses=pose, gt_poses=pose.clone()), ctx)
    assert ok.tolist() == [True] and v.item() == 100.0


def test_joint_reward_is_inverse_mpjpe_in_metres():
    model = body.load(None)
    eps = 1e-3
    ctx = RewardContext(reward_tasks=TASKS, body_model=model, joint_eps_m=eps, joint_cap=1e6)
    gt = rest_pose(3)
    pred = torch.cat([bent_pose(1, angle=0.3), bent_pose(1, angle=1.2), rest_pose(1)])
    valid = torch.tensor([True, True, False])
    v, ok = REWARDS.get("joint").fn(RewardInputs(
        tasks=["image2pose"] * 3, texts=["x"] * 3, pose_valid=valid, poses=pred, gt_poses=gt), ctx)
    assert ok.tolist() == [True, True, False] and math.isnan(v[2])
    # independent MPJPE in numpy on the body model's joints, pelvis-aligned, metres
    with torch.no_grad():
        jp = model(*body.vec6d_to_smpl(pred)).numpy().astype(np.float64)
        jg = model(*body.vec6d_to_smpl(gt)).numpy().astype(np.float64)
    jp, jg = jp - jp[:, :1], jg - jg[:, :1]
    err = np.linalg.norm(jp - jg, axis=-1).mean(-1)
    assert err[0] > 0.005 and err[1] > err[0]  # the bend moves the wrist/hand
    np.testing.assert_allclose(v[:2].numpy(), 1.0 / (err[:2] + eps), rtol=1e-4)
    assert v[0] > v[1]


class FakeEmbedder:
    """Fixed unit vectors per string (a seeded random projection of a hash)."""

    def __init__(self):
        self.table = {}

    def encode(self, texts):
        out = []
        for t in texts:
            if t not in self.table:
                rng = np.random.default_rng(abs(hash(t)) % 2**32)
                v = rng.standard_normal(8)
                self.table[t] = v / np.linalg.norm(v)
            out.append(self.table[t])
        return np.stack(out).astype(np.float32)


def test_text_reward_cosine_on_vqa_only():
    emb = FakeEmbedder()
    ctx = RewardContext(reward_tasks=TASKS, text_embedder=emb)
    batch = RewardInputs(tasks=["image2text", "image2text", "text2pose", "image2text"],
                         texts=["yes", "the left arm", "The SMPL ...", "no"],
                         pose_valid=torch.zeros(4, dtype=torch.bool),
                         reference_answers=["yes", "the right arm", None, None])
    v, ok = REWARDS.get("text").fn(batch, ctx)
    assert ok.tolist() == [True, True, False, False]
    assert v[0].item() == pytest.approx(1.0, abs=1e-6)
    expected = float(emb.table["the left arm"] @ emb.table["the right arm"])
    assert v[1].item() == pytest.approx(expected, abs=1e-6)


def test_semantic_reward_calls_model_on_valid_text2pose_rows_only():
    calls = []

    def model(texts, poses):
        calls.append((list(texts), poses.clone()))
        return poses[:, 0] * 0.5  # any deterministic function of the pose

    ctx = RewardContext(reward_tasks=TASKS, semantic_model=model)
    poses = torch.randn(4, 144)
    batch = RewardInputs(tasks=["text2pose", "text2pose", "image2pose", "text2pose"],
                         texts=["a"] * 4, pose_valid=torch.tensor([True, False, True, True]),
                         poses=poses, captions=["c0", "c1", None, "c3"])
    v, ok = REWARDS.get("semantic").fn(batch, ctx)
    assert ok.tolist() == [True, False, False, True]
    assert calls[0][0] == ["c0", "c3"]
    torch.testing.assert_close(v[[0, 3]], poses[[0, 3], 0] * 0.5)


def test_compute_rewards_branches_and_valid_set():
    cfg = RFTConfig()
    model = body.load(None)
    emb = FakeEmbedder()
    ctx = RewardContext(reward_tasks=cfg.reward_tasks, body_model=model, text_embedder=emb,
                        semantic_model=lambda t, p: torch.full((len(t),), 0.25))
    good = "The SMPL pose of this person is <POSE>."
    batch = RewardInputs(
        tasks=["image2pose", "image2pose", "text2pose", "image2text"],
        texts=[good, "garbage", good, "yes"],
        pose_valid=torch.tensor([True, False, True, False]),
        poses=rest_pose(4), gt_poses=rest_pose(4), captions=[None, None, "a man", None],
        reference_answers=[None, None, None, "yes"])
    weights = {"format": 2.0, "text": 1.0, "joint": 0.5, "semantic": 3.0}
    res = compute_rewards(batch, ctx, weights, cfg.discrete_rewards, cfg.continuous_rewards)
    assert res.discrete.tolist() == pytest.approx([2.0, 0.0, 2.0, 1.0], abs=1e-6)
    assert res.continuous_valid.tolist() == [True, False, True, False]
    assert res.continuous[0].item() == pytest.approx(0.5 * 100.0)   # perfect pose, capped
    assert res.continuous[2].item() == pytest.approx(3.0 * 0.25)
    assert math.isnan(res.continuous[1]) and math.isnan(res.continuous[3])
    m = res.metrics()
    assert m["reward/format"] == pytest.approx(2 / 3) and m["reward/joint"] == pytest.approx(100.0)
    # GRPO ablation: pose rewards go to the discrete reward, 0 where no pose
    res2 = compute_rewards(batch, ctx, weights, cfg.discrete_rewards, cfg.continuous_rewards,
                           pose_rewards_to_discrete=True)
    assert res2.discrete.tolist() == pytest.approx([52.0, 0.0, 2.75, 1.0], abs=1e-5)
    # zero weight: the reward is not even evaluated (no semantic model needed)
    ctx.semantic_model = None
    res3 = compute_rewards(batch, ctx, {**weights, "semantic": 0.0}, cfg.discrete_rewards,
                           cfg.continuous_rewards)
    assert "semantic" not in res3.per_reward and res3.continuous_valid.tolist()[2] is False


def test_missing_model_is_a_clear_error():
    ctx = RewardContext(reward_tasks=TASKS)
    batch = RewardInputs(tasks=["text2pose"], texts=["a"], pose_valid=torch.ones(1, dtype=torch.bool),
                         poses=rest_pose(1), captions=["c"])
    with pytest.raises(ValueError, match="semantic_model"):
        REWARDS.get("semantic").fn(batch, ctx)
