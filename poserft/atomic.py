"""Atomic output files: write to a temp file in the target folder, then ``os.replace``.

A reader (or Snakemake, after a crash) never sees a half-written table, JSON or PNG.

Outputs honour the umask like a plain ``open()``/``mkdir()`` would: ``tempfile.mkstemp``
creates 0600 files, ``tempfile.mkdtemp`` 0700 folders and safetensors' ``save_file`` 0600
files, which would make results private to their creator on a shared file system;
:func:`apply_umask` gives them the usual ``0o666 & ~umask`` / ``0o777 & ~umask`` before
they are moved into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "write_text", "write_json", "apply_umask", "current_umask",
           "make_temp_dir"]


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc);
    elsewhere by the set-and-restore idiom."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, recursive: bool = False) -> Path:
    """Give ``path`` the mode a plain ``open()`` / ``mkdir()`` would have: files
    ``0o666 & ~umask``, directories ``0o777 & ~umask``. ``recursive``: also everything under
    a directory (a finished temp folder, before it is renamed into place: some writers, e.g.
    safetensors, create 0600 files). Symlinks are left alone."""
    path = Path(path)
    mask = current_umask()
    if path.is_symlink():
        return path
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if recursive and path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o666 & ~mask)
    return path


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent`` (created if needed) with the umask applied, for
    writers that fill a folder and then rename it into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    return apply_umask(tempfile.mkdtemp(prefix=prefix, dir=parent))


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
        apply_umask(tmp)            # mkstemp made it 0600
        yield Path(tmp)
        if Path(tmp).is_file():     # a writer may have recreated it (np.savez, savefig)
            apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _first_non_finite(obj: Any, where: str = "") -> tuple[str, float] | None:
    """(key path, value) of the first NaN/inf in ``obj``, in the written (sorted-key) order."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "<top level>", obj)
    if isinstance(obj, dict):
        try:
            items = sorted(obj.items())
        except TypeError:
            items = list(obj.items())
        for key, value in items:
            found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = _first_non_finite(value, f"{where}[{i}]")
            if found:
                return found
    return None


def write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = False) -> Path:
    """JSON with sorted keys. NaN/inf are refused unless ``allow_nan`` (they are not JSON,
    but Python's json reads them back: fine for training summaries, not for results); the
    error names ``path`` and the key path of the first one, and nothing is written."""
    if not allow_nan:
        found = _first_non_finite(obj)
        if found is not None:
            key, value = found
            kind = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            raise ValueError(f"{path}: {key} is {kind}; JSON results must be finite numbers: "
                             f"fix the computation that produced it (or store null for a "
                             f"value that does not exist)")
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=allow_nan) + "\n"
    return write_text(path, text)
