"""The LLaVA-style backbone: a real checkpoint, or a tiny random model for the embedded world.

Either way the result is a ``transformers.LlavaForConditionalGeneration`` (CLIP vision
tower + projector + Llama-style LLM + LM head) whose vocabulary covers the tokenizer,
including the ``<image>`` and ``<POSE>`` special tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CheckpointUnavailableError", "tiny_llava_config", "build_tiny_backbone",
           "load_pretrained_backbone", "cast_parameters", "set_backbone_dtype",
           "record_config_dtype"]


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


def build_tiny_backbone(cfg, tokenizer, dtype=None, attn_implementation: str | None = None):
    """Random-init tiny LLaVA sized for ``tokenizer`` (seeded by ``cfg.seed``).

    The weights are drawn in float32 (so a seed gives the same model whatever ``dtype``) and
    then cast to ``dtype`` (a ``torch.dtype``; None: float32). ``attn_implementation``
    (None: ``cfg.attn_implementation``) is passed to transformers as for a checkpoint.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    from poserft.model.config import IMAGE_TOKEN
    llava_cfg = tiny_llava_config(cfg, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                  tokenizer.pad_token_id, tokenizer.bos_token_id,
                                  tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlavaForConditionalGeneration._from_config(
            llava_cfg, attn_implementation=attn_implementation or cfg.attn_implementation,
            dtype=torch.float32)
    if dtype is not None and dtype != torch.float32:
        set_backbone_dtype(model, dtype)
    return model


def cast_parameters(module, dtype) -> None:
    """Cast every floating PARAMETER of ``module`` to ``dtype`` in place: the parameter
    objects stay (ties, optimizer references); buffers stay as they are (the LLM's rotary
    frequencies remain float32, as transformers keeps them)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def set_backbone_dtype(model, dtype) -> None:
    """:func:`cast_parameters` of a LLaVA backbone, recorded in its config."""
    cast_parameters(model, dtype)
    record_config_dtype(model.config, dtype)


def record_config_dtype(config, dtype) -> None:
    """Set ``config.dtype`` (and its sub-configs') to ``dtype``, as from_pretrained does."""
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            sub.dtype = dtype


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_pretrained_backbone(checkpoint: str, dtype=None, attn_implementation: str = "sdpa"):
    """``LlavaForConditionalGeneration.from_pretrained`` + its tokenizer extended with
    ``<image>``/``<POSE>`` (embeddings resized when tokens were added).

    ``dtype`` (a ``torch.dtype``; None: float32) is the dtype the weights are loaded in,
    whatever the checkpoint stores (released LLaVA weights are float16; transformers 5 would
    otherwise keep that); ``attn_implementation`` selects the attention kernel.

    Tries, in order: a local directory; the local HF cache (``local_files_only``); the hub
    (skipped when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set). Raises
    :class:`CheckpointUnavailableError` listing every attempt.
    """
    import torch
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
            model = LlavaForConditionalGeneration.from_pretrained(
                checkpoint, local_files_only=local_only, dtype=dtype or torch.float32,
                attn_implementation=attn_implementation)
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
    # the policy holds one dtype, also where a model class keeps modules in float32
    # (_keep_in_fp32_modules) and for rows added by resize_token_embeddings
    set_backbone_dtype(model, dtype or torch.float32)
    return model, tokenizer
