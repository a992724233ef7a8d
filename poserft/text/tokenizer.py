"""Project tokenizer: train (byte-level BPE), save atomically, load as a HF fast tokenizer.

The embedded world trains its own small BPE on the split texts (captions, VQA questions
and answers, prompt templates). Real runs instead extend a checkpoint's tokenizer with the
two placeholder tokens (:func:`extend_pretrained_tokenizer`).

Conventions that callers rely on:

* special tokens ``<pad> <unk> <s> </s> <image> <POSE>`` (:data:`SPECIAL_TOKENS`), each one
  id; in a trained tokenizer they take ids 0..5 in that order;
* encoding adds **no** special tokens by itself (no post-processor): callers add
  ``bos_token_id``/``eos_token_id`` where their format needs them;
* byte-level pre-tokenization, so any UTF-8 text encodes without ``<unk>`` and
  ``decode(encode(text))`` returns ``text`` exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from poserft.atomic import write_text
from poserft.text.config import TokenizerConfig

__all__ = [
    "PAD_TOKEN", "UNK_TOKEN", "BOS_TOKEN", "EOS_TOKEN", "IMAGE_TOKEN", "POSE_TOKEN",
    "SPECIAL_TOKENS", "TOKENIZER_FILE", "TokenizerFileError", "train_tokenizer",
    "load_tokenizer", "read_split_texts", "build_project_tokenizer",
    "extend_pretrained_tokenizer", "special_token_ids",
]

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<s>", "</s>"
IMAGE_TOKEN, POSE_TOKEN = "<image>", "<POSE>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, POSE_TOKEN)
TOKENIZER_FILE = "tokenizer.json"
# Bump when the training recipe changes, so cached tokenizers are rebuilt.
_RECIPE_VERSION = 1


class TokenizerFileError(ValueError):
    """A tokenizer file is missing, unreadable or lacks the project's special tokens."""


def _resolve_file(path: str | os.PathLike) -> Path:
    """Accept either ``.../tokenizer.json`` or the directory holding it."""
    p = Path(path)
    return p / TOKENIZER_FILE if p.is_dir() else p


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike,
                    min_frequency: int = 2) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it atomically as JSON.

    ``out_path`` is the ``tokenizer.json`` file (or a directory to put it in). Returns the
    file path. The special tokens get ids 0..5 in :data:`SPECIAL_TOKENS` order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [t for t in texts if isinstance(t, str) and t]
    if not texts:
        raise ValueError("train_tokenizer: no non-empty texts to train on (are the captions "
                         "and VQA datasets of the splits empty?)")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is below the byte-level "
                         f"minimum {256 + len(SPECIAL_TOKENS)}; raise tokenizer.vocab_size")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # add_prefix_space=False: the start of a text is not silently changed, so decoding
    # reproduces the input exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    out_file = _resolve_file(out_path)
    write_text(out_file, tok.to_str(pretty=False))
    return out_file


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """``{token: id}`` for the project's special tokens; raises if one is not a single id."""
    ids = {}
    for token in SPECIAL_TOKENS:
        enc = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise TokenizerFileError(f"special token {token!r} encodes to {len(enc)} ids "
                                     f"({enc}); it must be one added special token")
        ids[token] = enc[0]
    return ids


def load_tokenizer(path: str | os.PathLike, model_max_length: int | None = None):
    """Load ``tokenizer.json`` (file or its directory) as a ``PreTrainedTokenizerFast``.

    pad/unk/bos/eos are set to ``<pad> <unk> <s> </s>``; ``<image>`` and ``<POSE>`` are
    additional special tokens. Raises :class:`FileNotFoundError` or
    :class:`TokenizerFileError` naming the file and how to rebuild it.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    file = _resolve_file(path)
    fix = ("rebuild it with the tokenizer rule (e.g. `snakemake results/tokenizer/tokenizer.json "
           "--forcerun`) or poserft.text.tokenizer.build_project_tokenizer")
    if not file.is_file():
        raise FileNotFoundError(f"{file}: tokenizer file does not exist; {fix}")
    try:
        raw = file.read_text(encoding="utf-8")
        json.loads(raw)
        backend = Tokenizer.from_str(raw)
    except Exception as exc:  # json / serde errors have several types
        raise TokenizerFileError(f"{file}: not a valid HF tokenizers JSON file "
                                 f"({type(exc).__name__}: {exc}); {fix}") from exc
    vocab = backend.get_vocab(with_added_tokens=True)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise TokenizerFileError(f"{file}: special tokens {missing} are missing; {fix} "
                                 "(or, for a checkpoint tokenizer, extend_pretrained_tokenizer)")
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        additional_special_tokens=[IMAGE_TOKEN, POSE_TOKEN], padding_side="right", **kwargs)
    special_token_ids(tok)  # every placeholder must stay one id
    return tok


def read_split_texts(h5_paths: Sequence[str | os.PathLike]) -> list[str]:
    """Captions, VQA questions and VQA answers of the split files, in file order."""
    from poserft.data.h5io import SplitReader

    texts: list[str] = []
    for path in h5_paths:
        with SplitReader(path) as reader:
            for key in ("captions/text", "vqa/question", "vqa/answer"):
                if reader.has(key):
                    texts.extend(str(t) for t in reader.read(key))
    return texts


def _fingerprint(cfg: TokenizerConfig, texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": _RECIPE_VERSION, "cfg": cfg.to_dict()},
                        sort_keys=True).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _fingerprint_file(out_file: Path) -> Path:
    return out_file.with_name(out_file.name + ".inputs.sha256")


def build_project_tokenizer(cfg: TokenizerConfig | None,
                            h5_paths: Sequence[str | os.PathLike],
                            out_path: str | os.PathLike,
                            extra_texts: Iterable[str] = ()) -> dict:
    """Stage entry point: the project tokenizer from the splits' texts plus ``extra_texts``.

    The corpus is captions + VQA questions/answers of ``h5_paths`` plus ``extra_texts``
    (the prompt templates). Cached: a fingerprint of config + corpus is stored next to the
    output (``tokenizer.json.inputs.sha256``); when it matches, nothing is retrained.
    With ``cfg.pretrained`` set, that checkpoint's tokenizer is extended instead.

    Returns ``{"path", "vocab_size", "num_texts", "cached"}``.
    """
    cfg = TokenizerConfig.expect(cfg, "build_project_tokenizer: cfg")
    out_file = _resolve_file(out_path)
    texts = read_split_texts(h5_paths) + [str(t) for t in extra_texts]
    fp = _fingerprint(cfg, texts)
    fp_file = _fingerprint_file(out_file)
    if out_file.is_file() and fp_file.is_file() and fp_file.read_text().strip() == fp:
        try:
            tok = load_tokenizer(out_file)
            return {"path": str(out_file), "vocab_size": len(tok), "num_texts": len(texts),
                    "cached": True}
        except (TokenizerFileError, FileNotFoundError):
            pass  # a damaged cached file is simply rebuilt
    if cfg.pretrained:
        tok, _ = extend_pretrained_tokenizer(cfg.pretrained)
        write_text(out_file, tok.backend_tokenizer.to_str(pretty=False))
    else:
        train_tokenizer(texts, cfg.vocab_size, out_file, min_frequency=cfg.min_frequency)
    tok = load_tokenizer(out_file)
    write_text(fp_file, fp + "\n")
    return {"path": str(out_file), "vocab_size": len(tok), "num_texts": len(texts),
            "cached": False}


def extend_pretrained_tokenizer(name_or_path: str, local_files_only: bool | None = None):
    """A real checkpoint's tokenizer with ``<image>``/``<POSE>`` (and the project's pad/unk/
    bos/eos where the checkpoint has none) added as special tokens.

    Returns ``(tokenizer, num_added)``; after loading the model call
    ``model.resize_token_embeddings(len(tokenizer))`` when ``num_added > 0``.
    ``local_files_only`` defaults to true when ``HF_HUB_OFFLINE`` is set or the name is a
    local directory.
    """
    from transformers import AutoTokenizer

    if local_files_only is None:
        local_files_only = bool(os.environ.get("HF_HUB_OFFLINE")) or Path(name_or_path).is_dir()
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True,
                                            local_files_only=local_files_only)
    except Exception as exc:
        raise TokenizerFileError(f"{name_or_path}: cannot load the checkpoint tokenizer "
                                 f"({type(exc).__name__}: {exc}); check tokenizer.pretrained "
                                 "(a local checkpoint directory or a hub name with network "
                                 "access)") from exc
    if not getattr(tok, "is_fast", False):
        raise TokenizerFileError(f"{name_or_path}: only fast (tokenizer.json) tokenizers are "
                                 "supported; convert the checkpoint's tokenizer first")
    roles = {"pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN, "bos_token": BOS_TOKEN,
             "eos_token": EOS_TOKEN}
    new = {role: tok_str for role, tok_str in roles.items() if getattr(tok, role) is None}
    # The project names must exist as tokens even when the checkpoint uses its own
    # (e.g. [PAD]); they are added as extra special tokens then.
    have = set(tok.get_vocab())
    extra = [t for t in SPECIAL_TOKENS if t not in have and t not in new.values()]
    n = tok.add_special_tokens({**new, "additional_special_tokens": extra},
                               replace_extra_special_tokens=False)
    return tok, n
