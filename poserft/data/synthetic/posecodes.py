"""Posecodes: quantised elementary descriptions of a pose, derived from its 3D joints.

In the spirit of PoseScript's posecodes (own implementation): each posecode measures one
geometric quantity (a joint angle, a distance, a relative position, the torso's
inclination, contact with the ground, the overall posture) and quantises it into named
categories. Values closer than a margin to a category boundary are *ambiguous* (-1) and
are never verbalised or asked about, so every caption/answer is correct with a margin.

Frames (joints in metres, y up; any yaw):
* world vertical ``Y`` for heights ("above the head", "on the ground"); the ground is
  the lowest joint of the pose;
* the *torso* frame (left = hip axis, up = pelvis->neck) for "in front of the body";
* the *heading* frame (hip axis made horizontal, ``Y``, horizontal forward) for leg
  positions and the torso's inclination. It is undefined when the body lies down or the
  hip axis is close to vertical; posecodes that need it are then -1.

``compute_posecodes(joints (N,24,3)) -> {key: (N,) int}`` with ``POSECODES[key]`` giving
the categories. Keys of left/right pairs share a ``group`` so they can be aggregated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from poserft.data.synthetic.sampler import JOINT_INDEX as J

__all__ = ["Posecode", "POSECODES", "compute_posecodes", "body_frames", "joint_angle"]

AMBIGUOUS = -1


@dataclass(frozen=True)
class Posecode:
    """A posecode: ``values`` are category names; ``describe`` flags the categories worth
    putting in a caption (defaults such as 'hands not crossed' are only used for VQA)."""

    key: str
    group: str
    side: str | None
    values: tuple[str, ...]
    describe: tuple[bool, ...]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1)


def joint_angle(joints: np.ndarray, a: int, b: int, c: int) -> np.ndarray:
    """Interior angle (degrees) at joint b between segments b->a and b->c: (N,24,3) -> (N,)."""
    u, v = _unit(joints[:, a] - joints[:, b]), _unit(joints[:, c] - joints[:, b])
    return np.degrees(np.arccos(np.clip(_dot(u, v), -1.0, 1.0)))


def body_frames(joints: np.ndarray) -> dict[str, np.ndarray]:
    """Frames and scalars every posecode uses. All vectors (N,3), scalars (N,)."""
    Y = np.array([0.0, 1.0, 0.0])
    left = _unit(joints[:, J["left_hip"]] - joints[:, J["right_hip"]])
    torso = _unit(joints[:, J["neck"]] - joints[:, J["pelvis"]])
    up = _unit(torso - _dot(torso, left)[:, None] * left)
    front = np.cross(left, up)                         # rest pose: +x, +y -> +z
    left_h = left * np.array([1.0, 0.0, 1.0])
    hip_axis_horizontal = np.linalg.norm(left_h, axis=-1)
    left_h = _unit(left_h)
    front_h = np.cross(left_h, Y)
    ground = joints[..., 1].min(axis=1)
    height = joints[..., 1] - ground[:, None]          # (N,24) height above ground
    upright = _dot(up, Y)                              # cos of torso tilt
    lying = (upright < 0.45) & (height[:, J["pelvis"]] < 0.4)
    heading_ok = (hip_axis_horizontal > 0.85) & ~lying
    return {"Y": np.broadcast_to(Y, left.shape), "left": left, "up": up, "front": front,
            "torso": torso,
            "left_h": left_h, "front_h": front_h, "height": height, "upright": upright,
            "lying": lying, "heading_ok": heading_ok}


def _bin(x: np.ndarray, edges, margin: float, valid: np.ndarray | None = None) -> np.ndarray:
    """Category index of x among ``edges`` (ascending); -1 within ``margin`` of an edge or
    where ``valid`` is False."""
    edges = np.asarray(edges, dtype=np.float64)
    edges = np.broadcast_to(edges, x.shape + edges.shape[-1:]) if edges.ndim == 1 else edges
    cat = np.sum(x[:, None] > edges, axis=1)
    near = np.min(np.abs(x[:, None] - edges), axis=1) < margin
    out = np.where(near, AMBIGUOUS, cat)
    if valid is not None:
        out = np.where(valid, out, AMBIGUOUS)
    return out.astype(np.int64)


POSECODES: dict[str, Posecode] = {}


def _define(key, group, side, values, describe=None):
    POSECODES[key] = Posecode(key, group, side, tuple(values),
                              tuple(describe) if describe else (True,) * len(values))


for _side in ("left", "right"):
    _define(f"knee_angle.{_side}", "knee_angle", _side,
            ("completely bent", "bent at a right angle", "slightly bent", "straight"))
    _define(f"elbow_angle.{_side}", "elbow_angle", _side,
            ("completely bent", "bent at a right angle", "slightly bent", "straight"))
    _define(f"hand_height.{_side}", "hand_height", _side,
            ("below the hips", "between the hips and the shoulders",
             "at shoulder or head height", "above the head"))
    _define(f"knee_height.{_side}", "knee_height", _side, ("below the hip", "raised to hip height"),
            (False, True))
    _define(f"foot_ground.{_side}", "foot_ground", _side,
            ("on the ground", "lifted off the ground"),
            (False, True))
    _define(f"hand_ground.{_side}", "hand_ground", _side,
            ("touching the ground", "off the ground"), (True, False))
    _define(f"hand_head.{_side}", "hand_head", _side, ("close to the head", "away from the head"),
            (True, False))
    _define(f"hand_front.{_side}", "hand_front", _side,
            ("behind the torso", "level with the torso", "in front of the torso"),
            (True, False, True))
    _define(f"hand_side.{_side}", "hand_side", _side,
            ("close to the body", "stretched out to the side"), (False, True))
    _define(f"knee_front.{_side}", "knee_front", _side,
            ("behind the hips", "under the hips", "in front of the hips"), (True, False, True))
_define("feet_distance", "feet_distance", None,
        ("close together", "about shoulder-width apart", "wide apart"))
_define("hands_distance", "hands_distance", None,
        ("close together", "a moderate distance apart", "wide apart"))
_define("knees_distance", "knees_distance", None,
        ("close together", "slightly apart", "wide apart"))
_define("hands_cross", "hands_cross", None,
        ("to the right of the right hand", "to the left of the right hand"), (True, False))
_define("feet_cross", "feet_cross", None,
        ("to the right of the right foot", "to the left of the right foot"), (True, False))
_define("feet_order", "feet_order", None,
        ("behind the right foot", "level with the right foot", "in front of the right foot"))
_define("hands_order", "hands_order", None,
        ("lower than the right hand", "at about the same height as the right hand",
         "higher than the right hand"))
_define("torso_pitch", "torso_pitch", None,
        ("leaning backward", "upright", "leaning forward", "bent forward at the waist"))
_define("torso_roll", "torso_roll", None,
        ("leaning to the right", "not leaning sideways", "leaning to the left"),
        (True, False, True))
_define("torso_twist", "torso_twist", None,
        ("turned to the right", "facing the same way as the hips", "turned to the left"),
        (True, False, True))
_define("lying", "lying", None,
        ("not lying down", "lying on the back", "lying on the stomach", "lying on the left side",
         "lying on the right side"), (False, True, True, True, True))
_define("posture", "posture", None,
        ("standing on both feet", "standing on one leg", "kneeling on both knees",
         "kneeling on the left knee", "kneeling on the right knee", "squatting",
         "sitting as if on a chair", "sitting on the ground"))

ANGLE_EDGES, ANGLE_MARGIN = (67.0, 112.0, 155.0), 7.0


def compute_posecodes(joints: np.ndarray) -> dict[str, np.ndarray]:
    """joints (N,24,3) metres, y up -> ``{posecode key: (N,) int}`` (-1: ambiguous)."""
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 3 or joints.shape[1:] != (24, 3):
        raise ValueError(f"compute_posecodes: joints must be (N, 24, 3), got {joints.shape}")
    fr = body_frames(joints)
    h, Y = fr["height"], fr["Y"]
    y = joints[..., 1]
    out: dict[str, np.ndarray] = {}
    torso_upright = fr["upright"] > 0.75
    for side in ("left", "right"):
        s = -1.0 if side == "right" else 1.0   # outward direction along the hip axis
        hip, knee, ankle = J[f"{side}_hip"], J[f"{side}_knee"], J[f"{side}_ankle"]
        sho, elb, wri = J[f"{side}_shoulder"], J[f"{side}_elbow"], J[f"{side}_wrist"]
        foot = J[f"{side}_foot"]
        out[f"knee_angle.{side}"] = _bin(joint_angle(joints, hip, knee, ankle), ANGLE_EDGES,
                                         ANGLE_MARGIN)
        out[f"elbow_angle.{side}"] = _bin(joint_angle(joints, sho, elb, wri), ANGLE_EDGES,
                                          ANGLE_MARGIN)
        levels = np.stack([y[:, J["pelvis"]], y[:, sho], y[:, J["head"]] + 0.05], axis=1)
        out[f"hand_height.{side}"] = _bin(y[:, wri], levels, 0.04, torso_upright)
        out[f"knee_height.{side}"] = _bin(y[:, knee] - y[:, hip], (-0.15,), 0.05,
                                          fr["upright"] > 0.6)
        foot_h = np.minimum(h[:, ankle], h[:, foot])
        out[f"foot_ground.{side}"] = _bin(foot_h, (0.12,), 0.05)
        out[f"hand_ground.{side}"] = _bin(h[:, wri], (0.13,), 0.06)
        out[f"hand_head.{side}"] = _bin(np.linalg.norm(joints[:, wri] - joints[:, J["head"]],
                                                       axis=-1), (0.25,), 0.07)
        out[f"hand_front.{side}"] = _bin(_dot(joints[:, wri] - joints[:, J["spine3"]],
                                              fr["front"]), (-0.15, 0.25), 0.05, ~fr["lying"])
        out[f"hand_side.{side}"] = _bin(s * _dot(joints[:, wri] - joints[:, sho], fr["left"]),
                                        (0.3,), 0.08, ~fr["lying"])
        out[f"knee_front.{side}"] = _bin(_dot(joints[:, knee] - joints[:, hip], fr["front_h"]),
                                         (-0.12, 0.2), 0.05, fr["heading_ok"])

    def dist(a, b):
        return np.linalg.norm(joints[:, J[a]] - joints[:, J[b]], axis=-1)

    out["feet_distance"] = _bin(dist("left_ankle", "right_ankle"), (0.22, 0.65), 0.05)
    out["hands_distance"] = _bin(dist("left_wrist", "right_wrist"), (0.22, 0.8), 0.06)
    out["knees_distance"] = _bin(dist("left_knee", "right_knee"), (0.2, 0.5), 0.05)
    lr = joints[:, J["left_wrist"]] - joints[:, J["right_wrist"]]
    out["hands_cross"] = _bin(_dot(lr, fr["left"]), (0.0,), 0.06, ~fr["lying"])
    out["hands_order"] = _bin(_dot(lr, Y), (-0.25, 0.25), 0.07)
    lr_feet = joints[:, J["left_ankle"]] - joints[:, J["right_ankle"]]
    out["feet_cross"] = _bin(_dot(lr_feet, fr["left"]), (0.0,), 0.06)
    out["feet_order"] = _bin(_dot(lr_feet, fr["front_h"]), (-0.25, 0.25), 0.07, fr["heading_ok"])

    pitch = np.degrees(np.arcsin(np.clip(_dot(fr["torso"], fr["front_h"]), -1, 1)))
    roll = np.degrees(np.arcsin(np.clip(_dot(fr["torso"], fr["left_h"]), -1, 1)))
    out["torso_pitch"] = _bin(pitch, (-15.0, 15.0, 55.0), 6.0, fr["heading_ok"])
    out["torso_roll"] = _bin(roll, (-15.0, 15.0), 6.0, fr["heading_ok"])
    shoulders = joints[:, J["left_shoulder"]] - joints[:, J["right_shoulder"]]
    shoulders = shoulders - _dot(shoulders, fr["up"])[:, None] * fr["up"]
    twist = np.degrees(np.arctan2(_dot(np.cross(fr["left"], shoulders), fr["up"]),
                                  _dot(fr["left"], shoulders)))
    out["torso_twist"] = _bin(twist, (-20.0, 20.0), 6.0, ~fr["lying"])

    out["lying"] = _lying_code(fr, h)
    out["posture"] = _posture_code(out, fr, h, joints)
    return out


def _lying_code(fr: dict, h: np.ndarray) -> np.ndarray:
    face_up = _dot(fr["front"], fr["Y"])
    left_up = _dot(fr["left"], fr["Y"])
    not_lying = (fr["upright"] > 0.6) | (h[:, J["pelvis"]] > 0.5)
    lying = (fr["upright"] < 0.45) & (h[:, J["pelvis"]] < 0.4)
    code = np.full(len(h), AMBIGUOUS)
    code[not_lying] = 0
    code[lying & (face_up > 0.6)] = 1
    code[lying & (face_up < -0.6)] = 2
    code[lying & (left_up < -0.6)] = 3    # left side down
    code[lying & (left_up > 0.6)] = 4
    return code


def _posture_code(codes: dict, fr: dict, h: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """Overall posture from heights above the ground; -1 unless exactly one rule holds."""
    pelvis = h[:, J["pelvis"]]
    kl, kr = h[:, J["left_knee"]], h[:, J["right_knee"]]
    fl = np.minimum(h[:, J["left_ankle"]], h[:, J["left_foot"]])
    fr_ = np.minimum(h[:, J["right_ankle"]], h[:, J["right_foot"]])
    ang_l = joint_angle(joints, J["left_hip"], J["left_knee"], J["left_ankle"])
    ang_r = joint_angle(joints, J["right_hip"], J["right_knee"], J["right_ankle"])
    thigh_l = np.abs(joints[:, J["left_knee"], 1] - joints[:, J["left_hip"], 1])
    thigh_r = np.abs(joints[:, J["right_knee"], 1] - joints[:, J["right_hip"], 1])
    upright_body = codes["lying"] == 0
    rules = [
        (pelvis > 0.75) & (fl < 0.06) & (fr_ < 0.06),                                # standing
        (pelvis > 0.7) & (((fl > 0.2) & (fr_ < 0.05)) | ((fr_ > 0.2) & (fl < 0.05))),  # one leg
        (kl < 0.1) & (kr < 0.1) & (pelvis > 0.3),                                    # kneel both
        (kl < 0.1) & (kr > 0.25) & (pelvis > 0.3),                                   # kneel left
        (kr < 0.1) & (kl > 0.25) & (pelvis > 0.3),                                   # kneel right
        (pelvis > 0.25) & (pelvis < 0.6) & (ang_l < 75) & (ang_r < 75) & (fl < 0.08)
        & (fr_ < 0.08) & (kl > 0.2) & (kr > 0.2),                                    # squatting
        (pelvis > 0.3) & (pelvis < 0.7) & (ang_l > 65) & (ang_l < 125) & (ang_r > 65)
        & (ang_r < 125) & (thigh_l < 0.12) & (thigh_r < 0.12) & (kl > 0.25) & (kr > 0.25),
        (pelvis < 0.22),                                                             # on ground
    ]
    matches = np.stack(rules, axis=1) & upright_body[:, None]
    return np.where(matches.sum(axis=1) == 1, np.argmax(matches, axis=1), AMBIGUOUS)
