"""Skeleton body model: the SMPL kinematic tree with a fixed neutral rest skeleton.

Used whenever no licensed SMPL files are configured. Joints only (no mesh), so every
metric and reward works on the same 24 joints as with SMPL.

The rest skeleton (``NEUTRAL_REST_JOINTS``, metres, SMPL canonical frame: y up, body
facing +z, the body's left on +x, T-pose) is an anthropometric neutral adult close to the
SMPL neutral model's rest joints (``J_regressor @ v_template``; within about 1-2 cm),
made exactly left/right mirror-symmetric and rounded to millimetres. The pelvis sits at
y = -0.223 as in SMPL, so ``transl`` has SMPL's meaning (offset added to all joints).

Shape: betas are accepted (shape-checked) and IGNORED: the skeleton has one fixed body
shape. Bone lengths (m): thigh 0.381, shin 0.401, upper arm 0.260, forearm 0.264.
"""

from __future__ import annotations

import torch

from poserft.body.base import BodyModel
from poserft.body.kinematics import SMPL_PARENTS, forward_kinematics

__all__ = ["NEUTRAL_REST_JOINTS", "SkeletonModel"]

NEUTRAL_REST_JOINTS: tuple[tuple[float, float, float], ...] = (
    (0.000, -0.223, 0.028),    # 0 pelvis
    (0.069, -0.314, 0.023),    # 1 left_hip
    (-0.069, -0.314, 0.023),   # 2 right_hip
    (0.000, -0.114, 0.002),    # 3 spine1
    (0.104, -0.693, 0.016),    # 4 left_knee
    (-0.104, -0.693, 0.016),   # 5 right_knee
    (0.000, 0.020, 0.003),     # 6 spine2
    (0.090, -1.091, -0.027),   # 7 left_ankle
    (-0.090, -1.091, -0.027),  # 8 right_ankle
    (0.000, 0.076, 0.029),     # 9 spine3
    (0.116, -1.145, 0.094),    # 10 left_foot
    (-0.116, -1.145, 0.094),   # 11 right_foot
    (0.000, 0.289, -0.013),    # 12 neck
    (0.076, 0.192, -0.008),    # 13 left_collar
    (-0.076, 0.192, -0.008),   # 14 right_collar
    (0.000, 0.355, 0.040),     # 15 head
    (0.196, 0.236, -0.017),    # 16 left_shoulder
    (-0.196, 0.236, -0.017),   # 17 right_shoulder
    (0.454, 0.221, -0.042),    # 18 left_elbow
    (-0.454, 0.221, -0.042),   # 19 right_elbow
    (0.718, 0.235, -0.045),    # 20 left_wrist
    (-0.718, 0.235, -0.045),   # 21 right_wrist
    (0.806, 0.227, -0.060),    # 22 left_hand
    (-0.806, 0.227, -0.060),   # 23 right_hand
)


class SkeletonModel(BodyModel):
    """Forward kinematics of a fixed rest skeleton; betas ignored (see module docstring)."""

    kind = "skeleton"
    has_mesh = False

    def __init__(self, rest_joints: torch.Tensor | None = None) -> None:
        if rest_joints is None:
            rest_joints = torch.tensor(NEUTRAL_REST_JOINTS, dtype=torch.float32)
        super().__init__(rest_joints)

    def _pose(self, rotmats, betas, need_vertices):
        joints, _ = forward_kinematics(rotmats, self.rest_joints.to(rotmats.dtype), SMPL_PARENTS)
        return joints, None
