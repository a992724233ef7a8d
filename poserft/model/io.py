"""Save / load a trained policy as plain files (no DeepSpeed, no pickles).

A policy directory holds::

    model.safetensors   every parameter and persistent buffer of PoseMLLM, in the policy's
                        dtype (bfloat16 weights stay bfloat16)
    config.json         {"format", "version", "model": <model section>, "llava_config": ...,
                         "pose_vit_config": ... | null, "vocab_size": int,
                         "dtype": "float32" | "bfloat16" | "float16",
                         "lora_weights": null | "merged" | "adapter"}
    tokenizer.json      (+ tokenizer_config.json, written by save_pretrained)

A policy with LoRA adapters (``model.lora.enabled``) is written as ``model.lora.export``
says: ``merged`` folds each adapter into its LLM weight (``W + scaling * B @ A``), so the
file holds a plain policy (the keys of a policy without LoRA; readable without peft);
``adapter`` writes the peft module's own state (frozen base weights + adapter weights).
:func:`load_policy` reads both.

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
           "PolicyCheckpointError", "PolicyTokenizerError", "read_weights_header",
           "check_tokenizer_file", "POLICY_FORMAT", "POLICY_VERSION", "atomic_replace_dir",
           "merge_lora_state"]

POLICY_FORMAT = "poserft-policy"
POLICY_VERSION = 1
_FILES = ("model.safetensors", "config.json", "tokenizer.json")


class PolicyFileError(ValueError):
    """A policy directory is missing files or holds an incompatible format."""


class PolicyCheckpointError(PolicyFileError):
    """A policy file exists but cannot be read: truncated or corrupt (e.g. a copy that was
    cut short, a full disk)."""


class PolicyTokenizerError(PolicyCheckpointError):
    """A policy's tokenizer.json exists but is not a readable tokenizer (corrupt, cut short,
    overwritten by another file)."""


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


def check_tokenizer_file(path: str | os.PathLike) -> None:
    """Parse a policy's ``tokenizer.json`` (tokenizers only: fast, no transformers/torch);
    :class:`PolicyTokenizerError` naming the file, the cause and the fix if it is unreadable.
    transformers' own loader fails on such a file with errors of many types (JSON, serde,
    TypeError, UnicodeDecodeError) that name neither the file nor the fix."""
    from tokenizers import Tokenizer

    path = Path(path)
    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:     # serde / io errors come as plain Exception
        raise PolicyTokenizerError(
            f"{path}: cannot be read ({exc}); re-export the policy "
            f"(poserft.model.io.save_policy) or copy tokenizer.json from the run that trained "
            f"it") from None


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


# key prefix of the LLM in a PoseMLLM state dict, and what peft makes of it
_LM_PREFIX = "backbone.model.language_model."
_PEFT_LM_PREFIX = _LM_PREFIX + "base_model.model."


def _lora_scalings(model) -> dict[str, float]:
    """{state-dict stem of a LoRA layer: its scaling (alpha / r)} of the active adapter."""
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            for adapter, value in scaling.items():
                out[f"{name}|{adapter}"] = float(value)
    return out


def merge_lora_state(state: dict[str, torch.Tensor], scalings: dict[str, float]
                     ) -> dict[str, torch.Tensor]:
    """A LoRA policy's state dict (peft keys) -> the state dict of the plain policy with each
    adapter folded in: ``W + scaling * B @ A`` (in float32, stored in W's dtype), peft's
    ``base_layer`` / ``base_model.model`` levels removed. ``scalings``: from the live model
    (``{"<module name>|<adapter>": alpha / r}``). Works on gathered ZeRO-3 weights too."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".lora_" in key:
            raise PolicyFileError(f"cannot merge {key}: only plain LoRA (lora_A/lora_B) adapters "
                                  "are supported; export with model.lora.export=adapter")
        if key.endswith(".base_layer.weight"):
            stem = key[:-len(".base_layer.weight")]
            adapters = sorted(k.split("|", 1)[1] for k in scalings if k.split("|", 1)[0] == stem)
            w = value.float()
            for adapter in adapters:
                a = state[f"{stem}.lora_A.{adapter}.weight"].float()
                b = state[f"{stem}.lora_B.{adapter}.weight"].float()
                w = w + scalings[f"{stem}|{adapter}"] * (b @ a)
                used.add(f"{stem}|{adapter}")
            value = w.to(value.dtype)
            key = stem + ".weight"
        key = key.replace(".base_layer.", ".")
        if key.startswith(_PEFT_LM_PREFIX):
            key = _LM_PREFIX + key[len(_PEFT_LM_PREFIX):]
        out[key] = value
    missing = sorted(set(scalings) - used)
    if missing:
        raise PolicyFileError(f"LoRA layers {missing[:3]} have no base weight in the state dict")
    return out


def _weights_dtype(state: dict[str, torch.Tensor]) -> str:
    """Name of the floating dtype holding most of the weights (e.g. "bfloat16")."""
    counts: dict = {}
    for v in state.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    if not counts:
        return "float32"
    return str(max(counts, key=counts.get)).removeprefix("torch.")


def save_policy(model, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write ``model`` (a PoseMLLM) to ``out_dir`` atomically; returns the directory.

    ``state_dict``: full weights to save instead of ``model.state_dict()`` (e.g. gathered
    from ZeRO-3 partitions). Weights keep their dtype. A policy with LoRA adapters is
    written merged or as base + adapters, as ``model.config.lora.export`` says.
    """
    from safetensors.torch import save_file

    from poserft.model.vision import pose_encoder_config

    dest = Path(out_dir)
    tmp = make_temp_dir(dest.parent, prefix=f".{dest.name}.tmp-")   # umask applied
    try:
        state = _unshared_state(model) if state_dict is None else {
            k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        lora_weights = None
        if getattr(model, "has_lora", False):
            lora_weights = model.config.lora.export
            if lora_weights == "merged":
                state = merge_lora_state(state, _lora_scalings(model))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        enc = model.pose_encoder
        meta = {"format": POLICY_FORMAT, "version": POLICY_VERSION,
                "model": model.config.to_dict(),
                "llava_config": model.backbone.config.to_dict(),
                "pose_vit_config": None if enc is None else pose_encoder_config(enc),
                "vocab_size": len(model.tokenizer),
                "dtype": _weights_dtype(state),
                "lora_weights": lora_weights}
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


def load_policy(path: str | os.PathLike, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None, *, lora: bool | None = None):
    """Rebuild a :class:`~poserft.model.policy.PoseMLLM` from a policy directory (or a run
    directory holding ``final/``), in eval mode.

    ``device``: auto, cpu, cuda or cuda:k (None: CPU, for a caller such as the training
    engine that places the policy itself). ``dtype``: float32, bfloat16, float16 or auto
    (None: the stored ``model.dtype``); auto resolves against ``device`` as in
    :func:`~poserft.model.policy.resolve_dtype`. Every floating parameter is in that dtype,
    whatever dtype the file stores.

    LoRA (``lora``; None: the stored ``model.lora.enabled``): an ``adapter`` export comes
    back with its trained adapters; a ``merged`` export (or a policy saved without LoRA)
    comes back with fresh adapters on top (zero output until trained), so that training
    goes on with LoRA and :meth:`~PoseMLLM.adapters_disabled` is the saved policy.
    ``lora=False`` gives a plain policy (an adapter export is merged into it by peft).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    from poserft.model.policy import PoseMLLM, cast_policy, resolve_device, resolve_dtype
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
    lora_weights = meta.get("lora_weights")
    if lora_weights not in (None, "merged", "adapter"):
        raise PolicyFileError(f"{d / 'config.json'}: lora_weights {lora_weights!r} is none of "
                              "null, 'merged', 'adapter'; re-export with save_policy")
    model_dict = dict(meta["model"])
    model_dict["checkpoint"] = None  # weights come from model.safetensors, not the hub
    model_dict["pose_vit"] = {**model_dict["pose_vit"], "checkpoint": None}
    cfg = ModelConfig.from_dict(model_dict, where=f"{d / 'config.json'}:model")
    place = resolve_device(device)
    # where it runs: the device asked for; none asked: the GPU if one is visible (the
    # training engine moves the policy there)
    on_cuda = place.type == "cuda" if device is not None else torch.cuda.is_available()
    want = resolve_dtype(cfg.dtype if dtype is None else dtype,
                         place if device is not None else None)
    # checked first: AutoTokenizer's errors on a corrupt file do not name it
    check_tokenizer_file(d / "tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    if len(tokenizer) != meta["vocab_size"]:
        raise PolicyFileError(f"{d}: tokenizer has {len(tokenizer)} tokens but the model was "
                              f"saved with {meta['vocab_size']}")
    attn = cfg.attn_implementation
    if attn == "flash_attention_2" and not on_cuda:
        attn = "sdpa"     # a GPU kernel; the weights do not depend on it
    backbone = LlavaForConditionalGeneration._from_config(
        LlavaConfig.from_dict(meta["llava_config"]), attn_implementation=attn, dtype=want)
    encoder = None
    if meta["pose_vit_config"] is not None:
        encoder = pose_encoder_from_config(meta["pose_vit_config"])
    model = PoseMLLM(cfg, tokenizer, backbone, encoder)
    cast_policy(model, want)
    if lora_weights == "adapter":
        model.apply_lora()
    weights = d / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt_weights(weights, exc) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PolicyFileError(f"{d / 'model.safetensors'}: weights do not match the model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    del state
    want_lora = cfg.lora.enabled if lora is None else bool(lora)
    if model.has_lora and not want_lora:     # a plain policy: the LLM trains again
        model.backbone.model.language_model = model.language_model.merge_and_unload()
        model.language_model.requires_grad_(True)
        model.backbone.lm_head.requires_grad_(True)
    elif want_lora and not model.has_lora:
        model.apply_lora()
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.to(place).eval()
