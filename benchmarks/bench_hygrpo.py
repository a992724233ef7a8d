"""Benchmark: one HyGRPO step vs one discrete-only GRPO step on the same prompt batch.

Both modes run the same rollout (same prompts, same sampling seed), the same rewards, the
same reference forward and ``mu`` update passes; HyGRPO adds the Gaussian log-density, the
pose KL and the continuous clipped term. Prints the median time of each part and the
ratio HyGRPO / GRPO (target <= 1.3) for the full step and for the update alone.

Scoring path (``PoseMLLM.score``): HyGRPO runs a second time with the policy and its
reference forced onto the old full path (every row's prompt+completion through the LLM)
instead of the default cached prefix (each prompt prefilled once, its KV cache expanded to
its G rows), on the same batch, timed alternately with the others; the update times of
the two and their ratio are printed (``--score-paths cached``: skip the full-path run).

    .venv/bin/python benchmarks/bench_hygrpo.py                       # embedded tiny policy
    .venv/bin/python benchmarks/bench_hygrpo.py --policy results/runs/dist/seed0/sft \\
        --split data/synthetic/train.h5 --reward-model results/retrieval/reward

Without ``--policy`` a policy of the default ``model`` section is built with a small test
tokenizer and taught the answer format for a few supervised steps (so that candidates emit
``<POSE>`` and the continuous branch has work); without ``--split`` a random split file is
written to a temp folder; without ``--reward-model`` an untrained retrieval model of the
default ``retrieval`` section scores the semantic reward (the cost is what matters here).

Rollout memory (``rft.rollout_chunk_size``): after the timing, one rollout of the same batch
(B prompts x G) per value of ``--chunk-sizes`` (default 0 = all prompts in one generate call,
and 1 = one prompt per call), each in a fresh process, reporting its peak memory: on CUDA
``torch.cuda.max_memory_allocated`` (and the part above what was allocated before the
rollout: weights, inputs), on CPU the process's peak RSS (``resource.getrusage``;
the rollout's part is the peak minus the RSS before the rollout). ``--memory-only`` skips
the timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _random_split(path: Path, n: int = 64, image_size: int = 64) -> Path:
    from poserft.body import load
    from poserft.data.h5io import write_split
    from poserft.model.testing import TEST_TEXTS

    rng = np.random.default_rng(0)
    body_pose = (rng.normal(size=(n, 23, 3)) * 0.3).astype(np.float32)
    orient = (rng.normal(size=(n, 3)) * 0.3).astype(np.float32)
    joints = load(None)(torch.as_tensor(orient), torch.as_tensor(body_pose)).numpy()
    arrays = {"poses/global_orient": orient, "poses/body_pose": body_pose,
              "poses/betas": np.zeros((n, 10), np.float32), "joints": joints,
              "images": rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8),
              "image_pose/global_orient": orient,
              "captions/text": [TEST_TEXTS[i % 3] for i in range(n)],
              "captions/pose_index": np.arange(n)}
    return write_split(path, arrays, {"source": "bench", "split": "train",
                                      "body_model": "skeleton", "converter_params": {}})


def _reward_model_dir(tmp: Path, tokenizer) -> Path:
    from poserft.retrieval.checkpoint import save_retrieval_model
    from poserft.retrieval.config import RetrievalConfig
    from poserft.retrieval.model import RetrievalArch, RetrievalModel

    arch = RetrievalArch.from_config(RetrievalConfig(), len(tokenizer), tokenizer.pad_token_id,
                                     tokenizer.bos_token_id)
    save_retrieval_model(RetrievalModel(arch, tokenizer).eval(), tmp / "reward", {"role": "reward"})
    return tmp / "reward"


def _rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux: /proc/self/clear_refs 5), so
    that getrusage's peak covers only what follows (loading transients left out)."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)       # give freed heap back first
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rollout_memory_child(args) -> None:
    """One rollout of step 0's batch with ``rollout_chunk_size = args.rollout_memory``, in
    this (fresh) process; prints one JSON line with its peak memory."""
    from poserft.eval.runner import load_policy_on, resolve_device
    from poserft.rl.rollout import PromptSampler, generate_group
    from poserft.train.data import SFTTaskData

    dev = resolve_device("auto")
    policy = load_policy_on(args.policy, dev)
    mix = {"image2pose": 0.5, "text2pose": 0.5}
    batch = PromptSampler(SFTTaskData(args.split, policy.config, mix), mix).sample(0, args.batch_size)
    gen = torch.Generator(device=dev).manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        reset = _reset_peak_rss()
        before = _rss_mb()      # after a reset: the current RSS; else the peak so far
    t0 = time.perf_counter()
    roll = generate_group(policy, batch, args.group_size, 24, 1.0, gen,
                          chunk_size=args.rollout_memory)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = _rss_mb()
    print(json.dumps({"chunk": args.rollout_memory, "device": str(dev),
                      "peak_reset": dev.type == "cuda" or reset, "before_mb": before,
                      "peak_mb": peak, "rollout_mb": peak - before,
                      "seconds": time.perf_counter() - t0, "rows": len(roll),
                      "completion_len": int(roll.completion_ids.shape[1])}))


def rollout_memory(policy_dir: Path, split: Path, args) -> list[dict]:
    """:func:`rollout_memory_child` in a fresh process per chunk size (a process's peak
    RSS cannot be reset, and a fresh CUDA context has no cached blocks)."""
    out = []
    for chunk in (int(c) for c in args.chunk_sizes.split(",")):
        cmd = [sys.executable, __file__, "--rollout-memory", str(chunk), "--policy", str(policy_dir),
               "--split", str(split), "--batch-size", str(args.batch_size),
               "--group-size", str(args.group_size), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"rollout memory child (chunk {chunk}) failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", help="SFT policy dir (load_policy); default: build the tiny default")
    ap.add_argument("--split", help="HDF5 split with images + captions; default: a random one")
    ap.add_argument("--reward-model", help="retrieval model dir for the semantic reward")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--mu", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    ap.add_argument("--teach-steps", type=int, default=40)
    ap.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                    help="model section override of the built policy (without --policy), "
                         "e.g. --model text_hidden_size=512 --model text_layers=8")
    ap.add_argument("--chunk-sizes", default="0,1",
                    help="rft.rollout_chunk_size values whose rollout peak memory is measured "
                         "(comma-separated; empty: skip)")
    ap.add_argument("--memory-only", action="store_true", help="skip the step timing")
    ap.add_argument("--score-paths", default="both", choices=("both", "cached"),
                    help="both: also time HyGRPO with score() forced onto the full path "
                         "(no shared prefix) and print the update-time ratio")
    ap.add_argument("--rollout-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rollout_memory is not None:
        rollout_memory_child(args)
        return

    from poserft.model.io import load_policy

    tmp = Path(tempfile.mkdtemp(prefix="bench_hygrpo_"))
    torch.manual_seed(0)
    split = Path(args.split) if args.split else _random_split(tmp / "train.h5")
    if args.policy:
        base = load_policy(args.policy)
        source = args.policy
    else:
        from poserft.model.config import ModelConfig
        from poserft.model.policy import build_policy
        from poserft.model.testing import make_test_tokenizer
        from poserft.train.testing import teach_answer_format
        overrides = {}
        for item in args.model:
            key, _, value = item.partition("=")
            try:
                overrides[key] = json.loads(value)
            except json.JSONDecodeError:
                overrides[key] = value
        base = build_policy(ModelConfig.from_dict(overrides, where="model"),
                            make_test_tokenizer(tmp))
        teach_answer_format(base, split, args.teach_steps)
        source = (f"model section {overrides or 'default'}, {args.teach_steps} "
                  "format-teaching steps")
    reward_dir = Path(args.reward_model) if args.reward_model else _reward_model_dir(tmp, base.tokenizer)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"policy: {source} ({n_params / 1e6:.2f} M parameters); torch threads "
          f"{torch.get_num_threads()}")
    if not args.memory_only:
        time_steps(base, split, reward_dir, tmp, args)
    if args.chunk_sizes:
        policy_dir = Path(args.policy) if args.policy else tmp / "policy"
        if not args.policy:
            from poserft.model.io import save_policy
            save_policy(base, policy_dir)
        rows = rollout_memory(policy_dir, split, args)
        print(f"rollout memory: {args.batch_size} prompts x G={args.group_size}, one fresh "
              f"process per chunk size, {rows[0]['device']}; "
              + ("torch.cuda.max_memory_allocated" if rows[0]["device"].startswith("cuda")
                 else "peak RSS (getrusage" + (", reset before the rollout)"
                                               if rows[0]["peak_reset"] else ")")))
        print(f"{'chunk':<8}{'peak (MiB)':>12}{'rollout (MiB)':>15}{'time (s)':>10}")
        for r in rows:
            print(f"{r['chunk']:<8}{r['peak_mb']:>12.1f}{r['rollout_mb']:>15.1f}{r['seconds']:>10.2f}")
        if len(rows) > 1 and rows[-1]["rollout_mb"] > 0:
            print(f"rollout memory chunk {rows[0]['chunk']} / chunk {rows[-1]['chunk']}: "
                  f"{rows[0]['rollout_mb'] / rows[-1]['rollout_mb']:.2f}x")


def time_steps(base, split: Path, reward_dir: Path, tmp: Path, args) -> None:
    """Median step time of GRPO and HyGRPO (and HyGRPO on the full scoring path) on one
    fixed batch (alternating)."""
    from poserft.rl import trainer as T
    from poserft.rl.config import RFTConfig
    from poserft.rl.rollout import PromptSampler
    from poserft.train.data import SFTTaskData
    from poserft.train.engine import TrainEngine

    # All runs are set up first and timed alternately (grpo, hygrpo, grpo, ...) so that
    # load from other processes hits them alike. "hygrpo_full": HyGRPO with score() on the
    # full path (policy and reference), the same batch and seeds.
    names = ["grpo", "hygrpo"] + (["hygrpo_full"] if args.score_paths == "both" else [])
    runs = {}
    for name in names:
        mode = name.removesuffix("_full")
        n = args.batch_size * args.group_size
        cfg = RFTConfig.from_dict(dict(
            mode=mode, batch_size=args.batch_size, group_size=args.group_size,
            micro_batch_size=n, mu=args.mu, task_weights={"image2pose": 0.5, "text2pose": 0.5},
            optim={"lr": 1e-9, "warmup_steps": 0, "min_lr_ratio": 1.0}), where="rft")
        policy = copy.deepcopy(base)
        reference = copy.deepcopy(base).requires_grad_(False)
        if name.endswith("_full"):
            policy._score_path = reference._score_path = "full"
        mix = {t: w for t, w in cfg.task_weights.items() if w > 0}
        sampler = PromptSampler(SFTTaskData(split, policy.config, mix), mix)
        ctx = T.build_reward_context(cfg, {"body_model", "semantic_model"}, reward_dir)
        engine = TrainEngine(policy, cfg.optim, cfg.engine, 10 ** 6, tmp / f"ckpt_{name}",
                             grad_accum=1, micro_batch_size=n)
        batch = sampler.sample(0, cfg.batch_size)
        T.rft_step(engine, sampler, 0, ctx, cfg, reference, batch=batch)  # warm-up
        runs[name] = (engine, sampler, ctx, cfg, reference, batch)

    parts = {m: {"step": [], "generate": [], "reward": [], "update": []} for m in runs}
    valid = {}
    for _ in range(args.repeats):
        for name, (engine, sampler, ctx, cfg, reference, batch) in runs.items():
            t0 = time.perf_counter()
            last = T.rft_step(engine, sampler, 0, ctx, cfg, reference, batch=batch)
            total = time.perf_counter() - t0
            p = parts[name]
            p["step"].append(total)
            p["generate"].append(last["time/generate_s"])
            p["reward"].append(last["time/reward_s"])
            p["update"].append(total - last["time/generate_s"] - last["time/reward_s"])
            valid[name] = last["rollout/pose_valid_frac"]
    results = {m: {k: statistics.median(v) for k, v in p.items()} for m, p in parts.items()}
    results["hygrpo"]["pose_valid_frac"] = valid["hygrpo"]

    print(f"batch: {args.batch_size} prompts x G={args.group_size}, mu={args.mu}, "
          f"median of {args.repeats}; pose_valid_frac {results['hygrpo']['pose_valid_frac']:.2f}")
    print(f"{'part':<10}{'GRPO (s)':>12}{'HyGRPO (s)':>12}{'ratio':>8}")
    for part in ("generate", "reward", "update", "step"):
        g, h = results["grpo"][part], results["hygrpo"][part]
        print(f"{part:<10}{g:>12.4f}{h:>12.4f}{h / g:>8.3f}")
    ratio = results["hygrpo"]["step"] / results["grpo"]["step"]
    print(f"HyGRPO / GRPO step time: {ratio:.3f}x (target <= 1.3x): "
          f"{'OK' if ratio <= 1.3 else 'OVER TARGET'}")
    if "hygrpo_full" in results:
        full, cached = results["hygrpo_full"], results["hygrpo"]
        print(f"HyGRPO score path, median of {args.repeats}: update full {full['update']:.4f} s, "
              f"cached prefix {cached['update']:.4f} s: full / cached "
              f"{full['update'] / cached['update']:.2f}x (step {full['step']:.4f} s vs "
              f"{cached['step']:.4f} s: {full['step'] / cached['step']:.2f}x)")


if __name__ == "__main__":
    main()
