"""Body model layer: rotations, SMPL kinematic tree, joint sets, pose vectors, and
``load(cfg)`` -> a :class:`BodyModel` (SMPL/SMPL-H via smplx when model files are
configured, else the skeleton model). See docs/interfaces.md, section Body. Joint errors
(MPJPE, PA-MPJPE) are in ``poserft.body.metrics``.
"""

from __future__ import annotations

from poserft.body.base import BodyModel
from poserft.body.config import BodyConfig
from poserft.body.kinematics import JOINT_SETS, NUM_SMPL_JOINTS, SMPL_JOINT_NAMES, \
    SMPL_PARENTS, forward_kinematics, select_joint_set
from poserft.body.posevec import POSE_DIM, rotmats_to_smpl, rotmats_to_vec6d, \
    smpl_to_rotmats, smpl_to_vec6d, vec6d_to_rotmats, vec6d_to_smpl
from poserft.body.skeleton import NEUTRAL_REST_JOINTS, SkeletonModel

__all__ = [
    "BodyConfig", "BodyModel", "SkeletonModel", "load", "POSE_DIM", "smpl_to_vec6d",
    "vec6d_to_smpl", "vec6d_to_rotmats", "rotmats_to_vec6d", "smpl_to_rotmats",
    "rotmats_to_smpl", "JOINT_SETS", "SMPL_JOINT_NAMES", "SMPL_PARENTS", "NUM_SMPL_JOINTS",
    "NEUTRAL_REST_JOINTS", "forward_kinematics", "select_joint_set",
]


def load(cfg: BodyConfig | None = None) -> BodyModel:
    """Build the configured body model (an ``nn.Module`` on CPU, float32 buffers).

    ``None`` gives the skeleton model (the default ``body`` section). ``smpl``/``smplh``
    need the model files (a FileNotFoundError names the
    expected path and where to download it).
    """
    cfg = BodyConfig.expect(cfg, "body.load: cfg")
    cfg.check("body")
    if cfg.model == "skeleton":
        return SkeletonModel()
    from poserft.body.smpl import SmplxBodyModel  # smplx import is slow; only when needed
    return SmplxBodyModel.from_config(cfg)
