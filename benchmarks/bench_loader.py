"""Benchmark: image loading for training (decode + person crop + resize) through a DataLoader.

Writes ``--n`` synthetic full-frame JPEGs (640x480, a drawn stick figure on a noisy
background) and a split file with /image_paths and SPIN boxes, then times
``poserft.data.images.SplitImages`` rows -> batches of uint8 images through a
``torch.utils.data.DataLoader`` (batch ``--batch-size``) with each worker count of
``--workers``. Prints images/s for each and the ratio to the first (the 0-worker
baseline, measured in the same run), and checks every worker count gives the same bytes.
Each pass builds a new DataLoader, so worker start-up is included.

    .venv/bin/python benchmarks/bench_loader.py [--n 256] [--size 336] [--processor DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from poserft.data.h5io import write_split
from poserft.data.images import SplitImages

FRAME_W, FRAME_H = 640, 480


def _frame(rng: np.random.Generator) -> tuple[Image.Image, tuple[float, float], float]:
    """A noisy 640x480 frame with a stick figure; -> (image, box centre (x,y), SPIN scale)."""
    noise = rng.integers(0, 90, (FRAME_H // 8, FRAME_W // 8, 3), dtype=np.uint8)
    im = Image.fromarray(noise).resize((FRAME_W, FRAME_H), Image.BILINEAR)  # JPEG-like texture
    height = rng.uniform(180, 380)                      # the figure's height in pixels
    cx = rng.uniform(0.3, 0.7) * FRAME_W
    top = rng.uniform(10, FRAME_H - height - 10)
    u = height / 8                                      # head height
    draw = ImageDraw.Draw(im)
    colour = tuple(int(c) for c in rng.integers(120, 256, 3))
    draw.ellipse([cx - u / 2, top, cx + u / 2, top + u], fill=colour)
    neck, hip = (cx, top + u), (cx, top + 4 * u)
    width = max(2, int(u / 4))
    draw.line([neck, hip], fill=colour, width=width)                          # torso
    for s in (-1, 1):
        draw.line([(cx, top + 1.5 * u), (cx + s * 1.5 * u, top + 3.5 * u)], fill=colour, width=width)
        draw.line([hip, (cx + s * u, top + 8 * u)], fill=colour, width=width)
    return im, (cx, top + 4 * u), 1.2 * height / 200


def write_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """``root/frames/*.jpg`` + ``root/test.h5`` (relative /image_paths, SPIN boxes)."""
    rng = np.random.default_rng(seed)
    (root / "frames").mkdir(parents=True, exist_ok=True)
    names, centres, scales = [], [], []
    for i in range(n):
        im, centre, scale = _frame(rng)
        im.save(root / "frames" / f"{i:05d}.jpg", quality=90)
        names.append(f"frames/{i:05d}.jpg")
        centres.append(centre)
        scales.append(scale)
    arrays = {"poses/global_orient": np.zeros((n, 3), np.float32),
              "poses/body_pose": np.zeros((n, 23, 3), np.float32),
              "poses/betas": np.zeros((n, 10), np.float32),
              "joints": np.zeros((n, 24, 3), np.float32),
              "image_paths": names, "meta/bbox_center": np.asarray(centres, np.float64),
              "meta/bbox_scale": np.asarray(scales, np.float64)}
    return write_split(root / "test.h5", arrays, {"source": "bench", "split": "test",
                                                  "body_model": "skeleton",
                                                  "converter_params": {"n": n}})


class Rows(torch.utils.data.Dataset):
    """Row i -> (H,W,3) uint8 image (what a training dataset does per example)."""

    def __init__(self, images: SplitImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images.load(i)


def one_pass(images: SplitImages, workers: int, batch_size: int) -> tuple[float, np.ndarray]:
    """-> (seconds, all images (n,H,W,3)) for one pass over the split with a new loader."""
    start = time.perf_counter()
    loader = DataLoader(Rows(images), batch_size=batch_size, num_workers=workers,
                        shuffle=False)
    batches = [b.numpy() for b in loader]
    return time.perf_counter() - start, np.concatenate(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256, help="images (640x480 JPEG) to write")
    parser.add_argument("--size", type=int, default=336, help="output side (PIL bilinear)")
    parser.add_argument("--processor", default=None,
                        help="Hugging Face image processor folder (its resize + centre crop)")
    parser.add_argument("--workers", default="0,2",
                        help="comma-separated DataLoader worker counts; the first is the baseline")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many passes")
    parser.add_argument("--dir", default=None, help="write the images here (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = Path(args.dir or tmp)
        start = time.perf_counter()
        split = write_dataset(root, args.n)
        print(f"wrote {args.n} JPEGs {FRAME_W}x{FRAME_H} + {split.name} in "
              f"{time.perf_counter() - start:.1f} s")
        images = SplitImages(split, args.size, processor=args.processor)
        what = (f"processor {args.processor}" if args.processor else
                f"PIL bilinear {args.size}x{args.size}")
        print(f"decode + crop + resize ({what}), batch {args.batch_size}, best of "
              f"{args.repeats}, CPU cores: {os.cpu_count()}, torch threads: "
              f"{torch.get_num_threads()}")
        base_rate, base_out = None, None
        for w in workers:
            best, out = float("inf"), None
            for _ in range(args.repeats):
                seconds, out = one_pass(images, w, args.batch_size)
                best = min(best, seconds)
            rate = args.n / best
            base_rate = base_rate or rate
            same = "same bytes" if base_out is None or out.tobytes() == base_out.tobytes() \
                else "DIFFERENT BYTES"
            base_out = out if base_out is None else base_out
            print(f"  num_workers={w}: {best:7.2f} s  {rate:8.1f} images/s  "
                  f"{rate / base_rate:5.2f}x the {workers[0]}-worker baseline  "
                  f"({same}, {tuple(out.shape[1:])})")


if __name__ == "__main__":
    main()
