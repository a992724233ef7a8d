"""VQA pairs about a pose, derived from its posecodes (correct by construction).

Two kinds of questions, both about one unambiguous posecode of the pose:
* yes/no: "Is the left hand above the head?" asks either the true category or another
  category of the same posecode (categories are mutually exclusive), and the answer
  restates the truth: "Yes, the left hand is above the head." / "No, the left hand is
  below the hips.";
* open: "How bent is the left knee?" -> "The left knee is bent at a right angle."
  (only for posecodes with an open form and a describable true value).

Questions and answers use the canonical subject and category names, so they are exact
statements of the posecode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from poserft.data.synthetic.captioner import clause, is_plural, subject_of
from poserft.data.synthetic.posecodes import AMBIGUOUS, POSECODES

__all__ = ["VQAItem", "OPEN_QUESTIONS", "make_vqa", "vqa_for_poses"]

OPEN_QUESTIONS: dict[str, tuple[str, ...]] = {
    "knee_angle": ("How bent is {subj}?", "What is the angle of {subj}?"),
    "elbow_angle": ("How bent is {subj}?", "What is the angle of {subj}?"),
    "hand_height": ("How high is {subj}?", "Where is {subj} vertically?"),
    "feet_distance": ("How far apart are {subj}?",),
    "hands_distance": ("How far apart are {subj}?",),
    "knees_distance": ("How far apart are {subj}?",),
    "feet_order": ("Where is {subj} relative to the right foot?",),
    "hands_order": ("Where is {subj} relative to the right hand in height?",),
    "torso_pitch": ("How is {subj} inclined?",),
    "lying": ("How is {subj} lying?",),
    "posture": ("What is {subj} doing?", "Is {subj} standing, kneeling, squatting or sitting?"),
}


@dataclass(frozen=True)
class VQAItem:
    """One question/answer; ``asked`` is the category named in a yes/no question (None
    for open questions), ``truth`` the pose's category of posecode ``key``."""

    question: str
    answer: str
    key: str
    asked: int | None
    truth: int


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def make_vqa(row: dict[str, int], rng: np.random.Generator, n: int,
             weights: dict | None = None, open_prob: float = 0.4) -> list[VQAItem]:
    """Up to ``n`` VQA items about distinct posecodes of one pose (``row``: key -> value)."""
    keys = [k for k, v in row.items() if v != AMBIGUOUS]
    if not keys or n <= 0:
        return []
    w = np.array([(weights or {}).get((POSECODES[k].group, row[k]), 1.0) for k in keys])
    picked = rng.choice(len(keys), size=min(n, len(keys)), replace=False, p=w / w.sum())
    items = []
    for i in picked:
        key = keys[i]
        code, truth = POSECODES[key], row[key]
        subj = subject_of(key)
        statement = clause(subj, code.values[truth])
        opens = OPEN_QUESTIONS.get(code.group)
        if opens and code.describe[truth] and rng.random() < open_prob:
            question = opens[rng.integers(len(opens))].format(subj=subj)
            items.append(VQAItem(_cap(question), _cap(statement) + ".", key, None, truth))
            continue
        asked = truth if rng.random() < 0.5 else int(
            rng.choice([v for v in range(len(code.values)) if v != truth]))
        be = "Are" if is_plural(subj) else "Is"
        question = f"{be} {subj} {code.values[asked]}?"
        answer = ("Yes, " if asked == truth else "No, ") + statement + "."
        items.append(VQAItem(question, answer, key, asked, truth))
    return items


def vqa_for_poses(codes: dict[str, np.ndarray], rng: np.random.Generator, per_pose: int,
                  weights: dict | None = None) -> tuple[list[VQAItem], np.ndarray]:
    """VQA items for N poses -> (items, pose_index (Q,) int64)."""
    keys = list(codes)
    n = len(next(iter(codes.values())))
    items: list[VQAItem] = []
    index: list[int] = []
    for i in range(n):
        new = make_vqa({k: int(codes[k][i]) for k in keys}, rng, per_pose, weights)
        items.extend(new)
        index.extend([i] * len(new))
    return items, np.asarray(index, dtype=np.int64)
