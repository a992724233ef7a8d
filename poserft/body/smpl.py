"""SMPL / SMPL-H through the ``smplx`` package (needs the licensed model files).

* Files: ``body.model_path`` is a model file or a folder holding ``SMPL_{GENDER}.pkl``
  (SMPL) or ``SMPLH_{GENDER}.pkl|.npz`` (SMPL-H), directly or in a ``smpl/`` / ``smplh/``
  subfolder (AMASS's ``smplh/{gender}/model.npz`` layout also works). Official SMPL pickles
  store arrays as ``chumpy`` objects; they are read without chumpy (its pickled state is
  a dict holding the array as ``x``), so chumpy (broken on current numpy) is not needed.
* SMPL-H: our poses carry the 21 SMPL-H body joints (SMPL joints 1..21); SMPL's hand
  joints 22/23 have no SMPL-H counterpart, so their rotations are ignored, the hands are
  flat (identity finger rotations), and joints 22/23 are reported at SMPL-H's
  ``left_middle1`` / ``right_middle1`` (the knuckle SMPL's hand joint approximates).
* Joints: ``J_regressor @ (v_template + shapedirs . betas)`` posed by the rigid transform
  chain, exactly as smplx computes them; without a vertex regressor request we skip the
  skinning of 6890 vertices and run :func:`forward_kinematics` on the shaped rest joints
  (same numbers, checked in tests against smplx's own forward).
* ``body.h36m_regressor_path``: a (17, 6890) ``J_regressor_h36m.npy`` applied to the posed
  vertices gives H36M-17, and LSP-14 through ``H36M17_TO_LSP14``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from poserft.body.base import BodyModel
from poserft.body.config import BodyConfig
from poserft.body.kinematics import H36M17_TO_LSP14, SMPL_PARENTS, forward_kinematics

__all__ = ["SmplxBodyModel", "resolve_model_file", "load_model_data"]

_NAMES = {"smpl": "SMPL", "smplh": "SMPL-H"}
_FILE_STEMS = {"smpl": "SMPL", "smplh": "SMPLH"}
_DOWNLOAD = {"smpl": "https://smpl.is.tue.mpg.de", "smplh": "https://mano.is.tue.mpg.de"}
_REQUIRED_KEYS = {
    "smpl": ("v_template", "shapedirs", "posedirs", "J_regressor", "weights",
             "kintree_table", "f"),
    "smplh": ("v_template", "shapedirs", "posedirs", "J_regressor", "weights",
              "kintree_table", "f", "hands_componentsl", "hands_componentsr",
              "hands_meanl", "hands_meanr"),
}
_NUM_JOINTS = {"smpl": 24, "smplh": 52}
# Model joints reported as SMPL joints 0..23 (SMPL-H: left_middle1=25, right_middle1=40).
_BODY_JOINTS = {"smpl": tuple(range(24)), "smplh": tuple(range(22)) + (25, 40)}
_NUM_H36M_JOINTS = 17


def resolve_model_file(model: str, model_path: str, gender: str) -> Path:
    """Find the model file for ``model`` ('smpl'|'smplh'); FileNotFoundError names the
    expected path and where to download the file."""
    base = Path(model_path).expanduser()
    if base.is_file():
        return base
    stem = f"{_FILE_STEMS[model]}_{gender.upper()}"
    candidates = []
    for folder in (base, base / model):
        candidates += [folder / f"{stem}.pkl", folder / f"{stem}.npz"]
    if model == "smplh":
        candidates += [base / gender / "model.npz", base / "smplh" / gender / "model.npz"]
    for path in candidates:
        if path.is_file():
            return path
    others = ", ".join(str(p) for p in candidates[1:])
    raise FileNotFoundError(
        f"{_NAMES[model]} model file not found: {candidates[0]} — download from "
        f"{_DOWNLOAD[model]} and set body.model_path (also looked for: {others})")


class _ChumpyArray:
    """Stand-in for pickled ``chumpy`` objects: keeps their state dict (array in ``x``)."""

    def __setstate__(self, state):
        self.__dict__["state"] = state


class _ModelUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyArray
        return super().find_class(module, name)


def load_model_data(path: str | Path, model: str) -> dict:
    """Read an SMPL/SMPL-H model file (.pkl, chumpy or not, or .npz) into a dict of arrays
    (``J_regressor`` may stay scipy-sparse). ValueError names the file and missing keys."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=True) as npz:
                data = {k: npz[k] for k in npz.files}
        else:
            with open(path, "rb") as handle:
                data = _ModelUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, ModuleNotFoundError) as exc:
        raise ValueError(f"{path}: cannot read {_NAMES[model]} model file ({exc}); expected "
                         f"the official .pkl or an .npz of its arrays") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of model arrays, got {type(data).__name__}")
    data = dict(data)
    for key, value in data.items():
        if isinstance(value, _ChumpyArray):
            array = value.state.get("x") if isinstance(value.state, dict) else None
            if array is None:
                raise ValueError(f"{path}: entry {key!r} is a chumpy expression, not a plain "
                                 f"array; convert the file to .npz with chumpy installed")
            data[key] = np.asarray(array)
    missing = [k for k in _REQUIRED_KEYS[model] if k not in data]
    if missing:
        raise ValueError(f"{path}: not a {_NAMES[model]} model file, missing keys {missing}")
    num_joints = np.asarray(data["kintree_table"]).shape[-1]
    if num_joints != _NUM_JOINTS[model]:
        raise ValueError(f"{path}: kintree_table has {num_joints} joints, {_NAMES[model]} has "
                         f"{_NUM_JOINTS[model]} (is body.model right?)")
    return data


def _load_h36m_regressor(path: str, num_vertices: int) -> torch.Tensor:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"H36M joint regressor not found: {file} — get J_regressor_h36m.npy (17 x 6890) "
            f"from the SPIN / HMR2.0 data release and set body.h36m_regressor_path")
    regressor = np.load(file, allow_pickle=False)
    if regressor.shape != (_NUM_H36M_JOINTS, num_vertices):
        raise ValueError(f"{file}: J_regressor_h36m must have shape "
                         f"({_NUM_H36M_JOINTS}, {num_vertices}), got {regressor.shape}")
    if not np.isfinite(regressor).all():
        raise ValueError(f"{file}: regressor contains NaN or inf")
    return torch.as_tensor(regressor, dtype=torch.float32)


class SmplxBodyModel(BodyModel):
    """SMPL or SMPL-H mesh model (see module docstring)."""

    has_mesh = True

    def __init__(self, model: str, model_file: str | Path, gender: str = "neutral",
                 num_betas: int = 10, h36m_regressor_path: str | None = None) -> None:
        import smplx  # heavy import, only for mesh models
        from smplx.utils import Struct

        if model not in _NAMES:
            raise ValueError(f"model must be 'smpl' or 'smplh', got {model!r}")
        data = load_model_data(model_file, model)
        common = dict(model_path=str(model_file), data_struct=Struct(**data),
                      num_betas=num_betas, gender=gender, batch_size=1,
                      create_betas=False, create_global_orient=False,
                      create_body_pose=False, create_transl=False)
        if model == "smpl":
            layer = smplx.SMPL(**common)
        else:
            layer = smplx.SMPLH(**common, use_pca=False, flat_hand_mean=True,
                                create_left_hand_pose=False, create_right_hand_pose=False)
        body = list(_BODY_JOINTS[model])
        with torch.no_grad():
            joint_template = layer.J_regressor @ layer.v_template               # (J,3)
            joint_shapedirs = torch.einsum("jv,vck->jck", layer.J_regressor, layer.shapedirs)
        super().__init__(joint_template[body])
        self.kind = model
        self.model_file = str(model_file)
        self.layer = layer
        self.num_betas = layer.num_betas
        self.register_buffer("joint_shapedirs", joint_shapedirs[body].contiguous())  # (24,3,K)
        self._body_index = body
        self.h36m_regressor: torch.Tensor | None
        if h36m_regressor_path:
            self.register_buffer("h36m_regressor",
                                 _load_h36m_regressor(h36m_regressor_path,
                                                      layer.v_template.shape[0]))
        else:
            self.h36m_regressor = None

    @classmethod
    def from_config(cls, cfg: BodyConfig) -> "SmplxBodyModel":
        model_file = resolve_model_file(cfg.model, cfg.model_path, cfg.gender)
        return cls(cfg.model, model_file, cfg.gender, cfg.num_betas, cfg.h36m_regressor_path)

    def _fit_betas(self, betas: torch.Tensor | None, batch: int, like: torch.Tensor
                   ) -> torch.Tensor:
        if betas is None:
            return like.new_zeros(batch, self.num_betas)
        if betas.shape[1] > self.num_betas:
            raise ValueError(f"betas has {betas.shape[1]} coefficients but the {self.kind} model "
                             f"uses {self.num_betas} (body.num_betas / the model file)")
        # Fewer coefficients than the model: the missing ones are zero (the mean shape).
        return torch.nn.functional.pad(betas, (0, self.num_betas - betas.shape[1]))

    def _pose(self, rotmats, betas, need_vertices):
        batch = rotmats.shape[0]
        dtype = self.joint_shapedirs.dtype
        betas = self._fit_betas(betas, batch, rotmats).to(dtype)
        if not need_vertices:
            rest = self.rest_joints + torch.einsum("bk,jck->bjc", betas, self.joint_shapedirs)
            joints, _ = forward_kinematics(rotmats, rest.to(rotmats.dtype), SMPL_PARENTS)
            return joints, None
        from smplx.lbs import lbs
        full = rotmats.to(dtype)
        if self.kind == "smplh":
            flat_hands = torch.eye(3, dtype=dtype, device=full.device).expand(batch, 30, 3, 3)
            full = torch.cat([full[:, :22], flat_hands], dim=1)
        layer = self.layer
        vertices, joints = lbs(betas, full, layer.v_template, layer.shapedirs, layer.posedirs,
                               layer.J_regressor, layer.parents, layer.lbs_weights,
                               pose2rot=False)
        return joints[:, self._body_index].to(rotmats.dtype), vertices.to(rotmats.dtype)

    def uses_regressor(self, name: str) -> bool:
        return name in ("h36m17", "lsp14") and self.h36m_regressor is not None

    def _joint_set_from_vertices(self, name, vertices):
        if not self.uses_regressor(name):
            return None
        h36m = torch.einsum("jv,bvc->bjc", self.h36m_regressor.to(vertices.dtype), vertices)
        if name == "h36m17":
            return h36m
        return h36m[:, list(H36M17_TO_LSP14)]

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, file={self.model_file!r}, num_betas={self.num_betas}, "
                f"h36m_regressor={self.h36m_regressor is not None}")
