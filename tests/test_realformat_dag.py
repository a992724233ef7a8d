"""The whole DAG on the real-format smoke world (issue #15, item 5; configs/realformat_smoke.yaml).

Tiny PoseScript (+ AMASS), 3DPW, Human3.6M (SPIN npz) and COCO-EFT datasets in their
published layouts, with JPEG images on disk, are written to a temp folder and served from
127.0.0.1 (tests/realformat_world.py); `snakemake --cores 2 all` then downloads them
(checksums pinned), converts them, trains retrieval / SFT / RFT on them and evaluates on the
3DPW, H36M protocol-2 and PoseScript test splits. Checked: the manifests, the converted
splits, which split files each training job recorded as its MLflow inputs, and that every
benchmark has finite numbers (slow: about 2-3 minutes on 2 cores). A fast test checks the
committed config alone: it validates as committed and plans that DAG (`snakemake -n`).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from realformat_world import (
    CONFIG, PLACEHOLDER_BASE, ROOT, LoopbackServer, run_dag, smoke_config, write_raw_world)
from workflow_helpers import planned_jobs

from poserft.config import load_config
from poserft.data.h5io import SplitReader, validate_split

EXPERIMENT = "poserft-realformat-smoke"
SPLITS = {"posescript": ("train", "val", "test"), "pw3d": ("train", "val", "test"),
          "h36m": ("train", "test"), "coco_eft": ("train",)}


# ------------------------------------------------------------------ the committed config (fast)
def test_committed_config_is_standalone_and_plans_the_real_format_dag(tmp_path):
    """configs/realformat_smoke.yaml validates as committed (placeholder URLs, no pins), and
    its DAG downloads and converts every dataset and trains / evaluates on them."""
    from snakemake.utils import validate

    cfg = yaml.safe_load(CONFIG.read_text())
    validate(cfg, str(ROOT / "schemas" / "config.schema.yaml"))
    wf = load_config(cfg)
    assert set(wf.variants) == {"dist", "dist_rft"} and wf.seeds == [0]
    ds = wf["datasets"]
    assert list(ds.enabled) == list(SPLITS)
    for name in ds.enabled:
        source = ds.source(name)
        assert not source.manual and source.urls and not source.sha256
        assert all(u.startswith(PLACEHOLDER_BASE + f"/{name}/") for u in source.urls)
        assert sorted(source.splits) == sorted(SPLITS[name])
    assert set(wf["retrieval"].data) == {"posescript"}
    assert set(wf["sft"].data) == {"posescript", "pw3d", "h36m", "coco_eft"}
    assert set(wf["rft"].data) == {"posescript", "pw3d", "h36m"}
    assert (wf["eval"].image_benchmarks, wf["eval"].text_benchmarks) == (["pw3d", "h36m"],
                                                                         ["posescript"])
    proc = run_dag(tmp_path, cfg, "-n", cores=1, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = planned_jobs(proc.stdout + proc.stderr)
    for name in SPLITS:
        assert jobs[f"download_{name}"] == jobs[f"convert_{name}"] == 1
    assert jobs["sft"] == jobs["rft"] == 1 and jobs["evaluate"] == 2
    assert jobs["train_retrieval"] == 2


# ------------------------------------------------------------------ the whole DAG (slow)
def _failure(work: Path, proc) -> str:
    logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}"
                     for p in sorted((work / "logs").rglob("*.log")))
    return f"snakemake all failed:\n{proc.stderr[-6000:]}\n{logs[-12000:]}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("realformat")
    world = write_raw_world(base / "world", seed=0)
    work = base / "work"
    with LoopbackServer(base / "world" / "serve") as server:
        config = smoke_config(world, server.base)
        start = time.perf_counter()
        proc = run_dag(work, config, cores=2)
        seconds = time.perf_counter() - start
        requests = server.requests
    print(f"\nrealformat smoke DAG: snakemake --cores 2 all took {seconds:.0f} s")
    if proc.returncode != 0:
        pytest.fail(_failure(work, proc))
    return {"work": work, "world": world, "config": config, "requests": requests,
            "seconds": seconds}


@pytest.mark.slow
def test_every_dataset_downloaded_from_loopback_with_pinned_checksums(run):
    work, world = run["work"], run["world"]
    served = {f["url_path"] for ds in world.values() for f in ds["files"].values()}
    assert sorted(run["requests"]) == sorted(served)        # each archive fetched once
    for name, ds in world.items():
        manifest = json.loads((work / "data" / name / "download_manifest.json").read_text())
        assert manifest["manual"] is False
        assert manifest["files"] == {f: info["sha256"] for f, info in ds["files"].items()}
        assert manifest["files"] == run["config"]["datasets"][name]["sha256"]
        root = work / manifest["root"]
        assert not list(root.glob("*.sha256")), "unpinned download (no sha256 in the config)"
        assert not list(root.glob("*.part"))
        for expected in manifest["expected"]:
            assert (root / expected).exists(), (name, expected)


@pytest.mark.slow
def test_converted_splits_validate_and_point_at_real_images(run):
    work, world = run["work"], run["world"]
    for name, splits in SPLITS.items():
        for split in splits:
            path = work / "data" / name / f"{split}.h5"
            sizes = validate_split(path)
            assert sizes["N"] == world[name]["rows"][split], (name, split, sizes)
            with SplitReader(path) as r:
                if name == "posescript":
                    assert sizes["M"] == world[name]["captions"][split] > 0
                    assert not r.has("image_paths")
                    continue
                paths = [str(p) for p in r.read("image_paths")]
                assert len(paths) == sizes["N"]
                missing = [p for p in paths if not (work / p).is_file()]
                assert not missing, missing[:3]
                assert r.has("image_pose/global_orient")
                if (name, split) == ("h36m", "test"):       # protocol 2: joints, no SMPL fits
                    assert not np.asarray(r.read("meta/has_smpl")).any()
                    assert r.has("meta/gt_joints3d_spin24")
                if name == "pw3d":                          # row i <-> image_{i:05d}.jpg
                    frames = np.asarray(r.read("meta/frame"))
                    assert all(p.endswith(f"image_{f:05d}.jpg") for p, f in zip(paths, frames))


def _inputs(client, run_id) -> dict[str, str]:
    """MLflow run inputs: dataset name -> context tag."""
    out = {}
    for d in client.get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in d.tags}
        out[d.dataset.name] = tags.get("mlflow.data.context")
    return out


@pytest.mark.slow
def test_training_jobs_read_the_configured_real_sources(run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run['work']}/results/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    by_rule: dict[str, list] = {}
    for r in runs:
        by_rule.setdefault(r.data.tags.get("rule"), []).append(r)
    assert {f"download_{d}" for d in SPLITS} | {f"convert_{d}" for d in SPLITS} <= set(by_rule)

    retrieval = by_rule["train_retrieval"]
    assert len(retrieval) == 2                               # reward and evaluator
    for r in retrieval:
        assert _inputs(client, r.info.run_id) == {
            "posescript/train": "train", "posescript/val": "val", "posescript/test": "test"}
    (sft,) = by_rule["sft"]
    assert _inputs(client, sft.info.run_id) == {
        "posescript/train": "train", "pw3d/train": "train", "h36m/train": "train",
        "coco_eft/train": "train", "posescript/val": "val", "pw3d/val": "val"}
    tasks = set(sft.data.params["sft_tasks"].split(","))
    assert tasks == {"text2pose", "image2pose"}
    (rft,) = by_rule["rft"]
    assert _inputs(client, rft.info.run_id) == {
        "posescript/train": "train", "pw3d/train": "train", "h36m/train": "train",
        "posescript/val": "val", "pw3d/val": "val"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_metrics_score_the_real_test_layouts(run):
    res = run["work"] / "results"
    for variant in ("dist", "dist_rft"):
        metrics = json.loads((res / "runs" / variant / "seed0" / "metrics.json").read_text())
        assert set(metrics["image2pose"]) == {"synthetic", "pw3d", "h36m"}
        for name, m in metrics["image2pose"].items():
            assert m["num_samples"] == 8, (variant, name)
            for key in ("mpjpe", "pa_mpjpe", "best_of_n_mpjpe", "best_of_n_pa_mpjpe"):
                assert _finite(m[key]) and m[key] >= 0, (variant, name, key, m[key])
        assert set(metrics["text2pose"]) == {"synthetic", "posescript"}
        ps = metrics["text2pose"]["posescript"]
        assert ps["num_samples"] == 40
        assert _finite(ps["mpjpe"]) and _finite(ps["pa_mpjpe"])
        for protocol in ("protocol1", "protocol2"):
            for key, value in ps[protocol].items():
                assert _finite(value) and 0 <= value <= 100, (variant, protocol, key, value)
    recall = json.loads((res / "retrieval" / "evaluator" / "recall.json").read_text())
    assert set(recall) == {"full", "sampled"}
    main = (res / "tables" / "main.md").read_text()
    assert "dist_rft" in main


@pytest.mark.slow
def test_nothing_to_do_after_a_complete_run(run):
    proc = run_dag(run["work"], run["config"], "-n", cores=1, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert planned_jobs(proc.stdout + proc.stderr) == {}, (proc.stdout + proc.stderr)[-4000:]
