"""poserft.data.images: person boxes, crops, resizers (PIL, HF processors), bad files, workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poserft.data.h5io import SplitReader, write_split
from poserft.data.images import (ImageLoadError, Resizer, SplitImages, crop_person,
                                 person_boxes)

ATTRS = {"source": "unit", "split": "test", "body_model": "skeleton", "converter_params": {}}
W, H = 64, 48                                          # full-frame size (pixels)


def _frame(seed: int) -> np.ndarray:
    """(H,W,3) uint8 full frame: noise background, a red "person" at x 20..44, y 8..40."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
    frame[8:40, 20:44] = (230, 20, 20)
    return frame


def _write_frames(folder: Path, n: int) -> list[np.ndarray]:
    """``folder/frames/f{i}.{jpg|png}``: even rows JPEG, odd rows PNG; returns the frames as
    decoded (JPEG is lossy)."""
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(n):
        p = folder / "frames" / f"f{i}.{'jpg' if i % 2 == 0 else 'png'}"
        Image.fromarray(_frame(i)).save(p, **({"quality": 95} if i % 2 == 0 else {}))
        with Image.open(p) as im:
            frames.append(np.asarray(im.convert("RGB")))
    return frames


def _names(n: int) -> list[str]:
    return [f"frames/f{i}.{'jpg' if i % 2 == 0 else 'png'}" for i in range(n)]


def _split(path: Path, n: int, extra: dict) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"poses/global_orient": np.zeros((n, 3), np.float32),
              "poses/body_pose": (rng.normal(size=(n, 23, 3)) * 0.2).astype(np.float32),
              "poses/betas": np.zeros((n, 10), np.float32),
              "joints": np.zeros((n, 24, 3), np.float32), **extra}
    return write_split(path, arrays, ATTRS)


def _box_split(root: Path, n: int = 4, names=None, centre=(32.0, 24.0), scale=0.2) -> Path:
    """Split with /image_paths (relative to its folder) and SPIN boxes (side 200*scale)."""
    return _split(root / "test.h5", n, {
        "image_paths": names or _names(n),
        "meta/bbox_center": np.tile(np.asarray(centre, np.float64), (n, 1)),
        "meta/bbox_scale": np.full(n, scale)})


def _old_runner_read(split: Path, rows, size: int) -> np.ndarray:
    """The evaluator's loader before poserft.data.images (the reference for bit-identity)."""
    with SplitReader(split) as reader:
        boxes = person_boxes(reader, np.asarray(rows))
        out = []
        for i, p in enumerate(reader.read("image_paths", np.asarray(rows))):
            path = Path(str(p))
            if not path.is_absolute() and not path.is_file():
                path = reader.path.parent / path
            with Image.open(path) as im:
                im = im.convert("RGB")
                if boxes is not None:
                    im = im.crop(tuple(int(round(v)) for v in boxes[i]))
                out.append(np.asarray(im.resize((size, size), Image.BILINEAR)))
    return np.stack(out).astype(np.uint8)


# ------------------------------------------------------------------------------ crops --
def test_crop_geometry_partly_outside_the_frame_is_black():
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)     # H=6, W=8
    crop = crop_person(image, (-2, -1, 3, 4))                          # 5 x 5 box
    assert crop.shape == (5, 5, 3) and crop.dtype == np.uint8
    # By hand: crop pixel (r, c) is frame pixel (r - 1, c - 2) where that is in the frame.
    want = np.zeros((5, 5, 3), np.uint8)
    want[1:5, 2:5] = image[0:4, 0:3]
    np.testing.assert_array_equal(crop, want)
    # Box past the bottom-right corner; float edges round on their own (2.4 -> 2, 9.6 -> 10).
    crop = crop_person(image, (5.6, 2.4, 9.6, 6.4))
    want = np.zeros((4, 4, 3), np.uint8)
    want[0:4, 0:2] = image[2:6, 6:8]
    np.testing.assert_array_equal(crop, want)
    assert not crop_person(image, (20, 20, 24, 24)).any()                # wholly outside: black
    with pytest.raises(ValueError, match="empty box"):
        crop_person(image, (3, 3, 3, 5))


@pytest.mark.parametrize("box", [(-7.3, -4.6, 30.2, 32.9), (10.5, 3.5, 31.5, 24.5),
                                 (50.1, 30.7, 80.4, 61.0), (0, 0, 64, 48)])
def test_crop_matches_pil_crop(box):
    """PIL's Image.crop (what the evaluator used) pads with black the same way."""
    frame = _frame(3)
    want = np.asarray(Image.fromarray(frame).crop(tuple(int(round(v)) for v in box)))
    np.testing.assert_array_equal(crop_person(frame, box), want)


# ------------------------------------------------------------------------------ boxes --
def test_person_boxes_from_bbox_or_keypoints(tmp_path):
    n = 3
    kp = np.random.default_rng(1).uniform(25, 35, (n, 24, 2))
    kp[:, 0], kp[:, 1] = (20, 8), (44, 40)                  # extent: 24 x 32 px, centre (32, 24)
    base = {"image_paths": _names(n), "keypoints2d": kp.astype(np.float32)}
    with SplitReader(_split(tmp_path / "kp.h5", n, base)) as r:
        np.testing.assert_allclose(person_boxes(r, np.arange(n)),
                                   np.tile([12.8, 4.8, 51.2, 43.2], (n, 1)), atol=1e-4)  # 1.2 x 32
    box = {**base, "meta/bbox_center": np.tile([30.0, 20.0], (n, 1)),
           "meta/bbox_scale": np.full(n, 0.1)}                # wins over keypoints: side 20
    with SplitReader(_split(tmp_path / "box.h5", n, box)) as r:
        np.testing.assert_allclose(person_boxes(r, np.array([2, 0])),
                                   np.tile([20.0, 10.0, 40.0, 30.0], (2, 1)))
    with SplitReader(_split(tmp_path / "none.h5", n, {"image_paths": _names(n)})) as r:
        assert person_boxes(r, np.arange(n)) is None


# ------------------------------------------------------------------------ split images --
def test_paths_relative_to_the_split_file_crop_and_resize(tmp_path, monkeypatch):
    root = tmp_path / "data" / "pw3d"
    frames = _write_frames(root, 4)
    split = _box_split(root, 4, centre=(32.0, 24.0), scale=0.4)      # 80 px box around a 64x48 frame
    monkeypatch.chdir(tmp_path)                # the names are not relative to the working dir
    images = SplitImages(split, None)
    assert images.available and len(images) == 4
    crop = images.load(1)
    want = np.zeros((80, 80, 3), np.uint8)
    want[16:64, 8:72] = frames[1]                              # box (-8, -16, 72, 64)
    np.testing.assert_array_equal(crop, want)
    # Resized (PIL bilinear): bit-identical to the evaluator's old loader.
    got, ok = SplitImages(split, 16).load_many([3, 0, 2])
    assert got.shape == (3, 16, 16, 3) and got.dtype == np.uint8 and ok.all()
    np.testing.assert_array_equal(got, _old_runner_read(split, [3, 0, 2], 16))


def test_absolute_paths_and_no_boxes(tmp_path):
    frames = _write_frames(tmp_path, 2)
    names = [str(tmp_path / n) for n in _names(2)]
    split = _split(tmp_path / "elsewhere" / "test.h5", 2, {"image_paths": names})
    np.testing.assert_array_equal(SplitImages(split, None).load(0), frames[0])   # whole frame
    assert SplitImages(split, 20).load(1).shape == (20, 20, 3)


def test_in_file_images_kept_exactly_or_resized(tmp_path):
    stored = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    split = _split(tmp_path / "s.h5", 3, {"images": stored})
    for size in (None, 16):
        got, ok = SplitImages(split, size).load_many([2, 0])
        assert ok.all() and got.tobytes() == stored[[2, 0]].tobytes()
    small = SplitImages(split, 8).load(1)
    np.testing.assert_array_equal(
        small, np.asarray(Image.fromarray(stored[1]).resize((8, 8), Image.BILINEAR)))


def test_split_without_images(tmp_path):
    split = _split(tmp_path / "s.h5", 2, {})
    images = SplitImages(split, 16)
    assert not images.available
    with pytest.raises(ValueError, match="no /images or /image_paths"):
        images.load(0)


# ---------------------------------------------------------------- HF image processors --
def _normalise(image: np.ndarray, proc) -> np.ndarray:
    """uint8 (H,W,3) -> (3,H,W) float the way the processor rescales and normalises."""
    x = image.astype(np.float64) / 255.0
    x = (x - np.asarray(proc.image_mean)) / np.asarray(proc.image_std)
    return np.moveaxis(x, -1, 0)


def test_clip_processor_resize_matches_the_processor(tmp_path):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(tmp_path / "clip")
    resizer = Resizer(str(tmp_path / "clip"), size=999)          # the processor decides the size
    assert resizer.output_shape == (32, 32)
    crop = crop_person(_frame(5), (14.2, 2.7, 50.9, 47.3))        # 37 x 44 px, not square
    out = resizer(crop)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    want = proc(images=crop, return_tensors="np")["pixel_values"][0]
    assert np.abs(_normalise(out, proc) - want).max() < 1.5 / 255 / min(proc.image_std)
    # Through a split (and a pickled copy that reloads the processor).
    root = tmp_path / "data" / "h36m"
    _write_frames(root, 2)
    images = SplitImages(_box_split(root, 2), None, processor=str(tmp_path / "clip"))
    again = pickle.loads(pickle.dumps(images))
    assert again.resizer._proc is None                            # not pickled, reloaded
    np.testing.assert_array_equal(again.load(0), images.load(0))
    assert images.load(0).shape == (32, 32, 3)


def test_vitpose_style_height_width_processor(tmp_path):
    from transformers import ViTImageProcessor

    proc = ViTImageProcessor(size={"height": 64, "width": 48})
    proc.save_pretrained(tmp_path / "vit")
    resizer = Resizer(tmp_path / "vit")
    assert resizer.output_shape == (64, 48)
    crop = crop_person(_frame(6), (0, 0, 40, 40))
    out = resizer(crop)
    assert out.shape == (64, 48, 3)
    want = proc(images=crop, return_tensors="np")["pixel_values"][0]
    assert np.abs(_normalise(out, proc) - want).max() < 1.5 / 255 / min(proc.image_std)


def test_missing_processor_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)nowhere.*preprocessor_config\.json"):
        Resizer(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------- bad images --
def _bad_split(root: Path) -> Path:
    """Rows 0..3: good JPEG, missing JPEG, good JPEG, truncated JPEG (its first half)."""
    _write_frames(root, 3)                     # f0.jpg, f1.png, f2.jpg; no f1.jpg
    data = (root / "frames" / "f0.jpg").read_bytes()
    (root / "frames" / "f3.jpg").write_bytes(data[: len(data) // 2])
    names = ["frames/f0.jpg", "frames/f1.jpg", "frames/f2.jpg", "frames/f3.jpg"]
    return _box_split(root, 4, names=names)


@pytest.mark.parametrize("row,image,reason", [(1, "f1.jpg", "does not exist"),
                                              (3, "f3.jpg", "truncated")])
def test_bad_file_fails_naming_split_row_image_and_fix(tmp_path, row, image, reason):
    split = _bad_split(tmp_path / "data" / "pw3d")
    images = SplitImages(split, 16, stage="sft.loader")
    with pytest.raises(ImageLoadError) as info:
        images.load(row)
    msg = str(info.value)
    assert str(split) in msg and f"row {row}" in msg and image in msg and reason in msg
    assert "datasets.pw3d.image_root" in msg and "sft.loader.on_bad_image: skip" in msg
    with pytest.raises(ImageLoadError, match=f"row {row}"):       # load_many fails the same way
        images.load_many([0, row])
    assert isinstance(info.value, ValueError)


def test_skip_mode_returns_none_and_counts(tmp_path, caplog):
    split = _bad_split(tmp_path / "data" / "pw3d")
    images = SplitImages(split, 16, on_error="skip")
    assert images.load(1) is None and images.skipped == 1
    got, ok = images.load_many([0, 1, 2, 3])
    assert ok.tolist() == [True, False, True, False] and images.skipped == 3
    assert got.shape == (4, 16, 16, 3) and not got[1].any() and not got[3].any()
    np.testing.assert_array_equal(got[[0, 2]], SplitImages(split, 16).load_many([0, 2])[0])
    assert "f3.jpg" in caplog.text
    none, ok = images.load_many([1])
    assert none.shape == (1, 16, 16, 3) and not ok.any()
    with pytest.raises(ValueError, match="on_error"):
        SplitImages(split, 16, on_error="ignore")


# ---------------------------------------------------------------------------- workers --
class _Rows:
    """A map-style dataset over the rows of a SplitImages (what a training loader wraps)."""

    def __init__(self, images: SplitImages, n: int):
        self.images, self.n = images, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images.load(i)


def _collect(dataset, workers: int) -> np.ndarray:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=3, num_workers=workers, shuffle=False)
    return np.concatenate([b.numpy() for b in loader])


def test_dataloader_workers_give_the_same_bytes(tmp_path):
    root = tmp_path / "data" / "coco"
    _write_frames(root, 8)
    images = SplitImages(_box_split(root, 8, centre=(30.0, 22.0), scale=0.3), 24)
    with images.reader:
        images.load(0)                           # an open h5py handle must not travel
        serial = _collect(_Rows(images, 8), 0)
        parallel = _collect(_Rows(pickle.loads(pickle.dumps(images)), 8), 2)
    assert serial.shape == (8, 24, 24, 3) and serial.dtype == np.uint8
    assert serial.tobytes() == parallel.tobytes()


def test_worker_error_keeps_its_type(tmp_path):
    split = _bad_split(tmp_path / "data" / "pw3d")
    with pytest.raises(ImageLoadError, match="row 1"):
        _collect(_Rows(SplitImages(split, 16), 4), 2)
