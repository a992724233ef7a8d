"""Sentence embedder: the offline MiniLM through FlagEmbedding, caching, config checks."""

from __future__ import annotations

import numpy as np
import pytest

from poserft.configbase import ConfigError
from poserft.text.config import TextEmbedderConfig
from poserft.text.embedder import TextEmbedder, build_text_embedder, embedded_model_dir

SENTENCES = [
    "the left arm is raised above the head",
    "the person lifts the left arm over the head",
    "a bowl of soup stands on the kitchen table",
]


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return build_text_embedder(TextEmbedderConfig.from_dict({"batch_size": 2}, where="text_embedder"))


def test_shape_dtype_and_unit_norm(embedder):
    vecs = embedder.encode(SENTENCES + ["x"] * 3)  # more than one batch
    assert vecs.shape == (6, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_identical_sentences_and_paraphrases(embedder):
    a = embedder.encode([SENTENCES[0], SENTENCES[0]])
    assert float(a[0] @ a[1]) == pytest.approx(1.0, abs=1e-6)
    v = embedder.encode(SENTENCES)
    paraphrase, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


def test_matches_sentence_transformers_reference(embedder):
    """Independent implementation of the same checkpoint (mean pooling + normalise)."""
    from sentence_transformers import SentenceTransformer
    ref = SentenceTransformer(str(embedded_model_dir()), device="cpu", local_files_only=True)
    expected = ref.encode(SENTENCES, normalize_embeddings=True)
    got = embedder.encode(SENTENCES)
    np.testing.assert_allclose((got * expected).sum(1), 1.0, atol=1e-4)


def test_cache_serves_repeats_without_recompute(embedder):
    embedder.clear_cache()
    before = embedder.num_encoded
    first = embedder.encode(["reference answer one", "reference answer two",
                             "reference answer one"])
    assert embedder.num_encoded - before == 2  # duplicates inside a call encoded once
    again = embedder.encode(["reference answer two", "reference answer one"])
    assert embedder.num_encoded - before == 2  # all hits
    np.testing.assert_array_equal(again, first[[1, 0]])


def test_lru_eviction_and_disabled_cache():
    calls: list[list[str]] = []

    def encode_fn(texts):  # deterministic per string, unnormalised on purpose
        calls.append(list(texts))
        return np.array([[len(t), 1.0, 2.0] for t in texts])

    emb = TextEmbedder(encode_fn, dim=3, cache_size=2)
    out = emb.encode(["a", "bb"])
    np.testing.assert_allclose(out[1], np.array([2, 1, 2]) / 3.0)  # L2-normalised
    emb.encode(["a"])          # refresh 'a' -> 'bb' is now least recent
    emb.encode(["ccc"])        # evicts 'bb'
    emb.encode(["a", "bb"])
    assert calls == [["a", "bb"], ["ccc"], ["bb"]]

    nocache = TextEmbedder(encode_fn, dim=3, cache_size=0)
    nocache.encode(["a"]), nocache.encode(["a"])
    assert nocache.num_encoded == 2


def test_encode_rejects_bare_string(embedder):
    with pytest.raises(TypeError, match="list of strings"):
        embedder.encode("not a list")


def test_flag_backend_with_local_dir_matches_embedded(embedder):
    flag = build_text_embedder(TextEmbedderConfig.from_dict(
        {"backend": "flag", "model_name_or_path": str(embedded_model_dir()),
         "model_kind": "sentence", "pooling": "mean"}, where="text_embedder"))
    np.testing.assert_allclose(flag.encode(SENTENCES), embedder.encode(SENTENCES), atol=1e-5)


def test_config_invariants():
    with pytest.raises(ConfigError, match="text_embedder.model_name_or_path"):
        TextEmbedderConfig.from_dict({"backend": "flag"}, where="text_embedder")
    with pytest.raises(ConfigError, match="text_embedder.use_fp16"):
        TextEmbedderConfig.from_dict({"use_fp16": True}, where="text_embedder")
    with pytest.raises(ConfigError, match="text_embedder.backend"):
        TextEmbedderConfig.from_dict({"backend": "openai"}, where="text_embedder")
