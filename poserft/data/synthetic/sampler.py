"""Pose sampler: plausible, diverse SMPL poses from posture x arm-gesture archetypes.

A pose is composed of a *posture* (legs, spine, pelvis pitch, whole-body orientation:
standing, walking, sitting, kneeling, lying, ...) and an *arm gesture* per side (arms
down, raised, forward, T, ...). Each archetype gives uniform ranges for a few anatomical
parameters per joint; Gaussian noise (``joint_noise_deg``) is added to every parameter,
which is then clipped to the joint's limits. Parameters are side-agnostic (e.g. hip
``abd`` > 0 is outward for both legs): joints are built for the left side and mirrored
for the right (``M R M`` with ``M = diag(-1, 1, 1)``), and half of the poses are
mirrored as a whole so asymmetric archetypes (walking, lunging, one arm raised) occur on
both sides.

Anatomical parameters (degrees) of the left side, SMPL canonical frame (y up, facing +z,
body's left on +x; in the rest T-pose the left arm points along +x):

* hip ``(flex, abd, twist)``: ``Rx(-flex) Rz(abd) Ry(twist)``; flex > 0 moves the thigh
  forward. Hip flexion is measured against the *world* vertical: the pelvis pitch is
  added, so a standing forward bend keeps the legs vertical.
* knee ``(flex,)``: ``Rx(flex)`` (shin goes backward); ankle ``(flex,)``: ``Rx(-flex)``.
* spine ``(bend, side, twist)``: total over spine1-3 (split equally): ``Ry(tw) Rz(side)
  Rx(bend)``; bend > 0 is forward. neck / head the same, unsplit.
* collar ``(raise,)``: ``Rz(raise)``.
* shoulder ``(raise, front, twist)``: the upper arm is swung from its rest direction (+x)
  to ``(cos(front) sin(raise), -cos(raise), sin(front) sin(raise))``: raise 0 = hanging,
  90 = horizontal, 180 = overhead; front 0 = to the side, 90 = forward; then twisted about
  its own axis.
* elbow ``(flex,)``: ``Ry(-flex)`` (forearm toward the front of the rest arm).
* wrist ``(flex, dev)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = ["POSTURES", "GESTURES", "PoseSample", "sample_poses", "mirror_rotmats",
           "JOINT_INDEX", "LEFT_RIGHT_PERMUTATION"]

_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck",
    "left_collar", "right_collar", "head", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand",
)  # SMPL order (== poserft.body.SMPL_JOINT_NAMES, checked in tests)
JOINT_INDEX = {name: i for i, name in enumerate(_NAMES)}
# joint i of a mirrored pose takes joint LEFT_RIGHT_PERMUTATION[i] of the original
LEFT_RIGHT_PERMUTATION = np.array([
    JOINT_INDEX[n.replace("left_", "@").replace("right_", "left_").replace("@", "right_")]
    for n in _NAMES])
_MIRROR = np.diag([-1.0, 1.0, 1.0])

# Parameter names and limits (degrees) per anatomical joint kind.
_PARAMS = {
    "hip": (("flex", -40, 140), ("abd", -30, 75), ("twist", -45, 60)),
    "knee": (("flex", 0, 155),),
    "ankle": (("flex", -40, 40),),
    "spine": (("bend", -45, 120), ("side", -45, 45), ("twist", -60, 60)),
    "neck": (("bend", -40, 50), ("side", -30, 30), ("twist", -50, 50)),
    "head": (("bend", -30, 40), ("side", -20, 20), ("twist", -30, 30)),
    "collar": (("raise", -10, 30),),
    "shoulder": (("raise", 0, 180), ("front", -60, 150), ("twist", -100, 100)),
    "elbow": (("flex", 0, 150),),
    "wrist": (("flex", -60, 60), ("dev", -30, 30)),
}
# How strongly the global noise acts on each kind (spine noise is on the 3-joint total).
_NOISE_SCALE = {"hip": 1.0, "knee": 1.0, "ankle": 0.7, "spine": 1.2, "neck": 1.0,
                "head": 0.7, "collar": 0.5, "shoulder": 1.2, "elbow": 1.2, "wrist": 1.0}
_LEG_KINDS = ("hip", "knee", "ankle")
_ARM_KINDS = ("collar", "shoulder", "elbow", "wrist")


@dataclass(frozen=True)
class Posture:
    """Legs/spine/orientation archetype. ``left``/``right`` map a sided kind to
    ``{param: (lo, hi)}``; ``both`` applies to both sides unless overridden."""

    both: dict = field(default_factory=dict)
    left: dict = field(default_factory=dict)
    right: dict = field(default_factory=dict)
    center: dict = field(default_factory=dict)   # spine / neck / head
    pitch: tuple = (0.0, 0.0)                     # pelvis pitch forward (deg)
    lie: str = "upright"                          # upright | back | front | side
    gestures: tuple | None = None                 # allowed arm gestures (None: all)


@dataclass(frozen=True)
class Gesture:
    """Arm archetype: ``left``/``right`` map an arm kind to ``{param: (lo, hi)}``."""

    left: dict
    right: dict | None = None                     # None: same as left (symmetric)


# Face down, arms pointing "forward" would go through the floor.
_FLOOR_SAFE = ("arms_down", "arms_raised", "one_arm_raised", "t_arms", "reaching_side",
               "hands_on_head", "waving")
# On one side, arms held out sideways would point into the floor.
_SIDE_SAFE = ("arms_down", "arms_raised", "one_arm_raised", "arms_forward", "reaching_forward",
              "boxing_guard", "hands_on_head", "arms_crossed")
_STRAIGHT_LEGS = {"hip": {"flex": (-5, 10), "abd": (0, 10)}, "knee": {"flex": (0, 10)}}

POSTURES: dict[str, Posture] = {
    "standing": Posture(both=_STRAIGHT_LEGS),
    "standing_wide": Posture(both={"hip": {"flex": (-5, 10), "abd": (18, 32)},
                                   "knee": {"flex": (0, 15)}}),
    "walking": Posture(left={"hip": {"flex": (18, 35)}, "knee": {"flex": (0, 20)}},
                       right={"hip": {"flex": (-25, -10)}, "knee": {"flex": (15, 45)}},
                       center={"spine": {"bend": (0, 10)}}),
    "running": Posture(left={"hip": {"flex": (45, 75)}, "knee": {"flex": (70, 110)}},
                       right={"hip": {"flex": (-35, -15)}, "knee": {"flex": (40, 90)}},
                       center={"spine": {"bend": (10, 25)}}),
    "lunging": Posture(left={"hip": {"flex": (60, 80)}, "knee": {"flex": (70, 95)}},
                       right={"hip": {"flex": (-35, -20)}, "knee": {"flex": (15, 40)}}),
    "standing_one_leg": Posture(left={"hip": {"flex": (70, 100)}, "knee": {"flex": (70, 110)}},
                                right={"hip": {"flex": (-5, 5)}, "knee": {"flex": (0, 8)}}),
    "sitting": Posture(both={"hip": {"flex": (80, 100), "abd": (0, 15)},
                             "knee": {"flex": (80, 100)}}),
    "sitting_floor": Posture(both={"hip": {"flex": (88, 100), "abd": (0, 15)},
                                   "knee": {"flex": (0, 15)}},
                             center={"spine": {"bend": (0, 25)}}),
    "squatting": Posture(both={"hip": {"flex": (105, 130), "abd": (12, 28)},
                               "knee": {"flex": (125, 145)}, "ankle": {"flex": (15, 30)}},
                         center={"spine": {"bend": (15, 35)}}),
    # Kneeling: shins slightly rising backward and feet pointed so the knees are lowest.
    "kneeling": Posture(both={"hip": {"flex": (-5, 15), "abd": (0, 10)},
                              "knee": {"flex": (95, 110)}, "ankle": {"flex": (-40, -30)}}),
    "kneeling_one_knee": Posture(left={"hip": {"flex": (80, 100)}, "knee": {"flex": (80, 100)}},
                                 right={"hip": {"flex": (-10, 5)}, "knee": {"flex": (95, 110)},
                                        "ankle": {"flex": (-40, -30)}}),
    "bending_forward": Posture(both={"hip": {"flex": (-5, 5)}, "knee": {"flex": (0, 15)}},
                               pitch=(45, 75), center={"spine": {"bend": (15, 40)}}),
    "leaning_back": Posture(both=_STRAIGHT_LEGS, pitch=(-15, -8),
                            center={"spine": {"bend": (-25, -10)}}),
    "leaning_sideways": Posture(both=_STRAIGHT_LEGS,
                                center={"spine": {"side": (25, 45)}}),
    "twisting": Posture(both=_STRAIGHT_LEGS, center={"spine": {"twist": (35, 60)}}),
    "lying_back": Posture(both={"hip": {"flex": (0, 20)}, "knee": {"flex": (0, 25)}},
                          lie="back"),
    "lying_back_knees_up": Posture(both={"hip": {"flex": (50, 80)}, "knee": {"flex": (90, 120)}},
                                   lie="back"),
    "lying_front": Posture(both={"hip": {"flex": (-10, 5)}, "knee": {"flex": (0, 20)}},
                           lie="front", gestures=_FLOOR_SAFE),
    "lying_side": Posture(both={"hip": {"flex": (30, 70)}, "knee": {"flex": (40, 80)}},
                          lie="side", gestures=_SIDE_SAFE),
    "t_pose": Posture(both={"hip": {"flex": (-3, 3), "abd": (0, 6)}, "knee": {"flex": (0, 5)}},
                      gestures=("t_arms",)),
}

_DOWN = {"shoulder": {"raise": (5, 20), "front": (-10, 40)}, "elbow": {"flex": (0, 20)}}
GESTURES: dict[str, Gesture] = {
    "arms_down": Gesture(_DOWN),
    "arms_raised": Gesture({"shoulder": {"raise": (155, 180), "front": (-10, 40)},
                            "elbow": {"flex": (0, 20)}, "collar": {"raise": (10, 25)}}),
    "one_arm_raised": Gesture({"shoulder": {"raise": (150, 180), "front": (-10, 40)},
                               "elbow": {"flex": (0, 20)}}, _DOWN),
    "t_arms": Gesture({"shoulder": {"raise": (85, 95), "front": (-8, 8)},
                       "elbow": {"flex": (0, 8)}}),
    "arms_forward": Gesture({"shoulder": {"raise": (75, 100), "front": (80, 100)},
                             "elbow": {"flex": (0, 20)}}),
    "reaching_forward": Gesture({"shoulder": {"raise": (100, 135), "front": (70, 100)},
                                 "elbow": {"flex": (0, 15)}}, _DOWN),
    "reaching_side": Gesture({"shoulder": {"raise": (80, 120), "front": (-15, 15)},
                              "elbow": {"flex": (0, 10)}}, _DOWN),
    "hands_on_hips": Gesture({"shoulder": {"raise": (30, 45), "front": (-20, 0),
                                           "twist": (75, 95)},
                              "elbow": {"flex": (100, 125)}}),
    "boxing_guard": Gesture({"shoulder": {"raise": (25, 45), "front": (45, 75)},
                             "elbow": {"flex": (110, 135)}}),
    "hands_on_head": Gesture({"shoulder": {"raise": (125, 150), "front": (10, 40),
                                           "twist": (-80, -50)},
                              "elbow": {"flex": (120, 145)}}),
    "waving": Gesture({"shoulder": {"raise": (80, 110), "front": (0, 30),
                                    "twist": (-95, -70)},
                       "elbow": {"flex": (60, 100)}}, _DOWN),
    "arms_crossed": Gesture({"shoulder": {"raise": (20, 35), "front": (60, 85),
                                          "twist": (35, 55)},
                             "elbow": {"flex": (115, 135)}}),
}


@dataclass
class PoseSample:
    """Sampled poses. global_orient (N,3), body_pose (N,23,3) axis-angle float32;
    rotmats (N,24,3,3) float64; posture/gesture_left/gesture_right (N,) str labels."""

    global_orient: np.ndarray
    body_pose: np.ndarray
    rotmats: np.ndarray
    posture: np.ndarray
    gesture_left: np.ndarray
    gesture_right: np.ndarray


def _axis_rotation(axis: int, deg) -> np.ndarray:
    """Rotation(s) by ``deg`` degrees about a coordinate axis: () -> (3,3), (N,) -> (N,3,3)."""
    a = np.radians(np.asarray(deg, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    out = np.zeros(a.shape + (3, 3))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]   # the plane rotated, right-handed
    out[..., axis, axis] = 1.0
    out[..., i, i], out[..., i, j], out[..., j, i], out[..., j, j] = c, -s, s, c
    return out


def _rx(deg):
    return _axis_rotation(0, deg)


def _ry(deg):
    return _axis_rotation(1, deg)


def _rz(deg):
    return _axis_rotation(2, deg)


def _swing(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(N,3) unit vectors -> (N,3,3) minimal rotations taking src to dst."""
    axis = np.cross(src, dst)
    sin = np.linalg.norm(axis, axis=-1, keepdims=True)
    cos = np.sum(src * dst, axis=-1, keepdims=True)
    angle = np.arctan2(sin, cos)
    # src == -dst is impossible here (raise <= 180 keeps the arm off -x), so the axis is
    # only degenerate when there is no rotation at all.
    axis = np.where(sin > 1e-9, axis / np.maximum(sin, 1e-12), 0.0)
    return Rotation.from_rotvec(axis * angle).as_matrix()


def _joint_rotations(kind: str, p: dict[str, np.ndarray]) -> np.ndarray:
    """Left-side (or central) local rotations (N,3,3) of a kind from its parameters."""
    if kind == "hip":
        return _rx(-p["flex"]) @ _rz(p["abd"]) @ _ry(p["twist"])
    if kind == "knee":
        return _rx(p["flex"])
    if kind == "ankle":
        return _rx(-p["flex"])
    if kind in ("spine", "neck", "head"):
        return _ry(p["twist"]) @ _rz(p["side"]) @ _rx(p["bend"])
    if kind == "collar":
        return _rz(p["raise"])
    if kind == "shoulder":
        r, f = np.radians(p["raise"]), np.radians(p["front"])
        direction = np.stack([np.cos(f) * np.sin(r), -np.cos(r), np.sin(f) * np.sin(r)], -1)
        rest = np.broadcast_to(np.array([1.0, 0.0, 0.0]), direction.shape)
        return _swing(rest, direction) @ _rx(p["twist"])
    if kind == "elbow":
        return _ry(-p["flex"])
    if kind == "wrist":
        return _ry(-p["flex"]) @ _rz(p["dev"])
    raise KeyError(kind)


def mirror_rotmats(rotmats: np.ndarray) -> np.ndarray:
    """Left/right mirror image of poses: (N,24,3,3) -> (N,24,3,3), ``M R[perm] M``."""
    return _MIRROR @ rotmats[:, LEFT_RIGHT_PERMUTATION] @ _MIRROR


def _draw(rng: np.random.Generator, ranges: dict, kind: str, n: int, noise_deg: float,
          total_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Uniform draw in the archetype ranges (default 0) + Gaussian noise, clipped."""
    out = {}
    for name, lo, hi in _PARAMS[kind]:
        a, b = ranges.get(kind, {}).get(name, (0.0, 0.0))
        value = rng.uniform(a, b, size=n) + rng.normal(0.0, noise_deg * _NOISE_SCALE[kind], n)
        out[name] = np.clip(value, lo, hi) * total_scale
    return out


def _lie_rotation(kind: str) -> np.ndarray:
    return {"upright": np.eye(3), "back": _rx(-90.0), "front": _rx(90.0),
            "side": _rz(90.0)}[kind]


def sample_poses(n: int, rng: np.random.Generator, *, archetypes: list[str] | tuple = (),
                 noise_deg: float = 7.0, max_yaw_deg: float = 180.0,
                 asymmetric_arm_prob: float = 0.3) -> PoseSample:
    """Draw ``n`` poses.

    archetypes: posture names to use (empty: all of POSTURES), chosen uniformly.
    Gestures are chosen uniformly among those the posture allows; with probability
    ``asymmetric_arm_prob`` the right arm draws its own gesture. Returns a PoseSample.
    """
    names = list(archetypes) or list(POSTURES)
    unknown = sorted(set(names) - set(POSTURES))
    if unknown:
        raise ValueError(f"synth.archetypes: unknown posture(s) {unknown}; known: "
                         f"{sorted(POSTURES)}")
    posture = np.array(names, dtype=object)[rng.integers(0, len(names), n)]
    g_left = np.empty(n, dtype=object)
    g_right = np.empty(n, dtype=object)
    for i in range(n):
        allowed = POSTURES[posture[i]].gestures or tuple(GESTURES)
        g_left[i] = allowed[rng.integers(len(allowed))]
        own = rng.random() < asymmetric_arm_prob and len(allowed) > 1
        g_right[i] = allowed[rng.integers(len(allowed))] if own else g_left[i]

    rot = np.tile(np.eye(3), (n, 24, 1, 1))
    for pname in sorted(set(posture)):
        rows = np.flatnonzero(posture == pname)
        spec, m = POSTURES[pname], len(rows)
        pitch = rng.uniform(*spec.pitch, size=m) + rng.normal(0, noise_deg * 0.5, m)
        for side, sided_ranges in (("left", spec.left), ("right", spec.right)):
            for kind in _LEG_KINDS:
                ranges = {kind: {**spec.both.get(kind, {}), **sided_ranges.get(kind, {})}}
                params = _draw(rng, ranges, kind, m, noise_deg)
                if kind == "hip":
                    params["flex"] = np.clip(params["flex"] + pitch, -40, 140)
                local = _joint_rotations(kind, params)
                j = JOINT_INDEX[f"{side}_{kind}"]
                rot[rows, j] = local if side == "left" else _MIRROR @ local @ _MIRROR
        spine = _draw(rng, spec.center, "spine", m, noise_deg, total_scale=1 / 3)
        for j in ("spine1", "spine2", "spine3"):
            rot[rows, JOINT_INDEX[j]] = _joint_rotations("spine", spine)
        for kind in ("neck", "head"):
            rot[rows, JOINT_INDEX[kind]] = _joint_rotations(
                kind, _draw(rng, spec.center, kind, m, noise_deg))
        rot[rows, 0] = _lie_rotation(spec.lie) @ _rx(pitch)

    for side, labels in (("left", g_left), ("right", g_right)):
        for gname in sorted(set(labels)):
            rows = np.flatnonzero(labels == gname)
            g = GESTURES[gname]
            ranges = g.left if side == "left" or g.right is None else g.right
            for kind in _ARM_KINDS:
                local = _joint_rotations(kind, _draw(rng, ranges, kind, len(rows), noise_deg))
                j = JOINT_INDEX[f"{side}_{kind}"]
                rot[rows, j] = local if side == "left" else _MIRROR @ local @ _MIRROR

    mirrored = rng.random(n) < 0.5
    rot[mirrored] = mirror_rotmats(rot[mirrored])
    g_left[mirrored], g_right[mirrored] = g_right[mirrored].copy(), g_left[mirrored].copy()
    yaw = rng.uniform(-max_yaw_deg, max_yaw_deg, n)
    rot[:, 0] = _ry(yaw) @ rot[:, 0]

    aa = Rotation.from_matrix(rot.reshape(-1, 3, 3)).as_rotvec().reshape(n, 24, 3)
    return PoseSample(global_orient=aa[:, 0].astype(np.float32),
                      body_pose=aa[:, 1:].astype(np.float32), rotmats=rot,
                      posture=posture.astype(str), gesture_left=g_left.astype(str),
                      gesture_right=g_right.astype(str))
