"""HDF5 split files: schema, atomic writer, lazy reader, validator.

One file holds one split of one dataset (``data/{dataset}/{split}.h5``). Layout (N poses,
M captions, Q VQA pairs; see docs/interfaces.md)::

    /poses/global_orient (N,3) f32      axis-angle, dataset frame
    /poses/body_pose     (N,23,3) f32   SMPL joints 1..23
    /poses/betas         (N,10) f32
    /poses/transl        (N,3) f32      optional
    /joints              (N,24,3) f32   metres
    /captions/text       (M,) str       optional group (text + pose_index together)
    /captions/pose_index (M,) int64
    /images              (N,H,W,3) u8   optional
    /image_paths         (N,) str       optional
    /keypoints2d         (N,24,2) f32   optional, pixels
    /camera/K,R,t        (N,3,3),(N,3,3),(N,3)  optional group, world->camera
    /image_pose/global_orient (N,3) f32 optional, root orientation in the camera frame
    /vqa/question, /vqa/answer (Q,) str, /vqa/pose_index (Q,) int64   optional group
    /vqa/image_paths (Q,) str, /vqa/conversation_index (Q,) int64  VQA-only files (N = 0)
    /meta/*              free-form extras whose first axis is N (e.g. archetype labels)
    attrs: schema_version, source, split, body_model, converter_params (JSON string)

The writer checks the arrays against this schema *before* touching the disk, then writes
a temp file in the target folder and ``os.replace``-s it, so a reader never sees a partial
file; :func:`write_splits` does the same for several splits as one unit (all replaced, or
none touched). :class:`SplitReader` validates a file once when it is opened (schema, row
counts, shapes, finite floats; cached per file version in the process) and opens the HDF5
handle lazily in the process that first reads it (DataLoader workers each get their own
handle; no handle is pickled). Every error about a file on disk is a one-line
:class:`DataValidationError` naming the file, the dataset, the row where one applies, and
how to regenerate the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import h5py
import numpy as np

from poserft.atomic import apply_umask

__all__ = ["SCHEMA_VERSION", "SCHEMA", "REQUIRED_KEYS", "KEY_GROUPS", "REQUIRED_ATTRS",
           "DataValidationError", "write_split", "write_splits", "SplitReader",
           "validate_split"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class _Spec:
    axis: str            # which length the first axis must equal: "N", "M" or "Q"
    trailing: tuple      # trailing shape; None = any size
    kind: str            # "float" | "index" | "uint8" | "str"


SCHEMA: dict[str, _Spec] = {
    "poses/global_orient": _Spec("N", (3,), "float"),
    "poses/body_pose": _Spec("N", (23, 3), "float"),
    "poses/betas": _Spec("N", (10,), "float"),
    "poses/transl": _Spec("N", (3,), "float"),
    "joints": _Spec("N", (24, 3), "float"),
    "captions/text": _Spec("M", (), "str"),
    "captions/pose_index": _Spec("M", (), "index"),
    "images": _Spec("N", (None, None, 3), "uint8"),
    "image_paths": _Spec("N", (), "str"),
    "keypoints2d": _Spec("N", (24, 2), "float"),
    "camera/K": _Spec("N", (3, 3), "float"),
    "camera/R": _Spec("N", (3, 3), "float"),
    "camera/t": _Spec("N", (3,), "float"),
    "image_pose/global_orient": _Spec("N", (3,), "float"),
    "vqa/question": _Spec("Q", (), "str"),
    "vqa/answer": _Spec("Q", (), "str"),
    "vqa/pose_index": _Spec("Q", (), "index"),        # optional: VQA-only files have no poses
    "vqa/image_paths": _Spec("Q", (), "str"),         # VQA-only files (LLaVA-Instruct): image per row
    "vqa/conversation_index": _Spec("Q", (), "index"),  # rows of one multi-turn conversation
}
REQUIRED_KEYS = ("poses/global_orient", "poses/body_pose", "poses/betas", "joints")
# Keys that only make sense together: either all present or none.
KEY_GROUPS = (("captions/text", "captions/pose_index"),
              ("camera/K", "camera/R", "camera/t"),
              ("vqa/question", "vqa/answer"))
# Which index dataset points into the pose rows.
_POSE_INDEX_KEYS = ("captions/pose_index", "vqa/pose_index")
REQUIRED_ATTRS = ("schema_version", "source", "split", "body_model", "converter_params")
_META_PREFIX = "meta/"
_CHECK_BLOCK_ROWS = 4096          # rows read at a time when scanning for NaN / bad indices
_CHUNK_TARGET_BYTES = 256 * 1024  # small chunks: DataLoaders read single rows at random


class DataValidationError(ValueError):
    """A split file (or the arrays about to be written) violates the schema.

    ``file``, ``dataset`` and ``problem`` are kept as attributes; the message names all three.
    """

    def __init__(self, file: str | os.PathLike, dataset: str, problem: str):
        self.file, self.dataset, self.problem = str(file), dataset, problem
        super().__init__(f"{self.file}: '{dataset}': {problem}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _regenerate_hint(path: str | os.PathLike, source: str | None = None) -> str:
    """How to rebuild split file ``path`` (written by dataset/synthesizer ``source``)."""
    from poserft.data.converters.config import DATASET_NAMES
    for name in (source, Path(path).parent.name):
        if name == "synthetic":
            return "regenerate it: `snakemake --forcerun synthesize` (or delete it and rerun)"
        if name in DATASET_NAMES:
            return (f"regenerate it: `snakemake --forcerun convert_{name}` (or delete it and "
                    "rerun)")
    return ("regenerate it: delete it and rerun the step that wrote it (`snakemake --forcerun "
            "convert_<dataset>` for data/<dataset>/*.h5, `synthesize` for data/synthetic/*.h5)")


# ----------------------------------------------------------------------------- checks

def _is_string_array(a: Any) -> bool:
    if isinstance(a, h5py.Dataset):
        return h5py.check_string_dtype(a.dtype) is not None
    return a.dtype.kind in "OUS"


def _kind_ok(a: Any, kind: str) -> bool:
    if kind == "str":
        return _is_string_array(a)
    if _is_string_array(a):
        return False
    k = a.dtype.kind
    return {"float": k == "f", "index": k in "iu", "uint8": a.dtype == np.uint8}[kind]


def _row_blocks(n: int) -> Iterable[slice]:
    for start in range(0, n, _CHECK_BLOCK_ROWS):
        yield slice(start, min(n, start + _CHECK_BLOCK_ROWS))


def _check_attrs(attrs: Mapping[str, Any], label: str) -> None:
    for name in REQUIRED_ATTRS:
        if name not in attrs:
            raise DataValidationError(label, f"attrs.{name}", "required file attribute is missing")
    version = attrs["schema_version"]
    if isinstance(version, np.generic):
        version = version.item()
    if not isinstance(version, int) or version != SCHEMA_VERSION:
        raise DataValidationError(
            label, "attrs.schema_version",
            f"schema version {version!r} != {SCHEMA_VERSION}, the version this code reads and "
            "writes")
    for name in ("source", "split", "body_model", "converter_params"):
        if not isinstance(attrs[name], str):
            raise DataValidationError(label, f"attrs.{name}",
                                      f"must be a string, got {type(attrs[name]).__name__}")
    try:
        json.loads(attrs["converter_params"])
    except json.JSONDecodeError as exc:
        raise DataValidationError(label, "attrs.converter_params",
                                  f"not valid JSON ({exc})") from None


def _read_block(a: Any, rows: slice, label: str, key: str) -> np.ndarray:
    try:
        return np.asarray(a[rows])
    except OSError as exc:   # h5py: a truncated / corrupt file can open but not be read
        raise DataValidationError(label, key, f"rows {rows.start}..{rows.stop - 1} cannot be "
                                  f"read, the file is truncated or corrupt ({_one_line(exc)})"
                                  ) from None


def _check_tree(items: Mapping[str, Any], label: str) -> dict[str, int]:
    """Check datasets (h5py Datasets or numpy arrays keyed by path) against SCHEMA.

    Returns the lengths ``{"N": .., "M": .., "Q": ..}``; raises DataValidationError.
    """
    for key in items:
        if key not in SCHEMA and not key.startswith(_META_PREFIX):
            raise DataValidationError(
                label, key, f"unknown dataset; known: {sorted(SCHEMA)} or '{_META_PREFIX}*'")
    for key in REQUIRED_KEYS:
        if key not in items:
            raise DataValidationError(label, key, "required dataset is missing")
    for group in KEY_GROUPS:
        present = [k for k in group if k in items]
        if present and len(present) != len(group):
            missing = sorted(set(group) - set(present))
            raise DataValidationError(label, missing[0],
                                      f"missing; {present} require all of {list(group)}")

    lengths = {"N": int(items["poses/global_orient"].shape[0]) if
               items["poses/global_orient"].ndim else -1}
    for key, spec in SCHEMA.items():
        if key not in items:
            continue
        a = items[key]
        if not _kind_ok(a, spec.kind):
            raise DataValidationError(label, key, f"dtype {a.dtype} is not of kind '{spec.kind}'")
        if a.ndim != 1 + len(spec.trailing) or any(
                want is not None and got != want for got, want in zip(a.shape[1:], spec.trailing)):
            want = "(" + ", ".join([spec.axis] + ["*" if t is None else str(t)
                                                  for t in spec.trailing]) + ")"
            raise DataValidationError(label, key, f"shape {tuple(a.shape)} != expected {want}")
        expected = lengths.setdefault(spec.axis, int(a.shape[0]))
        if a.shape[0] != expected:
            raise DataValidationError(
                label, key, f"has {a.shape[0]} rows but other '{spec.axis}'-sized datasets have "
                f"{expected}")
    n = lengths["N"]
    for key in items:
        if key.startswith(_META_PREFIX) and (items[key].ndim == 0 or items[key].shape[0] != n):
            raise DataValidationError(label, key, f"meta datasets need first axis N={n}, "
                                      f"got shape {tuple(items[key].shape)}")

    for key, spec in SCHEMA.items():
        if key not in items or spec.kind != "float":
            continue
        for rows in _row_blocks(items[key].shape[0]):
            block = _read_block(items[key], rows, label, key)
            bad_rows = ~np.isfinite(block).reshape(len(block), -1).all(axis=1)
            if bad_rows.any():
                bad = rows.start + int(np.argmax(bad_rows))
                raise DataValidationError(label, key, f"contains NaN/inf (first at row {bad})")
    for key in _POSE_INDEX_KEYS:
        if key not in items:
            continue
        for rows in _row_blocks(items[key].shape[0]):
            block = _read_block(items[key], rows, label, key)
            out = (block < 0) | (block >= n)
            if out.any():
                row = rows.start + int(np.argmax(out))
                raise DataValidationError(
                    label, key, f"pose index {int(block[row - rows.start])} at row {row} is "
                    f"out of range [0, {n})")
    return {k: v for k, v in lengths.items()}


def validate_split(path: str | os.PathLike, *, require_attrs: bool = True) -> dict[str, int]:
    """Check a split file against the schema; return ``{"N":…, "M":…, "Q":…}`` lengths.

    Raises a one-line DataValidationError naming the file, the dataset (or
    ``attrs.<name>``), the problem (missing key, wrong shape/dtype, NaN/inf with its first
    row, schema version, pose index range, truncated/unreadable file) and how to
    regenerate the file. ``require_attrs=False`` (what readers use) checks the file
    attributes only when the file has any of them (write_split always writes them all), so
    a hand-made file holding just the datasets can still be read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(path, "/", f"file does not exist; {_regenerate_hint(path)}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataValidationError(path, "/", f"not a readable HDF5 file, probably truncated or "
                                  f"corrupt ({_one_line(exc)}); {_regenerate_hint(path)}") from None
    with f:
        source = None
        try:
            attrs = dict(f.attrs)
            source = attrs.get("source") if isinstance(attrs.get("source"), str) else None
            if require_attrs or any(name in attrs for name in REQUIRED_ATTRS):
                _check_attrs(attrs, str(path))
            items: dict[str, h5py.Dataset] = {}
            f.visititems(lambda name, obj: items.__setitem__(name, obj)
                         if isinstance(obj, h5py.Dataset) else None)
            return _check_tree(items, str(path))
        except DataValidationError as err:
            raise DataValidationError(err.file, err.dataset, f"{err.problem}; "
                                      f"{_regenerate_hint(path, source)}") from None
        except OSError as exc:  # attribute / group metadata unreadable
            raise DataValidationError(path, "/", f"cannot be read, probably truncated or corrupt "
                                      f"({_one_line(exc)}); {_regenerate_hint(path, source)}"
                                      ) from None


# Files already validated in this process: (path, device, inode, size, mtime) -> lengths.
_VALIDATED: dict[tuple, dict[str, int]] = {}


def _validate_once(path: Path) -> dict[str, int]:
    """:func:`validate_split`, skipped when this very file version passed before."""
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _VALIDATED:
        _VALIDATED[key] = validate_split(path, require_attrs=False)
    return dict(_VALIDATED[key])


# ----------------------------------------------------------------------------- writing

def _flatten(arrays: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in arrays.items():
        full = f"{prefix}{str(key).strip('/')}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, full + "/"))
        else:
            out[full] = value
    return out


def _as_array(key: str, value: Any, label: str) -> np.ndarray:
    """Numpy array with the storage dtype of ``key`` (f32, int64, uint8, or object str)."""
    spec = SCHEMA.get(key)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and (
            len(value) > 0 or (spec is not None and spec.kind == "str")):
        return np.array(list(value), dtype=object)
    a = np.asarray(value)
    if a.dtype.kind in "US":
        return a.astype(str).astype(object)
    if a.dtype.kind == "O":
        if not all(isinstance(v, str) for v in a.ravel()):
            raise DataValidationError(label, key, "object array must contain only str")
        return a
    if spec is None:
        return a
    if spec.kind == "float" and a.dtype.kind in "fiu":
        return a.astype(np.float32, copy=False)
    if spec.kind == "index" and a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    return a  # wrong kinds are reported by _check_tree with the key name


def _chunks(a: np.ndarray) -> tuple | None:
    if a.shape[0] == 0:
        return None
    row_bytes = 16 if a.dtype.kind == "O" else max(1, a[:1].nbytes)
    rows = int(max(1, min(a.shape[0], 4096, _CHUNK_TARGET_BYTES // row_bytes)))
    return (rows,) + a.shape[1:]


def _prepare(path: str | os.PathLike, arrays: Mapping[str, Any], attrs: Mapping[str, Any]
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Storage arrays and attributes for ``path``, checked against the schema (no disk I/O)."""
    label = str(path)
    flat = _flatten(arrays)
    data = {key: _as_array(key, value, label) for key, value in flat.items()}
    attrs = dict(attrs)
    attrs.setdefault("schema_version", SCHEMA_VERSION)
    if not isinstance(attrs.get("converter_params", ""), str):
        attrs["converter_params"] = json.dumps(attrs["converter_params"], sort_keys=True,
                                               default=str)
    attrs.setdefault("converter_params", "{}")
    _check_attrs(attrs, label)
    _check_tree(data, label)
    return data, attrs


def _write_temp(path: Path, data: Mapping[str, np.ndarray], attrs: Mapping[str, Any],
                compression: str) -> str:
    """Write a temp file next to ``path`` (mode ``0o666 & ~umask``); return its name.

    The temp file is removed if writing fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp_name, "w") as f:
            for name, value in attrs.items():
                f.attrs[name] = value
            for key, a in data.items():
                kw: dict[str, Any] = {}
                if a.shape and a.shape[0] > 0:
                    kw = {"chunks": _chunks(a), "compression": compression,
                          "shuffle": a.dtype.kind != "O"}
                    if compression == "gzip":
                        kw["compression_opts"] = 4
                if a.dtype.kind == "O":
                    f.create_dataset(key, data=a, dtype=h5py.string_dtype("utf-8"), **kw)
                else:
                    f.create_dataset(key, data=a, **kw)
        apply_umask(tmp_name)   # mkstemp made it 0600
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_name)
        raise
    return tmp_name


def _check_compression(compression: str) -> None:
    if compression not in ("gzip", "lzf"):
        raise ValueError(f"write_split: compression must be 'gzip' or 'lzf', got {compression!r}")


def write_split(path: str | os.PathLike, arrays: Mapping[str, Any], attrs: Mapping[str, Any],
                *, compression: str = "gzip") -> Path:
    """Validate ``arrays`` and write them atomically to ``path``.

    arrays: ``{"poses/global_orient": (N,3), …}`` (slash keys, or nested dicts) of numpy
        arrays / lists of str. Floats are stored as float32, indices as int64, strings as
        variable-length UTF-8.
    attrs: ``source``, ``split``, ``body_model`` (str) and ``converter_params`` (dict, or a
        JSON string); ``schema_version`` is added (if given it must equal SCHEMA_VERSION).
    compression: "gzip" (portable) or "lzf" (faster, h5py-only).
    Nothing is left at ``path`` (nor a temp file) if validation or writing fails; the file
    gets the mode a plain ``open()`` would give (``0o666 & ~umask``).
    """
    path = Path(path)
    _check_compression(compression)
    data, attrs = _prepare(path, arrays, attrs)
    tmp_name = _write_temp(path, data, attrs, compression)
    try:
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_name)
        raise
    return path


def _backup(path: Path) -> str | None:
    """A hard link (or copy) of an existing ``path`` next to it; None if there is no file."""
    if not path.is_file():
        return None
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".bak", dir=path.parent)
    os.close(fd)
    os.remove(name)
    try:
        os.link(path, name)
    except OSError:                      # file systems without hard links
        shutil.copy2(path, name)
    return name


def write_splits(jobs: Mapping[str | os.PathLike, tuple[Mapping[str, Any], Mapping[str, Any]]],
                 *, compression: str = "gzip") -> list[Path]:
    """Write several split files as one unit: ``{path: (arrays, attrs)}`` (see write_split).

    Every split is validated, then written to a temp file next to its target; only when
    all of them are written are the targets replaced (the previous files are kept as hard
    links until then and put back if a replace fails). So a failure anywhere leaves every
    target exactly as it was, the previous good files included, and no temp file behind.
    Files get the mode a plain ``open()`` would give (``0o666 & ~umask``).
    """
    _check_compression(compression)
    prepared = [(Path(path), *_prepare(path, arrays, attrs))
                for path, (arrays, attrs) in jobs.items()]
    temps: list[str] = []
    backups: list[tuple[Path, str | None]] = []     # targets already replaced
    try:
        for path, data, attrs in prepared:
            temps.append(_write_temp(path, data, attrs, compression))
        for (path, _, _), tmp_name in zip(prepared, temps):
            backup = _backup(path)
            try:
                os.replace(tmp_name, path)
            except BaseException:
                if backup is not None:           # ``path`` still is the previous file
                    os.remove(backup)
                raise
            backups.append((path, backup))
    except BaseException:
        for path, backup in reversed(backups):       # put the previous files back
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, path)
                elif path.exists():
                    path.unlink()
        for name in temps:
            with contextlib.suppress(FileNotFoundError):
                os.remove(name)
        raise
    for _, backup in backups:
        if backup is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(backup)
    return [path for path, _, _ in prepared]


# ----------------------------------------------------------------------------- reading

Index = int | slice | np.ndarray | list | None


def _take(ds: h5py.Dataset, index: Index, label: str) -> Any:
    """``ds[index]`` with numpy semantics for negative ints and unsorted/repeated arrays."""
    n = ds.shape[0]
    strings = h5py.check_string_dtype(ds.dtype) is not None
    src = ds.asstr() if strings else ds
    if index is None:
        return src[()]
    if isinstance(index, slice):
        return src[index]
    if isinstance(index, (int, np.integer)):
        i = int(index) + (n if index < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"{label}: '{ds.name}': index {int(index)} out of range for {n} rows")
        return src[i]
    idx = np.asarray(index)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"{label}: '{ds.name}': indices out of range for {n} rows")
    # h5py fancy indexing needs strictly increasing indices: read unique rows, then scatter.
    uniq, inverse = np.unique(idx.ravel(), return_inverse=True)
    rows = src[uniq] if uniq.size else np.empty((0,) + ds.shape[1:], dtype=object if strings
                                                  else ds.dtype)
    return np.asarray(rows)[inverse].reshape(idx.shape + tuple(ds.shape[1:]))


class SplitReader:
    """Lazy, fork/pickle-safe reader of one split file, validated when it is opened.

    ``validate`` (default True): check the file with :func:`validate_split` in the
    constructor (required datasets, row counts, shapes and dtypes, finite float datasets,
    pose index ranges, the schema version; attributes only if the file has any; uint8
    images are not scanned), so a bad file fails here with a one-line DataValidationError
    naming the file, the dataset, the first bad row and the fix, rather than deep inside a
    training step. A file version (path, inode, size, mtime) that passed once is not
    re-checked in the same process; DataLoader workers inherit the check. Pass
    ``validate=False`` only for a file that is being inspected or repaired.

    The h5py handle is opened on first access in the current process (per DataLoader
    worker) and is never pickled. Index arguments accept an int, slice, int/bool array or
    None (everything).
    """

    def __init__(self, path: str | os.PathLike, *, validate: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: split file does not exist (run the rule that "
                                    "produces it, e.g. `snakemake data/synthetic/train.h5`)")
        self.lengths: dict[str, int] | None = _validate_once(self.path) if validate else None
        self._file: h5py.File | None = None
        self._pid: int | None = None

    # -- handle management
    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise DataValidationError(
                    self.path, "/", f"not a readable HDF5 file, probably truncated or corrupt "
                    f"({_one_line(exc)}); {_regenerate_hint(self.path)}") from None
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __enter__(self) -> "SplitReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    def __repr__(self) -> str:
        return f"SplitReader({str(self.path)!r})"

    # -- generic access
    def has(self, key: str) -> bool:
        return key.strip("/") in self.file

    def keys(self) -> list[str]:
        names: list[str] = []
        self.file.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        return sorted(names)

    def read(self, key: str, index: Index = None) -> Any:
        key = key.strip("/")
        if key not in self.file:
            raise KeyError(f"{self.path}: dataset '{key}' is not in this file "
                           f"(has: {self.keys()})")
        try:
            return _take(self.file[key], index, str(self.path))
        except OSError as exc:   # only with validate=False, or a file changed after opening
            raise DataValidationError(
                self.path, key, f"cannot be read, the file is truncated or corrupt "
                f"({_one_line(exc)}); {_regenerate_hint(self.path)}") from None

    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes; ``converter_params`` is decoded from JSON."""
        out = {k: (v.item() if isinstance(v, np.generic) else v)
               for k, v in self.file.attrs.items()}
        if isinstance(out.get("converter_params"), str):
            out["converter_params"] = json.loads(out["converter_params"])
        return out

    # -- sizes
    @property
    def num_poses(self) -> int:
        return int(self.file["poses/global_orient"].shape[0])

    @property
    def num_captions(self) -> int:
        return int(self.file["captions/text"].shape[0]) if self.has("captions/text") else 0

    @property
    def num_vqa(self) -> int:
        return int(self.file["vqa/question"].shape[0]) if self.has("vqa/question") else 0

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        return tuple(self.file["images"].shape[1:]) if self.has("images") else None

    # -- typed access
    def poses(self, index: Index = None) -> dict[str, np.ndarray]:
        """``{"global_orient" (…,3), "body_pose" (…,23,3), "betas" (…,10)}`` plus
        ``"transl" (…,3)`` when stored."""
        names = ["global_orient", "body_pose", "betas"] + (["transl"] if self.has("poses/transl")
                                                           else [])
        return {name: self.read(f"poses/{name}", index) for name in names}

    def joints(self, index: Index = None) -> np.ndarray:
        return self.read("joints", index)

    def captions(self, index: Index = None) -> Any:
        """Caption text(s): a str for an int index, else an object array of str."""
        return self.read("captions/text", index)

    def caption_pose_index(self, index: Index = None) -> Any:
        return self.read("captions/pose_index", index)

    def images(self, index: Index = None) -> np.ndarray:
        return self.read("images", index)

    def keypoints2d(self, index: Index = None) -> np.ndarray:
        return self.read("keypoints2d", index)

    def camera(self, index: Index = None) -> dict[str, np.ndarray]:
        return {name: self.read(f"camera/{name}", index) for name in ("K", "R", "t")}

    def image_global_orient(self, index: Index = None) -> np.ndarray:
        return self.read("image_pose/global_orient", index)

    def vqa(self, index: Index = None) -> dict[str, Any]:
        return {name: self.read(f"vqa/{name}", index)
                for name in ("question", "answer", "pose_index")}
