"""configs/gpu_smoke.yaml and benchmarks/gpu_check.{sh,py} (issue #14), and paper.yaml's DAG.

The GPU smoke config is applied as benchmarks/gpu_check.sh applies it (standalone, with
``--replace-workflow-config``): it validates, runs bf16 + LoRA + gradient checkpointing with
only the dist / dist_rft variants, and its model has 0.5-1.0 B parameters by the formula of
benchmarks/gpu_check.py, which is checked against a meta-device build. The script parses and
its Python helper's CPU dry run works; ``snakemake -n all --configfile configs/paper.yaml``
still plans the paper DAG.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.utils import validate
from workflow_helpers import planned_jobs

from poserft.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "gpu_smoke.yaml"
PAPER = ROOT / "configs" / "paper.yaml"
SCHEMA = ROOT / "schemas" / "config.schema.yaml"
HELPER = ROOT / "benchmarks" / "gpu_check.py"
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _helper():
    spec = importlib.util.spec_from_file_location("gpu_check", HELPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = _helper()


def _dry_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`snakemake -n all` of this repository's Snakefile with `workdir` as working directory
    (where config.yaml and relative paths such as body.model_path resolve)."""
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "all", "--cores", "1",
                           "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args],
                          cwd=workdir, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ the gpu_smoke config
def test_gpu_smoke_config_is_standalone_bf16_lora_one_seed():
    cfg = gpu_check.read_config(SMOKE, replace=True)   # what --replace-workflow-config gives
    validate(cfg, str(SCHEMA))
    wf = load_config(cfg)
    assert set(wf.variants) == {"dist", "dist_rft"}
    assert wf.sft_owner("dist_rft") == "dist" and wf.has_rft("dist_rft")
    assert wf.seeds == [0]
    model = wf["model"]
    assert model.checkpoint is None                    # tiny architecture built from the config
    assert model.lora.enabled and model.lora.r == 8 and model.lora.alpha == 16
    assert model.dtype == "bfloat16" and model.gradient_checkpointing
    assert model.attn_implementation == "sdpa"
    for stage in ("sft", "rft"):
        engine = wf[stage].engine
        assert engine.precision == "bf16", stage
        assert engine.device in ("cuda", "auto"), stage
    assert wf["rft"].rollout_chunk_size > 0
    assert wf["eval"].device in ("cuda", "auto")


def test_gpu_smoke_model_has_half_to_one_billion_parameters():
    parts = gpu_check.model_size(gpu_check.read_config(SMOKE, replace=True))
    assert 0.5e9 <= parts["total"] <= 1.0e9, parts
    assert parts["llm_layers"] > 0.9 * parts["total"]     # the LLM is what makes it large
    assert parts["lora_adapters"] == 24 * 8 * (4 * (1536 + 1536) + 3 * (1536 + 4096))


@pytest.mark.parametrize("case", ["gpu_smoke", "embedded", "concat", "clip_only",
                                  "deterministic_lowrank", "vitpose_gqa"])
def test_param_formula_matches_a_meta_device_build(case, tmp_path):
    """The arithmetic of gpu_check.param_count equals the parameters of the policy that
    build_policy makes, on the meta device: the base model, and the LoRA adapters (on the
    LLM's projections only) when lora is enabled."""
    from poserft.model.policy import build_policy
    from poserft.model.testing import make_test_tokenizer

    if case == "gpu_smoke":
        wf = load_config(gpu_check.read_config(SMOKE, replace=True))
    else:
        wf = load_config(gpu_check.read_config(ROOT / "config.yaml", replace=True))
    model = wf["model"]
    # the workflow gives the MLLM the pretrained encoder, whose architecture is pose_encoder.vit
    vit = wf["pose_encoder"].vit if wf["pose_encoder"].enabled else model.pose_vit
    model = dataclasses.replace(model, pose_vit=vit)
    if case == "concat":
        model = dataclasses.replace(model, fusion="concat")
    elif case == "clip_only":
        model = dataclasses.replace(model, fusion="clip_only")
    elif case == "deterministic_lowrank":
        model = dataclasses.replace(model, head="deterministic", covariance="lowrank")
    elif case == "vitpose_gqa":
        model = dataclasses.replace(
            model, text_heads=8, text_kv_heads=2, covariance="lowrank", cov_rank=3,
            lora=dataclasses.replace(model.lora, enabled=True, target_modules=["q_proj", "v_proj"]),
            pose_vit=dataclasses.replace(model.pose_vit, arch="vitpose", image_size=32,
                                         patch_size=8, hidden_size=32, num_layers=2,
                                         num_heads=2, mlp_ratio=2))
    tok = make_test_tokenizer(tmp_path)
    meta = torch.device("meta")
    with meta:
        policy = build_policy(model, tok, device=meta)
    named = list(policy.named_parameters())
    adapters = sum(p.numel() for n, p in named if "lora_" in n)
    base = sum(p.numel() for n, p in named if "lora_" not in n)
    expected = gpu_check.param_count(model, len(tok))
    assert base == expected["total"]
    assert adapters == expected.get("lora_adapters", 0)
    assert not any("lora_" in n and "vision" in n for n, _ in named)   # LLM only


# ------------------------------------------------------------------ the script and helper
def test_gpu_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_probe_dry_run_on_cpu(tmp_path):
    """The rollout probe on a tiny random policy on CPU (seconds): tokens/s are reported."""
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(HELPER), "probe", "--tiny", "--device", "cpu",
                           "--repeats", "1", "--new-tokens", "4", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["prompts"] == 4 and result["group"] == 8
    assert 0 < result["generated_tokens"] <= 4 * 8 * 4
    assert result["tokens_per_s"] > 0
    assert "tokens/s" in proc.stdout


def test_summary_joins_log_benchmarks_and_gpu_samples(tmp_path):
    """Per stage: wall time from results/benchmarks/*.tsv, peak GPU memory of the process that
    ran the rule's script while the job ran (from the Snakemake log's start/end times)."""
    log = tmp_path / ".snakemake" / "log" / "2026-01-01T000000.000000.snakemake.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        "[Thu Jan  1 10:00:00 2026]\nlocalrule sft:\n    jobid: 3\n"
        "    benchmark: results/benchmarks/sft_dist_seed0.tsv\n"
        "[Thu Jan  1 10:02:00 2026]\nFinished jobid: 3 (Rule: sft)\n"
        "[Thu Jan  1 10:02:00 2026]\nlocalrule rft:\n    jobid: 5\n"
        "    benchmark: results/benchmarks/rft_dist_rft_seed0.tsv\n"
        "[Thu Jan  1 10:04:00 2026]\nFinished jobid: 5 (Rule: rft)\n")
    bench = tmp_path / "results" / "benchmarks"
    bench.mkdir(parents=True)
    for stem, s in (("sft_dist_seed0", 118.5), ("rft_dist_rft_seed0", 119.0)):
        (bench / f"{stem}.tsv").write_text(f"s\th:m:s\tmax_rss\n{s}\t0:01:58\t1000\n")
    from datetime import datetime
    t_sft = datetime(2026, 1, 1, 10, 1, 0).timestamp()
    t_rft = datetime(2026, 1, 1, 10, 3, 0).timestamp()
    samples = tmp_path / "samples.tsv"
    samples.write_text("time\tkind\tpid\tscript\tmib\n"
                       f"{t_sft}\tgpu\t0\t\t9000\n{t_sft}\tproc\t11\tsft\t8000\n"
                       f"{t_sft + 1}\tproc\t11\tsft\t8500\n"
                       f"{t_rft}\tgpu\t0\t\t5000\n{t_rft}\tproc\t12\trft\t4000\n")
    rows = {r["stage"]: r for r in gpu_check.stage_table(tmp_path, gpu_check.read_samples(samples))}
    assert rows["sft_dist_seed0"]["wall_s"] == 118.5
    assert rows["sft_dist_seed0"]["peak_gpu_mib"] == 8500
    assert rows["rft_dist_rft_seed0"]["peak_gpu_mib"] == 4000
    assert rows["rft_dist_rft_seed0"]["log_s"] == 120


# ------------------------------------------------------------------ DAGs (dry runs)
def test_gpu_smoke_dag_has_one_sft_one_rft(tmp_path):
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())  # as in a copy
    proc = _dry_run(tmp_path, "--configfile", str(SMOKE), "--replace-workflow-config")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = planned_jobs(out)
    assert jobs["sft"] == 1 and jobs["rft"] == 1 and jobs["evaluate"] == 2, jobs


def test_paper_config_dag_still_builds(tmp_path):
    """`snakemake -n all --configfile configs/paper.yaml` (the licensed SMPL folder and the
    H36M regressor exist on a real cluster only: an empty folder and file stand in)."""
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    (tmp_path / "body_models" / "smpl").mkdir(parents=True)
    (tmp_path / "body_models" / "J_regressor_h36m.npy").touch()
    proc = _dry_run(tmp_path, "--configfile", str(PAPER))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = planned_jobs(out)
    assert jobs["sft"] == 4 and jobs["rft"] == 2 and jobs["evaluate"] == 6, jobs
    # issue #15: every training stage reads the paper's datasets, not the synthetic world
    inputs = {}
    for block in out.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0].strip()
        line = next((ln for ln in block.splitlines() if ln.strip().startswith("input:")), "")
        inputs.setdefault(rule, set()).update(x.strip() for x in line.split(":", 1)[-1].split(","))
    paper = yaml.safe_load(PAPER.read_text())
    want = {"train_retrieval": paper["retrieval"]["data"], "sft": paper["sft"]["data"],
            "rft": paper["rft"]["data"]}
    assert set(want["train_retrieval"]) == {"posescript"}
    for rule, sources in want.items():
        read = {p.split("/")[1] for p in inputs[rule] if p.startswith("data/")}
        assert read == set(sources), (rule, read)
        assert f"data/{next(iter(sources))}/train.h5" in inputs[rule]
    assert not any(p.startswith("data/synthetic") for r in want for p in inputs[r])
    assert {"data/h36m/train.h5", "data/coco_eft/train.h5", "data/mpii_eft/train.h5",
            "data/bedlam_script/train.h5", "data/llava_instruct/train.h5"} <= inputs["sft"]
    # PoseScript reads the AMASS poses its ids name: after download_amass has run
    assert "data/amass/download_manifest.json" in inputs["convert_posescript"]
