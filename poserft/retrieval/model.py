"""Text-pose retrieval model: two encoders into one L2-normalised space + a learnt temperature.

Reference design: PoseScript's retrieval model (a text encoder, a VPoser-like pose MLP, a
batch-based classification loss with a learnt scale). Text encoders:

* ``transformer``: a small pre-norm transformer over the project tokenizer's ids, a
  ``<s>`` token prepended (so no caption is empty), masked mean pooling, projection;
* ``pretrained``: a HF encoder (``AutoModel``) with its own tokenizer, masked mean pooling
  of the last hidden states, projection (paper-scale runs).

The pose encoder sees :func:`poserft.retrieval.features.retrieval_pose_features`: 22 body
joints in 6D with the root yaw removed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from poserft.retrieval.config import RetrievalConfig
from poserft.retrieval.features import FEATURE_DIM, retrieval_pose_features

__all__ = ["RetrievalArch", "RetrievalModel", "masked_mean"]


@dataclass
class RetrievalArch:
    """Everything needed to rebuild the network (stored in the checkpoint's config.json)."""

    text_encoder: str
    vocab_size: int
    pad_id: int
    bos_id: int
    d_model: int
    n_layers: int
    n_heads: int
    ff_dim: int
    max_text_len: int
    pose_hidden_dim: int
    latent_dim: int
    dropout: float
    init_logit_scale: float
    max_logit_scale: float
    pretrained_text_model: str = ""
    freeze_pretrained: bool = False

    @classmethod
    def from_config(cls, cfg: RetrievalConfig, vocab_size: int, pad_id: int,
                    bos_id: int) -> "RetrievalArch":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in cfg.to_dict().items() if k in names}
        return cls(vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, **values)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "RetrievalArch":
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING}
        missing, unknown = sorted(required - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"{where}: model architecture keys missing {missing} / unknown "
                             f"{unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) token states, (B, L) bool/0-1 mask -> (B, H) mean over kept tokens."""
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


class TransformerTextEncoder(nn.Module):
    """ids (B, L), mask (B, L) -> (B, latent_dim) unnormalised."""

    def __init__(self, arch: RetrievalArch):
        super().__init__()
        self.token = nn.Embedding(arch.vocab_size, arch.d_model, padding_idx=arch.pad_id)
        self.position = nn.Embedding(arch.max_text_len, arch.d_model)
        layer = nn.TransformerEncoderLayer(arch.d_model, arch.n_heads, arch.ff_dim,
                                           arch.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, arch.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(arch.d_model)
        self.proj = nn.Linear(arch.d_model, arch.latent_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.token(ids) + self.position(pos)[None]
        x = self.encoder(x, src_key_padding_mask=~mask)
        return self.proj(masked_mean(self.norm(x), mask))


class PretrainedTextEncoder(nn.Module):
    """A HF encoder, mean-pooled and projected. ``load_weights=False`` builds the
    architecture only (weights then come from our checkpoint)."""

    def __init__(self, arch: RetrievalArch, name_or_path: str, load_weights: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        if load_weights:
            self.backbone = AutoModel.from_pretrained(name_or_path)
        else:
            self.backbone = AutoModel.from_config(AutoConfig.from_pretrained(name_or_path))
        if arch.freeze_pretrained:
            self.backbone.requires_grad_(False)
        self.proj = nn.Linear(self.backbone.config.hidden_size, arch.latent_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self.proj(masked_mean(states, mask))


class PoseEncoder(nn.Module):
    """VPoser-like MLP: (B, 132) features -> (B, latent_dim) unnormalised."""

    def __init__(self, arch: RetrievalArch):
        super().__init__()
        h = arch.pose_hidden_dim
        self.net = nn.Sequential(
            nn.Linear(FEATURE_DIM, h), nn.LeakyReLU(0.2), nn.LayerNorm(h), nn.Dropout(arch.dropout),
            nn.Linear(h, h), nn.LeakyReLU(0.2), nn.LayerNorm(h), nn.Dropout(arch.dropout),
            nn.Linear(h, arch.latent_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class RetrievalModel(nn.Module):
    """``encode_text(ids, mask)`` and ``encode_pose(pose_vec6d)`` -> unit vectors (B, latent).

    ``tokenizer`` (a HF fast tokenizer, not a submodule) turns strings into ids for
    :meth:`tokenize` / :meth:`embed_texts`; it is the project tokenizer for ``transformer``
    and the checkpoint's tokenizer for ``pretrained``.
    """

    def __init__(self, arch: RetrievalArch, tokenizer: Any = None,
                 text_model_source: str | None = None, load_text_weights: bool = True):
        super().__init__()
        self.arch = arch
        self.tokenizer = tokenizer
        if arch.text_encoder == "transformer":
            self.text_encoder: nn.Module = TransformerTextEncoder(arch)
        elif arch.text_encoder == "pretrained":
            self.text_encoder = PretrainedTextEncoder(
                arch, text_model_source or arch.pretrained_text_model, load_text_weights)
        else:
            raise ValueError(f"unknown text_encoder {arch.text_encoder!r}")
        self.pose_encoder = PoseEncoder(arch)
        # log-parametrised so the scale stays positive; clamped by clamp_logit_scale()
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(arch.init_logit_scale)))

    # -- scale
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.log_logit_scale.clamp_(0.0, math.log(self.arch.max_logit_scale))

    # -- encoders
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, L) long, mask (B, L) -> (B, latent_dim), unit L2 rows."""
        return F.normalize(self.text_encoder(ids, mask), dim=-1)

    def encode_pose(self, pose_vec6d: torch.Tensor) -> torch.Tensor:
        """(B, 144) pose vectors -> (B, latent_dim), unit L2 rows (yaw-invariant)."""
        return F.normalize(self.pose_encoder(retrieval_pose_features(pose_vec6d)), dim=-1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                pose_vec6d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_text(ids, mask), self.encode_pose(pose_vec6d)

    # -- strings
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """strings -> ids (B, L) long, mask (B, L) bool, L <= max_text_len."""
        if self.tokenizer is None:
            raise RuntimeError("RetrievalModel has no tokenizer attached; load it with "
                               "poserft.retrieval.checkpoint.load_retrieval_model")
        texts = list(texts)
        if self.arch.text_encoder == "transformer":
            # Own format: <s> + caption tokens, truncated, right-padded with <pad>.
            enc = self.tokenizer(texts, add_special_tokens=False, truncation=True,
                                 max_length=self.arch.max_text_len - 1)["input_ids"]
            seqs = [[self.arch.bos_id] + e for e in enc]
        else:
            seqs = self.tokenizer(texts, add_special_tokens=True, truncation=True,
                                  max_length=self.arch.max_text_len)["input_ids"]
        length = max((len(s) for s in seqs), default=1)
        ids = torch.full((len(seqs), length), self.arch.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = True
        return ids, mask

    def embed_texts(self, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        """strings (n) -> (n, latent_dim) unit rows, batched; grad-free, current mode."""
        device = self.log_logit_scale.device
        texts = list(texts)
        # batch texts of similar length together: less padding to compute through
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                ids, mask = self.tokenize([texts[i] for i in order[start:start + batch_size]])
                out.append(self.encode_text(ids.to(device), mask.to(device)))
        if not out:
            return torch.zeros(0, self.arch.latent_dim, device=device)
        sorted_emb = torch.cat(out)
        emb = torch.empty_like(sorted_emb)
        emb[torch.tensor(order, device=device)] = sorted_emb
        return emb

    def embed_poses(self, pose_vec6d: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(n, 144) -> (n, latent_dim) unit rows, batched; grad-free, current mode."""
        device = self.log_logit_scale.device
        out = []
        with torch.no_grad():
            for start in range(0, pose_vec6d.shape[0], batch_size):
                out.append(self.encode_pose(pose_vec6d[start:start + batch_size].to(device)))
        return torch.cat(out) if out else torch.zeros(0, self.arch.latent_dim, device=device)
