"""Glue between a Snakemake ``script:`` job and poserft: logging, tracking, params.

A workflow script is a thin adapter::

    from poserft.workflow import job
    with job(snakemake) as (params, tracker):
        train_retrieval(params["retrieval"], ..., tracker=tracker)

``job`` sends stdout/stderr (progress bars included) to the rule's ``log:`` file, opens
one MLflow run tagged with rule, wildcards, variant, git commit and config hash, logs the
rule's ``params`` flattened, and marks the run FAILED if the job raises (Snakemake then
deletes the job's outputs, so nothing half-written is taken as done).

A param named after a config section (``params: rft=CFG.variant_params(...)``) arrives as
that section's typed object (:data:`poserft.config.SECTIONS`): the rule passed its
canonical dict, and the library functions take typed sections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from poserft.config import SECTIONS, config_hash, section_class
from poserft.tracking import NullTracker, Tracker, git_commit, rank_zero

__all__ = ["job", "plain", "typed_params", "source_split_paths"]


def plain(obj: Any) -> Any:
    """Snakemake ``Namedlist``/``Params`` (and nested) -> plain dicts/lists."""
    if hasattr(obj, "items") and callable(obj.items):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def source_split_paths(inputs: Any) -> dict[str, dict[str, str]]:
    """``{source: {split: path}}`` from a rule's named inputs ``<source>__<split>`` (what
    :meth:`poserft.config.WorkflowConfig.training_files` names them), in input order."""
    out: dict[str, dict[str, str]] = {}
    for key, value in inputs.items():
        if "__" in key:
            source, split = key.rsplit("__", 1)
            out.setdefault(source, {})[split] = str(value)
    return out


def typed_params(params: dict) -> dict:
    """Params named after a config section -> that section's typed object; others as given."""
    return {k: section_class(k).from_dict(v, where=k) if k in SECTIONS and isinstance(v, dict)
            else v for k, v in params.items()}


@contextlib.contextmanager
def _redirect_to(log_path: str | None) -> Iterator[None]:
    if not log_path:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as fh, \
            contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.removeHandler(handler)


def limit_threads(threads: int) -> None:
    """Use exactly the job's ``threads`` for math libraries.

    Snakemake runs up to ``--cores`` jobs at once; torch would otherwise give every job
    all cores, and oversubscribed tiny-model training runs 10-40x slower (measured).
    """
    threads = max(1, int(threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(threads)


@contextlib.contextmanager
def job(snakemake: Any, results_dir: str = "results") -> Iterator[tuple[dict, Any]]:
    """Context for one Snakemake job: ``(params, tracker)``; sections typed (:func:`typed_params`)."""
    limit_threads(getattr(snakemake, "threads", 1) or 1)
    params = {k: plain(v) for k, v in snakemake.params.items()}
    wildcards = {k: str(v) for k, v in snakemake.wildcards.items()}
    tracking = (snakemake.config or {}).get("tracking") or {}
    log_path = snakemake.log[0] if len(snakemake.log) else None
    run_name = snakemake.rule + "".join(f"-{v}" for v in wildcards.values())
    with _redirect_to(log_path):
        tracker: Any = NullTracker()
        if tracking.get("enabled", True) and rank_zero():
            tags = {"rule": snakemake.rule, "git_commit": git_commit(),
                    "config_hash": config_hash(params),
                    "variant": wildcards.get("variant", ""),
                    **{f"wildcard.{k}": v for k, v in wildcards.items()},
                    "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
            tracker = Tracker(tracking.get("experiment", "poserft"), run_name,
                              tracking_uri=tracking.get("tracking_uri"),
                              artifact_root=tracking.get("artifact_root"),
                              results_dir=results_dir, tags=tags, params=params)
        print(f"[poserft] {run_name}: params hash {config_hash(params)}", file=sys.stderr)
        with tracker:
            yield typed_params(params), tracker
