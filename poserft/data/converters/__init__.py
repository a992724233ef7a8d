"""Real-dataset converters: raw files in each dataset's own layout -> HDF5 split files.

One module per source. Each exposes a *builder*
``build(source, raw_dir, splits, body, cfg) -> {split: SplitArrays}`` that reads and
checks everything in memory; :func:`convert` (the stage entry point) runs the builder,
adds the common attributes and writes every split with ``h5io.write_split``. Because all
reading and checking happens before the first write, a malformed input (missing key,
wrong shape) raises :class:`~poserft.data.converters.common.ConversionError` naming the file
and field and leaves no output behind.

This package ``__init__`` stays import-light (no numpy/torch/h5py at import time) because
the Snakefile imports ``poserft.data.converters.config`` while parsing; the registry is
built on first access of ``CONVERTERS``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CONVERTERS", "convert", "BUILDER_MODULES"]

# dataset name -> "module:function" of its builder
BUILDER_MODULES: dict[str, str] = {
    "amass": "poserft.data.converters.amass:build_amass",
    "posescript": "poserft.data.converters.posescript:build_posescript",
    "pw3d": "poserft.data.converters.pw3d:build_pw3d",
    "h36m": "poserft.data.converters.spin_npz:build_spin_npz",
    "mpi_inf_3dhp": "poserft.data.converters.spin_npz:build_spin_npz",
    "coco_eft": "poserft.data.converters.eft:build_eft",
    "mpii_eft": "poserft.data.converters.eft:build_eft",
    "bedlam_script": "poserft.data.converters.bedlam_script:build_bedlam_script",
    "llava_instruct": "poserft.data.converters.llava:build_llava",
}


def _load_registry() -> dict[str, Any]:
    registry = {}
    for name, target in BUILDER_MODULES.items():
        module, func = target.split(":")
        registry[name] = getattr(importlib.import_module(module), func)
    return registry


def __getattr__(name: str) -> Any:
    if name == "CONVERTERS":
        registry = _load_registry()
        globals()["CONVERTERS"] = registry
        return registry
    if name == "convert":
        from poserft.data.converters.run import convert as _convert
        globals()["convert"] = _convert
        return _convert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
