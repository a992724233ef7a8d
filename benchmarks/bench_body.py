"""Benchmark: forward kinematics + MPJPE + PA-MPJPE on many poses (CPU).

Prints poses/s for each stage of the vectorised path (``poserft.body`` skeleton model and
``poserft.eval.metrics``) and for a naive per-sample numpy loop (the baseline, run on a
subset in the same process), with the ratio, and checks both give the same numbers.

    .venv/bin/python benchmarks/bench_body.py [--n 100000] [--baseline-n 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from poserft.body import NEUTRAL_REST_JOINTS, SMPL_PARENTS, load, smpl_to_rotmats
from poserft.body.kinematics import JOINT_SETS
from poserft.eval.metrics import mpjpe, pa_mpjpe

LSP = list(JOINT_SETS["lsp14"].from_smpl24)


def _best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _rodrigues(v: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(v)
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def naive_sample(aa: np.ndarray, gt: np.ndarray, rest: np.ndarray) -> tuple[float, float]:
    """One pose: (24,3) axis-angle, (14,3) gt LSP joints -> (MPJPE, PA-MPJPE) in mm."""
    world = [None] * 24
    joints = np.zeros((24, 3))
    for j, p in enumerate(SMPL_PARENTS):
        local = np.eye(4)
        local[:3, :3] = _rodrigues(aa[j])
        local[:3, 3] = rest[j] - (rest[p] if p >= 0 else 0.0)
        world[j] = local if p < 0 else world[p] @ local
        joints[j] = world[j][:3, 3]
    pred = joints[LSP]
    hips_p, hips_g = pred[2:4].mean(0), gt[2:4].mean(0)
    err = np.linalg.norm((pred - hips_p) - (gt - hips_g), axis=1).mean() * 1000
    x, y = pred - pred.mean(0), gt - gt.mean(0)
    u, s, vh = np.linalg.svd(x.T @ y)
    d = np.sign(np.linalg.det(u @ vh))
    rot = u @ np.diag([1, 1, d]) @ vh
    scale = (s * [1, 1, d]).sum() / (x ** 2).sum()
    pa = np.linalg.norm(scale * x @ rot - y, axis=1).mean() * 1000
    return err, pa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="poses for the vectorised path")
    parser.add_argument("--baseline-n", type=int, default=2000, help="poses for the naive loop")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    aa = rng.normal(scale=0.4, size=(args.n, 24, 3)).astype(np.float32)
    aa_gt = aa + rng.normal(scale=0.1, size=aa.shape).astype(np.float32)
    model = load(None)
    go, bp = torch.from_numpy(aa[:, 0]), torch.from_numpy(aa[:, 1:])
    with torch.no_grad():
        gt = model(torch.from_numpy(aa_gt[:, 0]), torch.from_numpy(aa_gt[:, 1:]))[:, LSP]
        rotmats = smpl_to_rotmats(go, bp)
        t_rot, _ = _best_time(lambda: smpl_to_rotmats(go, bp), args.repeats)
        t_fk, joints = _best_time(lambda: model.forward_rotmats(rotmats), args.repeats)
        pred = joints[:, LSP]
        t_mpjpe, err = _best_time(lambda: mpjpe(pred, gt, root=(2, 3)), args.repeats)
        t_pa, pa = _best_time(lambda: pa_mpjpe(pred, gt), args.repeats)
    total = t_rot + t_fk + t_mpjpe + t_pa

    sub = min(args.baseline_n, args.n)
    rest = np.array(NEUTRAL_REST_JOINTS, dtype=np.float32).astype(np.float64)
    gt_np = gt.numpy().astype(np.float64)
    start = time.perf_counter()
    naive = np.array([naive_sample(aa[i].astype(np.float64), gt_np[i], rest) for i in range(sub)])
    t_naive = time.perf_counter() - start
    max_diff = max(np.abs(naive[:, 0] - err[:sub].numpy()).max(),
                   np.abs(naive[:, 1] - pa[:sub].numpy()).max())

    print(f"device: CPU, torch threads: {torch.get_num_threads()}, poses: {args.n}, "
          f"best of {args.repeats}")
    rows = [("axis-angle -> rotmats", t_rot), ("forward kinematics (24 joints)", t_fk),
            ("MPJPE (LSP-14, hip-aligned)", t_mpjpe), ("PA-MPJPE (LSP-14)", t_pa),
            ("total", total)]
    for name, seconds in rows:
        print(f"  {name:32s} {seconds:8.3f} s  {args.n / seconds:12,.0f} poses/s")
    naive_rate = sub / t_naive
    print(f"  naive numpy per-sample loop      {t_naive:8.3f} s  {naive_rate:12,.0f} poses/s "
          f"({sub} poses)")
    speedup = args.n / total / naive_rate
    print(f"speed-up of the vectorised path over the naive loop: {speedup:.1f}x")
    print(f"max |vectorised - naive| on the subset: {max_diff:.2e} mm "
          f"(mean MPJPE {float(err.mean()):.1f} mm, PA-MPJPE {float(pa.mean()):.1f} mm)")


if __name__ == "__main__":
    main()
