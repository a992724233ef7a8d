"""Automatic captioner: posecodes -> varied natural-language descriptions.

Pipeline per caption (PoseScript-like design, own implementation):
1. *eligible* posecodes: unambiguous values flagged as worth describing;
2. *selection*: a random subset of ``k`` of them, weighted towards rare values
   (``1/sqrt(frequency)`` over the split) so captions carry discriminative details;
3. *aggregation*: a left/right pair with the same value becomes one plural clause
   ("both knees are bent at a right angle");
4. *verbalisation*: each clause picks a subject and a complement among synonyms, is
   rendered as "<subject> is/are <complement>" or attached as "with <subject>
   <complement>", and clauses are joined into one to a few sentences.

Every complement of a value is a paraphrase of the value's canonical name
(``POSECODES[key].values``) so any phrasing is as correct as the posecode itself.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from poserft.data.synthetic.posecodes import AMBIGUOUS, POSECODES

__all__ = ["SUBJECTS", "PLURAL_SUBJECTS", "PARAPHRASES", "value_weights", "caption_pose",
           "caption_poses", "subject_of", "is_plural", "clause"]

# Singular subjects per group ("{side}" is filled in); the first is canonical.
SUBJECTS: dict[str, tuple[str, ...]] = {
    "knee_angle": ("the {side} knee", "the {side} leg", "their {side} knee"),
    "elbow_angle": ("the {side} elbow", "the {side} arm", "their {side} elbow"),
    "hand_height": ("the {side} hand", "their {side} hand", "the person's {side} hand"),
    "knee_height": ("the {side} knee", "their {side} knee"),
    "foot_ground": ("the {side} foot", "their {side} foot"),
    "hand_ground": ("the {side} hand", "their {side} hand"),
    "hand_head": ("the {side} hand", "their {side} hand"),
    "hand_front": ("the {side} hand", "their {side} hand"),
    "hand_side": ("the {side} arm", "the {side} hand"),
    "knee_front": ("the {side} knee", "their {side} knee"),
    "feet_distance": ("the feet", "the two feet", "the legs"),
    "hands_distance": ("the hands", "the two hands"),
    "knees_distance": ("the knees", "the two knees"),
    "hands_cross": ("the left hand",),
    "feet_cross": ("the left foot",),
    "feet_order": ("the left foot",),
    "hands_order": ("the left hand",),
    "torso_pitch": ("the torso", "the upper body", "the person"),
    "torso_roll": ("the torso", "the upper body"),
    "torso_twist": ("the upper body", "the torso", "the shoulders"),
    "lying": ("the person", "this person", "someone", "the figure"),
    "posture": ("the person", "this person", "someone", "the figure"),
}
# Plural subjects when a left/right pair agrees.
PLURAL_SUBJECTS: dict[str, tuple[str, ...]] = {
    "knee_angle": ("both knees", "both legs", "the two knees"),
    "elbow_angle": ("both elbows", "both arms", "the two elbows"),
    "hand_height": ("both hands", "the two hands"),
    "knee_height": ("both knees",),
    "foot_ground": ("both feet",),
    "hand_ground": ("both hands",),
    "hand_head": ("both hands",),
    "hand_front": ("both hands",),
    "hand_side": ("both arms", "both hands"),
    "knee_front": ("both knees",),
}
# Extra phrasings per (group, canonical value). "subject|complement" overrides the
# subject with an equivalent statement (e.g. the mirrored comparison).
PARAPHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "knee_angle": {"completely bent": ("fully bent", "bent as far as possible"),
                   "bent at a right angle": ("bent at about ninety degrees",
                                             "bent at roughly a right angle"),
                   "slightly bent": ("a little bent", "bent slightly"),
                   "straight": ("extended straight", "fully extended")},
    "hand_height": {"below the hips": ("lower than the hips", "down below the hips"),
                    "between the hips and the shoulders": (
                        "lower than the shoulders but higher than the hips",),
                    "at shoulder or head height": ("raised above the shoulders but not above "
                                                   "the head",),
                    "above the head": ("raised above the head", "higher than the head",
                                       "up over the head")},
    "knee_height": {"raised to hip height": ("lifted up to the height of the hip",
                                             "at least as high as the hip")},
    "foot_ground": {"lifted off the ground": ("raised off the floor", "in the air")},
    "hand_ground": {"touching the ground": ("on the floor", "resting on the ground")},
    "hand_head": {"close to the head": ("near the head", "next to the head")},
    "hand_front": {"behind the torso": ("behind the body",),
                   "in front of the torso": ("held out in front of the torso",
                                             "in front of the body")},
    "hand_side": {"stretched out to the side": ("extended sideways", "held out to the side")},
    "knee_front": {"behind the hips": ("pulled back behind the hips",),
                   "in front of the hips": ("brought forward in front of the hips",
                                            "forward of the hips")},
    "feet_distance": {"close together": ("together", "next to each other"),
                      "about shoulder-width apart": ("apart at about shoulder width",),
                      "wide apart": ("spread wide", "far apart")},
    "hands_distance": {"close together": ("together", "near each other"),
                       "a moderate distance apart": ("neither close together nor far apart",),
                       "wide apart": ("far apart", "spread far apart")},
    "knees_distance": {"close together": ("together", "next to each other"),
                       "wide apart": ("spread wide apart", "far apart")},
    "hands_cross": {"to the right of the right hand": (
        "crossed over to the right of the right hand",
        "the right hand|to the left of the left hand",
        "the hands|crossed, the left one on the right side")},
    "feet_cross": {"to the right of the right foot": (
        "crossed over to the right of the right foot",
        "the right foot|to the left of the left foot",
        "the legs|crossed, the left foot on the right side")},
    "feet_order": {"behind the right foot": ("further back than the right foot",
                                             "the right foot|in front of the left foot"),
                   "level with the right foot": ("side by side with the right foot",),
                   "in front of the right foot": ("ahead of the right foot",
                                                  "the right foot|behind the left foot")},
    "hands_order": {"lower than the right hand": ("the right hand|higher than the left hand",),
                    "at about the same height as the right hand": (
                        "the hands|at about the same height",),
                    "higher than the right hand": ("the right hand|lower than the left hand",
                                                   "raised higher than the right hand")},
    "torso_pitch": {"leaning backward": ("leaning back", "tilted backward"),
                    "upright": ("straight and upright", "vertical"),
                    "leaning forward": ("tilted forward", "inclined forward"),
                    "bent forward at the waist": ("bent over", "folded forward at the hips")},
    "torso_roll": {"leaning to the right": ("tilted to the right side",),
                   "leaning to the left": ("tilted to the left side",)},
    "torso_twist": {"turned to the right": ("twisted to the right", "rotated toward the right"),
                    "turned to the left": ("twisted to the left", "rotated toward the left")},
    "lying": {"lying on the back": ("lying on their back", "lying face up"),
              "lying on the stomach": ("lying face down", "lying on their front"),
              "lying on the left side": ("lying on their left side",),
              "lying on the right side": ("lying on their right side",)},
    "posture": {"standing on both feet": ("standing up", "standing with both feet on the ground"),
                "standing on one leg": ("balancing on one leg",),
                "kneeling on both knees": ("kneeling", "down on both knees"),
                "kneeling on the left knee": ("down on the left knee",),
                "kneeling on the right knee": ("down on the right knee",),
                "squatting": ("in a squat", "crouching down in a squat"),
                "sitting as if on a chair": ("in a seated position with the thighs level",),
                "sitting on the ground": ("sitting on the floor", "seated on the ground")},
}
PARAPHRASES["elbow_angle"] = PARAPHRASES["knee_angle"]
_LEADING_GROUPS = ("posture", "lying")        # mentioned first when selected
_PLURAL_HEADS = {"hands", "feet", "legs", "knees", "elbows", "arms", "shoulders"}


def is_plural(subject: str) -> bool:
    words = subject.split()
    return words[0] == "both" or words[-1] in _PLURAL_HEADS


def subject_of(key: str, variant: int = 0, plural: bool = False) -> str:
    code = POSECODES[key]
    table = PLURAL_SUBJECTS if plural else SUBJECTS
    options = table[code.group]
    return options[variant % len(options)].format(side=code.side or "")


def clause(subject: str, complement: str, form: str = "full") -> str:
    """'full': "<subject> is <complement>"; 'with': "with <subject> <complement>"."""
    if form == "with":
        return f"with {subject} {complement}"
    return f"{subject} {'are' if is_plural(subject) else 'is'} {complement}"


def value_weights(codes: dict[str, np.ndarray]) -> dict[tuple[str, int], float]:
    """Selection weight ``1/sqrt(frequency)`` per (group, value) over a set of poses."""
    counts: Counter = Counter()
    totals: Counter = Counter()
    for key, values in codes.items():
        group = POSECODES[key].group
        valid = values[values != AMBIGUOUS]
        totals[group] += len(valid)
        counts.update((group, int(v)) for v in valid)
    return {gv: 1.0 / np.sqrt(c / max(totals[gv[0]], 1)) for gv, c in counts.items()}


def _phrasings(key: str, value: int) -> list[tuple[str | None, str]]:
    """(subject override or None, complement) options for a value."""
    code = POSECODES[key]
    name = code.values[value]
    out: list[tuple[str | None, str]] = [(None, name)]
    for p in PARAPHRASES.get(code.group, {}).get(name, ()):
        subj, _, comp = p.rpartition("|")
        out.append((subj or None, comp))
    return out


def _select(row: dict[str, int], weights: dict, rng: np.random.Generator, k: int) -> list[str]:
    eligible = [key for key, v in row.items()
                if v != AMBIGUOUS and POSECODES[key].describe[v]]
    if not eligible:
        return []
    w = np.array([weights.get((POSECODES[key].group, row[key]), 1.0)
                  * (1.5 if POSECODES[key].group in _LEADING_GROUPS else 1.0)
                  for key in eligible])
    k = min(k, len(eligible))
    picked = rng.choice(len(eligible), size=k, replace=False, p=w / w.sum())
    return [eligible[i] for i in picked]


def _partner(key: str) -> str | None:
    side = POSECODES[key].side
    if side is None:
        return None
    return key.replace(side, "right" if side == "left" else "left")


def caption_pose(row: dict[str, int], weights: dict, rng: np.random.Generator,
                 min_codes: int, max_codes: int) -> str:
    """One caption for one pose. ``row``: ``{posecode key: value}`` of that pose."""
    selected = _select(row, weights, rng, int(rng.integers(min_codes, max_codes + 1)))
    units: list[tuple[str, bool]] = []            # (key, plural)
    done: set[str] = set()
    for key in selected:
        if key in done:
            continue
        partner = _partner(key)
        if partner and partner not in done and row.get(partner) == row[key] \
                and rng.random() < 0.75:
            units.append((key, True))
            done.update((key, partner))
        else:
            units.append((key, False))
            done.add(key)
    if not units:
        return "The pose is hard to describe."
    lead = [u for u in units if POSECODES[u[0]].group in _LEADING_GROUPS]
    rest = [u for u in units if POSECODES[u[0]].group not in _LEADING_GROUPS]
    rng.shuffle(rest)

    clauses: list[tuple[str, str, str]] = []      # (subject, complement, group)
    for key, plural in lead + rest:
        options = _phrasings(key, row[key])
        subj_override, comp = options[rng.integers(len(options))]
        variant = int(rng.integers(8))
        subj = subj_override or subject_of(key, variant, plural)
        clauses.append((subj, comp, POSECODES[key].group))

    sentences: list[str] = []
    current = clause(*clauses[0][:2])
    in_sentence = 1
    for subj, comp, group in clauses[1:]:
        r = rng.random()
        if in_sentence >= 3 or r < 0.35:
            sentences.append(current)
            current, in_sentence = clause(subj, comp), 1
            continue
        if r < 0.6 and group not in _LEADING_GROUPS:
            current += ", " + clause(subj, comp, "with")
        elif r < 0.8:
            current += ", and " + clause(subj, comp)
        elif r < 0.9:
            current += "; " + clause(subj, comp)
        else:
            current += " while " + clause(subj, comp)
        in_sentence += 1
    sentences.append(current)
    if POSECODES[units[0][0]].group not in _LEADING_GROUPS and rng.random() < 0.2:
        sentences[0] = ("In this pose, " if rng.random() < 0.5 else "Here, ") + sentences[0]
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


def caption_poses(codes: dict[str, np.ndarray], rng: np.random.Generator, per_pose: int,
                  min_codes: int, max_codes: int, weights: dict | None = None
                  ) -> tuple[list[str], np.ndarray]:
    """Captions for N poses: (texts (N*per_pose,), pose_index (N*per_pose,) int64).

    Captions of one pose are made distinct when possible (a few redraws)."""
    weights = weights if weights is not None else value_weights(codes)
    keys = list(codes)
    n = len(next(iter(codes.values())))
    texts: list[str] = []
    index: list[int] = []
    for i in range(n):
        row = {k: int(codes[k][i]) for k in keys}
        seen: set[str] = set()
        for _ in range(per_pose):
            for _attempt in range(4):
                text = caption_pose(row, weights, rng, min_codes, max_codes)
                if text not in seen:
                    break
            seen.add(text)
            texts.append(text)
            index.append(i)
    return texts, np.asarray(index, dtype=np.int64)
