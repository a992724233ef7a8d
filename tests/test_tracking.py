"""MLflow tracking: runs written by poserft are readable back through the client API."""
from __future__ import annotations

import types

import pytest

mlflow = pytest.importorskip("mlflow")

from poserft.tracking import (  # noqa: E402
    NullTracker, Tracker, flatten_params, metric_name, resolve_tracking_uri)
from poserft.workflow import job  # noqa: E402


def test_flatten_params():
    assert flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == \
        {"a.b": "1", "a.c": "[1, 2]", "d": "None", "e": "{}"}


def test_metric_names_are_made_mlflow_safe():
    assert metric_name("test/full/t2p_R@10") == "test/full/t2p_R_at_10"
    assert metric_name("a:b(c)") == "a_b_c_"


def test_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("http://x:5000", tmp_path) == "http://x:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri("http://x:5000", tmp_path) == "http://127.0.0.1:1"


def _fake_snakemake(tmp_path, rule="sft", wildcards=None, params=None):
    return types.SimpleNamespace(
        rule=rule, wildcards=dict(wildcards or {}), params=dict(params or {}),
        log=[str(tmp_path / "logs" / f"{rule}.log")],
        config={"tracking": {"experiment": "poserft-test", "tracking_uri": None,
                             "artifact_root": None, "enabled": True}})


def test_job_run_is_readable_back(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    smk = _fake_snakemake(tmp_path, wildcards={"variant": "dist", "seed": "0"},
                          params={"sft": {"optim": {"lr": 0.001}, "steps": 3}, "note": "x"})
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    with job(smk, results_dir=str(tmp_path / "results")) as (params, tracker):
        # a param named after a config section arrives typed; others as given
        from poserft.train.config import SFTConfig
        assert isinstance(params["sft"], SFTConfig) and params["note"] == "x"
        assert (params["sft"].steps, params["sft"].optim.lr) == (3, 0.001)
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "val/t2p_R@5": 50.0}, step=step)
        tracker.log_artifact(artifact)
        print("inside the job")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/results/mlflow.db")
    exp = client.get_experiment_by_name("poserft-test")
    assert exp.artifact_location.startswith("file://") and "mlartifacts" in exp.artifact_location
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params == {"sft.optim.lr": "0.001", "sft.steps": "3", "note": "x"}
    assert run.data.tags["rule"] == "sft" and run.data.tags["variant"] == "dist"
    assert run.data.tags["wildcard.seed"] == "0" and len(run.data.tags["config_hash"]) == 12
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert history[-1].value == pytest.approx(1 / 3)
    assert client.get_metric_history(run.info.run_id, "val/t2p_R_at_5")[0].value == 50.0
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    assert not (tmp_path / "mlruns").exists()  # artifacts never land in the CWD
    assert "inside the job" in (tmp_path / "logs" / "sft.log").read_text()


def test_failed_job_marks_run_failed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    smk = _fake_snakemake(tmp_path, rule="rft")
    with pytest.raises(RuntimeError):
        with job(smk, results_dir=str(tmp_path / "results")):
            raise RuntimeError("boom")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/results/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("poserft-test").experiment_id])
    assert run.info.status == "FAILED"


def test_non_zero_rank_does_not_log(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RANK", "1")
    with job(_fake_snakemake(tmp_path), results_dir=str(tmp_path / "results")) as (_, tracker):
        assert isinstance(tracker, NullTracker) and not isinstance(tracker, Tracker)
    assert not (tmp_path / "results" / "mlflow.db").exists()


def test_parallel_jobs_recording_the_same_dataset_do_not_fail(tmp_path, monkeypatch):
    """Two jobs started together record the same split: MLflow's SQL store checks for the
    dataset row, both find none, the second insert hits the unique key. log_datasets
    retries; the row exists by then and is linked. Here the clash is forced: the first
    attempt lets the other job's insert land, then fails the way SQLite does."""
    from mlflow.exceptions import MlflowException

    from poserft.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    split = tmp_path / "train.h5"
    split.write_bytes(b"x" * 64)
    ds = [{"name": "synthetic/train", "path": str(split), "context": "train"}]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    kw = dict(tracking_uri=uri, results_dir=str(tmp_path))
    first = Tracker("poserft-race", "sft-a", **kw)
    other = Tracker("poserft-race", "sft-b", **kw)
    real = first._client.log_inputs
    calls = []

    def clash_once(run_id, datasets=None, **k):
        calls.append(run_id)
        if len(calls) == 1:
            other.log_datasets(ds)          # the parallel job's insert lands first
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                  "datasets.experiment_id, datasets.name, datasets.digest")
        return real(run_id, datasets=datasets, **k)

    monkeypatch.setattr(first._client, "log_inputs", clash_once)
    first.log_datasets(ds)
    assert len(calls) == 2
    client = mlflow.MlflowClient(tracking_uri=uri)
    for t in (first, other):
        (inp,) = client.get_run(t.run_id).inputs.dataset_inputs
        assert inp.dataset.name == "synthetic/train"

    # any other MLflow error is not retried; a clash that never clears ends in the error
    def broken(run_id, datasets=None, **k):
        calls.append(run_id)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run")

    monkeypatch.setattr(first._client, "log_inputs", broken)
    calls.clear()
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        first.log_datasets(ds)
    assert len(calls) == 1

    def always_clash(run_id, datasets=None, **k):
        calls.append(run_id)
        raise MlflowException("UNIQUE constraint failed: datasets.name")

    monkeypatch.setattr(first._client, "log_inputs", always_clash)
    monkeypatch.setattr("poserft.tracking.time.sleep", lambda s: None)
    calls.clear()
    with pytest.raises(MlflowException, match="UNIQUE"):
        first.log_datasets(ds)
    assert len(calls) == 4
    first.end()
    other.end()
