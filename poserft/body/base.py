"""The body-model interface every metric and reward takes joints from."""

from __future__ import annotations

import torch
from torch import nn

from poserft.body.kinematics import JOINT_SETS, NUM_SMPL_JOINTS, SMPL_PARENTS, \
    select_joint_set
from poserft.body.posevec import _check_finite, smpl_to_rotmats, vec6d_to_rotmats

__all__ = ["BodyModel"]


class BodyModel(nn.Module):
    """Pose -> 3D joints (SMPL canonical frame: y up, facing +z, metres).

    Subclasses implement :meth:`_pose` (joints and, for mesh models, vertices).

    Attributes:
        parents: (24,) long buffer, parent of each SMPL joint (-1 for the root).
        rest_joints: (24,3) float buffer, joints of the zero pose with zero betas.
        kind: 'skeleton' | 'smpl' | 'smplh'.
    """

    kind = "abstract"
    has_mesh = False

    def __init__(self, rest_joints: torch.Tensor) -> None:
        super().__init__()
        if tuple(rest_joints.shape) != (NUM_SMPL_JOINTS, 3):
            raise ValueError(f"rest_joints must be (24, 3), got {tuple(rest_joints.shape)}")
        self.register_buffer("rest_joints", rest_joints.detach().clone().float())
        self.register_buffer("parents", torch.tensor(SMPL_PARENTS, dtype=torch.long))

    # -- subclasses -----------------------------------------------------------------------
    def _pose(self, rotmats: torch.Tensor, betas: torch.Tensor | None, need_vertices: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """rotmats (B,24,3,3), betas (B,K)|None -> joints (B,24,3), vertices (B,V,3)|None,
        both without translation."""
        raise NotImplementedError

    def _joint_set_from_vertices(self, name: str, vertices: torch.Tensor) -> torch.Tensor | None:
        """(B,V,3) -> (B,J,3) through a configured vertex regressor, or None."""
        return None

    # -- public -------------------------------------------------------------------------
    def forward(self, global_orient: torch.Tensor, body_pose: torch.Tensor,
                betas: torch.Tensor | None = None, transl: torch.Tensor | None = None
                ) -> torch.Tensor:
        """global_orient (B,3), body_pose (B,23,3) axis-angle -> joints (B,24,3) metres."""
        return self.forward_rotmats(self._rotmats(global_orient, body_pose), betas, transl)

    def forward_rotmats(self, rotmats: torch.Tensor, betas: torch.Tensor | None = None,
                        transl: torch.Tensor | None = None) -> torch.Tensor:
        """rotmats (B,24,3,3) local rotations -> joints (B,24,3) metres."""
        return self.joint_set_from_rotmats("smpl24", rotmats, betas, transl)

    def forward_vec6d(self, pose6d: torch.Tensor) -> torch.Tensor:
        """pose6d (..., 144) continuous 6D rotations (24 joints x 6, joint 0 = the global
        orientation; what the pose heads predict) -> joints (..., 24, 3) metres, zero shape.

        Any leading batch shape (none included: (144,) -> (24, 3)). Half-precision inputs
        (fp16/bf16, e.g. from a bf16 backbone) are computed and returned in float32, float64
        stays float64; differentiable (the SFT joint loss backpropagates through it). The
        input must be on the body model's device.
        """
        if not isinstance(pose6d, torch.Tensor):
            raise TypeError(f"forward_vec6d: expected a torch.Tensor, got {type(pose6d).__name__}")
        if pose6d.dtype != torch.float64:
            pose6d = pose6d.float()
        rotmats = vec6d_to_rotmats(pose6d)                                   # (..., 24, 3, 3)
        lead = rotmats.shape[:-3]
        joints = self.forward_rotmats(rotmats.reshape((-1,) + rotmats.shape[-3:]))  # (N, 24, 3)
        return joints.reshape(lead + joints.shape[-2:])

    def joint_set(self, name: str, global_orient: torch.Tensor, body_pose: torch.Tensor,
                  betas: torch.Tensor | None = None, transl: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Joints of set ``name`` ('smpl24' | 'h36m17' | 'lsp14'): (B,J,3) metres.

        'h36m17' (and 'lsp14' derived from it) use the vertex regressor when the model has a
        mesh and one is configured; otherwise the documented SMPL-24 approximation
        (``kinematics.JOINT_SETS[name].from_smpl24``).
        """
        return self.joint_set_from_rotmats(name, self._rotmats(global_orient, body_pose),
                                           betas, transl)

    def joint_set_from_rotmats(self, name: str, rotmats: torch.Tensor,
                               betas: torch.Tensor | None = None,
                               transl: torch.Tensor | None = None) -> torch.Tensor:
        """Like :meth:`joint_set` from (B,24,3,3) local rotation matrices."""
        if name not in JOINT_SETS:
            raise ValueError(f"unknown joint set {name!r}; known: {sorted(JOINT_SETS)}")
        rotmats = self._check_rotmats(rotmats)
        batch = rotmats.shape[0]
        betas = self._check_batch_arg(betas, "betas", batch, None, rotmats)
        transl = self._check_batch_arg(transl, "transl", batch, 3, rotmats)
        need_vertices = name != "smpl24" and self.uses_regressor(name)
        joints, vertices = self._pose(rotmats, betas, need_vertices)
        out = None
        if need_vertices:
            out = self._joint_set_from_vertices(name, vertices)
        if out is None:
            out = joints if name == "smpl24" else select_joint_set(joints, name)
        if transl is not None:
            out = out + transl[:, None, :]
        return out

    def uses_regressor(self, name: str) -> bool:
        """Whether joint set ``name`` comes from a vertex regressor (exact) rather than the
        SMPL-24 approximation."""
        return False

    # -- validation ---------------------------------------------------------------------
    def _rotmats(self, global_orient, body_pose) -> torch.Tensor:
        rotmats = smpl_to_rotmats(global_orient, body_pose)
        return rotmats.to(self.rest_joints.device)

    def _check_rotmats(self, rotmats) -> torch.Tensor:
        if not isinstance(rotmats, torch.Tensor):
            rotmats = torch.as_tensor(rotmats, dtype=torch.get_default_dtype())
        if rotmats.dim() != 4 or tuple(rotmats.shape[1:]) != (NUM_SMPL_JOINTS, 3, 3):
            raise ValueError(f"rotmats must have shape (B, 24, 3, 3), got {tuple(rotmats.shape)}")
        if rotmats.shape[0] == 0:
            raise ValueError("empty batch: rotmats has 0 rows")
        if not rotmats.is_floating_point():
            rotmats = rotmats.to(torch.get_default_dtype())
        _check_finite(rotmats, "rotmats")
        return rotmats

    @staticmethod
    def _check_batch_arg(x, name: str, batch: int, width: int | None, like: torch.Tensor
                         ) -> torch.Tensor | None:
        if x is None:
            return None
        x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
        if x.dim() != 2 or x.shape[0] != batch or (width is not None and x.shape[1] != width):
            want = f"({batch}, {width if width is not None else 'K'})"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
        _check_finite(x, name)
        return x

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
