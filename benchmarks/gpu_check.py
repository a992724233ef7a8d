"""Helpers of benchmarks/gpu_check.sh: model size from a config, a GPU memory sampler, the
per-stage summary of a finished DAG run, and a direct rollout probe.

    python benchmarks/gpu_check.py params --config configs/gpu_smoke.yaml
    python benchmarks/gpu_check.py sample --out gpu_samples.tsv &          # until SIGTERM
    python benchmarks/gpu_check.py summary --workdir <run dir> --samples gpu_samples.tsv
    python benchmarks/gpu_check.py probe --policy <run dir>/results/runs/dist/seed0/sft/final
    python benchmarks/gpu_check.py probe --tiny --device cpu              # CPU dry run (seconds)

``params`` counts parameters from the config with the arithmetic of
:func:`poserft.model.backbone.tiny_llava_config` (tests/test_gpu_smoke_config.py checks it
against a meta-device build). ``sample`` polls ``nvidia-smi`` for per-process and whole-GPU
memory; ``summary`` joins that with the Snakemake log (job start/end) and the per-rule
benchmark files (results/benchmarks/*.tsv). ``probe`` loads a policy and times
``poserft.rl.rollout.generate_group`` (B prompts x G samples): tokens/s and
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

POSE_DIM = 144
LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------- config, size
def read_config(path: str | os.PathLike, replace: bool = True) -> dict:
    """The workflow config dict as Snakemake builds it: ``replace`` = the file alone
    (``--replace-workflow-config``); else the file merged recursively into config.yaml
    (plain ``--configfile``)."""
    import yaml

    overlay = yaml.safe_load(Path(path).read_text()) or {}
    if replace:
        return overlay
    base = yaml.safe_load((ROOT / "config.yaml").read_text()) or {}

    def update(a, b):
        for k, v in b.items():
            a[k] = update(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a
    return update(base, overlay)


def _linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def _mlp2(i: int, d: int) -> int:
    """fusion.MLPProjector / LLaVA's projector: Linear(i, d) -> GELU -> Linear(d, d)."""
    return _linear(i, d) + _linear(d, d)


def pose_encoder_params(vit_cfg) -> tuple[int, int]:
    """(parameters, token width) of the pose-aware encoder of architecture ``vit_cfg`` (a
    PoseViTConfig; its checkpoint is ignored). Small, so built on the meta device and counted."""
    import dataclasses

    import torch

    from poserft.model.vision import build_pose_vit
    cfg = dataclasses.replace(vit_cfg, checkpoint=None)
    with torch.device("meta"):
        enc = build_pose_vit(cfg)
    return sum(p.numel() for p in enc.parameters()), enc.hidden_size


def param_count(model_cfg, vocab_size: int, pose_vit_cfg=None) -> dict:
    """Parameter count of the tiny pose MLLM that ``model_cfg`` (a ModelConfig with
    ``checkpoint: null``) builds, by component. ``pose_vit_cfg``: the architecture of the pose
    encoder (``pose_encoder.vit`` when that stage runs, else ``model.pose_vit``)."""
    m = model_cfg
    if m.checkpoint:
        raise ValueError("param_count: model.checkpoint is set; the size comes from the checkpoint")
    h, n_l, heads, kv = m.text_hidden_size, m.text_layers, m.text_heads, m.text_kv_heads
    hd = h // heads
    inter, v = m.text_intermediate_size, int(vocab_size)
    # LlamaDecoderLayer: q,k,v,o without bias; gate/up/down without bias; 2 RMSNorms
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    mlp = 3 * h * inter
    layer = attn + mlp + 2 * h
    llm_layers = n_l * layer
    embed = v * h
    lm_head = v * h
    final_norm = h
    # CLIPVisionModel: patch conv (no bias), class emb, position emb (patches + 1),
    # pre/post LayerNorm; layers: q,k,v,out with bias, 2 LayerNorms, fc1/fc2 (I = 2 * width)
    c, cl = m.clip_hidden_size, m.clip_layers
    n_patch = (m.clip_image_size // m.clip_patch_size) ** 2
    clip_inter = 2 * c
    clip_layer = 4 * _linear(c, c) + 4 * c + _linear(c, clip_inter) + _linear(clip_inter, c)
    clip = 3 * m.clip_patch_size ** 2 * c + c + (n_patch + 1) * c + 4 * c + cl * clip_layer
    # pose encoder and fusion (PoseMLLM: LLaVA's projector becomes W_a)
    if m.fusion == "clip_only":
        pose_enc, pose_dim = 0, 0
    else:
        pose_enc, pose_dim = pose_encoder_params(pose_vit_cfg if pose_vit_cfg is not None else m.pose_vit)
    if m.fusion == "separate":
        fusion = _mlp2(c, h) + _mlp2(pose_dim, h)
    elif m.fusion == "concat":
        fusion = _mlp2(c + pose_dim, h)
    else:
        fusion = _mlp2(c, h)
    hh = m.head_hidden_size
    if m.head == "gaussian":
        head = _linear(h, hh) + 2 * _linear(hh, POSE_DIM)
        if m.covariance == "lowrank":
            head += _linear(hh, POSE_DIM * m.cov_rank)
    else:
        head = _linear(h, hh) + _linear(hh, POSE_DIM)
    parts = {"llm_layers": llm_layers, "llm_embed_and_head": embed + lm_head + final_norm,
             "clip": clip, "pose_encoder": pose_enc, "fusion": fusion, "pose_head": head}
    parts["total"] = sum(parts.values())
    # LoRA adapters (A: r x in, B: out x r) on the named LLM projections, when configured
    lora = getattr(m, "lora", None)
    if lora is not None and getattr(lora, "enabled", False):
        shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
                  "o_proj": (heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter),
                  "down_proj": (inter, h)}
        targets = lora.target_modules
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",")]
        parts["lora_adapters"] = n_l * sum(lora.r * sum(shapes[t]) for t in targets if t in shapes)
    return parts


def model_size(config: dict) -> dict:
    """:func:`param_count` of a workflow config dict (validated by poserft.config.load_config)."""
    from poserft.config import load_config

    wf = load_config(config)
    model = wf["model"]
    vit = wf["pose_encoder"].vit if wf["pose_encoder"].enabled else None
    return param_count(model, wf["tokenizer"].vocab_size, vit)


def cmd_params(args) -> int:
    cfg = read_config(args.config, replace=not args.overlay)
    parts = model_size(cfg)
    for k, n in parts.items():
        print(f"  {k:20s} {n:>15,d}  ({n / 1e9:.3f} B)")
    bytes_bf16 = 2 * parts["total"]
    print(f"  bf16 weights: {bytes_bf16 / 1e9:.2f} GB")
    return 0


# ---------------------------------------------------------------------------- GPU sampler
def _script_of(pid: int) -> str:
    """Rule script a process runs (``.snakemake/scripts/tmpXXXX.sft.py`` -> ``sft``), or '?'."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    m = re.search(r"\.snakemake/scripts/tmp[^ /]*?\.([A-Za-z0-9_]+)\.py", cmd)
    if m:
        return m.group(1)
    m = re.search(r"poserft\.train\.launch|torchrun", cmd)
    return "launch" if m else "?"


def _smi(query: str, what: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", f"--query-{what}={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        return []
    return [[x.strip() for x in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def cmd_sample(args) -> int:
    """Poll nvidia-smi every ``interval`` s; rows: time, kind (gpu|proc), pid, script, MiB."""
    stop, warned = False, False

    def _stop(*_):
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with open(args.out, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["time", "kind", "pid", "script", "mib"])
        while not stop:
            t = time.time()
            try:
                for row in _smi("index,memory.used", "gpu"):
                    w.writerow([f"{t:.2f}", "gpu", row[0], "", row[1]])
                for row in _smi("pid,used_memory", "compute-apps"):
                    if len(row) >= 2 and row[0].isdigit():
                        w.writerow([f"{t:.2f}", "proc", row[0], _script_of(int(row[0])), row[1]])
            except (OSError, subprocess.SubprocessError) as exc:
                if not warned:   # e.g. no nvidia-smi: say it once, keep the (empty) file
                    print(f"sampler: {exc}", file=sys.stderr)
                    warned = True
            fh.flush()
            time.sleep(args.interval)
    return 0


# ---------------------------------------------------------------------------- summary
_TS = re.compile(r"^\[(\w{3} \w{3}\s+\d+ \d\d:\d\d:\d\d \d{4})\]$")


def parse_snakemake_log(path: Path) -> list[dict]:
    """Jobs of a Snakemake log: rule, jobid, benchmark stem, start/end (epoch s, 1 s)."""
    jobs, by_id, ts, cur = [], {}, None, None
    for line in path.read_text(errors="replace").splitlines():
        m = _TS.match(line.strip())
        if m:
            ts = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y").timestamp()
            continue
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            cur = {"rule": m.group(1), "start": ts, "end": None, "jobid": None, "benchmark": None}
            jobs.append(cur)
            continue
        s = line.strip()
        if cur is not None and s.startswith("jobid:"):
            cur["jobid"] = s.split(":", 1)[1].strip()
            by_id[cur["jobid"]] = cur
        elif cur is not None and s.startswith("benchmark:"):
            cur["benchmark"] = Path(s.split(":", 1)[1].strip()).stem
        m = re.match(r"^Finished jobid: (\d+)", s)
        if m and m.group(1) in by_id:
            by_id[m.group(1)]["end"] = ts
    return jobs


def read_samples(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as fh:
        return [{"time": float(r["time"]), "kind": r["kind"], "pid": r["pid"],
                 "script": r["script"], "mib": float(r["mib"])}
                for r in csv.DictReader(fh, delimiter="\t") if r.get("mib", "").replace(".", "").isdigit()]


def stage_table(workdir: Path, samples: list[dict]) -> list[dict]:
    """One row per job: stage (benchmark stem), wall s (benchmark TSV), peak GPU MiB."""
    logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    jobs = [j for log in logs for j in parse_snakemake_log(log)]
    bench = {}
    for f in sorted((workdir / "results" / "benchmarks").glob("*.tsv")):
        with open(f) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            bench[f.stem] = float(rows[-1]["s"])
    proc = [s for s in samples if s["kind"] == "proc"]
    per_pid_ok = bool(proc) and all(s["script"] != "?" for s in proc)
    # per process: its rule script and first sample time -> the job of that rule running then
    pid_peak: dict[str, tuple[str, float, float]] = {}
    for s in proc:
        script, first, peak = pid_peak.get(s["pid"], (s["script"], s["time"], 0.0))
        pid_peak[s["pid"]] = (script, first, max(peak, s["mib"]))
    rows, seen = [], set()
    for j in jobs:
        stage = j["benchmark"] or j["rule"]
        if stage in seen or j["rule"] == "all":
            continue
        seen.add(stage)
        start, end = j["start"], j["end"]
        peak, how = None, ""
        if per_pid_ok and start is not None:
            cands = [p for (script, first, p) in pid_peak.values()
                     if script == j["rule"] and start - 1 <= first <= (end or float("inf")) + 1]
            if cands:
                peak, how = max(cands), "process"
        if peak is None and start is not None and not per_pid_ok:
            gpu = [s["mib"] for s in samples if s["kind"] == "gpu"
                   and start - 1 <= s["time"] <= (end or float("inf")) + 1]
            if gpu:
                peak, how = max(gpu), "whole GPU while it ran"
        rows.append({"stage": stage, "rule": j["rule"], "wall_s": bench.get(stage),
                     "log_s": (end - start) if (start is not None and end is not None) else None,
                     "peak_gpu_mib": peak, "peak_how": how})
    for stem, s in bench.items():   # a job the log missed
        if stem not in seen:
            rows.append({"stage": stem, "rule": stem.split("_")[0], "wall_s": s, "log_s": None,
                         "peak_gpu_mib": None, "peak_how": ""})
    return rows


def cmd_summary(args) -> int:
    workdir = Path(args.workdir)
    samples = read_samples(Path(args.samples)) if args.samples else []
    rows = stage_table(workdir, samples)
    print(f"{'stage':40s} {'wall s':>8s} {'peak GPU MiB':>13s}  how   (~: from the log, no benchmark file)")
    for r in rows:
        wall = (f"{r['wall_s']:.1f}" if r["wall_s"] is not None        # benchmark TSV
                else f"~{r['log_s']:.0f}" if r["log_s"] is not None else "-")   # log, 1 s steps
        peak = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        print(f"{r['stage']:40s} {wall:>8s} {peak:>13s}  {r['peak_how']}")
    gpu = [s["mib"] for s in samples if s["kind"] == "gpu"]
    if gpu:
        print(f"peak GPU memory in use over the whole run (nvidia-smi): {max(gpu):.0f} MiB")
    elif args.samples:
        print("no GPU memory samples (nvidia-smi gave none)")
    if samples and not any(s["kind"] == "proc" and s["script"] != "?" for s in samples):
        print("note: nvidia-smi listed no process this script could map to a rule (PID "
              "namespace of a container?); peaks are of the whole GPU during each job, so jobs "
              "that overlapped share them")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


# ---------------------------------------------------------------------------- rollout probe
def _tiny_policy(device: str):
    import tempfile

    from poserft.model.policy import build_policy
    from poserft.model.testing import make_test_tokenizer, tiny_model_config

    tok = make_test_tokenizer(tempfile.mkdtemp(prefix="gpu_check_tok_"))
    return build_policy(tiny_model_config(), tok).to(device)


def cmd_probe(args) -> int:
    import torch

    from poserft.rl.rollout import PromptBatch, generate_group

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("probe: torch.cuda is not available", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.tiny:
        policy = _tiny_policy(device)
    else:
        from poserft.model.io import load_policy
        policy = load_policy(args.policy, device=device)
    policy.eval()
    load_s = time.perf_counter() - t0
    weights_dtype = str(next(policy.backbone.parameters()).dtype).replace("torch.", "")
    n_params = sum(p.numel() for p in policy.parameters())
    weights_mib = torch.cuda.memory_allocated() / 2**20 if cuda else None

    b, g = args.prompts, args.group
    n_img = (b + 1) // 2   # half image->pose, half text->pose prompts
    captions = ["The person is standing with both arms raised above the head.",
                "The person is squatting with the knees completely bent.",
                "The person is lunging forward with the left leg in front.",
                "The person is sitting with the legs crossed."]
    prompts = [policy.image2pose_prompt()] * n_img + \
        [policy.text2pose_prompt(captions[i % len(captions)]) for i in range(b - n_img)]
    gen = torch.Generator().manual_seed(0)
    side = args.image_size
    images = torch.randint(0, 256, (b, side, side, 3), generator=gen, dtype=torch.uint8)
    batch = PromptBatch(tasks=["image2pose"] * n_img + ["text2pose"] * (b - n_img),
                        prompts=prompts, images=images, gt_poses=torch.zeros(b, POSE_DIM),
                        captions=[None] * n_img + captions[: b - n_img],
                        reference_answers=[None] * b)
    # bf16 autocast on GPU whatever dtype the weights were saved in (model.dtype decides the
    # stored dtype; the head computes its densities in float32 either way)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and weights_dtype == "float32" \
        else torch.autocast(device.split(":")[0], enabled=False)
    rgen = torch.Generator(device=policy.device).manual_seed(0)

    def run():
        with amp:
            out = generate_group(policy, batch, g, args.new_tokens, 1.0, generator=rgen)
        if cuda:
            torch.cuda.synchronize()
        return out

    run()  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, tokens, valid = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        r = run()
        times.append(time.perf_counter() - t)
        tokens.append(int(r.completion_mask.sum()))
        valid.append(float(r.pose_valid.float().mean()))
    med = statistics.median(times)
    tok = statistics.median(tokens)
    result = {
        "device": device, "gpu": torch.cuda.get_device_name() if cuda else None,
        "policy": "tiny test policy" if args.tiny else str(args.policy),
        "params": n_params, "weights_dtype": weights_dtype,
        "autocast_bf16": cuda and weights_dtype == "float32", "load_s": load_s,
        "prompts": b, "group": g, "new_tokens_max": args.new_tokens, "repeats": args.repeats,
        "prompt_tokens": int(policy.build_inputs(prompts[:1], images[:1])["input_ids"].shape[1]),
        "rollout_s_median": med, "generated_tokens": tok, "tokens_per_s": tok / med if med else None,
        "sequences_per_s": b * g / med if med else None, "pose_valid_rate": statistics.mean(valid),
        "weights_mib": weights_mib,
        "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "max_memory_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if cuda else None,
    }
    print(f"rollout probe: {result['policy']} on {device}"
          + (f" ({result['gpu']})" if cuda else ""))
    print(f"  {n_params / 1e6:,.1f} M parameters, weights {weights_dtype}"
          + (" (bf16 autocast)" if result["autocast_bf16"] else "") + f", loaded in {load_s:.1f} s")
    print(f"  generate_group: {b} prompts x G={g}, <= {args.new_tokens} new tokens, prompt "
          f"{result['prompt_tokens']} tokens; median of {args.repeats}: {med * 1000:.1f} ms, "
          f"{tok} tokens generated -> {result['tokens_per_s']:.0f} tokens/s, "
          f"{result['sequences_per_s']:.0f} sequences/s; <POSE> emitted in "
          f"{100 * result['pose_valid_rate']:.0f}% of candidates")
    if cuda:
        print(f"  GPU memory: weights {weights_mib:.0f} MiB; peak during rollout "
              f"{result['max_memory_allocated_mib']:.0f} MiB allocated, "
              f"{result['max_memory_reserved_mib']:.0f} MiB reserved (torch.cuda.max_memory_*)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


# ---------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("params", help="parameter count of a config's model")
    p.add_argument("--config", default=str(ROOT / "configs" / "gpu_smoke.yaml"))
    p.add_argument("--overlay", action="store_true",
                   help="merge into config.yaml (plain --configfile) instead of replacing it")
    p.set_defaults(fn=cmd_params)
    p = sub.add_parser("sample", help="poll nvidia-smi memory until SIGTERM")
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.5)
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("summary", help="per-stage wall time and peak GPU memory of a run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--samples", default=None)
    p.add_argument("--json", default=None)
    p.set_defaults(fn=cmd_summary)
    p = sub.add_parser("probe", help="time generate_group on a policy")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", help="policy directory (e.g. results/runs/dist/seed0/sft/final)")
    src.add_argument("--tiny", action="store_true",
                     help="a tiny random test policy instead (dry run; seconds on CPU)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--json", default=None)
    p.set_defaults(fn=cmd_probe)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
