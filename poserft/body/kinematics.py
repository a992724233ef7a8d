"""SMPL kinematic tree and the joint sets used for evaluation.

Joint sets (``JOINT_SETS``), each with its joint names and how to get it from SMPL-24:

* ``smpl24``: the 24 SMPL joints (identity).
* ``h36m17``: Human3.6M 17 joints in the row order of the ``J_regressor_h36m.npy`` used by
  SPIN / HMR2.0 (4D-Humans). With that file, the LSP-14 subset is
  ``H36M17_TO_LSP14 = [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10]`` (SPIN's
  ``H36M_TO_J14``), which makes rows 1-3 the left leg and rows 4-6 the right leg. Metrics
  are unaffected by the naming because prediction and ground truth go through the same map.
  With a mesh model and a configured regressor the joints are ``regressor @ vertices``;
  otherwise they are *approximated* by SMPL joints (``from_smpl24``, see ``approximate``).
* ``lsp14``: the 14 LSP joints of the HMR2.0/4D-Humans 3DPW / H36M protocol, order
  R ankle, R knee, R hip, L hip, L knee, L ankle, R wrist, R elbow, R shoulder,
  L shoulder, L elbow, L wrist, neck, head top. From H36M-17 via ``H36M17_TO_LSP14`` when
  a regressor is available; otherwise from SMPL-24 with two documented approximations:
  LSP ``neck`` -> SMPL ``neck`` (12, base of the neck, within a few cm) and LSP
  ``head_top`` -> SMPL ``head`` (15, the head joint sits near the skull centre, about
  10 cm below the top of the head). The LSP hips are regressed by HMR2.0 (slightly lower
  and wider than SMPL's hip joints); SMPL hips 1/2 are used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SMPL_JOINT_NAMES", "SMPL_PARENTS", "NUM_SMPL_JOINTS", "JointSet", "JOINT_SETS",
    "H36M17_TO_LSP14", "select_joint_set", "tree_levels", "forward_kinematics",
]

SMPL_JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck",
    "left_collar", "right_collar", "head", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand",
)
NUM_SMPL_JOINTS = len(SMPL_JOINT_NAMES)

# Parent of each SMPL joint (SMPL kintree_table[0], with -1 for the root).
SMPL_PARENTS: tuple[int, ...] = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21,
)

H36M17_TO_LSP14: tuple[int, ...] = (6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10)


@dataclass(frozen=True)
class JointSet:
    """A joint set: ``names`` (J,), SMPL-24 indices ``from_smpl24`` (J,) used when no
    vertex regressor is available, and the names among them that are approximations."""

    name: str
    names: tuple[str, ...]
    from_smpl24: tuple[int, ...]
    approximate: tuple[str, ...] = ()
    description: str = ""

    @property
    def num_joints(self) -> int:
        return len(self.names)


_H36M17_NAMES = (
    "pelvis", "left_hip", "left_knee", "left_ankle", "right_hip", "right_knee",
    "right_ankle", "spine", "thorax", "neck_nose", "head", "left_shoulder", "left_elbow",
    "left_wrist", "right_shoulder", "right_elbow", "right_wrist",
)
_LSP14_NAMES = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow",
    "left_wrist", "neck", "head_top",
)

JOINT_SETS: dict[str, JointSet] = {
    "smpl24": JointSet("smpl24", SMPL_JOINT_NAMES, tuple(range(NUM_SMPL_JOINTS)),
                       description="The 24 SMPL joints."),
    "h36m17": JointSet(
        "h36m17", _H36M17_NAMES,
        # spine -> spine2 (mid torso), thorax -> neck (base of the neck),
        # neck_nose and head -> head (no face/top-of-head joint in SMPL).
        (0, 1, 4, 7, 2, 5, 8, 6, 12, 15, 15, 16, 18, 20, 17, 19, 21),
        approximate=("spine", "thorax", "neck_nose", "head"),
        description="Human3.6M 17 joints (J_regressor_h36m.npy row order, SPIN/HMR2.0); "
                    "exact only through the vertex regressor."),
    "lsp14": JointSet(
        "lsp14", _LSP14_NAMES,
        (8, 5, 2, 1, 4, 7, 21, 19, 17, 16, 18, 20, 12, 15),
        approximate=("right_hip", "left_hip", "neck", "head_top"),
        description="14 LSP joints used for 3DPW/H36M PA-MPJPE (HMR2.0 convention)."),
}

# The LSP-14 subset of H36M-17 must agree with the direct SMPL map (same joints).
assert tuple(JOINT_SETS["h36m17"].from_smpl24[i] for i in H36M17_TO_LSP14) == \
    JOINT_SETS["lsp14"].from_smpl24


def select_joint_set(joints24: torch.Tensor, name: str) -> torch.Tensor:
    """(..., 24, 3) SMPL joints -> (..., J, 3) joints of set ``name`` via ``from_smpl24``."""
    if name not in JOINT_SETS:
        raise ValueError(f"unknown joint set {name!r}; known: {sorted(JOINT_SETS)}")
    if joints24.dim() < 2 or tuple(joints24.shape[-2:]) != (NUM_SMPL_JOINTS, 3):
        raise ValueError(f"select_joint_set: expected (..., 24, 3) SMPL joints, got "
                         f"{tuple(joints24.shape)}")
    index = torch.as_tensor(JOINT_SETS[name].from_smpl24, device=joints24.device)
    return joints24.index_select(-2, index)


def tree_levels(parents: tuple[int, ...] | list[int]) -> list[list[int]]:
    """Group joints by depth in the tree (root first), so that forward kinematics can
    process all joints of one depth in one batched step. Parents must precede children."""
    depth: list[int] = []
    for j, p in enumerate(parents):
        if p >= j:
            raise ValueError(f"parents must be topologically sorted; joint {j} has parent {p}")
        depth.append(0 if p < 0 else depth[p] + 1)
    levels: list[list[int]] = [[] for _ in range(max(depth) + 1)]
    for j, d in enumerate(depth):
        levels[d].append(j)
    return levels


def forward_kinematics(rotmats: torch.Tensor, rest_joints: torch.Tensor,
                       parents: tuple[int, ...] | list[int] = SMPL_PARENTS,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose a rest skeleton with per-joint local rotations (joints only, no skinning).

    Same convention as SMPL's rigid transform chain: joint ``j`` rotates its subtree by
    ``rotmats[..., j]`` about its rest position, expressed in its parent's frame; the root
    rotates about its rest position ``rest_joints[0]`` (no translation added here).

    Args:
        rotmats: (..., J, 3, 3) local rotation matrices (joint 0 = global orientation).
        rest_joints: (J, 3) shared, or (..., J, 3) per-sample rest joint positions.
        parents: (J,) parent indices, ``-1`` for the root, parents before children.
    Returns:
        posed joints (..., J, 3) and global rotations (..., J, 3, 3).
    """
    num_joints = len(parents)
    if rotmats.dim() < 3 or tuple(rotmats.shape[-3:]) != (num_joints, 3, 3):
        raise ValueError(f"forward_kinematics: rotmats must be (..., {num_joints}, 3, 3), "
                         f"got {tuple(rotmats.shape)}")
    batch_shape = rotmats.shape[:-3]
    shared_rest = rest_joints.dim() == 2
    if tuple(rest_joints.shape[-2:]) != (num_joints, 3) or not (
            shared_rest or rest_joints.shape[:-2] == batch_shape):
        raise ValueError(f"forward_kinematics: rest_joints must be ({num_joints}, 3) or "
                         f"{tuple(batch_shape) + (num_joints, 3)}, got {tuple(rest_joints.shape)}")
    tree_levels(tuple(parents))                      # validates the topological order
    n = rotmats[..., 0, 0, 0].numel()
    rest = rest_joints.to(rotmats.dtype)
    parent_index = [max(p, 0) for p in parents]
    bones = rest - rest[..., parent_index, :]        # bone vectors in the rest pose
    bones = torch.cat([rest[..., :1, :], bones[..., 1:, :]], dim=-2)   # root: absolute
    rot = rotmats.reshape(n, num_joints, 3, 3)
    bones = bones if shared_rest else bones.reshape(n, num_joints, 3)
    # Chunks keep the working set in cache: several times faster than one pass on 100k poses.
    joints, rots = [], []
    for lo in range(0, max(n, 1), _FK_CHUNK):
        j, r = _fk_batch_last(rot[lo:lo + _FK_CHUNK],
                              bones if shared_rest else bones[lo:lo + _FK_CHUNK], parents)
        joints.append(j)
        rots.append(r)
    joints_t = joints[0] if len(joints) == 1 else torch.cat(joints)
    rots_t = rots[0] if len(rots) == 1 else torch.cat(rots)
    return (joints_t.reshape(batch_shape + (num_joints, 3)),
            rots_t.reshape(batch_shape + (num_joints, 3, 3)))


_FK_CHUNK = 16384


def _fk_batch_last(rotmats: torch.Tensor, bones: torch.Tensor, parents
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """rotmats (n,J,3,3), bones (J,3) or (n,J,3) -> joints (n,J,3), global rots (n,J,3,3)."""
    n, num_joints = rotmats.shape[:2]
    # Batch-last layout (J, 3, 3, n): every step below is a handful of elementwise ops on
    # contiguous rows, much faster on CPU than millions of tiny 3x3 matmuls.
    rot = rotmats.permute(1, 2, 3, 0).contiguous()
    bone = bones[:, :, None] if bones.dim() == 2 else bones.permute(1, 2, 0).contiguous()
    global_rot: list[torch.Tensor] = [None] * num_joints  # type: ignore[list-item]
    posed: list[torch.Tensor] = [None] * num_joints       # type: ignore[list-item]
    for j, p in enumerate(parents):
        if p < 0:
            global_rot[j] = rot[j]
            posed[j] = bone[j].expand(3, n)
            continue
        g = global_rot[p]                                               # (3, 3, n)
        # G_j = G_p @ R_j, row-broadcast: sum_k G_p[:, k] (outer) R_j[k, :].
        global_rot[j] = (g[:, 0:1] * rot[j][0] + g[:, 1:2] * rot[j][1]
                         + g[:, 2:3] * rot[j][2])
        posed[j] = posed[p] + g[:, 0] * bone[j][0] + g[:, 1] * bone[j][1] + g[:, 2] * bone[j][2]
    return (torch.stack(posed, 0).permute(2, 0, 1),
            torch.stack(global_rot, 0).permute(3, 0, 1, 2))
