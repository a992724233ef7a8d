"""Config section ``retrieval``: text-pose retrieval models (reward and evaluator roles).

Stdlib only: the Snakefile imports it at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from poserft.configbase import ConfigError, Section, option
from poserft.data.config import check_data_weights, data_option

ROLES = ("reward", "evaluator")


@dataclass
class RetrievalConfig(Section):
    """Text-pose retrieval model (PoseScript-style) and its contrastive training."""

    # --- architecture
    text_encoder: Literal["transformer", "pretrained"] = option(
        "transformer", help="'transformer': a small transformer over the project tokenizer's "
        "ids, trained from scratch; 'pretrained': a HF text encoder (pretrained_text_model) "
        "with its own tokenizer, mean-pooled.", choices=("transformer", "pretrained"))
    pretrained_text_model: str = option("", help="HF checkpoint name or local directory for "
                                        "text_encoder 'pretrained' (e.g. distilbert-base-uncased "
                                        "as in PoseScript).")
    freeze_pretrained: bool = option(False, help="Keep the pretrained text encoder's weights "
                                     "fixed (only its projection is trained).")
    d_model: int = option(128, help="Width of the from-scratch text transformer.", minimum=8)
    n_layers: int = option(1, help="Layers of the from-scratch text transformer.", minimum=1)
    n_heads: int = option(4, help="Attention heads of the text transformer (divides d_model).",
                          minimum=1)
    ff_dim: int = option(256, help="Feed-forward width of the text transformer.", minimum=8)
    max_text_len: int = option(64, help="Caption tokens kept (longer captions are truncated).",
                               minimum=4)
    pose_hidden_dim: int = option(512, help="Hidden width of the pose MLP (VPoser-like).",
                                  minimum=8)
    latent_dim: int = option(128, help="Dimension of the shared L2-normalised space.", minimum=4)
    dropout: float = option(0.0, help="Dropout in both encoders (the synthetic world does not "
                            "overfit in the default epochs; 0.1 for real data).", minimum=0.0, maximum=0.9)
    init_logit_scale: float = option(10.0, help="Initial inverse temperature of the "
                                     "contrastive logits (PoseScript: 10).", exclusive_minimum=0.0)
    max_logit_scale: float = option(100.0, help="Upper clamp of the learnt inverse temperature.",
                                    exclusive_minimum=0.0)

    # --- optimisation
    epochs: int = option(12, help="Passes over the role's training poses (one sampled caption "
                         "per pose per epoch).", minimum=1)
    batch_size: int = option(64, help="Pose-caption pairs per contrastive batch.", minimum=2)
    lr: float = option(1e-3, help="AdamW peak learning rate.", exclusive_minimum=0.0)
    weight_decay: float = option(0.01, help="AdamW weight decay.", minimum=0.0)
    warmup_fraction: float = option(0.05, help="Fraction of steps with linear LR warm-up "
                                    "(then cosine decay to 10%).", minimum=0.0, maximum=0.5)
    grad_clip: float = option(1.0, help="Gradient-norm clip (0 disables).", minimum=0.0)
    eval_batch_size: int = option(512, help="Batch size when embedding val/test splits.",
                                  minimum=1)
    device: str = option("cpu", help="Torch device ('cpu', 'cuda', 'cuda:0').")
    torch_threads: int = option(1, help="CPU threads for torch during training (0: torch's "
                                "default). 1 by default: for the tiny model a second thread "
                                "gains little on an idle machine and thrashes on a shared one; "
                                "a rule may pass its `threads`.", minimum=0)

    data: dict[str, float] = data_option(
        "train_retrieval", "caption-pose pairs (their train splits train, val splits pick the "
        "best epoch, test splits give recall.json; weights set each source's share of an "
        "epoch's batches)")

    # --- roles: reward model (used by RFT) and evaluator (used by evaluation)
    reward_seed: int = option(0, help="Seed of the reward model's init and batches.")
    evaluator_seed: int = option(1, help="Seed of the evaluator model's init and batches.")
    role_subsets: Literal["disjoint_halves", "random_fraction", "all"] = option(
        "disjoint_halves", help="Training poses per role: 'disjoint_halves' splits the train "
        "poses in two halves (reward: first, evaluator: second) so the evaluator never saw the "
        "reward model's data; 'random_fraction': each role draws subset_fraction of the poses "
        "with its own seed; 'all': both use every pose.",
        choices=("disjoint_halves", "random_fraction", "all"))
    subset_fraction: float = option(0.5, help="Fraction of train poses per role for "
                                    "role_subsets 'random_fraction'.", exclusive_minimum=0.0,
                                    maximum=1.0)
    subset_seed: int = option(1234, help="Seed of the pose permutation behind the role subsets.")
    share_evaluator_with_reward: bool = option(
        False, help="Paper-faithful setting: evaluate with the reward model itself (the "
        "workflow then trains only the reward role). false: a separately trained evaluator.")

    # --- validation / test recall (poserft.eval.metrics.retrieval_recall)
    recall_ks: list[int] = option([5, 10, 20], help="K of Recall@K.")
    sampled_candidates: int = option(32, help="Protocol 2: candidates per query (1 true + "
                                     "distractors).", minimum=2)
    sampled_repeats: int = option(10, help="Protocol 2: random draws per query.", minimum=1)
    recall_seed: int = option(0, help="Seed of protocol 2's distractor draws.")

    def seed_for(self, role: str) -> int:
        if role not in ROLES:
            raise ConfigError(f"retrieval role {role!r} is not one of {list(ROLES)}")
        return self.reward_seed if role == "reward" else self.evaluator_seed

    def check(self, where: str) -> None:
        check_data_weights(f"{where}.data", self.data)
        if self.text_encoder == "transformer" and self.d_model % self.n_heads:
            raise ConfigError(f"{where}.d_model ({self.d_model}) must be divisible by "
                              f"{where}.n_heads ({self.n_heads})")
        if self.text_encoder == "pretrained" and not self.pretrained_text_model.strip():
            raise ConfigError(f"{where}.pretrained_text_model: required when "
                              f"{where}.text_encoder is 'pretrained'")
        if self.max_logit_scale < self.init_logit_scale:
            raise ConfigError(f"{where}.max_logit_scale ({self.max_logit_scale}) is below "
                              f"{where}.init_logit_scale ({self.init_logit_scale})")
        if not self.recall_ks or any(k < 1 for k in self.recall_ks):
            raise ConfigError(f"{where}.recall_ks: need at least one K >= 1, got {self.recall_ks}")
        if max(self.recall_ks) > self.sampled_candidates:
            raise ConfigError(f"{where}.recall_ks: K={max(self.recall_ks)} exceeds "
                              f"{where}.sampled_candidates ({self.sampled_candidates})")
        if (self.role_subsets == "all" and self.reward_seed == self.evaluator_seed
                and not self.share_evaluator_with_reward):
            raise ConfigError(f"{where}.reward_seed == {where}.evaluator_seed with "
                              f"{where}.role_subsets 'all' trains two identical models; give "
                              f"different seeds or set {where}.share_evaluator_with_reward: true")
