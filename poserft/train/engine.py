"""Training engine shared by SFT and RFT: optimizer, LR schedule, accumulation, precision,
checkpoint/resume, and the torch / DeepSpeed backends behind one interface.

Usage (the SFT and RFT loops look like this)::

    engine = TrainEngine(model, optim_cfg, engine_cfg, total_steps, out_dir,
                         grad_accum=2, micro_batch_size=16, tracker=tracker)
    for step in engine.steps():                       # resumes from out_dir/checkpoints
        metrics = engine.train_step([mb0, mb1], loss_fn)   # one optimizer step
    engine.export_policy()                            # out_dir/final (save_policy)

``loss_fn(model, micro_batch) -> (loss, metrics)`` must call the policy THROUGH ``model``
(``model(PoseMLLM.sft_loss, batch)``, ``model(PoseMLLM.score, prompts, images, rollout)``): ``model`` is
the DDP / DeepSpeed wrapper when there is one, and only calls through it synchronise
gradients (DDP) and gather ZeRO-3 partitions correctly.

Checkpoints: ``out_dir/checkpoints/step_{N:08d}/`` written to a temp dir and renamed, so
a killed job leaves either a complete checkpoint or none; the newest complete one is
loaded automatically on restart. They hold model, optimizer, scheduler, RNG states
(python, numpy, torch CPU/CUDA), the step and the caller's ``extra`` dict.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from poserft.train.config import EngineConfig, OptimConfig
from poserft.train.distributed import DistInfo, barrier, init_distributed

__all__ = ["lr_factor", "make_optimizer", "make_scheduler", "deepspeed_config", "TrainEngine",
           "capture_rng_state", "restore_rng_state", "latest_checkpoint", "seed_everything",
           "run_fingerprint", "RESUME_NEUTRAL_ENGINE_KEYS"]

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^step_(\d{8})$")
_FINGERPRINT_FILE = "FINGERPRINT"
# engine keys a run may change between its checkpoints and the resume without changing the
# trajectory; the callers of run_fingerprint leave them out
RESUME_NEUTRAL_ENGINE_KEYS = frozenset({"checkpoint_every", "keep_checkpoints", "log_every",
                                        "num_threads", "dist_timeout_s"})


def run_fingerprint(config: dict, files: Sequence[str | os.PathLike] = ()) -> str:
    """Short hash of what a training run's trajectory depends on: its config section (a
    plain dict; leave out keys that may change between resumes, e.g. ``steps``) and its
    input files, each by resolved path, size and modification time (cheap for multi-GB
    checkpoints; a touched or copied input counts as changed, which only costs a restart)."""
    import hashlib
    import json
    stats = []
    for f in files:
        p = Path(f)
        st = p.stat() if p.exists() else None
        stats.append([str(p.resolve()), st.st_size if st else None, st.st_mtime_ns if st else None])
    blob = json.dumps({"config": config, "files": stats}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- pure parts

def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup ``(s+1)/warmup``,
    then cosine from 1 to ``min_ratio`` over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases/norm scales (ndim < 2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW (betas from config; the paper: 0.9, 0.95)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.min_lr_ratio))


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, micro_batch_size: int,
                     grad_accum: int, world_size: int, bf16: bool) -> dict:
    """A complete DeepSpeed config dict (no ``"auto"`` left) for a client torch optimizer."""
    zero: dict[str, Any] = {"stage": engine.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": False, "reduce_bucket_size": 50_000_000,
                            "allgather_bucket_size": 50_000_000}
    if engine.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": 50_000_000,
                     "stage3_param_persistence_threshold": 100_000,
                     "stage3_gather_16bit_weights_on_model_save": True})
    if engine.offload_optimizer and engine.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        # our own torch AdamW: DeepSpeed's fused/CPU Adam would compile C++ extensions
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": {
        "name": np_state[0], "keys": torch.from_numpy(np_state[1].copy()),
        "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_python(obj):
    """RNG tuples -> lists so ``torch.load(weights_only=True)`` accepts them."""
    if isinstance(obj, tuple):
        return [_to_python(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_python(v) for k, v in obj.items()}
    return obj


def _python_rng_from_lists(x):
    return tuple(_python_rng_from_lists(v) if isinstance(v, list) else v for v in x)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """Newest complete ``out_dir/checkpoints/step_*`` (temp dirs are ignored)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name)
                   and (p / "COMPLETE").is_file())
    return found[-1] if found else None


# ----------------------------------------------------------------------------- engine

class TrainEngine:
    """One optimizer step = ``train_step(micro_batches, loss_fn)``; see module docstring."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, engine: EngineConfig,
                 total_steps: int, out_dir: str | os.PathLike, *, grad_accum: int = 1,
                 micro_batch_size: int = 1, tracker=None, fingerprint: str | None = None):
        # fingerprint: what the checkpoints' trajectory depends on (run_fingerprint); a
        # checkpoint written under another one is stale and never resumed.
        self.optim_cfg, self.cfg = optim, engine
        self.fingerprint = fingerprint
        self.total_steps, self.grad_accum = int(total_steps), int(grad_accum)
        self.out_dir = Path(out_dir)
        if engine.num_threads:
            torch.set_num_threads(engine.num_threads)
        want_cuda = engine.device == "cuda" or (engine.device == "auto" and torch.cuda.is_available())
        if engine.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but no CUDA device is visible; use auto or cpu")
        # DeepSpeed needs RANK/MASTER_* even for one process (else it tries MPI discovery)
        self.dist: DistInfo = init_distributed("cuda" if want_cuda else "cpu", engine.dist_timeout_s,
                                               export_env=engine.backend == "deepspeed")
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if want_cuda else "cpu")
        if want_cuda:
            torch.cuda.set_device(self.device)
        self.bf16 = engine.precision == "bf16" or (engine.precision == "auto" and want_cuda)
        if self.bf16 and not want_cuda and engine.backend == "deepspeed":
            raise RuntimeError("engine.precision=bf16 with DeepSpeed needs a GPU; use fp32 on CPU")
        self.tracker = tracker if (tracker is not None and self.is_main) else _null_tracker()
        self.step = 0
        model.to(self.device)
        self._module = model
        if engine.backend == "deepspeed":
            self._init_deepspeed(model, micro_batch_size)
        else:
            self.optimizer = make_optimizer(model, optim)
            self.scheduler = make_scheduler(self.optimizer, optim, self.total_steps)
            self.model = model
            if self.dist.world_size > 1:
                from torch.nn.parallel import DistributedDataParallel
                self.model = DistributedDataParallel(
                    model, device_ids=[self.device.index] if want_cuda else None,
                    find_unused_parameters=True)  # text-only batches skip the vision towers

    def _init_deepspeed(self, model, micro_batch_size: int) -> None:
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            # On CPU, deepspeed.initialize probes every op and JIT-compiles the shared-memory
            # all-reduce extension (minutes on a fresh machine; a killed build leaves a lock
            # that hangs later runs). gloo runs the same collectives, so declare it unusable.
            import deepspeed.ops
            deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
        import deepspeed

        optimizer = make_optimizer(model, self.optim_cfg)
        scheduler = make_scheduler(optimizer, self.optim_cfg, self.total_steps)
        self.ds_config = deepspeed_config(self.cfg, self.optim_cfg, micro_batch_size,
                                          self.grad_accum, self.dist.world_size, self.bf16)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=True)

    # ------------------------------------------------------------------ properties
    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped model (PoseMLLM)."""
        return self._module

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def autocast(self):
        """bf16 autocast on GPU for the torch backend; a no-op otherwise (DeepSpeed casts)."""
        if self.bf16 and self.cfg.backend == "torch":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def steps(self) -> Iterator[int]:
        """Resume from the newest checkpoint, then yield the remaining step indices; saves
        a checkpoint every ``checkpoint_every`` steps and after the last one."""
        self.resume()
        from tqdm.auto import tqdm
        bar = tqdm(range(self.step, self.total_steps), initial=self.step, total=self.total_steps,
                   disable=not self.is_main, desc="train", dynamic_ncols=True)
        for s in bar:
            yield s
            every = self.cfg.checkpoint_every
            if (every and self.step % every == 0) or self.step == self.total_steps:
                self.save_checkpoint()

    # ------------------------------------------------------------------ training
    def _with_every_param(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss + 0 * (one element of every trainable parameter)`` under multi-rank ZeRO-1/2.

        ZeRO-1/2 reduce gradients bucket by bucket as they become ready, so every rank must
        produce gradients for the same parameters; a micro-batch that skips a part of the
        model on one rank (no image in it, no valid pose) would otherwise desynchronise the
        collectives (gloo: "Received data size doesn't match expected size"). ZeRO-3 tracks
        parameter use itself and holds only shards outside forward, so it is left alone.
        """
        if self.dist.world_size == 1 or self.cfg.zero_stage >= 3:
            return loss
        touch = sum(p.reshape(-1)[0] for p in self._module.parameters() if p.requires_grad)
        return loss + 0.0 * touch

    def train_step(self, micro_batches: Sequence[Any],
                   loss_fn: Callable[[Any, Any], tuple[torch.Tensor, dict]]) -> dict:
        """Accumulate gradients over ``micro_batches`` and take one optimizer step.

        Returns the micro-batch-averaged metrics plus ``lr`` and ``grad_norm``.
        """
        if self.cfg.backend == "deepspeed" and len(micro_batches) != self.grad_accum:
            raise ValueError(f"DeepSpeed was configured for {self.grad_accum} micro-batches per "
                             f"step, got {len(micro_batches)}")
        self.model.train()
        totals: dict[str, float] = {}
        lr = self.lr
        n = len(micro_batches)
        for i, mb in enumerate(micro_batches):
            last = i == n - 1
            if self.cfg.backend == "deepspeed":
                with self.autocast():
                    loss, metrics = loss_fn(self.model, mb)
                self.model.backward(self._with_every_param(loss))
                self.model.step()
            else:
                sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") \
                    else self.model.no_sync()
                with sync:
                    with self.autocast():
                        loss, metrics = loss_fn(self.model, mb)
                    (loss / n).backward()
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step} "
                                         f"(micro-batch {i}); metrics: {metrics}")
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / n
        if self.cfg.backend == "deepspeed":
            norm = self.model.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        else:
            params = [p for p in self._module.parameters() if p.grad is not None]
            if self.optim_cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip))
            else:
                grad_norm = float(torch.linalg.vector_norm(
                    torch.stack([p.grad.detach().norm() for p in params]))) if params else 0.0
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        totals.update(lr=lr, grad_norm=grad_norm)
        if self.step % self.cfg.log_every == 0 or self.step == self.total_steps or self.step == 1:
            self.log(totals)
        return totals

    def log(self, metrics: dict, prefix: str = "train/") -> None:
        if self.is_main:
            self.tracker.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()},
                                     step=self.step)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, extra: dict | None = None) -> Path:
        """Save a resumable checkpoint of the current step (atomic: temp dir + rename)."""
        root = self.out_dir / "checkpoints"
        final = root / f"step_{self.step:08d}"
        tmp = root / f".tmp-step_{self.step:08d}"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        meta = {"step": self.step, "rng": _to_python(capture_rng_state()), "extra": extra or {},
                "backend": self.cfg.backend}
        if self.cfg.backend == "deepspeed":
            self.model.save_checkpoint(str(tmp), tag="ds", save_latest=False)
            if self.is_main:
                torch.save(meta, tmp / "meta.pt")
        elif self.is_main:
            meta.update(model=self._module.state_dict(), optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict())
            torch.save(meta, tmp / "state.pt")
        barrier()
        if self.is_main:
            if self.fingerprint is not None:
                (tmp / _FINGERPRINT_FILE).write_text(self.fingerprint)
            (tmp / "COMPLETE").write_text(str(self.step))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints(root)
        barrier()
        return final

    def _prune_checkpoints(self, root: Path) -> None:
        found = sorted(p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name))
        for old in found[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> dict:
        """Load the newest complete checkpoint in out_dir (if any); returns its ``extra``."""
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return {}
        if self.fingerprint is not None:
            found = ckpt / _FINGERPRINT_FILE
            theirs = found.read_text() if found.is_file() else None
            if theirs != self.fingerprint:
                # A rerun after a config or input change (Snakemake reruns the rule, the
                # checkpoints are not an output so they survive): resuming would continue a
                # different run. Start fresh instead.
                barrier()
                if self.is_main:
                    log.warning("%s: written by a run with another config or inputs "
                                "(fingerprint %s, now %s); not resuming, removing the stale "
                                "checkpoints and starting from step 0", ckpt, theirs, self.fingerprint)
                    shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
                barrier()
                return {}
        if self.cfg.backend == "deepspeed":
            meta = torch.load(ckpt / "meta.pt", map_location="cpu", weights_only=True)
            if meta.get("backend") != "deepspeed":
                raise RuntimeError(f"{ckpt}: written by the {meta.get('backend')} backend; cannot "
                                   "resume with engine.backend=deepspeed (delete it or switch back)")
            self.model.load_checkpoint(str(ckpt), tag="ds", load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
        else:
            path = ckpt / "state.pt"
            if not path.is_file():
                raise RuntimeError(f"{ckpt}: no state.pt (written by the DeepSpeed backend?); "
                                   "resume with engine.backend=deepspeed or delete the checkpoint")
            meta = torch.load(path, map_location="cpu", weights_only=True)
            self._module.load_state_dict(meta["model"])
            self.optimizer.load_state_dict(meta["optimizer"])
            self.scheduler.load_state_dict(meta["scheduler"])
        rng = meta["rng"]
        rng["python"] = _python_rng_from_lists(rng["python"])
        restore_rng_state(rng)
        self.step = int(meta["step"])
        if self.is_main:
            log.info("resumed from step %d (%s)", self.step, ckpt)
        return meta.get("extra", {})

    def gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """ZeRO-3: the full weights gathered from all partitions (on rank 0; every rank must
        call). None for other backends/stages, whose module already holds full weights."""
        if self.cfg.backend == "deepspeed" and self.cfg.zero_stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()
            return state if self.is_main else None
        return None

    def export_policy(self, out_dir: str | os.PathLike | None = None) -> Path:
        """``save_policy`` of the current weights into ``out_dir`` (default ``<out_dir>/final``)."""
        from poserft.model.io import save_policy
        dest = Path(out_dir) if out_dir is not None else self.out_dir / "final"
        state = self.gathered_state_dict()
        if self.is_main:
            save_policy(self._module, dest, state_dict=state)
        barrier()
        return dest


def _null_tracker():
    try:
        from poserft.tracking import NullTracker
        return NullTracker()
    except ImportError:  # tracking not importable: a local no-op with the same methods
        class _Null:
            def log_params(self, *a, **k): ...
            def log_metrics(self, *a, **k): ...
            def log_artifact(self, *a, **k): ...
            def set_tags(self, *a, **k): ...
        return _Null()
