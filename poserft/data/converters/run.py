"""The conversion stage entry point: one dataset's raw files -> its HDF5 split files."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from poserft.body.config import BodyConfig
from poserft.data.converters.common import ConversionError, SplitArrays
from poserft.data.converters.config import DatasetSource, DatasetsConfig, source_section

__all__ = ["convert"]


def _body_model_name(body_cfg: BodyConfig | None) -> str:
    return "skeleton" if body_cfg is None else body_cfg.model


def _datasets_config(name: str, cfg: Any) -> DatasetsConfig:
    """The whole ``datasets`` section from: that section, or just ``datasets.<name>`` (typed)."""
    if isinstance(cfg, DatasetSource):
        full = DatasetsConfig()
        setattr(full, name, source_section(name, cfg))
        return full
    return DatasetsConfig.expect(cfg, f"convert({name!r}): cfg")


def convert(name: str, cfg: DatasetsConfig | DatasetSource | None,
            raw_dir: str | os.PathLike, out_paths: Mapping[str, str | os.PathLike],
            body_cfg: Any = None, tracker: Any = None, *, progress: bool = True) -> dict[str, Path]:
    """Convert dataset ``name`` from ``raw_dir`` into one HDF5 file per split.

    cfg: the ``datasets`` section (DatasetsConfig) or just this dataset's (DatasetSource).
    out_paths: ``{split: path}``; every split must be configured in ``datasets.<name>.splits``.
    body_cfg: the ``body`` section (``poserft.body.load`` turns poses into ``/joints``).
    Reads and checks everything first; a malformed input raises ConversionError (naming
    file and field) before any file is written. The splits are then written as one unit
    (``h5io.write_splits``: every split to a temp file first, the targets replaced only
    once all are written), so a failure at any point leaves the previous split files
    exactly as they were, and no partial or temp file. Returns ``{split: path}``.
    """
    from poserft.body import load as load_body
    from poserft.data.converters import CONVERTERS
    from poserft.data.download import missing_files
    from poserft.data.h5io import write_splits

    if name not in CONVERTERS:
        raise ConversionError(raw_dir, "name", f"no converter for {name!r}; known: {sorted(CONVERTERS)}")
    datasets = _datasets_config(name, cfg)
    source = datasets.source(name)
    raw_dir = Path(raw_dir)
    if not out_paths:
        raise ConversionError(raw_dir, "out_paths", "no split to write")
    derivable = {"val"} if getattr(source, "val_fraction", 0) > 0 else set()
    for split in out_paths:
        if split not in source.splits and split not in derivable:
            raise ConversionError(raw_dir, f"datasets.{name}.splits",
                                  f"split {split!r} is not configured; configured: {sorted(source.splits)}")
    missing = missing_files(raw_dir, source.files)
    if missing:
        raise ConversionError(raw_dir, f"datasets.{name}.files",
                              f"missing {missing}; run the download step first (get the data "
                              f"from {source.homepage})")

    start = time.perf_counter()
    body = load_body(body_cfg)
    built: dict[str, SplitArrays] = CONVERTERS[name](source, raw_dir, list(out_paths), body,
                                                     datasets, progress=progress)
    params = {k: v for k, v in source.to_dict().items() if k not in ("sha256",)}
    jobs = {}
    for split, path in out_paths.items():
        result = built[split]
        attrs = {"source": name, "split": split, "body_model": _body_model_name(body_cfg),
                 "converter_params": {**params, **result.params}}
        jobs[path] = (result.arrays, attrs)
    write_splits(jobs)
    if tracker is not None:
        tracker.log_params({"dataset": name, "splits": ",".join(out_paths)})
        metrics = {"convert_seconds": time.perf_counter() - start}
        for split, result in built.items():
            metrics[f"{split}/n_poses"] = result.n_poses
            for key, value in result.stats.items():
                metrics[f"{split}/{key}"] = float(value)
        tracker.log_metrics(metrics)
    return {split: Path(p) for split, p in out_paths.items()}
