"""The ``body`` config section: which body model turns poses into joints.

Stdlib-only (imported by the Snakefile at parse time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from poserft.configbase import ConfigError, Section, option

__all__ = ["BodyConfig"]

_NAMES = {"smpl": "SMPL", "smplh": "SMPL-H"}
_DOWNLOAD = {"smpl": "https://smpl.is.tue.mpg.de", "smplh": "https://mano.is.tue.mpg.de"}
_EXPECTED = {"smpl": "SMPL_{g}.pkl", "smplh": "SMPLH_{g}.pkl or .npz"}   # smpl.py's names


def _relative_note(path: str) -> str:
    """Where a relative path was looked up: the Snakefile parse and the jobs run in the
    working directory, which is not always the config file's folder."""
    return "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"


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
        path = None if self.model == "skeleton" else os.path.expanduser(self.model_path)
        if path is not None and not os.path.exists(path):
            rel = _relative_note(path)
            files = _EXPECTED[self.model].format(g=self.gender.upper())
            raise ConfigError(
                f"{where}.model_path: {self.model_path} does not exist{rel}; download the "
                f"{_NAMES[self.model]} model files from {_DOWNLOAD[self.model]} and set "
                f"{where}.model_path to the file or to the folder holding {files}, or set "
                f"{where}.model: skeleton (no files needed)")
        if self.model == "skeleton" and self.h36m_regressor_path:
            raise ConfigError(
                f"{where}.h36m_regressor_path: a vertex regressor needs a mesh model; set "
                f"{where}.model to 'smpl' or 'smplh' (with {where}.model_path) or drop the "
                f"regressor path.")
        # checked here, not when evaluation first loads the body model hours into a run
        regressor = self.h36m_regressor_path and os.path.expanduser(self.h36m_regressor_path)
        if regressor and not os.path.isfile(regressor):
            what = ("is a folder, not the .npy file" if os.path.isdir(regressor)
                    else f"does not exist{_relative_note(regressor)}")
            raise ConfigError(
                f"{where}.h36m_regressor_path: {self.h36m_regressor_path} {what}; get "
                f"J_regressor_h36m.npy (17 x 6890) from the SPIN / HMR2.0 data release and set "
                f"{where}.h36m_regressor_path to it, or drop {where}.h36m_regressor_path (no "
                f"H36M-17 / LSP-14 joints then)")
