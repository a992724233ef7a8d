"""Posecodes and captions on hand-built poses (rotations set by hand, joints from the body
model), with geometry re-measured independently with numpy."""

import re

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import poserft.body as body
from poserft.data.synthetic.captioner import caption_pose, caption_poses, value_weights
from poserft.data.synthetic.posecodes import AMBIGUOUS, POSECODES, compute_posecodes
from poserft.data.synthetic.sampler import JOINT_INDEX as J

MODEL = body.load(None)


def build(root=None, **joint_rotvecs_deg):
    """One pose from axis-angle rotations given in degrees per joint name -> joints (1,24,3)."""
    aa = np.zeros((24, 3))
    if root is not None:
        aa[0] = np.radians(root)
    for name, rv in joint_rotvecs_deg.items():
        aa[J[name]] = np.radians(rv)
    with torch.no_grad():
        j = MODEL(torch.tensor(aa[None, 0], dtype=torch.float32),
                  torch.tensor(aa[None, 1:], dtype=torch.float32))
    return j.numpy().astype(np.float64)


def angle_deg(j, a, b, c):
    """Interior angle at joint b of pose 0, via the law of cosines (independent formula)."""
    ab = np.linalg.norm(j[0, J[a]] - j[0, J[b]])
    cb = np.linalg.norm(j[0, J[c]] - j[0, J[b]])
    ac = np.linalg.norm(j[0, J[a]] - j[0, J[c]])
    return np.degrees(np.arccos((ab ** 2 + cb ** 2 - ac ** 2) / (2 * ab * cb)))


def value(codes, key):
    v = int(codes[key][0])
    return POSECODES[key].values[v] if v != AMBIGUOUS else None


def captions_about(codes, keys, n=40, seed=0):
    """Captions of one pose when only ``keys`` are eligible."""
    row = {k: (int(codes[k][0]) if k in keys else AMBIGUOUS) for k in codes}
    rng = np.random.default_rng(seed)
    return [caption_pose(row, {}, rng, 1, 3) for _ in range(n)]


ARMS_DOWN = {"left_shoulder": (0, 0, -75), "right_shoulder": (0, 0, 75)}


def test_right_elbow_at_ninety_degrees():
    j = build(**ARMS_DOWN, right_elbow=(0, 90, 0))
    assert 80 < angle_deg(j, "right_shoulder", "right_elbow", "right_wrist") < 100
    assert angle_deg(j, "left_shoulder", "left_elbow", "left_wrist") > 165
    codes = compute_posecodes(j)
    assert value(codes, "elbow_angle.right") == "bent at a right angle"
    assert value(codes, "elbow_angle.left") == "straight"
    caps = captions_about(codes, ["elbow_angle.right"])
    pattern = re.compile(r"(right elbow|right arm) is bent at (a|about ninety|roughly a)"
                         r" ?(right angle|degrees)?", re.I)
    assert all(pattern.search(c) for c in caps), caps[:3]
    assert not any("left" in c or "straight" in c for c in caps)


def test_arms_raised_gives_both_hands_above_head():
    j = build(left_shoulder=(0, 0, 80), right_shoulder=(0, 0, -80))
    assert j[0, J["left_wrist"], 1] > j[0, J["head"], 1] + 0.1   # independent check
    codes = compute_posecodes(j)
    assert value(codes, "hand_height.left") == value(codes, "hand_height.right") == \
        "above the head"
    caps = captions_about(codes, ["hand_height.left", "hand_height.right"])
    above = re.compile(r"(above|over|higher than) the head")
    assert all(above.search(c) for c in caps)
    assert any(re.search(r"(Both|both|the two) hands are", c) for c in caps)   # aggregated
    assert not any(re.search(r"\bhands is\b|\bhand are\b", c) for c in caps)


def test_standing_arms_down_and_leaning_forward():
    codes = compute_posecodes(build(**ARMS_DOWN))
    assert value(codes, "posture") == "standing on both feet"
    assert value(codes, "lying") == "not lying down"
    assert value(codes, "torso_pitch") == "upright"
    assert value(codes, "hand_height.left") == "below the hips"
    assert value(codes, "knee_angle.left") == "straight"
    # pitch the pelvis 35 deg forward, flex the hips by as much: legs stay vertical
    lean = compute_posecodes(build(root=(35, 0, 0), left_hip=(-35, 0, 0),
                                   right_hip=(-35, 0, 0), **ARMS_DOWN))
    assert value(lean, "torso_pitch") == "leaning forward"
    assert value(lean, "posture") == "standing on both feet"


def test_kneeling_and_lying_postures():
    kneel = build(left_knee=(105, 0, 0), right_knee=(105, 0, 0), left_ankle=(35, 0, 0),
                  right_ankle=(35, 0, 0), **ARMS_DOWN)
    knee_h = kneel[0, [J["left_knee"], J["right_knee"]], 1] - kneel[0, :, 1].min()
    assert np.all(knee_h < 0.05)
    assert value(compute_posecodes(kneel), "posture") == "kneeling on both knees"
    assert value(compute_posecodes(build(root=(-90, 0, 0))), "lying") == "lying on the back"
    assert value(compute_posecodes(build(root=(90, 0, 0))), "lying") == "lying on the stomach"
    # (in a T-pose on its side the body would rest on one arm, so the arms are lowered)
    side = compute_posecodes(build(root=(0, 0, -90), **ARMS_DOWN))
    assert value(side, "lying") == "lying on the left side"
    lying = compute_posecodes(build(root=(-90, 0, 0)))
    assert value(lying, "posture") is None      # posture only describes non-lying bodies


def test_crossed_hands_and_feet_apart():
    # swing each arm from its rest direction to pointing forward and across the midline
    def swing(src, dst):
        axis = np.cross(src, dst)
        ang = np.arccos(np.dot(src, dst) / np.linalg.norm(src) / np.linalg.norm(dst))
        return np.degrees(axis / np.linalg.norm(axis) * ang)
    j = build(left_shoulder=swing([1, 0, 0], [-0.6, 0, 0.8]),
              right_shoulder=swing([-1, 0, 0], [0.6, 0, 0.8]),
              left_hip=(0, 0, 25), right_hip=(0, 0, -25))
    assert j[0, J["left_wrist"], 0] < j[0, J["right_wrist"], 0] - 0.1   # left hand on the right
    codes = compute_posecodes(j)
    assert value(codes, "hands_cross") == "to the right of the right hand"
    assert value(codes, "hand_front.left") == "in front of the torso"
    feet = np.linalg.norm(j[0, J["left_ankle"]] - j[0, J["right_ankle"]])
    assert feet > 0.7 and value(codes, "feet_distance") == "wide apart"
    caps = captions_about(codes, ["hands_cross"])
    assert all(re.search(r"left hand is (crossed over )?to the right of the right hand|"
                         r"right hand is to the left of the left hand|hands are crossed", c)
               for c in caps)


def test_values_near_a_boundary_are_ambiguous():
    """Knee angles are binned at 67/112/155 deg; within 7 deg of an edge they are ambiguous
    (never described)."""
    base = build(**ARMS_DOWN)

    def with_knee_angle(deg):
        j = base.copy()
        hip, knee = j[0, J["left_hip"]], j[0, J["left_knee"]]
        thigh = (hip - knee) / np.linalg.norm(hip - knee)
        axis = np.cross(thigh, [0.0, 0.0, 1.0])             # perpendicular to the thigh
        axis /= np.linalg.norm(axis)
        rot = Rotation.from_rotvec(np.radians(deg) * axis).as_matrix()
        shin_len = np.linalg.norm(j[0, J["left_ankle"]] - knee)
        j[0, J["left_ankle"]] = knee + shin_len * (rot @ thigh)
        return compute_posecodes(j)["knee_angle.left"][0]

    for edge in (67.0, 112.0, 155.0):          # documented bin edges
        assert with_knee_angle(edge) == AMBIGUOUS
        assert with_knee_angle(edge - 5.0) == AMBIGUOUS and with_knee_angle(edge + 5.0) == -1
    expected = {40.0: 0, 58.0: 0, 76.0: 1, 90.0: 1, 103.0: 1, 121.0: 2, 146.0: 2, 164.0: 3,
                175.0: 3}
    assert {a: int(with_knee_angle(a)) for a in expected} == expected


def test_caption_poses_counts_determinism_and_variety():
    rng = np.random.default_rng(0)
    poses = np.concatenate([build(**ARMS_DOWN), build(left_shoulder=(0, 0, 80),
                                                      right_shoulder=(0, 0, -80))])
    codes = compute_posecodes(poses)
    t1, i1 = caption_poses(codes, np.random.default_rng(3), 3, 2, 5)
    t2, i2 = caption_poses(codes, np.random.default_rng(3), 3, 2, 5)
    assert t1 == t2 and list(i1) == [0, 0, 0, 1, 1, 1]
    assert len(set(t1[:3])) == 3                      # distinct captions per pose
    assert all(c[0].isupper() and c.endswith(".") for c in t1)
    w = value_weights(codes)
    assert all(v >= 1.0 for v in w.values())          # 1/sqrt(frequency) with freq <= 1
    caps = [caption_pose({k: int(v[1]) for k, v in codes.items()}, w, rng, 3, 3)
            for _ in range(20)]
    assert len(set(caps)) > 15                        # templates and subsets vary


@pytest.mark.parametrize("bad", [np.zeros((2, 17, 3)), np.zeros((24, 3))])
def test_compute_posecodes_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match=r"\(N, 24, 3\)"):
        compute_posecodes(bad)
