#!/usr/bin/env bash
# GPU check: the whole DAG on one GPU (configs/gpu_smoke.yaml, ~0.69 B-parameter model, bf16,
# LoRA, gradient checkpointing) in a scratch copy of the project, then a direct rollout probe.
#
#   bash benchmarks/gpu_check.sh                # from the repository root
#
# Installs nothing: it needs `make install` done (./.venv with a CUDA build of torch), or
# POSERFT_PYTHON pointing at such an interpreter. Exit codes: 0 all ran, 2 no usable GPU
# (torch.cuda unavailable), 3 the DAG failed or hit its time limit, 4 the probe failed.
# Everything it prints is the summary (stdout); the scratch copy is kept for inspection.
#
# Settings (environment):
#   GPU_CHECK_TIMEOUT_S   hard limit of the DAG run, seconds (default 480 = 8 min)
#   GPU_CHECK_CORES       snakemake --cores (default: nproc)
#   GPU_CHECK_WORKDIR     scratch directory (default: a new mktemp -d under ${TMPDIR:-/tmp})
#   GPU_CHECK_CONFIG      workflow config (default configs/gpu_smoke.yaml, standalone)
#   POSERFT_PYTHON        interpreter (default ./.venv/bin/python)
#   GPU_CHECK_DEVICE      cuda (default); cpu only to test this script's plumbing without a
#                         GPU, with a CPU config: GPU_CHECK_DEVICE=cpu
#                         GPU_CHECK_CONFIG=tests/data/smoke_config.yaml bash benchmarks/gpu_check.sh
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${POSERFT_PYTHON:-$ROOT/.venv/bin/python}
TIMEOUT_S=${GPU_CHECK_TIMEOUT_S:-480}
CORES=${GPU_CHECK_CORES:-$(nproc 2>/dev/null || echo 4)}
CONFIG=${GPU_CHECK_CONFIG:-configs/gpu_smoke.yaml}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
HELPER="$ROOT/benchmarks/gpu_check.py"

section() { printf '\n===== %s =====\n' "$*"; }

if [[ ! -x "$PY" ]]; then
    echo "gpu_check: no Python at $PY; run \`make install\` first (or set POSERFT_PYTHON)" >&2
    exit 2
fi

# ---------------------------------------------------------------- (a) the machine
section "GPU and torch"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap --format=csv \
        || nvidia-smi
else
    echo "nvidia-smi: not found"
fi
GPU_CHECK_DEVICE="$DEVICE" "$PY" - <<'EOF'
import os
import sys
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if not torch.cuda.is_available() and os.environ["GPU_CHECK_DEVICE"] != "cpu":
    print("gpu_check: torch.cuda is not available (a CPU build of torch, or no GPU visible); "
          "install the CUDA build of the pinned torch (README, Dependencies) on a GPU machine")
    sys.exit(2)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, bf16 supported: {torch.cuda.is_bf16_supported()}")
import importlib.util
for mod in ("flash_attn", "deepspeed", "peft"):
    print(f"  {mod}: {'present' if importlib.util.find_spec(mod) else 'absent'}")
EOF
rc=$?
if [[ $rc -ne 0 ]]; then
    exit 2
fi

section "model of $CONFIG"
if [[ "$CONFIG" = /* ]]; then CONFIG_PATH=$CONFIG; else CONFIG_PATH=$ROOT/$CONFIG; fi
"$PY" "$HELPER" params --config "$CONFIG_PATH" || echo "(could not count the parameters)"

# ---------------------------------------------------------------- (c) the DAG, scratch copy
WORK=${GPU_CHECK_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/poserft-gpu-check.XXXXXX")}
mkdir -p "$WORK"
section "scratch copy: $WORK"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # tracked + untracked-but-not-ignored files: no data/, results/, .venv, .snakemake
    (cd "$ROOT" && git ls-files -z -co --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$WORK" -xf -
else
    tar -C "$ROOT" --exclude=./.venv --exclude=./data --exclude=./results --exclude=./logs \
        --exclude=./.snakemake --exclude=./raw -cf - . | tar -C "$WORK" -xf -
fi
echo "copied $(find "$WORK" -type f | wc -l) files"

SAMPLES="$WORK/gpu_samples.tsv"
"$PY" "$HELPER" sample --out "$SAMPLES" --interval 0.5 &
SAMPLER=$!
stop_sampler() {
    if [[ -n "${SAMPLER:-}" ]] && kill -0 "$SAMPLER" 2>/dev/null; then
        kill -TERM "$SAMPLER" 2>/dev/null
        wait "$SAMPLER" 2>/dev/null
    fi
    SAMPLER=
}
trap stop_sampler EXIT

section "snakemake all (--configfile $CONFIG --replace-workflow-config), limit ${TIMEOUT_S} s, $CORES cores"
# MLFLOW_TRACKING_URI would send the smoke runs to a shared server: keep them local.
t0=$(date +%s)
(cd "$WORK" && env -u MLFLOW_TRACKING_URI PATH="$(dirname "$PY"):$PATH" \
    timeout --signal=INT --kill-after=30 "$TIMEOUT_S" \
    "$PY" -m snakemake --cores "$CORES" all --configfile "$CONFIG" --replace-workflow-config \
    > "$WORK/snakemake.out" 2>&1)
dag_rc=$?
t1=$(date +%s)
stop_sampler
if [[ $dag_rc -eq 0 ]]; then
    echo "DAG finished in $((t1 - t0)) s"
elif [[ $dag_rc -eq 124 || $dag_rc -eq 137 ]]; then
    echo "DAG hit the ${TIMEOUT_S} s limit after $((t1 - t0)) s (exit $dag_rc)"
else
    echo "DAG FAILED after $((t1 - t0)) s (exit $dag_rc); last lines of $WORK/snakemake.out:"
    tail -n 40 "$WORK/snakemake.out"
    for log in $(grep -ho "logs/[^ ]*\.log" "$WORK/snakemake.out" | sort -u); do
        if [[ -f "$WORK/$log" ]] && grep -qi "error\|traceback" "$WORK/$log"; then
            echo "--- $log (tail)"
            tail -n 30 "$WORK/$log"
        fi
    done
fi

# ---------------------------------------------------------------- (d) per-stage numbers
section "per stage: wall time (results/benchmarks/*.tsv) and peak GPU memory (nvidia-smi)"
"$PY" "$HELPER" summary --workdir "$WORK" --samples "$SAMPLES" --json "$WORK/stages.json" \
    || echo "(summary failed)"

probe_rc=0
POLICY="$WORK/results/runs/dist/seed0/sft/final"
section "rollout probe: generate_group, 4 prompts x G=8, on the SFT policy"
if [[ -f "$POLICY/model.safetensors" ]]; then
    (cd "$WORK" && timeout 300 "$PY" "$HELPER" probe --policy "$POLICY" --device "$DEVICE" \
        --prompts 4 --group 8 --new-tokens 24 --repeats 3 --json "$WORK/probe.json")
    probe_rc=$?
else
    echo "no SFT policy at $POLICY (the DAG did not get that far); probing a tiny random policy instead"
    (cd "$WORK" && timeout 300 "$PY" "$HELPER" probe --tiny --device "$DEVICE" --json "$WORK/probe.json")
    probe_rc=$?
fi

section "summary"
echo "scratch copy: $WORK (snakemake.out, logs/, results/, stages.json, probe.json, gpu_samples.tsv)"
echo "DAG: exit $dag_rc in $((t1 - t0)) s (limit $TIMEOUT_S s); probe: exit $probe_rc"
if [[ -f "$WORK/results/tables/main.md" ]]; then
    echo "results/tables/main.md written; first lines:"
    head -n 20 "$WORK/results/tables/main.md"
fi
if [[ $dag_rc -ne 0 ]]; then
    exit 3
fi
if [[ $probe_rc -ne 0 ]]; then
    exit 4
fi
exit 0
