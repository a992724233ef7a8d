"""MLflow tracking: one run per Snakemake job.

* Experiment from ``tracking.experiment``; the run is tagged with the rule, wildcards,
  variant, git commit and the hash of the stage's config, and the stage's config is
  logged flattened as params (run ids and timestamps never enter config or params).
* Default tracking URI: ``sqlite:///<results>/mlflow.db`` with artifacts in
  ``<results>/mlartifacts`` (absolute, so artifacts never land in a job's CWD ``./mlruns``).
  ``MLFLOW_TRACKING_URI`` in the environment overrides it (an ``mlflow server`` on a cluster).
* Only rank 0 logs; other ranks get a :class:`NullTracker`.

Browse the runs with ``mlflow ui --backend-store-uri sqlite:///results/mlflow.db``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = ["NullTracker", "Tracker", "resolve_tracking_uri", "ensure_experiment",
           "flatten_params", "git_commit", "rank_zero", "metric_name"]

_MLFLOW_PARAM_MAX = 6000  # mlflow's limit on a param value's length
_MLFLOW_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(name: str) -> str:
    """MLflow accepts only ``[A-Za-z0-9_-. /]`` in names: ``t2p_R@5`` -> ``t2p_R_at_5``."""
    return _MLFLOW_BAD_NAME_CHARS.sub("_", name.replace("@", "_at_"))


def rank_zero() -> bool:
    """True unless a distributed launcher says this process is not rank 0."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return os.environ[var] == "0"
    return True


def resolve_tracking_uri(configured: str | None, results_dir: str | os.PathLike = "results") -> str:
    """``MLFLOW_TRACKING_URI`` > configured > SQLite file under ``results_dir``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    db = Path(results_dir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def default_artifact_root(uri: str, configured: str | None, results_dir: str | os.PathLike) -> str | None:
    if configured:
        return configured
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return (Path(results_dir).resolve() / "mlartifacts").as_uri()
    return None  # a tracking server chooses (its --default-artifact-root)


def ensure_experiment(name: str, uri: str, artifact_root: str | None = None, retries: int = 5) -> str:
    """Get or create the experiment; safe when several jobs race to create it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=uri)
    last: Exception | None = None
    for attempt in range(retries):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException as exc:  # lost the race, or the DB was busy: look again
            last = exc
            time.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"could not get or create MLflow experiment {name!r} at {uri}: {last}")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists and None become strings."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = str(value)
            out[name] = text if len(text) <= _MLFLOW_PARAM_MAX else text[: _MLFLOW_PARAM_MAX - 3] + "..."
    return out


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_input(name: str, path: str | os.PathLike, context: str, weight: float | None = None,
                  profile: Mapping[str, Any] | None = None):
    """An MLflow ``DatasetInput`` for split file ``path``: named ``name`` (e.g.
    ``posescript/train``), digest from the file's path, size and mtime (a rewritten file is a
    new dataset version), ``context`` ('train', 'val', 'test') and the mixture ``weight`` as
    input tags, ``profile`` (row counts) shown in the UI."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    p = Path(path).resolve()
    st = p.stat()
    digest = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    tags = [InputTag("mlflow.data.context", context)]
    if weight is not None:
        tags.append(InputTag("weight", f"{float(weight):g}"))
    dataset = Dataset(name=name, digest=digest, source_type="local",
                      source=json.dumps({"uri": str(p)}),
                      profile=json.dumps(dict(profile)) if profile else None)
    return DatasetInput(dataset=dataset, tags=tags)


def record_datasets(tracker, datasets: list[Mapping[str, Any]]) -> None:
    """``tracker.log_datasets(datasets)`` when the tracker records datasets (a test double or
    another rank's null tracker may not)."""
    log = getattr(tracker, "log_datasets", None)
    if log is not None:
        log(datasets)


class NullTracker:
    """Tracker that records nothing (non-zero ranks, tests, tracking disabled)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_datasets(self, datasets: list[Mapping[str, Any]]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.end("FAILED" if exc_type else "FINISHED")
        return False


_DATASET_RETRIES = 4      # log_inputs attempts when a parallel job inserts the same dataset row
# how SQLAlchemy words a unique-key clash: SQLite, PostgreSQL, MySQL
_UNIQUE_VIOLATION = ("UNIQUE constraint failed", "UniqueViolation", "duplicate key value",
                     "Duplicate entry")


def _is_unique_violation(exc: Exception) -> bool:
    return any(marker in str(exc) for marker in _UNIQUE_VIOLATION)


class Tracker(NullTracker):
    """One MLflow run. Use as a context manager; the run ends FAILED on an exception."""

    def __init__(self, experiment: str, run_name: str, *, tracking_uri: str | None = None,
                 artifact_root: str | None = None, results_dir: str | os.PathLike = "results",
                 tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None):
        import mlflow

        self.uri = resolve_tracking_uri(tracking_uri, results_dir)
        root = default_artifact_root(self.uri, artifact_root, results_dir)
        self.experiment_id = ensure_experiment(experiment, self.uri, root)
        self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        run = self._client.create_run(self.experiment_id, run_name=run_name,
                                      tags={k: str(v) for k, v in (tags or {}).items()})
        self.run_id = run.info.run_id
        self.owns_run = True
        self._ended = False
        if params:
            self.log_params(params)

    @classmethod
    def attach(cls, run_id: str, tracking_uri: str) -> "Tracker":
        """Log into an existing run that another process owns.

        For the ranks started by :func:`poserft.train.launch.launch_local`: the Snakemake job
        (the parent) opened the run, rank 0 logs into it, and only the parent ends it, so one
        job is one run. ``end`` is a no-op here; the run must exist.
        """
        import mlflow
        from mlflow.exceptions import MlflowException

        self = cls.__new__(cls)
        self.uri = tracking_uri
        self._client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            raise ValueError(f"cannot attach to MLflow run {run_id!r} at {tracking_uri}: {exc}") from exc
        self.experiment_id = run.info.experiment_id
        self.run_id = run.info.run_id
        self.owns_run = False
        self._ended = False
        return self

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # mlflow's batch limit
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_name(k), float(v), now, int(step or 0))
                 for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_datasets(self, datasets: list[Mapping[str, Any]]) -> None:
        """Record the split files this run read as MLflow run inputs (the UI's Datasets
        column): :func:`dataset_input` of each ``{name, path, context, weight?, profile?}``.

        Two jobs that start together (the DAG runs SFT jobs side by side) record the same
        split, so the same dataset row, at the same moment: MLflow's SQL store looks the row
        up, finds none in either job, and the second insert fails its unique key. The row
        exists then, so a retry links it instead of failing the training job."""
        if not datasets:
            return
        from mlflow.exceptions import MlflowException

        inputs = [dataset_input(**d) for d in datasets]
        for attempt in range(_DATASET_RETRIES):
            try:
                self._client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as exc:
                if not _is_unique_violation(exc) or attempt == _DATASET_RETRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def end(self, status: str = "FINISHED") -> None:
        if self.owns_run and not self._ended:
            self._client.set_terminated(self.run_id, status=status)
            self._ended = True
