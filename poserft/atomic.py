"""Atomic output files: write to a temp file in the target folder, then ``os.replace``.

A reader (or Snakemake, after a crash) never sees a half-written table, JSON or PNG.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "write_text", "write_json"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path``, on error it is removed.

    ``suffix`` (default: ``path``'s own) keeps writers that infer the format from the
    extension (matplotlib, numpy) working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                               suffix=suffix if suffix is not None else path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = False) -> Path:
    """JSON with sorted keys. NaN/inf are refused unless ``allow_nan`` (they are not JSON,
    but Python's json reads them back: fine for training summaries, not for results)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=allow_nan) + "\n"
    return write_text(path, text)
