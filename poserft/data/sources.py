"""Which split files a training stage reads: the sources of its ``data`` mapping.

A stage's config names its sources with weights (``retrieval.data``, ``sft.data``,
``rft.data``: :func:`poserft.data.config.data_option`); the workflow hands the stage the
split files of those sources. :func:`resolve_sources` checks that the files given match the
config and puts them in config order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

__all__ = ["resolve_sources"]


def resolve_sources(split_paths: Mapping, data: Mapping[str, float], where: str
                    ) -> dict[str, tuple[float, dict[str, Path]]]:
    """``{source: (weight, {split: path})}`` from a stage's ``split_paths`` and ``data``.

    ``split_paths`` is either one source's ``{"train": path, "val": path}`` (then ``data``
    must name exactly one source: the embedded default's ``{synthetic: 1.0}``) or
    ``{source: {"train": path, ...}}`` with the sources of ``data``.
    """
    if not split_paths:
        raise ValueError(f"{where}: split_paths is empty; give the 'train' split of each source")
    flat = all(isinstance(v, (str, os.PathLike)) for v in split_paths.values())
    if flat:
        if len(data) != 1:
            raise ValueError(f"{where}: split_paths {sorted(split_paths)} is one source's splits "
                             f"but the config's data names {len(data)} sources {sorted(data)}; "
                             "pass {source: {split: path}}")
        split_paths = {next(iter(data)): split_paths}
    missing, extra = sorted(set(data) - set(split_paths)), sorted(set(split_paths) - set(data))
    if missing or extra:
        raise ValueError(f"{where}: the files given ({sorted(split_paths)}) do not match the "
                         f"config's data sources ({sorted(data)}): missing {missing}, extra {extra}")
    out = {}
    for name in data:                     # config order: the order of the sources
        splits = {k: Path(v) for k, v in split_paths[name].items() if v}
        if "train" not in splits:
            raise ValueError(f"{where}: split_paths needs a 'train' entry for source {name!r}, "
                             f"got {sorted(splits)}")
        out[name] = (float(data[name]), splits)
    return out
