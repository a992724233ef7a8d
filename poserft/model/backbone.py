"""The LLaVA-style backbone: a real checkpoint, or a tiny random model for the embedded world.

Either way the result is a ``transformers.LlavaForConditionalGeneration`` (CLIP vision
tower + projector + Llama-style LLM + LM head) whose vocabulary covers the tokenizer,
including the ``<image>`` and ``<POSE>`` special tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CheckpointUnavailableError", "tiny_llava_config", "build_tiny_backbone",
           "load_pretrained_backbone"]


class CheckpointUnavailableError(RuntimeError):
    """model.checkpoint could not be loaded (not a local dir, not cached, hub unreachable)."""


def tiny_llava_config(cfg, vocab_size: int, image_token_id: int, pad_token_id: int,
                      bos_token_id: int | None = None, eos_token_id: int | None = None):
    """``LlavaConfig`` of the embedded world from a ModelConfig's ``text_*``/``clip_*`` sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=cfg.clip_hidden_size, intermediate_size=2 * cfg.clip_hidden_size,
        num_hidden_layers=cfg.clip_layers, num_attention_heads=cfg.clip_heads,
        image_size=cfg.clip_image_size, patch_size=cfg.clip_patch_size,
        projection_dim=cfg.clip_hidden_size, attention_dropout=0.0)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=False,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        attention_dropout=0.0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       vision_feature_layer=cfg.vision_feature_layer,
                       vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=False)


def build_tiny_backbone(cfg, tokenizer):
    """Random-init tiny LLaVA sized for ``tokenizer`` (seeded by ``cfg.seed``)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from poserft.model.config import IMAGE_TOKEN
    llava_cfg = tiny_llava_config(cfg, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                  tokenizer.pad_token_id, tokenizer.bos_token_id,
                                  tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlavaForConditionalGeneration(llava_cfg)


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_pretrained_backbone(checkpoint: str):
    """``LlavaForConditionalGeneration.from_pretrained`` + its tokenizer extended with
    ``<image>``/``<POSE>`` (embeddings resized when tokens were added).

    Tries, in order: a local directory; the local HF cache (``local_files_only``); the hub
    (skipped when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set). Raises
    :class:`CheckpointUnavailableError` listing every attempt.
    """
    from transformers import LlavaForConditionalGeneration

    from poserft.model.config import IMAGE_TOKEN
    from poserft.text.tokenizer import extend_pretrained_tokenizer

    attempts: list[str] = []
    is_dir = Path(checkpoint).is_dir()
    modes = [True] if is_dir else [True] + ([] if _hub_offline() else [False])
    model = tokenizer = None
    for local_only in modes:
        where = ("local directory" if is_dir else
                 "local HF cache (local_files_only)" if local_only else "hub download")
        try:
            model = LlavaForConditionalGeneration.from_pretrained(checkpoint, local_files_only=local_only)
            tokenizer, n_added = extend_pretrained_tokenizer(checkpoint, local_files_only=local_only)
            break
        except Exception as exc:  # OSError, HF hub errors, tokenizer errors: all reported below
            attempts.append(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            model = None
    if model is None:
        if not is_dir and Path(checkpoint).exists():
            attempts.insert(0, f"{checkpoint} exists but is not a directory")
        raise CheckpointUnavailableError(
            f"model.checkpoint={checkpoint!r} could not be loaded. Tried:\n  - "
            + "\n  - ".join(attempts)
            + "\nModel hubs are unreachable from this machine (offline). Download the "
              "checkpoint where there is network access (e.g. `huggingface-cli download "
              f"{checkpoint} --local-dir ...`), copy it here, and set model.checkpoint to that "
              "local path; or set model.checkpoint: null for the tiny embedded model.")
    # Released vocabularies are often padded (e.g. 32064 rows for 32002 tokens): only grow.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tokenizer.pad_token_id is not None:
        model.config.text_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
