"""Pose sampler: determinism, plausibility per archetype, diversity, mirror symmetry."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import poserft.body as body
from poserft.data.synthetic.sampler import (GESTURES, JOINT_INDEX, LEFT_RIGHT_PERMUTATION,
                                            POSTURES, mirror_rotmats, sample_poses)

MODEL = body.load(None)


def fk(sample):
    with torch.no_grad():
        return MODEL(torch.from_numpy(sample.global_orient),
                     torch.from_numpy(sample.body_pose)).numpy().astype(np.float64)


def test_joint_order_matches_body_layer():
    assert tuple(JOINT_INDEX) == tuple(body.SMPL_JOINT_NAMES)


def test_same_seed_same_poses_different_seed_different():
    a = sample_poses(50, np.random.default_rng(7))
    b = sample_poses(50, np.random.default_rng(7))
    c = sample_poses(50, np.random.default_rng(8))
    np.testing.assert_array_equal(a.body_pose, b.body_pose)
    np.testing.assert_array_equal(a.posture, b.posture)
    assert np.abs(a.body_pose - c.body_pose).max() > 0.5


def test_outputs_are_valid_axis_angle_matching_rotmats():
    s = sample_poses(64, np.random.default_rng(0))
    assert s.global_orient.shape == (64, 3) and s.body_pose.shape == (64, 23, 3)
    assert s.global_orient.dtype == np.float32
    aa = np.concatenate([s.global_orient[:, None], s.body_pose], axis=1).reshape(-1, 3)
    assert np.linalg.norm(aa, axis=-1).max() <= np.pi + 1e-5
    np.testing.assert_allclose(Rotation.from_rotvec(aa).as_matrix(),
                               s.rotmats.reshape(-1, 3, 3), atol=1e-5)
    # the two SMPL hand joints are never articulated
    np.testing.assert_array_equal(s.body_pose[:, 21:], 0)


def test_archetype_coverage_and_unknown_name():
    s = sample_poses(2000, np.random.default_rng(1))
    counts = {p: int((s.posture == p).sum()) for p in POSTURES}
    expected = 2000 / len(POSTURES)
    assert min(counts.values()) > 0.6 * expected, counts
    gestures = set(s.gesture_left) | set(s.gesture_right)
    assert gestures == set(GESTURES)
    only = sample_poses(30, np.random.default_rng(1), archetypes=["squatting", "lying_back"])
    assert set(only.posture) == {"squatting", "lying_back"}
    with pytest.raises(ValueError, match="synth.archetypes.*nope"):
        sample_poses(3, np.random.default_rng(0), archetypes=["nope"])


def _torso_up(j):
    v = j[:, JOINT_INDEX["neck"]] - j[:, JOINT_INDEX["pelvis"]]
    return v[:, 1] / np.linalg.norm(v, axis=1)


def test_archetypes_are_plausible_postures():
    """Geometry per archetype, checked on joints from the body model (not on parameters)."""
    def joints_of(name, n=60):
        return fk(sample_poses(n, np.random.default_rng(3), archetypes=[name]))

    standing = joints_of("standing")
    height = standing[..., 1].max(1) - standing[..., 1].min(1)
    assert np.all(height > 1.2) and np.all(_torso_up(standing) > 0.85)
    lying = np.concatenate([joints_of(n) for n in ("lying_back", "lying_front", "lying_side")])
    assert np.all(np.abs(_torso_up(lying)) < 0.45)           # torso roughly horizontal
    for name in ("sitting", "squatting", "kneeling"):
        j = joints_of(name)
        pelvis_h = j[:, 0, 1] - j[..., 1].min(1)
        stand_h = standing[:, 0, 1] - standing[..., 1].min(1)
        assert np.median(pelvis_h) < np.median(stand_h) - 0.25, name
    kneel = joints_of("kneeling")
    knee_h = kneel[:, [4, 5], 1] - kneel[..., 1].min(1, keepdims=True)
    assert np.median(knee_h) < 0.08                            # knees on the ground
    bend = joints_of("bending_forward")
    assert np.median(_torso_up(bend)) < 0.6 and np.median(_torso_up(standing)) > 0.95
    raised = fk(sample_poses(300, np.random.default_rng(4), archetypes=["standing"]))
    labels = sample_poses(300, np.random.default_rng(4), archetypes=["standing"]).gesture_left
    up = labels == "arms_raised"
    assert up.sum() > 5
    assert np.all(raised[up, JOINT_INDEX["left_wrist"], 1] > raised[up, JOINT_INDEX["head"], 1])


def test_diversity_of_joint_configurations():
    j = fk(sample_poses(400, np.random.default_rng(5)))
    rel = j - j[:, :1]                                          # root-relative
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 400, 2000), rng.integers(0, 400, 2000)
    keep = a != b
    mpjpe = np.linalg.norm(rel[a[keep]] - rel[b[keep]], axis=-1).mean(-1)
    assert np.median(mpjpe) > 0.25                              # metres: very different poses
    assert mpjpe.min() > 0.01                                   # no duplicates
    # the sampler perturbs every joint: two draws of one archetype differ too
    s = fk(sample_poses(50, np.random.default_rng(6), archetypes=["t_pose"], max_yaw_deg=0))
    spread = np.linalg.norm(s - s.mean(0), axis=-1).mean()
    assert 0.02 < spread < 0.3
    # random yaw: facing directions cover the circle
    facing = np.cross(j[:, 1] - j[:, 2], [0, 1, 0])
    yaw = np.degrees(np.arctan2(facing[:, 0], facing[:, 2]))
    hist, _ = np.histogram(yaw, bins=8, range=(-180, 180))
    assert hist.min() > 20


def test_mirror_matches_reflected_joints():
    """FK(mirror(pose)) equals the x-reflection of FK(pose) with left/right swapped
    (the skeleton's rest pose is exactly mirror-symmetric)."""
    s = sample_poses(20, np.random.default_rng(9))
    m = mirror_rotmats(s.rotmats)
    np.testing.assert_allclose(mirror_rotmats(m), s.rotmats, atol=1e-12)
    with torch.no_grad():
        j = MODEL.forward_rotmats(torch.from_numpy(s.rotmats).float()).numpy()
        jm = MODEL.forward_rotmats(torch.from_numpy(m).float()).numpy()
    reflected = j[:, LEFT_RIGHT_PERMUTATION] * np.array([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(jm, reflected, atol=2e-5)
