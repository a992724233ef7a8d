"""The ``body`` config section: which body model turns poses into joints.

Stdlib-only (imported by the Snakefile at parse time).
"""

from __future__ import annotations

from dataclasses import dataclass

from poserft.configbase import ConfigError, Section, option

__all__ = ["BodyConfig"]


@dataclass
class BodyConfig(Section):
    """Body model: SMPL/SMPL-H via smplx when model files are configured, else a skeleton."""

    model: str = option(
        "skeleton",
        help="'skeleton': SMPL kinematic tree with a fixed neutral rest skeleton (joints only, "
             "no licensed files); 'smpl' / 'smplh': the SMPL / SMPL-H mesh model through the "
             "smplx package (needs body.model_path).",
        choices=("skeleton", "smpl", "smplh"))
    model_path: str | None = option(
        None,
        help="SMPL/SMPL-H model file (.pkl/.npz) or a folder holding SMPL_{GENDER}.pkl "
             "(smpl) / SMPLH_{GENDER}.pkl|.npz (smplh), directly or in a smpl/ or smplh/ "
             "subfolder. Download from https://smpl.is.tue.mpg.de (SMPL) or "
             "https://mano.is.tue.mpg.de (SMPL-H).")
    gender: str = option("neutral", help="Gender of the SMPL/SMPL-H model file.",
                         choices=("neutral", "male", "female"))
    num_betas: int = option(10, help="Number of shape coefficients used by the mesh model "
                                     "(the skeleton model ignores betas).",
                            minimum=1, maximum=300)
    h36m_regressor_path: str | None = option(
        None,
        help="Optional J_regressor_h36m.npy (17 x 6890) applied to the mesh vertices to get "
             "the H36M-17 joints (and LSP-14 from them). Needs a mesh model (smpl/smplh).")

    def check(self, where: str) -> None:
        if self.model != "skeleton" and not self.model_path:
            raise ConfigError(
                f"{where}.model_path: required when {where}.model is '{self.model}'. Set it to "
                f"the folder holding the {self.model.upper()} model files, or set "
                f"{where}.model: skeleton.")
        if self.model == "skeleton" and self.h36m_regressor_path:
            raise ConfigError(
                f"{where}.h36m_regressor_path: a vertex regressor needs a mesh model; set "
                f"{where}.model to 'smpl' or 'smplh' (with {where}.model_path) or drop the "
                f"regressor path.")
