"""Single-node multi-process launcher: poserft.train.launch (+ Tracker.attach).

Fast: how many processes a job gets from its Snakemake resources, payload checks, the
in-process path, torchrun's failure summary parsing, and attaching to a parent's MLflow run.

Slow (torchrun, 2 CPU ranks with gloo): ``workflow_scripts/sft.py`` itself, given Snakemake's
own containers with ``resources: nproc_per_node=2``, trains the tiny model. Checked against an independent in-process
reference: 2 ranks x 1 micro-batch each must give the weights of ONE process accumulating the
same 2 micro-batches (``run_sft`` gives rank r micro-batch ``micro * world + rank``), and must
differ from one process that saw only rank 0's micro-batch, so the ranks really averaged
gradients. The exported policy loads, and the job has exactly one MLflow run (the parent's)
holding rank 0's metrics.
"""
from __future__ import annotations

import functools
import json
import time
import types
from pathlib import Path

import pytest
import torch

from poserft.train import launch
from poserft.train.launch import LaunchError, launch_local, resolve_nproc

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------- process count

@pytest.mark.parametrize("resources, cuda, expected", [
    ({}, None, 1),                                        # local default: in-process
    ({"nproc_per_node": 2}, None, 2),                     # CPU ranks on request
    ({"gpu": 0, "nproc_per_node": 3}, 0, 3),
    ({"gpu": 1}, 1, 1),
    ({"gpu": 8, "cpus_per_gpu": 8}, 8, 8),                # SLURM profile: one rank per GPU
    ({"gpu": 8, "nproc_per_node": 1}, 8, 8),              # the rule's default does not cap GPUs
    ({"gpu": "4", "nproc_per_node": 4}, None, 4),         # strings from --set-resources
])
def test_resolve_nproc(resources, cuda, expected):
    assert resolve_nproc(resources, cuda_devices=cuda) == expected


@pytest.mark.parametrize("resources, cuda, match", [
    ({"gpu": 8, "nproc_per_node": 4}, 8, r"nproc_per_node=4 but resources.gpu=8"),
    ({"gpu": 8}, 2, r"resources.gpu=8 but only 2 CUDA device"),
    ({"nproc_per_node": 0}, None, r"nproc_per_node=0"),
    ({"nproc_per_node": "two"}, None, r"nproc_per_node='two' is not an integer"),
    ({"gpu": -1}, None, r"resources.gpu=-1 must be a whole number"),
    ({"nproc_per_node": 1.5}, None, r"nproc_per_node=1.5 must be a whole number"),
])
def test_resolve_nproc_rejects_bad_resources(resources, cuda, match):
    with pytest.raises(ValueError, match=match):
        resolve_nproc(resources, cuda_devices=cuda)


def test_job_nproc_reads_the_snakemake_resources():
    fake = types.SimpleNamespace(resources={"_cores": 2, "mem_mb": 6000, "nproc_per_node": 2,
                                            "tmpdir": "/tmp"})
    assert launch.job_nproc(fake) == 2
    fake.resources = {"_cores": 1, "mem_mb": 6000}
    assert launch.job_nproc(fake) == 1


# --------------------------------------------------------------------------- payload, in-process

def _echo_stage(tracker=None, **kwargs):
    return {"kwargs": kwargs, "tracker": tracker}


def test_in_process_path_passes_kwargs_and_tracker():
    sentinel = object()
    out = launch_local(_echo_stage, {"a": 1, "obj": sentinel}, 1, tracker="the-tracker")
    assert out == {"kwargs": {"a": 1, "obj": sentinel}, "tracker": "the-tracker"}
    # in-process, any callable will do (nothing has to be imported by another interpreter)
    assert launch_local(lambda tracker=None, **kw: kw, {"b": 2}, 1) == {"b": 2}
    with pytest.raises(TypeError, match="the stage must be a function, got str"):
        launch_local("sft", {}, 1)


def test_stage_reference_names_an_importable_function_and_resolves_back():
    from poserft.rl.trainer import run_rft
    from poserft.train.sft import run_sft
    for fn, ref in ((run_sft, "poserft.train.sft:run_sft"),
                    (run_rft, "poserft.rl.trainer:run_rft"),
                    (_Stages.run, f"{__name__}:_Stages.run")):
        assert launch.stage_reference(fn) == ref
        assert launch.resolve_stage(ref) is fn
    with pytest.raises(ValueError, match="is not 'module:qualname'"):
        launch.resolve_stage("poserft.train.sft.run_sft")


def _make_closure():
    def inner(tracker=None, **kwargs):
        return kwargs
    return inner


class _Stages:
    @staticmethod
    def run(tracker=None, **kwargs):
        return kwargs


def _decorated(tracker=None, **kwargs):
    return kwargs


_undecorated = _decorated
_decorated = functools.wraps(_decorated)(lambda tracker=None, **kw: kw)  # the name: a wrapper


def _renamed(fn, **attrs):
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__)
    for key, value in attrs.items():
        setattr(copy, key, value)
    return copy


@pytest.mark.parametrize("fn, why", [
    (lambda tracker=None: {}, "lambdas and functions defined inside functions"),
    (_make_closure(), "lambdas and functions defined inside functions"),
    (_undecorated, "that name holds a different object"),
    (_renamed(_echo_stage, __qualname__="_gone"), "importing it failed \\(AttributeError"),
    (_renamed(_echo_stage, __module__="no_such_module_xyz"),
     "importing it failed \\(ModuleNotFoundError"),
])
def test_unimportable_stages_are_refused_before_starting_anything(monkeypatch, fn, why):
    started = []
    monkeypatch.setattr(launch, "_run_streaming", lambda *a, **k: started.append(a) or (0, ""))
    with pytest.raises(ValueError, match=f"cannot be started on several ranks: {why}"):
        launch_local(fn, {}, 2)
    assert started == []


def test_functions_of_main_and_non_functions_are_refused():
    with pytest.raises(ValueError, match="functions of __main__ are not importable"):
        launch.stage_reference(_renamed(_echo_stage, __module__="__main__"))
    assert launch.stage_reference(_decorated) == f"{__name__}:_decorated"  # what the name holds
    with pytest.raises(TypeError, match="the stage must be a function, got str"):
        launch_local("sft", {}, 2)


def test_non_json_kwargs_fail_before_starting_anything(monkeypatch):
    from poserft.rl.trainer import run_rft
    started = []
    monkeypatch.setattr(launch, "_run_streaming", lambda *a, **k: started.append(a) or (0, ""))
    tracker = types.SimpleNamespace(run_id=None, uri=None, set_tags=lambda t: started.append(t))
    with pytest.raises(ValueError, match=r"launch_local\(poserft.rl.trainer:run_rft\): argument "
                                         r"'text_embedder' cannot be sent to the ranks"):
        launch_local(run_rft, {"out_dir": "x", "text_embedder": object()}, 2, tracker=tracker)
    assert started == []


def test_the_ranks_get_the_stage_by_reference(monkeypatch):
    """The torchrun command line and the payload name the function as module:qualname."""
    from poserft.train.sft import run_sft
    seen = {}

    def fake_run(cmd, env):
        seen["cmd"] = cmd
        payload = json.loads(Path(cmd[-1]).read_text())
        seen["payload"] = payload
        Path(payload["result_path"]).write_text(json.dumps({"ok": 1}))
        return 0, ""

    monkeypatch.setattr(launch, "_run_streaming", fake_run)
    assert launch_local(run_sft, {"out_dir": Path("/runs/x")}, 2) == {"ok": 1}
    assert seen["cmd"][-3:-1] == ["poserft.train.launch", "poserft.train.sft:run_sft"]
    assert seen["payload"]["stage"] == "poserft.train.sft:run_sft"
    assert seen["payload"]["kwargs"] == {"out_dir": "/runs/x"}


def _json_stage(tracker=None, **kwargs):
    return {"kwargs": kwargs, "tracker": type(tracker).__name__}


def test_stage_entry_imports_the_stage_and_checks_the_payload(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    ref = launch.stage_reference(_json_stage)
    payload = tmp_path / "payload.json"
    payload.write_text(launch._payload_text(ref, {"a": 1}, None, tmp_path / "r.json"))
    expected = {"kwargs": {"a": 1}, "tracker": "NullTracker"}
    assert launch.stage_entry(ref, payload) == expected
    assert json.loads((tmp_path / "r.json").read_text()) == expected
    with pytest.raises(ValueError, match="payload is for stage"):
        launch.stage_entry("poserft.train.sft:run_sft", payload)


def _types_stage(tracker=None, **kwargs):
    return {**{k: type(v).__name__ for k, v in kwargs.items()},
            "sft_type": type(kwargs["nested"]["sft"]).__name__,
            "model_fields": kwargs["model_cfg"].to_dict()}


def test_config_sections_reach_the_ranks_typed(tmp_path, monkeypatch):
    """poserft.workflow.job hands typed sections; they cross the payload as themselves."""
    from poserft.model.testing import tiny_model_config
    from poserft.train.config import SFTConfig
    monkeypatch.delenv("RANK", raising=False)
    model = tiny_model_config(head="deterministic")
    sft = SFTConfig.from_dict({"steps": 3}, where="sft")
    kwargs = {"model_cfg": model, "nested": {"sft": sft, "n": 1}, "out_dir": Path("/x")}
    ref = launch.stage_reference(_types_stage)
    text = launch._payload_text(ref, kwargs, None, tmp_path / "r.json")
    back = json.loads(text, object_hook=launch._json_object)["kwargs"]
    assert back == {"model_cfg": model, "nested": {"sft": sft, "n": 1}, "out_dir": "/x"}
    assert type(back["model_cfg"]) is type(model) and type(back["nested"]["sft"]) is SFTConfig
    (tmp_path / "p.json").write_text(text)
    out = launch.stage_entry(ref, tmp_path / "p.json")
    assert out == {"model_cfg": "ModelConfig", "nested": "dict", "out_dir": "str",
                   "sft_type": "SFTConfig", "model_fields": model.to_dict()}


def test_payload_carries_paths_as_strings_and_the_parent_run():
    parent = types.SimpleNamespace(run_id="abc123", uri="sqlite:////tmp/m.db")
    text = launch._payload_text("poserft.train.sft:run_sft",
                                {"out_dir": Path("/runs/x"), "sft_cfg": {"steps": 3}},
                                launch._tracking_of(parent), Path("/tmp/r.json"))
    assert json.loads(text) == {"stage": "poserft.train.sft:run_sft",
                                "kwargs": {"out_dir": "/runs/x", "sft_cfg": {"steps": 3}},
                                "tracking": {"run_id": "abc123", "tracking_uri": "sqlite:////tmp/m.db"},
                                "result_path": "/tmp/r.json"}
    from poserft.tracking import NullTracker
    assert launch._tracking_of(NullTracker()) is None and launch._tracking_of(None) is None


def test_failing_rank_is_read_from_torchrun_root_cause():
    summary = ("Failures:\n[1]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : -15\n"
               "Root Cause (first observed failure):\n[0]:\n  time      : x\n"
               "  rank      : 1 (local_rank: 1)\n  exitcode  : 1 (pid: 12)\n")
    assert launch._failing_rank(summary) == 1
    assert launch._failing_rank("torchrun: error: unrecognized arguments") is None


def test_rank_log_tail_reads_the_failing_ranks_files(tmp_path):
    d = tmp_path / "abc_x" / "attempt_0"
    for rank in (0, 1):
        (d / str(rank)).mkdir(parents=True)
        (d / str(rank) / "stdout.log").write_text("")
        (d / str(rank) / "stderr.log").write_text("\n".join(f"r{rank} line {i}" for i in range(100)))
    tail = launch._rank_log_tail(tmp_path, 1, lines=3)
    assert tail == "--- rank 1 stderr ---\nr1 line 97\nr1 line 98\nr1 line 99"
    msg = launch._failure_message("poserft.train.sft:run_sft", 2, 1, "Root Cause\n  rank      : 1 (local_rank: 1)\n", tmp_path)
    assert "exited with code 1 (rank 1 failed first)" in msg and "r1 line 99" in msg
    assert "r0 line" not in msg


# --------------------------------------------------------------------------- Tracker.attach

@pytest.mark.slow  # ~10 s: creating MLflow's SQLite schema, not the code under test
def test_attached_tracker_logs_into_the_parent_run_and_never_ends_it(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from poserft.tracking import Tracker
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker("attach", "parent", tracking_uri=uri, results_dir=tmp_path)
    child = Tracker.attach(parent.run_id, parent.uri)
    child.log_metrics({"train/loss": 2.5}, step=3)
    child.log_params({"sft_num_parameters": 7})
    child.end("FAILED")                                   # not the child's to end
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(parent.run_id).info.status == "RUNNING"
    parent.end("FINISHED")
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED" and run.data.params["sft_num_parameters"] == "7"
    assert [(m.step, m.value) for m in client.get_metric_history(parent.run_id, "train/loss")] == [(3, 2.5)]
    assert len(client.search_runs([parent.experiment_id])) == 1
    with pytest.raises(ValueError, match="cannot attach to MLflow run 'nope'"):
        Tracker.attach("nope", uri)


# --------------------------------------------------------------------------- 2 ranks, SFT

STEPS, BATCH = 4, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from poserft.model.testing import make_test_split, make_test_tokenizer
    d = tmp_path_factory.mktemp("launch")
    make_test_tokenizer(d)
    return {"train": str(make_test_split(d / "train.h5", 32, seed=0)),
            "val": str(make_test_split(d / "val.h5", 8, seed=1, split="val")),
            "tokenizer": str(d / "tokenizer.json")}


def _sft_dict(grad_accum: int, eval_samples: int = 0) -> dict:
    """The ``sft`` section as a plain dict (what Snakemake hands a job as ``params.sft``)."""
    return {"steps": STEPS, "batch_size": BATCH, "grad_accum": grad_accum,
            "eval_samples": eval_samples, "max_new_tokens": 14,
            "optim": {"lr": 1e-2, "warmup_steps": 1},
            "engine": {"checkpoint_every": 0, "log_every": 1, "device": "cpu",
                       "precision": "fp32", "backend": "torch"}}


def _sft_kwargs(world, out_dir: Path, grad_accum: int, eval_samples: int = 0) -> dict:
    from poserft.model.testing import tiny_model_config
    from poserft.train.config import SFTConfig
    return {"model_cfg": tiny_model_config(),
            "sft_cfg": SFTConfig.from_dict(_sft_dict(grad_accum, eval_samples), where="sft"),
            "split_paths": {"train": world["train"], "val": world["val"]},
            "tokenizer_path": world["tokenizer"], "out_dir": str(out_dir)}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from poserft.model.io import load_policy
    return {k: v.detach().clone() for k, v in load_policy(run_dir).state_dict().items()}


def _fake_snakemake(world, tmp_path: Path, uri: str, **resources):
    """What Snakemake hands workflow_scripts/sft.py for rule sft (its own container types)."""
    from snakemake.iocontainers import InputFiles, Log, OutputFiles, Params, ResourceList, Wildcards

    from poserft.model.testing import tiny_model_config
    run = tmp_path / "runs" / "launch" / "seed0" / "sft"
    params = {"model": tiny_model_config().to_dict(),
              "sft": _sft_dict(1, eval_samples=4), "body": {}}
    return types.SimpleNamespace(
        rule="sft", threads=1, config={"tracking": {"experiment": "launch", "enabled": True,
                                                    "tracking_uri": uri, "artifact_root": None}},
        input=InputFiles(fromdict={"synthetic__train": world["train"], "synthetic__val": world["val"],
                                   "tokenizer": world["tokenizer"], "pose_encoder": []}),
        output=OutputFiles(fromdict={k: str(run / "final" / f) for k, f in (
            ("model", "model.safetensors"), ("config", "config.json"), ("tokenizer", "tokenizer.json"))}),
        params=Params(fromdict=params), wildcards=Wildcards(fromdict={"variant": "launch", "seed": "0"}),
        log=Log(fromdict={"log": str(tmp_path / "sft.log")}),
        resources=ResourceList(fromdict={"tmpdir": "/tmp", "_nodes": 1, "_cores": 1, **resources})), run


@pytest.mark.slow
def test_two_process_sft_equals_accumulated_reference_and_logs_one_run(world, tmp_path, monkeypatch):
    """workflow_scripts/sft.py itself, with resources nproc_per_node=2."""
    import runpy
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")            # job() sets it; keep the session's
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fake, run = _fake_snakemake(world, tmp_path, uri, mem_mb=6000, nproc_per_node=2)
    script = Path(__file__).resolve().parents[1] / "workflow_scripts" / "sft.py"
    t0 = time.monotonic()
    runpy.run_path(str(script), init_globals={"snakemake": fake}, run_name="__main__")
    wall = time.monotonic() - t0
    log_text = (tmp_path / "sft.log").read_text()
    print(f"[launch] workflow_scripts/sft.py, 2 ranks x {STEPS} SFT steps: {wall:.1f} s")
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == STEPS and summary["policy_dir"] == str(run / "final"), log_text[-3000:]
    assert "[default0]:" in log_text and "starting 2 processes" in log_text  # ranks -> rule's log

    # Independent references, in-process: one process accumulating both ranks' micro-batches
    # (must match), one process seeing rank 0's micro-batch only (must not).
    torch.set_num_threads(1)
    from poserft.train.sft import run_sft
    launch_local(run_sft, _sft_kwargs(world, tmp_path / "accum2", 2), 1)
    launch_local(run_sft, _sft_kwargs(world, tmp_path / "rank0_only", 1), 1)
    two, accum, alone = (_weights(d) for d in (run, tmp_path / "accum2", tmp_path / "rank0_only"))
    assert two.keys() == accum.keys()
    gap = max(float((accum[k] - alone[k]).abs().max()) for k in accum)
    assert gap > 1e-3, f"the reference cannot tell 1 from 2 micro-batches (gap {gap})"
    diff = max(float((two[k] - accum[k]).abs().max()) for k in accum)
    print(f"[launch] max |2 ranks - accumulated| {diff:.2e}; |accumulated - rank 0 only| {gap:.2e}")
    for k in accum:
        torch.testing.assert_close(two[k], accum[k], rtol=1e-4, atol=2e-5,
                                   msg=lambda m: f"{k}: 2 ranks differ from gradient accumulation: {m}")

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("launch").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]     # one job, one run: the parent's
    run_info = runs[0]
    assert run_info.info.run_name == "sft-launch-0" and run_info.data.tags["rule"] == "sft"
    assert run_info.info.status == "FINISHED" and run_info.data.tags["nproc_per_node"] == "2"
    assert run_info.data.params["sft.steps"] == str(STEPS)          # logged by the parent
    assert "sft_num_parameters" in run_info.data.params              # logged by rank 0
    history = client.get_metric_history(run_info.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert "val/image2pose/format_rate" in run_info.data.metrics     # rank 0's end-of-training check


@pytest.mark.slow
def test_a_failing_rank_raises_with_its_log_tail(world, tmp_path):
    from poserft.train.sft import run_sft
    kwargs = _sft_kwargs(world, tmp_path / "bad", 1)
    kwargs["split_paths"] = {"val": world["val"]}         # run_sft refuses: no 'train' split
    with pytest.raises(LaunchError) as info:
        launch_local(run_sft, kwargs, 2)
    msg = str(info.value)
    assert "stage poserft.train.sft:run_sft: 2 processes launched with torchrun exited with code 1" in msg
    assert "failed first" in msg and "run_sft: split_paths needs a 'train' entry" in msg
    assert not (tmp_path / "bad" / "final").exists()
