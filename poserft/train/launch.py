"""Start a training stage on every process of one node (torchrun semantics).

A Snakemake ``script:`` job is ONE process, even inside an 8-GPU SLURM allocation. The
``sft`` and ``rft`` workflow scripts therefore hand their stage to :func:`launch_local`:

* ``nproc <= 1``: the stage runs in-process, exactly as before.
* ``nproc > 1``: the stage's keyword arguments go into a temporary JSON payload and
  ``python -m torch.distributed.run --standalone --nproc-per-node N -m poserft.train.launch
  MODULE:QUALNAME PAYLOAD`` starts N ranks on this node; each rank runs :func:`stage_entry`,
  which imports the stage function by that reference (e.g. ``poserft.train.sft:run_sft``)
  and calls it. ``TrainEngine`` reads ``RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*`` from torchrun
  (nccl and ``cuda:LOCAL_RANK`` on GPUs, gloo on CPU).

The stage is the function itself (``launch_local(run_sft, kwargs, nproc, tracker=...)``), so
go-to-definition follows it; with several ranks it must be importable by its module and
qualified name (a module-level function, not a lambda, closure or ``__main__`` function).

How many processes (:func:`resolve_nproc`, from the job's Snakemake resources): one per GPU
when the job asks for ``gpu`` > 1 (the SLURM profile: ``gpu: 8``); otherwise the
``nproc_per_node`` resource (default 1), which starts that many CPU (gloo) ranks, e.g.
``snakemake --set-resources sft:nproc_per_node=2``.

MLflow: one run per Snakemake job. The parent (the workflow script, through
``poserft.workflow.job``) owns the run; its id and tracking URI go into the payload, rank 0
logs into it through :meth:`poserft.tracking.Tracker.attach` and never ends it, ranks > 0 get
a :class:`~poserft.tracking.NullTracker`. Rank 0's return value (the stage summary) comes back
to the parent through a JSON file.

Failures: a rank that raises makes torchrun stop the others and exit non-zero;
:func:`launch_local` then raises :class:`LaunchError` with the failing rank's log tail (per-rank
logs are tee'd by torchrun into a temporary ``--log-dir``; all output also goes to the
parent's stdout, i.e. the rule's ``log:`` file).

Payload JSON::

    {"stage": "poserft.train.sft:run_sft", "kwargs": {...run_sft keyword arguments, JSON...},
     "tracking": {"run_id": "...", "tracking_uri": "..."} | null, "result_path": "..."}

Config sections (:class:`poserft.configbase.Section`, e.g. the typed params of
``poserft.workflow.job``) travel as ``{"__section__": "module:qualname", "fields": {...}}``
and reach the ranks as the same typed object (``from_dict`` of its ``to_dict``).
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["NPROC_RESOURCE", "LaunchError", "resolve_nproc", "job_nproc", "stage_reference",
           "resolve_stage", "launch_local", "stage_entry", "main"]

log = logging.getLogger(__name__)

NPROC_RESOURCE = "nproc_per_node"
_SECTION_KEY = "__section__"  # a config section in the payload (module docstring)
# Variables of an enclosing launcher that must not leak into the ranks' rendezvous.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                  "TORCHELASTIC_ERROR_FILE")
_TAIL_LINES = 60


class LaunchError(RuntimeError):
    """The ranks of a launched stage did not all finish."""


def _int_resource(resources: Mapping[str, Any], name: str, default: int) -> int:
    value = resources.get(name, default)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"resources.{name}={value!r} is not an integer; set it to a whole "
                         f"number of {'GPUs' if name == 'gpu' else 'processes'}") from None
    if number < 0 or number != float(value):
        raise ValueError(f"resources.{name}={value!r} must be a whole number >= 0")
    return number


def resolve_nproc(resources: Mapping[str, Any], cuda_devices: int | None = None) -> int:
    """Processes to start for a job, from its Snakemake resources.

    * ``gpu`` >= 1: one rank per GPU (``nproc_per_node`` may be left out or 1, or repeat it).
    * no GPUs: ``nproc_per_node`` (default 1) CPU ranks (gloo), for tests and CPU clusters.

    ``cuda_devices`` (``torch.cuda.device_count()``, None to skip the check): with ``gpu`` > 1
    at least that many devices must be visible, otherwise ranks would silently share or miss
    GPUs.
    """
    gpus = _int_resource(resources, "gpu", 0)
    asked = _int_resource(resources, NPROC_RESOURCE, 1)
    if asked == 0:
        raise ValueError(f"resources.{NPROC_RESOURCE}=0: at least one process is needed "
                         "(1 runs the stage in-process)")
    if gpus >= 1:
        if asked > 1 and asked != gpus:
            raise ValueError(f"resources.{NPROC_RESOURCE}={asked} but resources.gpu={gpus}: a job "
                             f"with GPUs runs one rank per GPU; drop {NPROC_RESOURCE} or set it "
                             f"to {gpus}")
        if gpus > 1 and cuda_devices is not None and cuda_devices < gpus:
            raise ValueError(f"resources.gpu={gpus} but only {cuda_devices} CUDA device(s) are "
                             f"visible (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); run the job "
                             "inside its GPU allocation or lower resources.gpu")
        return gpus
    return asked


def job_nproc(snakemake: Any) -> int:
    """:func:`resolve_nproc` for a Snakemake ``script:`` job (checks the visible GPUs)."""
    resources = {str(k): v for k, v in snakemake.resources.items()}
    cuda_devices = None
    if _int_resource(resources, "gpu", 0) > 1:
        import torch
        cuda_devices = torch.cuda.device_count()
    return resolve_nproc(resources, cuda_devices)


def resolve_stage(reference: str) -> Callable[..., dict]:
    """The function named by ``"module:qualname"`` (what :func:`stage_reference` returns)."""
    module, sep, qualname = reference.partition(":")
    if not sep or not module or not qualname:
        raise ValueError(f"stage reference {reference!r} is not 'module:qualname'")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def stage_reference(fn: Callable[..., Any]) -> str:
    """``"module:qualname"`` of a stage function (or a config section class), checked to
    import back to ``fn`` itself.

    The ranks started by torchrun are new interpreters: they get the stage by importing it,
    so it must be a module-level function (or a class attribute) of an importable module.
    Lambdas, closures, functions of ``__main__`` and wrappers that hide the original raise
    ValueError here, before anything starts.
    """
    if not callable(fn):
        raise TypeError(f"launch_local: the stage must be a function, got {type(fn).__name__}")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    reference = f"{module}:{qualname}"
    why = None
    if not module or not qualname:
        why = "it has no __module__/__qualname__"
    elif "<" in qualname:  # '<lambda>', 'outer.<locals>.inner'
        why = "lambdas and functions defined inside functions cannot be imported"
    elif module == "__main__":
        why = "functions of __main__ are not importable in the ranks"
    else:
        try:
            found = resolve_stage(reference)
        except (ImportError, AttributeError) as exc:
            why = f"importing it failed ({type(exc).__name__}: {exc})"
        else:
            if found is not fn:
                why = "that name holds a different object (rebound, or a decorator's wrapper)"
    if why is not None:
        raise ValueError(f"launch_local: stage {reference} cannot be started on several ranks: "
                         f"{why}; pass a module-level function such as "
                         "poserft.train.sft.run_sft")
    return reference


def _json_default(obj: Any) -> Any:
    from poserft.configbase import Section

    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Section):
        return {_SECTION_KEY: stage_reference(type(obj)), "fields": obj.to_dict()}
    raise TypeError(type(obj).__name__)


def _json_object(d: dict) -> Any:
    """``json.loads`` hook: a config section of the payload back to its typed object."""
    if _SECTION_KEY in d:
        cls = resolve_stage(d[_SECTION_KEY])
        return cls.from_dict(d["fields"], where=cls.__name__)
    return d


def _check_json_kwargs(stage: str, kwargs: Mapping[str, Any]) -> None:
    """ValueError naming the first argument that cannot travel to the ranks as JSON."""
    for key, value in kwargs.items():
        try:
            json.dumps(value, default=_json_default, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"launch_local({stage}): argument {key!r} cannot be sent to the "
                             f"ranks as JSON ({exc}); pass config sections and paths, and let "
                             "the stage build objects itself (e.g. text_embedder as its "
                             "section)") from None


def _payload_text(stage: str, kwargs: Mapping[str, Any], tracking: dict | None,
                  result_path: Path) -> str:
    """The payload JSON; ``stage`` is the function's ``module:qualname`` reference."""
    _check_json_kwargs(stage, kwargs)
    return json.dumps({"stage": stage, "kwargs": dict(kwargs), "tracking": tracking,
                       "result_path": str(result_path)}, default=_json_default, allow_nan=False)


def _tracking_of(tracker: Any) -> dict | None:
    """Run id + URI of the parent's MLflow run, or None (tracking disabled: NullTracker)."""
    run_id, uri = getattr(tracker, "run_id", None), getattr(tracker, "uri", None)
    return {"run_id": run_id, "tracking_uri": uri} if run_id and uri else None


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    # the ranks import poserft from the same tree as this process, installed or not
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # rank output reaches the log in order, not at exit
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun would set it too, with a warning
    return env


def _failing_rank(output: str) -> int | None:
    """The rank torchrun names as the root cause of a failure, if it printed one."""
    section = output.rsplit("Root Cause", 1)[-1] if "Root Cause" in output else ""
    m = re.search(r"^\s*rank\s*:\s*(\d+)", section, re.MULTILINE)
    return int(m.group(1)) if m else None


def _rank_log_tail(log_dir: Path, rank: int, lines: int = _TAIL_LINES) -> str:
    """Last lines of one rank's stdout+stderr that torchrun tee'd under ``log_dir``."""
    parts = []
    for stream in ("stdout", "stderr"):
        for path in sorted(log_dir.glob(f"**/attempt_*/{rank}/{stream}.log")):
            text = path.read_text(errors="replace").splitlines()
            if text:
                parts.append(f"--- rank {rank} {stream} ---\n" + "\n".join(text[-lines:]))
    return "\n".join(parts)


def _failure_message(stage: str, nproc: int, rc: int, output: str, log_dir: Path) -> str:
    rank = _failing_rank(output)
    ranks = [rank] if rank is not None else list(range(nproc))
    tails = "\n".join(t for t in (_rank_log_tail(log_dir, r) for r in ranks) if t)
    if not tails:  # torchrun failed before any rank wrote: show its own output
        tails = "--- torchrun ---\n" + "\n".join(output.splitlines()[-_TAIL_LINES:])
    who = f"rank {rank} failed first" if rank is not None else "no rank named as the root cause"
    return (f"stage {stage}: {nproc} processes launched with torchrun exited with code {rc} "
            f"({who}). Log tail:\n{tails}")


def _run_streaming(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``cmd``; copy its output to our stdout (the rule's log) as it comes. Returns
    (exit code, last lines). SIGTERM/Ctrl-C stop torchrun, which stops its ranks."""
    tail: collections.deque[str] = collections.deque(maxlen=400)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def _terminate(signum, frame):  # the job is being killed: take the ranks with us
        raise SystemExit(128 + signum)

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
        return proc.wait(), "".join(tail)
    finally:
        if proc.poll() is None:
            proc.terminate()  # torchrun forwards SIGTERM to its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def launch_local(stage: Callable[..., dict], kwargs: Mapping[str, Any], nproc: int,
                 tracker: Any = None) -> dict:
    """Run the stage function ``stage`` (e.g. :func:`poserft.train.sft.run_sft`) with
    ``kwargs`` and ``tracker=`` on ``nproc`` processes of this node; return rank 0's summary.

    ``tracker``: the job's tracker (``poserft.workflow.job``). In-process it is passed through;
    with several ranks rank 0 logs into the same MLflow run. When ``nproc > 1``, ``stage`` must
    be importable as ``module:qualname`` (:func:`stage_reference`) and ``kwargs`` must be JSON
    (dicts, lists, numbers, strings, paths) or config sections; both are checked before
    anything starts.
    """
    nproc = int(nproc)
    if nproc <= 1:
        if not callable(stage):
            raise TypeError(f"launch_local: the stage must be a function, got "
                            f"{type(stage).__name__}")
        return stage(**kwargs, tracker=tracker)
    reference = stage_reference(stage)
    _check_json_kwargs(reference, kwargs)
    if tracker is not None:
        tracker.set_tags({"nproc_per_node": nproc})
    with tempfile.TemporaryDirectory(prefix=f"poserft-{getattr(stage, '__name__', 'stage')}-launch-") as tmp:
        tmp = Path(tmp)
        result_path = tmp / "result.json"
        payload = tmp / "payload.json"
        payload.write_text(_payload_text(reference, kwargs, _tracking_of(tracker), result_path))
        log_dir = tmp / "ranks"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "--max-restarts=0", f"--log-dir={log_dir}",
               "--tee=3", "-m", "poserft.train.launch", reference, str(payload)]
        log.info("%s: starting %d processes: %s", reference, nproc, " ".join(cmd))
        rc, output = _run_streaming(cmd, _child_env())
        if rc != 0:
            raise LaunchError(_failure_message(reference, nproc, rc, output, log_dir))
        if not result_path.exists():
            raise LaunchError(f"stage {reference}: all {nproc} processes exited 0 but rank 0 "
                              f"wrote no summary to {result_path}")
        return json.loads(result_path.read_text())


def stage_entry(stage: str, payload_path: str | os.PathLike) -> dict:
    """One rank: load the payload, build this rank's tracker, import and run the stage
    (``stage``: its ``module:qualname`` reference, as on the command line).

    Rank 0 logs into the parent's MLflow run (never ending it) and writes the summary for the
    parent; other ranks get a NullTracker and write nothing.
    """
    from poserft.tracking import NullTracker, Tracker, rank_zero

    payload = json.loads(Path(payload_path).read_text(), object_hook=_json_object)
    if payload.get("stage") != stage:
        raise ValueError(f"{payload_path}: payload is for stage {payload.get('stage')!r}, "
                         f"launched as {stage!r}")
    fn = resolve_stage(stage)
    tracking = payload.get("tracking")
    main_rank = rank_zero()
    tracker: Any = NullTracker()
    if tracking and main_rank:
        tracker = Tracker.attach(tracking["run_id"], tracking["tracking_uri"])
    try:
        summary = fn(**payload["kwargs"], tracker=tracker)
        if main_rank and payload.get("result_path"):
            from poserft.atomic import write_json
            write_json(payload["result_path"], summary, allow_nan=True)
        return summary
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m poserft.train.launch MODULE:FUNCTION PAYLOAD.json  (started by "
              "torchrun; see poserft.train.launch.launch_local)", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    # record: a rank's traceback reaches torchrun's failure summary (its "Root Cause")
    record(stage_entry)(argv[0], argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
