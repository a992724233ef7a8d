"""Project tokenizer: training, special tokens, loading errors, corpus and caching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from poserft.configbase import ConfigError
from poserft.text.config import TokenizerConfig
from poserft.text.tokenizer import (SPECIAL_TOKENS, TokenizerFileError, build_project_tokenizer,
                                    extend_pretrained_tokenizer, load_tokenizer,
                                    read_split_texts, special_token_ids, train_tokenizer)

CORPUS = [
    "the left arm is raised above the head",
    "the person squats with both knees bent",
    "the right elbow is bent and the hand touches the shoulder",
    "the torso leans forward while the legs stay straight",
    "what is the angle of the left knee?",
    "it is bent at about ninety degrees",
] * 10


def _write_split(path: Path, captions: list[str], questions: list[str], answers: list[str]):
    """Minimal split file with the datasets the tokenizer reads (schema of docs/interfaces.md)."""
    n = 2
    str_t = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f["poses/global_orient"] = np.zeros((n, 3), np.float32)
        f["poses/body_pose"] = np.zeros((n, 23, 3), np.float32)
        f["poses/betas"] = np.zeros((n, 10), np.float32)
        f["joints"] = np.zeros((n, 24, 3), np.float32)
        f.create_dataset("captions/text", data=captions, dtype=str_t)
        f["captions/pose_index"] = np.arange(len(captions), dtype=np.int64) % n
        if questions:
            f.create_dataset("vqa/question", data=questions, dtype=str_t)
            f.create_dataset("vqa/answer", data=answers, dtype=str_t)
            f["vqa/pose_index"] = np.zeros(len(questions), np.int64)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return train_tokenizer(CORPUS, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_special_tokens_are_single_ids_in_fixed_order(tok_path):
    tok = load_tokenizer(tok_path)
    assert special_token_ids(tok) == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == SPECIAL_TOKENS[:4]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids = tok("<image> describe <POSE> now", add_special_tokens=False)["input_ids"]
    assert ids.count(4) == 1 and ids.count(5) == 1
    # placeholders glued to words must still be recognised as one token each
    ids = tok("x<POSE>y<image>", add_special_tokens=False)["input_ids"]
    assert 5 in ids and 4 in ids


def test_vocab_size_and_lossless_roundtrip(tok_path):
    tok = load_tokenizer(tok_path)
    assert len(tok) == 300
    for text in ["the left arm is raised", "Ünïcode 日本語 ✓ and  double  spaces\n",
                 " leading space"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # frequent corpus words got merged: fewer tokens than characters
    assert len(tok("the left arm is raised")["input_ids"]) <= 0.6 * len("the left arm is raised")
    # no implicit bos/eos: the caller decides the format
    assert tok("arm")["input_ids"] == tok("arm", add_special_tokens=False)["input_ids"]


def test_padding_batch(tok_path):
    tok = load_tokenizer(tok_path)
    batch = tok(["arm", "the left arm is raised above the head"], padding=True)
    a, b = batch["input_ids"]
    assert len(a) == len(b)
    assert batch["attention_mask"][0][-1] == 0 and a[-1] == tok.pad_token_id


def test_directory_path_is_accepted(tok_path):
    assert len(load_tokenizer(tok_path.parent)) == 300


def test_missing_file_error_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json.*build_project_tokenizer"):
        load_tokenizer(tmp_path / "nope.json")


def test_corrupt_file_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerFileError, match="tokenizer.json.*not a valid"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(TokenizerFileError, match="not a valid"):
        load_tokenizer(bad)


def test_tokenizer_without_project_specials_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=100,
                                                        special_tokens=["<unk>", "<pad>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerFileError, match=r"<s>.*missing"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_failed_training_leaves_no_file(tmp_path):
    out = tmp_path / "tokenizer.json"
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_tokenizer(["", ""], 300, out)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, 100, out)
    assert list(tmp_path.iterdir()) == []


def test_config_rejects_too_small_vocab():
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        TokenizerConfig.from_dict({"vocab_size": 100}, where="tokenizer")
    with pytest.raises(ConfigError, match="tokenizer.pretrained"):
        TokenizerConfig.from_dict({"pretrained": " "}, where="tokenizer")


def _n_tokens(tok, word: str) -> int:
    return len(tok(" " + word, add_special_tokens=False)["input_ids"])


def test_build_project_tokenizer_corpus_and_cache(tmp_path):
    h5a, h5b = tmp_path / "train.h5", tmp_path / "val.h5"
    _write_split(h5a, CORPUS[:6] * 5, ["the qwxzvkj angle?"] * 30, ["so plorbtwix yes"] * 30)
    _write_split(h5b, ["the left arm is up"] * 4, [], [])
    texts = read_split_texts([h5a, h5b])
    assert len(texts) == 30 + 30 + 30 + 4
    assert "the qwxzvkj angle?" in texts and "so plorbtwix yes" in texts

    out = tmp_path / "tok" / "tokenizer.json"
    cfg = TokenizerConfig.from_dict({"vocab_size": 400, "min_frequency": 2}, where="tokenizer")
    info = build_project_tokenizer(cfg, [h5a, h5b], out, extra_texts=["do frumblezonk go"] * 30)
    assert info["cached"] is False and info["num_texts"] == 94 + 30
    tok = load_tokenizer(out)
    # words seen only in VQA questions, answers and extra texts were learnt as one token
    for word in ("qwxzvkj", "plorbtwix", "frumblezonk"):
        assert _n_tokens(tok, word) == 1, word
    mtime = os.stat(out).st_mtime_ns

    again = build_project_tokenizer(cfg, [h5a, h5b], out, extra_texts=["do frumblezonk go"] * 30)
    assert again["cached"] is True and os.stat(out).st_mtime_ns == mtime

    changed = build_project_tokenizer(cfg, [h5a, h5b], out, extra_texts=[])
    assert changed["cached"] is False
    assert _n_tokens(load_tokenizer(out), "frumblezonk") > 1


def test_extend_pretrained_tokenizer():
    from poserft.text.embedder import embedded_model_dir
    tok, n_added = extend_pretrained_tokenizer(str(embedded_model_dir()))
    assert n_added >= 2
    ids = special_token_ids(tok)  # raises unless each is a single id
    assert ids["<image>"] != ids["<POSE>"]
    assert tok.pad_token is not None and tok.eos_token is not None
    enc = tok("<image> a person <POSE>", add_special_tokens=False)["input_ids"]
    assert enc[0] == ids["<image>"] and enc[-1] == ids["<POSE>"]


def test_build_from_pretrained_checkpoint(tmp_path):
    """tokenizer.pretrained: no BPE training; the checkpoint tokenizer gains the placeholders."""
    from poserft.text.embedder import embedded_model_dir
    h5 = tmp_path / "train.h5"
    _write_split(h5, CORPUS[:4], [], [])
    out = tmp_path / "tokenizer.json"
    cfg = TokenizerConfig.from_dict({"pretrained": str(embedded_model_dir())}, where="tokenizer")
    info = build_project_tokenizer(cfg, [h5], out)
    tok = load_tokenizer(out)
    assert info["vocab_size"] == len(tok) > 30000  # the MiniLM (BERT) vocabulary, extended
    ids = special_token_ids(tok)
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert tok("<image> left arm <POSE>", add_special_tokens=False)["input_ids"][0] == ids["<image>"]
