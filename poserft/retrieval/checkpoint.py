"""A trained retrieval model as a self-contained directory, written atomically.

Layout::

    model.safetensors   all weights (text encoder, pose encoder, log_logit_scale)
    config.json         {"format", "format_version", "arch": RetrievalArch, "tokenizer": {...},
                         role, seed, training summary}
    tokenizer.json      the project tokenizer (text_encoder 'transformer'), or
    text_encoder/       HF config + tokenizer of the pretrained encoder ('pretrained')
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from poserft.atomic import apply_umask, make_temp_dir
from poserft.retrieval.model import RetrievalArch, RetrievalModel

__all__ = ["CHECKPOINT_FORMAT", "FORMAT_VERSION", "RetrievalCheckpointError",
           "save_retrieval_model", "load_retrieval_model"]

CHECKPOINT_FORMAT = "poserft-retrieval"
FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, TEXT_ENCODER_DIR = (
    "model.safetensors", "config.json", "tokenizer.json", "text_encoder")
_FIX = ("retrain it with poserft.retrieval.train.train_retrieval (rerun the train_retrieval "
        "rule of this role, e.g. with --forcerun)")


class RetrievalCheckpointError(ValueError):
    """A retrieval model directory is incomplete, corrupt or does not match its config."""


def save_retrieval_model(model: RetrievalModel, out_dir: str | os.PathLike,
                         meta: dict[str, Any]) -> Path:
    """Write ``model`` (+ its tokenizer) to ``out_dir``; ``meta`` goes into config.json.

    Files are written to a temporary folder inside ``out_dir`` and moved into place with
    ``os.replace`` (config.json last), so a crash never leaves a half-written file.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = make_temp_dir(out_dir, prefix=".tmp-retrieval-")
    try:
        # clone: safetensors refuses tensors that share storage (tied HF weights)
        state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
        if model.arch.text_encoder == "transformer":
            (tmp / TOKENIZER_FILE).write_text(model.tokenizer.backend_tokenizer.to_str(),
                                              encoding="utf-8")
            tok_entry = {"file": TOKENIZER_FILE}
        else:
            model.text_encoder.backbone.config.save_pretrained(tmp / TEXT_ENCODER_DIR)
            model.tokenizer.save_pretrained(tmp / TEXT_ENCODER_DIR)
            tok_entry = {"file": TEXT_ENCODER_DIR}
        tok_entry["vocab_size"] = len(model.tokenizer)
        config = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION,
                  "arch": model.arch.to_dict(), "tokenizer": {**meta.pop("tokenizer", {}),
                                                             **tok_entry}, **meta}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True),
                                       encoding="utf-8")
        apply_umask(tmp, recursive=True)     # safetensors writes 0600 files
        for name in (WEIGHTS_FILE, tok_entry["file"], CONFIG_FILE):
            target = out_dir / name
            if (tmp / name).is_dir() and target.exists():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _read_config(model_dir: Path) -> dict:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: retrieval model config is missing; {_FIX}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RetrievalCheckpointError(f"{path}: not valid JSON ({exc}); {_FIX}") from exc
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise RetrievalCheckpointError(f"{path}: not a poserft retrieval model config "
                                       f"(format != {CHECKPOINT_FORMAT!r}); {_FIX}")
    if config.get("format_version") != FORMAT_VERSION:
        raise RetrievalCheckpointError(f"{path}: format_version {config.get('format_version')!r}"
                                       f" is not {FORMAT_VERSION}; {_FIX}")
    for key in ("arch", "tokenizer"):
        if not isinstance(config.get(key), dict):
            raise RetrievalCheckpointError(f"{path}: key '{key}' is missing or not a mapping; "
                                           f"{_FIX}")
    return config


def load_retrieval_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu"
                         ) -> RetrievalModel:
    """Rebuild a trained model from its directory, in eval mode, tokenizer attached.

    Raises FileNotFoundError / :class:`RetrievalCheckpointError` naming the offending file
    (missing files, bad JSON, wrong keys, shape mismatches) and how to fix it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from poserft.text.tokenizer import TokenizerFileError, load_tokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: retrieval model directory does not exist; {_FIX}")
    config = _read_config(model_dir)
    try:
        arch = RetrievalArch.from_dict(config["arch"], where=str(model_dir / CONFIG_FILE))
    except (TypeError, ValueError) as exc:
        raise RetrievalCheckpointError(f"{exc}; {_FIX}") from exc

    tok_path = model_dir / config["tokenizer"].get("file", TOKENIZER_FILE)
    try:
        if arch.text_encoder == "transformer":
            tokenizer = load_tokenizer(tok_path)
            model = RetrievalModel(arch, tokenizer)
        else:
            from transformers import AutoTokenizer
            if not tok_path.is_dir():
                raise FileNotFoundError(f"{tok_path}: pretrained text encoder config/tokenizer "
                                        f"folder is missing")
            tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
            model = RetrievalModel(arch, tokenizer, text_model_source=str(tok_path),
                                   load_text_weights=False)
    except (TokenizerFileError, FileNotFoundError, OSError) as exc:
        raise RetrievalCheckpointError(f"{model_dir}: cannot rebuild the text side ({exc}); "
                                       f"{_FIX}") from exc

    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file is missing; {_FIX}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RetrievalCheckpointError(f"{weights}: unreadable safetensors file ({exc}); "
                                       f"{_FIX}") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise RetrievalCheckpointError(
            f"{weights} does not match {model_dir / CONFIG_FILE}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, shape mismatches {shapes[:5]}; the two files "
            f"come from different trainings or versions; {_FIX}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
