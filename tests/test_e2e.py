"""One end-to-end smoke run of the whole DAG on the smallest world (tests/data/smoke_config.yaml).

In a copy of the project it checks that `snakemake --cores 2 all` produces every table, plot
and metrics file, that the runs are readable back from MLflow, and that editing one stage's
config section reruns that stage and its downstream jobs, nothing upstream (Snakemake's
params rerun trigger).
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_helpers import changed_keys, planned_jobs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if not f.startswith("tests/")]


def _snakemake(workdir: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args],
                          cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    for rel in _project_files():
        dest = work / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    shutil.copy2(ROOT / "tests" / "data" / "smoke_config.yaml", work / "config.yaml")
    proc = _snakemake(work, "all")
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in (work / "logs").rglob("*.log"))
        pytest.fail(f"snakemake all failed:\n{proc.stderr[-6000:]}\n{logs[-12000:]}")
    return work


def test_all_outputs_exist(finished_run):
    res = finished_run / "results"
    for variant in ("baseline", "dist", "dist_rft"):
        metrics = json.loads((res / "runs" / variant / "seed0" / "metrics.json").read_text())
        assert metrics, variant
    for table in ("main", "image2pose", "text2pose", "ablation"):
        assert (res / "tables" / f"{table}.md").stat().st_size > 0
        assert (res / "tables" / f"{table}.csv").stat().st_size > 0
    for plot in ("reward_curves", "metric_bars", "gallery"):
        assert (res / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dist_rft" in (res / "tables" / "main.md").read_text()
    recall = json.loads((res / "retrieval" / "evaluator" / "recall.json").read_text())
    assert set(recall) == {"full", "sampled"}
    summary = json.loads((res / "runs" / "dist_rft" / "seed0" / "rft" / "rft_summary.json").read_text())
    assert summary
    # every heavy rule left a benchmark file
    for name in ("synthesize", "sft_dist_seed0", "rft_dist_rft_seed0", "evaluate_dist_seed0"):
        assert (res / "benchmarks" / f"{name}.tsv").exists(), name


def test_runs_are_in_mlflow(finished_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{finished_run}/results/mlflow.db")
    exp = client.get_experiment_by_name("poserft-smoke")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    rules = {r.data.tags.get("rule") for r in runs}
    assert {"synthesize", "tokenizer", "train_retrieval", "pretrain_pose_encoder", "sft", "rft",
            "evaluate", "evaluate_reference"} <= rules
    assert all(r.info.status == "FINISHED" for r in runs)
    (rft,) = [r for r in runs if r.data.tags.get("rule") == "rft"]
    assert rft.data.tags["variant"] == "dist_rft" and rft.data.params["rft.mode"] == "hygrpo"
    assert rft.data.metrics, "the RFT run logged no metrics"
    # the split files each stage read are MLflow run inputs (the UI's Datasets column)
    want = {"train_retrieval": {("synthetic/train", "train"), ("synthetic/val", "val"),
                                ("synthetic/test", "test")},
            "sft": {("synthetic/train", "train"), ("synthetic/val", "val")},
            "rft": {("synthetic/train", "train"), ("synthetic/val", "val")},
            "evaluate": {("synthetic/test", "test")}}
    for rule, pairs in want.items():
        run = next(r for r in runs if r.data.tags.get("rule") == rule)
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        got = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
               for d in inputs}
        assert got == pairs, (rule, got)


def _dry_run_with(work: Path, name: str, overlay: dict, proc_out: list | None = None
                  ) -> dict[str, int]:
    path = work / name
    path.write_text(yaml.safe_dump(overlay))
    proc = _snakemake(work, "all", "-n", "--configfile", "config.yaml", str(path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if proc_out is not None:
        proc_out.append(proc)
    return planned_jobs(proc.stdout + proc.stderr)


def _params_change(proc: subprocess.CompletedProcess, rule: str) -> tuple[dict, dict]:
    """The (before, now) params of the one job of ``rule`` whose params changed, as
    Snakemake recorded and compares them (its dry-run 'reason' line)."""
    text = proc.stdout + proc.stderr
    for block in re.split(r"\n(?=rule \w+:)", text):
        if not block.startswith(f"rule {rule}:"):
            continue
        m = re.search(r"before: (\{.*\}) now: (\{.*\}) *$", block, re.M)
        if m:
            return ast.literal_eval(m.group(1)), ast.literal_eval(m.group(2))
    raise AssertionError(f"no params change of rule {rule} in:\n{text[-3000:]}")


def test_nothing_to_do_after_a_complete_run(finished_run):
    assert _dry_run_with(finished_run, "same.yaml", {}) == {}


def test_editing_rft_reruns_rft_and_downstream_only(finished_run):
    jobs = _dry_run_with(finished_run, "edit_rft.yaml", {"rft": {"clip_eps_pose": 0.25}})
    assert jobs.get("rft") == 1 and jobs.get("evaluate") == 1
    assert not {"synthesize", "tokenizer", "train_retrieval", "sft"} & set(jobs)


@pytest.mark.parametrize("overlay", [
    {"rft": {"optim": {"lr": 2.0e-6}}},
    {"variants": {"dist_rft": {"rft": {"optim": {"lr": 2.0e-6}}}}},
], ids=["base", "variant"])
def test_a_nested_edit_changes_only_that_key_in_the_rule_params(finished_run, overlay):
    """The params the rft rule receives change in optim.lr only: the rest of optim keeps
    the rft section's own defaults (warmup 0, constant LR), not OptimConfig's."""
    procs: list = []
    jobs = _dry_run_with(finished_run, "edit_lr.yaml", overlay, procs)
    assert jobs.get("rft") == 1 and not {"synthesize", "sft", "train_retrieval"} & set(jobs)
    before, now = _params_change(procs[0], "rft")
    assert changed_keys(before, now) == {"optim.lr"}
    assert now["optim"]["lr"] == 2.0e-6 and now["optim"]["warmup_steps"] == 0


def test_sorted_keys_and_explicit_defaults_plan_nothing(finished_run):
    """The same config written back with sorted keys, and with default values written out,
    is the same config: no job reruns."""
    cfg = yaml.safe_load((finished_run / "config.yaml").read_text())
    cfg["rft"]["clip_eps_pose"] = 0.2                  # defaults, now explicit
    cfg["sft"]["optim"] = {"warmup_steps": 20}
    cfg["model"]["fusion"] = "separate"
    path = finished_run / "sorted_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=True))
    proc = _snakemake(finished_run, "all", "-n", "--configfile", str(path),
                      "--replace-workflow-config", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert planned_jobs(proc.stdout + proc.stderr) == {}, (proc.stdout + proc.stderr)[-4000:]


def test_editing_one_variant_reruns_that_variant_only(finished_run):
    jobs = _dry_run_with(finished_run, "edit_variant.yaml",
                         {"variants": {"baseline": {"sft": {"steps": 13}}}})
    assert jobs.get("sft") == 1 and jobs.get("evaluate") == 1
    assert not {"synthesize", "tokenizer", "train_retrieval", "rft"} & set(jobs)


def test_editing_a_training_mixture_reruns_that_stage_and_downstream_only(finished_run):
    """A mixture is config (issue #15): re-weighting sft.data reruns the SFTs and what
    follows, never the data, the tokenizer or the retrieval models."""
    jobs = _dry_run_with(finished_run, "edit_mix.yaml", {"sft": {"data": {"synthetic": 2.0}}})
    assert jobs.get("sft") and jobs.get("rft") and jobs.get("evaluate")
    assert not {"synthesize", "tokenizer", "train_retrieval"} & set(jobs)
    jobs = _dry_run_with(finished_run, "edit_retrieval_mix.yaml",
                         {"retrieval": {"data": {"synthetic": 2.0}}})
    assert jobs.get("train_retrieval") and jobs.get("rft") and jobs.get("evaluate")
    assert not {"synthesize", "tokenizer", "sft"} & set(jobs)


def test_editing_synth_reruns_everything(finished_run):
    jobs = _dry_run_with(finished_run, "edit_synth.yaml", {"synth": {"num_train": 250}})
    assert {"synthesize", "tokenizer", "train_retrieval", "sft", "rft", "evaluate"} <= set(jobs)
