"""Images of a split file: person boxes, HMR-style crops, resizing, worker-safe loading.

A split holds its images either in the file (``/images`` (N,H,W,3) uint8: person crops
already, the synthetic world) or as files on disk (``/image_paths`` (N,) str: full frames of
the real datasets; absolute, or relative to the split file's folder). The person in a full
frame is ``/meta/bbox_center`` (N,2) + ``/meta/bbox_scale`` (N,) (SPIN: a square box of side
``200 * scale`` px) or, failing that, the extent of ``/keypoints2d`` (N,24,2) enlarged 1.2x.

:class:`SplitImages` is the one path from a row to the uint8 (H,W,3) image a model sees
(evaluation and the training DataLoaders share it):

    decode (PIL, RGB) -> :func:`crop_person` (square, black outside the frame) -> :class:`Resizer`

The :class:`Resizer` is PIL bilinear to ``size`` x ``size`` (the evaluator's historical
path, kept bit-identical), or a Hugging Face image processor's own resize + centre crop
(its ``size``, ``crop_size``, ``resample``) without its normalisation: the vision tower
normalises itself, and uint8 is 4x smaller than float32 to send from a worker.

A missing, unreadable or truncated image file is an :class:`ImageLoadError` naming the
split file, the row, the image and the fix (``on_error="fail"``, the default and what
evaluation uses), or a skipped row counted in :attr:`SplitImages.skipped`
(``on_error="skip"``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from poserft.data.h5io import SplitReader

__all__ = ["person_boxes", "crop_person", "Resizer", "ImageLoadError", "image_load_error",
           "SplitImages"]

log = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
_LOGGED_SKIPS = 5          # warnings per process for skipped images; the rest are only counted
# What PIL raises for an unreadable file: UnidentifiedImageError and "image file is
# truncated" are OSErrors; broken headers surface as SyntaxError/ValueError/EOFError.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------- boxes --
def person_boxes(reader, idx: np.ndarray) -> np.ndarray | None:
    """(n,4) square person boxes ``x0, y0, x1, y1`` (pixels) for full-frame images: the
    SPIN-style box (``/meta/bbox_center``, side ``200 * /meta/bbox_scale``) when the split has
    it, else the extent of ``/keypoints2d`` enlarged 1.2x; None when neither exists."""
    if reader.has("meta/bbox_center") and reader.has("meta/bbox_scale"):
        centre = np.asarray(reader.read("meta/bbox_center", idx), dtype=np.float64)
        half = 100.0 * np.asarray(reader.read("meta/bbox_scale", idx), dtype=np.float64)
    elif reader.has("keypoints2d"):
        kp = np.asarray(reader.keypoints2d(idx), dtype=np.float64)
        lo, hi = np.nanmin(kp, axis=1), np.nanmax(kp, axis=1)
        centre, half = (lo + hi) / 2, 0.6 * (hi - lo).max(axis=1)
    else:
        return None
    return np.stack([centre[:, 0] - half, centre[:, 1] - half,
                     centre[:, 0] + half, centre[:, 1] + half], axis=1)


def _pixel_box(box) -> tuple[int, int, int, int]:
    """Float box -> whole pixels, each edge rounded on its own (Python's round, as PIL's
    ``Image.crop`` of the evaluator always did, so crops stay bit-identical; a square float
    box can come out one pixel off square)."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return x0, y0, x1, y1


def _usable(box) -> bool:
    """Whether a float box gives a non-empty crop."""
    if not np.isfinite(box).all():
        return False
    x0, y0, x1, y1 = _pixel_box(box)
    return x1 > x0 and y1 > y0


def crop_person(image: np.ndarray, box) -> np.ndarray:
    """(H,W,3) uint8 image, box ``(x0, y0, x1, y1)`` (pixels, may reach outside the frame)
    -> (y1-y0, x1-x0, 3) uint8 crop, edges rounded to whole pixels; pixels outside the frame
    are black (HMR-style: the person keeps their place and scale in the crop). No resize."""
    x0, y0, x1, y1 = _pixel_box(box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop_person: empty box {tuple(box)}")
    h, w = image.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], dtype=image.dtype)
    # The overlap of the box and the frame, in frame and in crop coordinates.
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if fx1 > fx0 and fy1 > fy0:
        out[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0] = image[fy0:fy1, fx0:fx1]
    return out


# -------------------------------------------------------------------------- resizing --
def _load_processor(name: str):
    """A Hugging Face image processor from a local folder or the local HF cache, PIL
    backend (numpy in, numpy out, same on every machine whether torchvision is installed
    or not; no torch threads inside DataLoader workers)."""
    try:
        from transformers import AutoImageProcessor
        proc = AutoImageProcessor.from_pretrained(name, local_files_only=True, backend="pil")
    except Exception as exc:   # noqa: BLE001 - any failure here has the same fix
        reason = " ".join(str(exc).split())[:300]
        raise ValueError(
            f"image processor {name!r} cannot be loaded ({type(exc).__name__}: {reason}). "
            "The Hugging Face hub is not reachable from here: give a local folder holding its "
            "preprocessor_config.json, or download it beforehand on a machine with network "
            f"(`huggingface-cli download {name}` with the same HF_HOME), or set the loader's "
            "image_processor to null for a plain bilinear resize") from None
    if getattr(proc, "backend", "pil") != "pil":
        raise ValueError(f"image processor {name!r} ({type(proc).__name__}) has no PIL backend; "
                         "use a processor with one or image_processor: null")
    return proc


class Resizer:
    """Person crop (h,w,3) uint8 -> the model's input image (H,W,3) uint8.

    ``processor=None``: PIL bilinear to ``size`` x ``size``. Otherwise ``processor`` names a
    Hugging Face image processor (checkpoint name in the local cache, or a local folder),
    loaded with ``local_files_only=True``; its own ``resize`` (``size``, ``resample``) and
    ``center_crop`` (``crop_size``, when ``do_center_crop``) make the image, e.g. CLIP
    ViT-L/14-336: shortest edge 336 then a 336 x 336 centre crop, bicubic; a ViTPose-style
    ``{"height": 256, "width": 192}`` gives 256 x 192. ``size`` is ignored then. No rescale
    or normalisation: the model does that.

    Picklable: the processor object is not pickled but reloaded from ``processor`` on first
    use in the new process (a DataLoader worker).
    """

    def __init__(self, processor: str | os.PathLike | None, size: int | None = None):
        if processor is None and not size:
            raise ValueError("Resizer: give a size (PIL bilinear) or an image processor")
        self.processor = None if processor is None else str(processor)
        self.size = None if size is None else int(size)
        self._proc = _load_processor(self.processor) if self.processor else None  # fail now

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"] = None
        return state

    def __repr__(self) -> str:
        return f"Resizer(processor={self.processor!r}, size={self.size})"

    @property
    def proc(self):
        """The Hugging Face processor (None for the PIL path), loaded in this process."""
        if self._proc is None and self.processor:
            self._proc = _load_processor(self.processor)
        return self._proc

    @property
    def output_shape(self) -> tuple[int, int] | None:
        """(H, W) of every output, or None when it depends on the input's aspect ratio (a
        processor with a shortest-edge resize and no centre crop)."""
        if self.processor is None:
            return (self.size, self.size)
        p = self.proc
        if getattr(p, "do_center_crop", False) and p.crop_size is not None:
            return (int(p.crop_size.height), int(p.crop_size.width))
        if getattr(p, "do_resize", True) and p.size is not None and p.size.height and p.size.width:
            return (int(p.size.height), int(p.size.width))
        return None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(h,w,3) uint8 -> (H,W,3) uint8."""
        if self.processor is None:
            # np.array, not asarray: a PIL-backed array is read-only, which torch warns about.
            return np.array(Image.fromarray(image).resize((self.size, self.size),
                                                          Image.BILINEAR))
        p = self.proc
        chw = np.moveaxis(np.asarray(image), -1, 0)        # the PIL backend works channel-first
        if getattr(p, "do_resize", True):
            chw = p.resize(chw, p.size, resample=p.resample)
        if getattr(p, "do_center_crop", False):
            chw = p.center_crop(chw, p.crop_size)
        return np.ascontiguousarray(np.moveaxis(chw, 0, -1)).astype(np.uint8, copy=False)


# --------------------------------------------------------------------------- errors --
class ImageLoadError(ValueError):
    """An image file of a split that cannot be used (missing, unreadable, truncated).

    Constructed from the whole message (one string), so that a DataLoader worker's error
    re-raises in the main process as this type; :func:`image_load_error` writes it.
    """


def _dataset_name(split: Path) -> str | None:
    from poserft.data.converters.config import DATASET_NAMES
    name = split.parent.name                  # data/{dataset}/{split}.h5
    return name if name in DATASET_NAMES else None


def image_load_error(split: str | os.PathLike, row: int, image: str, reason: str,
                     stage: str | None = None) -> ImageLoadError:
    """The error for one bad image: ``<split>: row <row>: image <path>: <reason>; <fix>``.
    ``stage`` (e.g. ``"sft.loader"``): the config section whose ``on_bad_image: skip``
    would drop such rows; None (evaluation) leaves that hint out."""
    split = Path(split)
    name = _dataset_name(split)
    fix = (f"check datasets.{name or '<dataset>'}.image_root (the folder the converter joined "
           "to the image names) and re-run the converter (`snakemake --forcerun "
           f"convert_{name or '<dataset>'}`)")
    if stage:
        fix += f", or set {stage}.on_bad_image: skip to drop such rows"
    return ImageLoadError(f"{split}: row {int(row)}: image {image}: {reason}; fix: {fix}")


# --------------------------------------------------------------------------- splits --
class SplitImages:
    """Row -> uint8 (H,W,3) image of one split file, for evaluation and DataLoader workers.

    reader_or_path: a :class:`SplitReader` or the split file's path.
    size: output side for the PIL bilinear resize (None: no resize, crops as cut).
    processor: a Hugging Face image processor (see :class:`Resizer`); overrides ``size``.
    on_error: ``"fail"`` (raise :class:`ImageLoadError`) or ``"skip"`` (``load`` returns
        None, ``skipped`` counts it, the first few are logged) for a bad image file.
    stage: the config section named in the error's ``on_bad_image: skip`` hint.
    key: the dataset of paths: ``image_paths`` (one per pose row, person-cropped) or
        ``vqa/image_paths`` (one per question of a VQA-only file such as LLaVA-Instruct;
        whole images, no person box).

    In-file ``/images`` are returned as stored when they already have the output shape
    (exact bytes), else resized the same way; ``/image_paths`` are decoded, cropped to
    :func:`person_boxes` (when the split has boxes) and resized. Relative paths resolve
    against the split file's folder, then the working directory (the converters write
    ``<raw_dir>/<name>/...`` relative to the workflow's root).

    Worker-safe: pickling keeps the path and the plain config; the HDF5 handle and the
    processor are reopened in each process. ``skipped`` counts this process's skips (each
    DataLoader worker counts its own).
    """

    def __init__(self, reader_or_path: SplitReader | str | os.PathLike, size: int | None,
                 processor: str | None = None, on_error: str = "fail", *,
                 stage: str | None = None, key: str = "image_paths"):
        if on_error not in ON_ERROR:
            raise ValueError(f"SplitImages: on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.reader = (reader_or_path if isinstance(reader_or_path, SplitReader)
                       else SplitReader(reader_or_path))
        self.size, self.processor, self.on_error, self.stage = size, processor, on_error, stage
        self.key = key
        self.resizer = Resizer(processor, size) if (processor or size) else None
        self.skipped = 0

    def __repr__(self) -> str:
        return (f"SplitImages({str(self.reader.path)!r}, size={self.size}, "
                f"processor={self.processor!r}, on_error={self.on_error!r})")

    def __len__(self) -> int:
        return self.reader.num_poses

    @property
    def path(self) -> Path:
        return self.reader.path

    @property
    def available(self) -> bool:
        """Whether the split has images at all (/images or /image_paths)."""
        return self.reader.has("images") or self.reader.has("image_paths")

    # -- public
    def load(self, row: int) -> np.ndarray | None:
        """(H,W,3) uint8 image of pose row ``row``; None for a skipped bad file."""
        return self._load_rows(np.asarray([int(row)], dtype=np.int64))[0]

    def load_many(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """-> (images (n,H,W,3) uint8, ok (n,) bool); rows not ok (skipped) are black."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.reader.has("images") and self.key == "image_paths":           # in-file crops: one read, no per-row copies
            return self._stored(rows), np.ones(len(rows), dtype=bool)
        images = self._load_rows(rows)
        ok = np.array([im is not None for im in images], dtype=bool)
        good = [im for im in images if im is not None]
        shapes = {im.shape for im in good}
        if len(shapes) > 1:
            raise ValueError(f"{self.path}: images of rows {rows.tolist()} have different shapes "
                             f"{sorted(shapes)}; give SplitImages a size or a processor")
        if shapes:
            shape = shapes.pop()
        else:                                   # nothing loaded: the shape it would have had
            hw = self.resizer.output_shape if self.resizer is not None else None
            shape = (hw or (0, 0)) + (3,)
        out = np.zeros((len(rows),) + shape, dtype=np.uint8)
        for i, im in enumerate(images):
            if im is not None:
                out[i] = im
        return out, ok

    # -- pieces
    def _load_rows(self, rows: np.ndarray) -> list[np.ndarray | None]:
        r = self.reader
        if self.key != "image_paths":           # VQA-only files: whole images by question
            return [self._from_file(int(row), name, None)
                    for row, name in zip(rows, r.read(self.key, rows))]
        if r.has("images"):
            return list(self._stored(rows))
        if not r.has("image_paths"):
            raise ValueError(f"{self.path}: no /images or /image_paths; image->pose needs one "
                             "(re-run the converter with images)")
        names = r.read("image_paths", rows)
        boxes = person_boxes(r, rows)
        return [self._from_file(int(row), names[i], None if boxes is None else boxes[i])
                for i, row in enumerate(rows)]

    def _stored(self, rows: np.ndarray) -> np.ndarray:
        """In-file crops (n,H,W,3): as stored when they have the output shape already."""
        images = np.asarray(self.reader.images(rows))
        if self.resizer is None or self.resizer.output_shape == images.shape[1:3]:
            return images
        return np.stack([self.resizer(im) for im in images]).astype(np.uint8)

    def _resolve(self, name: Any) -> Path:
        """Absolute, else relative to the split's folder, else to the working directory."""
        path = Path(name.decode() if isinstance(name, bytes) else str(name))
        if path.is_absolute():
            return path
        beside = self.path.parent / path
        return beside if beside.is_file() or not path.is_file() else path

    def _missing_reason(self, name: Any) -> str:
        name = name.decode() if isinstance(name, bytes) else str(name)
        if Path(name).is_absolute():
            return "file does not exist"
        return (f"file does not exist (relative name {name!r}, looked for in the split's folder "
                f"{self.path.parent} and in the working directory {Path.cwd()})")

    def _from_file(self, row: int, name: Any, box: np.ndarray | None) -> np.ndarray | None:
        path = self._resolve(name)
        if not path.is_file():
            return self._bad(row, path, self._missing_reason(name))
        if box is not None and not _usable(box):   # e.g. a zero bbox_scale: a bad row too
            return self._bad(row, path, f"no usable person box {np.round(box, 2).tolist()}")
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))       # decodes the whole file
        except _DECODE_ERRORS as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return self._bad(row, path, f"cannot be decoded ({type(exc).__name__}: {reason})")
        if box is not None:
            image = crop_person(image, box)
        if self.resizer is not None:
            return self.resizer(image)
        return image if image.flags.writeable else image.copy()

    def _bad(self, row: int, path: Path, reason: str) -> None:
        if self.on_error == "fail":
            raise image_load_error(self.path, row, str(path), reason, self.stage)
        self.skipped += 1
        if self.skipped <= _LOGGED_SKIPS:
            log.warning("skipping a bad image (on_bad_image: skip): %s%s",
                        image_load_error(self.path, row, str(path), reason),
                        "" if self.skipped < _LOGGED_SKIPS else
                        " (further skipped images are counted, not logged)")
        return None
