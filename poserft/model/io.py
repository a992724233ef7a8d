"""Save / load a trained policy as plain files (no DeepSpeed, no pickles).

A policy directory holds::

    model.safetensors   every parameter and persistent buffer of PoseMLLM
    config.json         {"format", "version", "model": <model section>, "llava_config": ...,
                         "pose_vit_config": ... | null, "vocab_size": int}
    tokenizer.json      (+ tokenizer_config.json, written by save_pretrained)

:func:`save_policy` writes into a temp directory next to the target and renames it into
place, so a reader sees either the old complete policy or the new one. A training run
directory (e.g. SFT's ``out_dir``) keeps its exported policy in ``out_dir/final/``;
:func:`load_policy` accepts either directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from poserft.atomic import apply_umask, make_temp_dir
from poserft.model.config import ModelConfig

if TYPE_CHECKING:   # torch is imported by the functions that need it: `poserft info` stays fast
    import torch

__all__ = ["save_policy", "load_policy", "resolve_policy_dir", "PolicyFileError",
           "PolicyCheckpointError", "read_weights_header", "POLICY_FORMAT", "POLICY_VERSION",
           "atomic_replace_dir"]

POLICY_FORMAT = "poserft-policy"
POLICY_VERSION = 1
_FILES = ("model.safetensors", "config.json", "tokenizer.json")


class PolicyFileError(ValueError):
    """A policy directory is missing files or holds an incompatible format."""


class PolicyCheckpointError(PolicyFileError):
    """A policy file exists but cannot be read: truncated or corrupt (e.g. a copy that was
    cut short, a full disk)."""


_REWRITE = ("re-export the policy with poserft.model.io.save_policy, or rerun the sft/rft "
            "stage that wrote it (e.g. snakemake --forcerun <rule>)")


def _corrupt_weights(path: Path, exc: BaseException) -> PolicyCheckpointError:
    try:
        size = f", {path.stat().st_size:,} bytes on disk"
    except OSError:
        size = ""
    return PolicyCheckpointError(
        f"{path}: truncated or corrupt safetensors file ({exc}{size}); {_REWRITE}")


def read_weights_header(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header, without loading the weights;
    :class:`PolicyCheckpointError` naming the file if it is truncated or corrupt."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(int(d) for d in f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt_weights(path, exc) from None


def atomic_replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` dir to ``dest``, replacing an existing ``dest``."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _unshared_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tensors that share storage (tied weights) copied apart; safetensors
    refuses aliased tensors."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone().contiguous() if key in seen or not v.is_contiguous() else v
        seen.add(key)
    return out


def save_policy(model, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write ``model`` (a PoseMLLM) to ``out_dir`` atomically; returns the directory.

    ``state_dict``: full weights to save instead of ``model.state_dict()`` (e.g. gathered
    from ZeRO-3 partitions).
    """
    from safetensors.torch import save_file

    from poserft.model.vision import pose_encoder_config

    dest = Path(out_dir)
    tmp = make_temp_dir(dest.parent, prefix=f".{dest.name}.tmp-")   # umask applied
    try:
        state = _unshared_state(model) if state_dict is None else {
            k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        enc = model.pose_encoder
        meta = {"format": POLICY_FORMAT, "version": POLICY_VERSION,
                "model": model.config.to_dict(),
                "llava_config": model.backbone.config.to_dict(),
                "pose_vit_config": None if enc is None else pose_encoder_config(enc),
                "vocab_size": len(model.tokenizer)}
        (tmp / "config.json").write_text(json.dumps(meta, indent=1, default=str))
        model.tokenizer.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise PolicyFileError(f"{dest}: the tokenizer did not write tokenizer.json (only fast "
                                  "tokenizers are supported)")
        apply_umask(tmp, recursive=True)     # safetensors writes 0600 files
        atomic_replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def resolve_policy_dir(path: str | os.PathLike) -> Path:
    """``path`` itself if it holds a policy, else ``path/final`` (a training run dir)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "final" / "config.json").is_file():
        return p / "final"
    raise PolicyFileError(f"{p}: no policy here (expected {', '.join(_FILES)} in it or in "
                          f"{p / 'final'}); run the SFT/RFT stage that writes it")


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a :class:`~poserft.model.policy.PoseMLLM` from a policy directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    from poserft.model.policy import PoseMLLM
    from poserft.model.vision import pose_encoder_from_config

    d = resolve_policy_dir(path)
    for name in _FILES:
        if not (d / name).is_file():
            raise PolicyFileError(f"{d / name}: missing; the policy directory is incomplete, "
                                  "re-export it with save_policy")
    meta = json.loads((d / "config.json").read_text())
    if meta.get("format") != POLICY_FORMAT or meta.get("version") != POLICY_VERSION:
        raise PolicyFileError(f"{d / 'config.json'}: format {meta.get('format')!r} v"
                              f"{meta.get('version')!r}, expected {POLICY_FORMAT!r} "
                              f"v{POLICY_VERSION}; re-export with this code's save_policy")
    model_dict = dict(meta["model"])
    model_dict["checkpoint"] = None  # weights come from model.safetensors, not the hub
    model_dict["pose_vit"] = {**model_dict["pose_vit"], "checkpoint": None}
    cfg = ModelConfig.from_dict(model_dict, where=f"{d / 'config.json'}:model")
    tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    if len(tokenizer) != meta["vocab_size"]:
        raise PolicyFileError(f"{d}: tokenizer has {len(tokenizer)} tokens but the model was "
                              f"saved with {meta['vocab_size']}")
    backbone = LlavaForConditionalGeneration(LlavaConfig.from_dict(meta["llava_config"]))
    encoder = None
    if meta["pose_vit_config"] is not None:
        encoder = pose_encoder_from_config(meta["pose_vit_config"])
    model = PoseMLLM(cfg, tokenizer, backbone, encoder)
    weights = d / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt_weights(weights, exc) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PolicyFileError(f"{d / 'model.safetensors'}: weights do not match the model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()
