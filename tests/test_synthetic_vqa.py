"""VQA pairs agree with the joint geometry (re-measured here with plain numpy)."""

import re

import numpy as np
import torch

import poserft.body as body
from poserft.data.synthetic.posecodes import POSECODES, compute_posecodes
from poserft.data.synthetic.sampler import JOINT_INDEX as J
from poserft.data.synthetic.sampler import sample_poses
from poserft.data.synthetic.vqa import make_vqa, vqa_for_poses

MODEL = body.load(None)


def world(n=300, seed=0):
    s = sample_poses(n, np.random.default_rng(seed))
    with torch.no_grad():
        j = MODEL(torch.from_numpy(s.global_orient), torch.from_numpy(s.body_pose)).numpy()
    return j.astype(np.float64)


def interior_angle(p, a, b, c):
    """Law of cosines at joint b (independent of the posecode implementation)."""
    ab, cb, ac = (np.linalg.norm(p[J[x]] - p[J[y]]) for x, y in ((a, b), (c, b), (a, c)))
    return np.degrees(np.arccos((ab ** 2 + cb ** 2 - ac ** 2) / (2 * ab * cb)))


def test_answers_are_consistent_with_questions():
    j = world()
    codes = compute_posecodes(j)
    items, index = vqa_for_poses(codes, np.random.default_rng(1), 3)
    assert len(items) == len(index) and len(items) >= 0.9 * 3 * len(j)
    assert np.all(np.bincount(index, minlength=len(j)) <= 3)
    n_yes = n_no = n_open = 0
    for it, p in zip(items, index):
        code = POSECODES[it.key]
        assert it.truth == codes[it.key][p]                  # about this pose
        truth_name = code.values[it.truth]
        assert truth_name in it.answer and it.answer.endswith(".")
        assert it.question.endswith("?") and it.question[0].isupper()
        if it.asked is None:
            n_open += 1
            assert not it.answer.startswith(("Yes", "No"))
        else:
            assert code.values[it.asked] in it.question
            if it.asked == it.truth:
                n_yes += 1
                assert it.answer.startswith("Yes, ")
            else:
                n_no += 1
                assert it.answer.startswith("No, ")
    assert min(n_yes, n_no, n_open) > 0.1 * len(items)    # all three kinds occur


def test_answers_match_independent_geometry():
    j = world(400, seed=2)
    codes = compute_posecodes(j)
    items, index = vqa_for_poses(codes, np.random.default_rng(3), 4)
    checked = 0
    for it, p in zip(items, index):
        name = POSECODES[it.key].values[it.truth]
        group, side = POSECODES[it.key].group, POSECODES[it.key].side
        pose = j[p]
        if group in ("knee_angle", "elbow_angle"):
            a, b, c = (("hip", "knee", "ankle") if group == "knee_angle"
                       else ("shoulder", "elbow", "wrist"))
            ang = interior_angle(pose, f"{side}_{a}", f"{side}_{b}", f"{side}_{c}")
            lo, hi = {"completely bent": (0, 67), "bent at a right angle": (67, 112),
                      "slightly bent": (112, 155), "straight": (155, 181)}[name]
            assert lo <= ang <= hi, (it.question, it.answer, ang)
            checked += 1
        elif group == "hand_height" and name == "above the head":
            assert pose[J[f"{side}_wrist"], 1] > pose[J["head"], 1]
            checked += 1
        elif group == "foot_ground" and name == "lifted off the ground":
            ground = pose[:, 1].min()
            assert min(pose[J[f"{side}_ankle"], 1], pose[J[f"{side}_foot"], 1]) > ground + 0.1
            checked += 1
        elif group == "feet_distance":
            d = np.linalg.norm(pose[J["left_ankle"]] - pose[J["right_ankle"]])
            lo, hi = {"close together": (0, 0.22), "about shoulder-width apart": (0.22, 0.65),
                      "wide apart": (0.65, 9)}[name]
            assert lo <= d <= hi
            checked += 1
        elif group == "hands_order":
            dy = pose[J["left_wrist"], 1] - pose[J["right_wrist"], 1]
            assert {"lower than the right hand": dy < -0.25,
                    "at about the same height as the right hand": abs(dy) < 0.25,
                    "higher than the right hand": dy > 0.25}[name]
            checked += 1
    assert checked > 100


def test_make_vqa_is_seeded_and_skips_ambiguous_codes():
    j = world(3, seed=4)
    codes = compute_posecodes(j)
    row = {k: int(v[0]) for k, v in codes.items()}
    a = make_vqa(row, np.random.default_rng(0), 5)
    b = make_vqa(row, np.random.default_rng(0), 5)
    assert [x.question for x in a] == [x.question for x in b]
    assert len({x.key for x in a}) == len(a)              # distinct posecodes
    only_one = {k: (1 if k == "knee_angle.left" else -1) for k in row}
    items = make_vqa(only_one, np.random.default_rng(0), 4)
    assert len(items) == 1 and re.search(r"left knee", items[0].question)
    assert "bent at a right angle" in items[0].answer
    assert make_vqa({k: -1 for k in row}, np.random.default_rng(0), 3) == []
