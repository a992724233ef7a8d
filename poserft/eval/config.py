"""The ``eval`` config section: how one variant's policy is benchmarked.

Stdlib-only (the Snakefile imports it at parse time). Image->pose and text->pose are
scored on the whole test splits by default (``max_image_samples: 0``,
``max_text_samples: 0``); the knobs remain for quick looks on a seeded subset. Held-out VQA
keeps a small subset by default (``max_vqa_samples: 32``; paper scale, configs/paper.yaml:
0). The same rows score every variant, seed and the floor/ceiling reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from poserft.configbase import ConfigError, Section, option
from poserft.model.config import DEFAULT_FORMAT_REGEX

__all__ = ["EvalConfig", "IMAGE_BENCHMARKS", "TEXT_BENCHMARKS"]

# Real datasets with an image->pose / text->pose test protocol (names of `datasets:`).
IMAGE_BENCHMARKS = ("pw3d", "h36m", "mpi_inf_3dhp")
TEXT_BENCHMARKS = ("posescript",)


@dataclass
class EvalConfig(Section):
    """Benchmarks of one variant: image->pose errors, text->pose retrieval, format, VQA."""

    max_image_samples: int = option(
        0, "Images scored per image->pose test split: 0 (default) = the whole split; N > 0 = "
           "a seeded subset of N rows (the same for every variant, seed and the "
           "floor/ceiling reference), for quick looks only.", minimum=0)
    max_text_samples: int = option(
        0, "Test captions turned into poses for text->pose Recall@K and MPJPE: 0 (default) = "
           "all; N > 0 = a seeded subset of N captions (the same for every variant, seed and "
           "the reference), for quick looks only. Must be 0 or > eval.protocol2_candidates "
           "(protocol 2 draws distractors from the other generated poses).", minimum=0)
    max_vqa_samples: int = option(
        32, "Held-out VQA questions answered for the mean text reward (seeded subset); "
            "0 = all, and the metric is skipped when the split has no /vqa.", minimum=0)
    subset_seed: int = option(0, "Seed of the test subsets above (fixed across variants and "
                                 "seeds so that every run scores the same samples).")
    joint_set: Literal["lsp14", "h36m17", "smpl24"] = option(
        "lsp14", "Joints compared by MPJPE / PA-MPJPE. lsp14: the HMR2.0/4D-Humans 3DPW/H36M "
                 "protocol (14 LSP joints).", choices=("lsp14", "h36m17", "smpl24"))
    pred_betas: Literal["zero", "gt"] = option(
        "zero", "Body shape of the predicted pose (the MLLM predicts pose only): zero = mean "
                "shape; gt = the ground-truth betas (isolates pose error). The skeleton "
                "body model ignores shape.", choices=("zero", "gt"))
    best_of_n: int = option(
        4, "Extra column: N poses sampled per image (temperature below), the lowest error of "
           "the N per image (oracle selection, each metric separately). 0 disables.",
        minimum=0)
    sample_temperature: float = option(1.0, "Sampling temperature of the best-of-N candidates.",
                                       exclusive_minimum=0.0)
    max_new_tokens: int = option(24, "Longest generated answer (tokens).", minimum=1)
    device: str = option(
        "auto", "Device the policy and the evaluator model run on: auto (cuda when a GPU is "
        "visible, else cpu), cpu, cuda or cuda:N. Pose errors are computed on the CPU either "
        "way.")
    batch_size: int = option(
        32, "Prompts per generate call (and rows per body-model / evaluator pass). Greedy "
        "results do not depend on it beyond float rounding; the best-of-N samples of a batch "
        "share one seeded generator stream, so their draws do.", minimum=1)
    recall_ks: list[int] = option([5, 10, 20], "K values of Recall@K (RT2P and RP2T).")
    protocol2_candidates: int = option(
        32, "Protocol 2 (sampled): candidates per query (ground truth + N-1 distractors).",
        minimum=2)
    protocol2_repeats: int = option(10, "Protocol 2: random repeats R per query.", minimum=1)
    recall_seed: int = option(0, "Seed of protocol 2's distractor draws.")
    format_regex: str = option(
        DEFAULT_FORMAT_REGEX, "Regex the whole stripped answer of a pose prompt must match to "
        "count as well formatted (same default as rft.format_regex).")
    image_benchmarks: list[str] = option(
        list(IMAGE_BENCHMARKS), "Real datasets whose test split is also scored for "
        "image->pose when they are in datasets.enabled (Table 1).")
    text_benchmarks: list[str] = option(
        list(TEXT_BENCHMARKS), "Real datasets whose test split is also scored for text->pose "
        "Recall@K when they are in datasets.enabled (Table 2).")

    def check(self, where: str) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"{where}.device: {self.device!r} is not one of auto, cpu, cuda, "
                              "cuda:N")
        if not self.recall_ks or any(k < 1 for k in self.recall_ks):
            raise ConfigError(f"{where}.recall_ks: expected positive integers, got {self.recall_ks}")
        if max(self.recall_ks) > self.protocol2_candidates:
            raise ConfigError(f"{where}.recall_ks: K={max(self.recall_ks)} exceeds "
                              f"{where}.protocol2_candidates={self.protocol2_candidates} (every "
                              "query would trivially hit); lower K or raise the candidates")
        if 0 < self.max_text_samples <= self.protocol2_candidates:
            raise ConfigError(
                f"{where}.max_text_samples ({self.max_text_samples}) must be 0 (all) or > "
                f"{where}.protocol2_candidates ({self.protocol2_candidates}): protocol 2 "
                "needs that many other generated poses as distractors")
        try:
            re.compile(self.format_regex)
        except re.error as exc:
            raise ConfigError(f"{where}.format_regex: not a valid regular expression ({exc})") from None
        for key, known in (("image_benchmarks", IMAGE_BENCHMARKS),
                           ("text_benchmarks", TEXT_BENCHMARKS)):
            for name in getattr(self, key):
                if name not in known:
                    raise ConfigError(f"{where}.{key}: {name!r} has no protocol here; known: "
                                      f"{list(known)}")
