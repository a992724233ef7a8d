"""Config sections of the training engine (shared by SFT and RFT) and of SFT (``sft:``).

Stdlib-only (the Snakefile imports it at parse time). ``OptimConfig`` and ``EngineConfig``
are nested in ``sft.optim``/``sft.engine`` and reused by the RFT section.
Defaults: the tiny embedded world on 2 CPU cores (about a minute of SFT).
"""

from __future__ import annotations

from dataclasses import dataclass

from poserft.configbase import ConfigError, Section, option
from poserft.data.config import LoaderConfig, check_data_weights, data_option

__all__ = ["OptimConfig", "EngineConfig", "SFTConfig", "SFT_TASKS"]

SFT_TASKS = ("text2pose", "image2pose", "image2text")


@dataclass
class OptimConfig(Section):
    """AdamW with linear warmup then cosine decay (per optimizer step)."""

    lr: float = option(1e-3, "Peak learning rate (tiny world, measured best of 2e-4..5e-3 in "
                       "docs/embedded_world.md; paper-scale runs use ~2e-5).",
                       exclusive_minimum=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms).", minimum=0.0)
    betas: list[float] = option([0.9, 0.95], "AdamW (beta1, beta2); the paper uses (0.9, 0.95).")
    eps: float = option(1e-8, "AdamW epsilon.", exclusive_minimum=0.0)
    warmup_steps: int = option(20, "Linear warmup steps from 0 to lr.", minimum=0)
    min_lr_ratio: float = option(0.1, "Cosine floor as a fraction of lr.", minimum=0.0, maximum=1.0)
    grad_clip: float = option(1.0, "Max global grad norm (0 disables clipping).", minimum=0.0)

    def check(self, where: str) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}.betas: {self.betas} must be two numbers in [0, 1)")


@dataclass
class EngineConfig(Section):
    """How training runs: plain torch or DeepSpeed, precision, checkpointing."""

    backend: str = option("torch", "torch: plain PyTorch (CPU or one GPU, DDP when launched "
                          "with several ranks); deepspeed: DeepSpeed ZeRO.",
                          choices=("torch", "deepspeed"))
    zero_stage: int = option(2, "DeepSpeed ZeRO stage (0-3); used with backend=deepspeed.", minimum=0, maximum=3)
    offload_optimizer: bool = option(False, "DeepSpeed: offload optimizer states to CPU (ZeRO >= 1).")
    precision: str = option("auto", "auto: bf16 on GPU, fp32 on CPU; or force fp32/bf16.",
                            choices=("auto", "fp32", "bf16"))
    device: str = option("auto", "auto: cuda:LOCAL_RANK when available, else cpu.", choices=("auto", "cpu", "cuda"))
    checkpoint_every: int = option(100, "Save a resumable checkpoint every N optimizer steps (0: only at the end).", minimum=0)
    keep_checkpoints: int = option(2, "Most recent checkpoints kept on disk.", minimum=1)
    log_every: int = option(10, "Log metrics every N steps.", minimum=1)
    seed: int = option(0, "Global seed (data order, dropout, sampling).")
    num_threads: int = option(
        1, "torch intra-op CPU threads (0: leave torch's default). 1 for the tiny world: its "
           "ops are too small to parallelise and, on a shared 2-core machine, 2 threads were "
           "measured 18x slower than 1 (spin-waiting under contention).", minimum=0)
    dist_timeout_s: int = option(1800, "Process-group init/collective timeout (seconds).", minimum=10)


@dataclass
class SFTConfig(Section):
    """Supervised pretraining of the pose MLLM on mixed tasks from the HDF5 splits."""

    steps: int = option(
        3500, "Optimizer steps (about 4 min for the embedded world on one core). Text->pose "
              "is bounded by steps: one dist seed read test text PA-MPJPE 157.2 mm at 1500 "
              "steps, 138.9 at 3000, 131.4 at 4000 (docs/embedded_world.md, section 10).",
        minimum=1)
    batch_size: int = option(16, "Examples per micro-batch (per rank).", minimum=1)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", minimum=1)
    data: dict[str, float] = data_option("sft", "SFT examples (text->pose, image->pose, VQA)")
    loader: LoaderConfig = option(LoaderConfig(), "Reading examples: DataLoader workers and "
                                  "images stored as file paths (crop, resize, bad files).")
    task_weights: dict[str, float] = option(
        {"text2pose": 1.0, "image2pose": 1.0, "image2text": 0.5},
        "Sampling weight of each task (text2pose, image2pose, image2text). Tasks whose data "
        "is absent from the split (no captions / images / VQA) are dropped with a warning.")
    lm_weight: float = option(1.0, "Weight of the answer next-token cross-entropy.", minimum=0.0)
    prompt_lm_weight: float = option(
        0.0, "Weight of a next-token cross-entropy on the prompts' own text (captions, "
             "questions; image slots excluded): language-model training for an LLM that "
             "starts untrained (the embedded world). 0 = off; 0.5 lowered text->pose "
             "PA-MPJPE by 2-6 mm on seeds whose text path had not converged but cost the "
             "seed that had (docs/embedded_world.md, section 13).", minimum=0.0)
    pose_weight: float = option(1.0, "Weight of the pose loss (Gaussian NLL per dim, or 6D MSE "
                                "for the deterministic head).", minimum=0.0)
    joint_weight: float = option(1.0, "Weight of the FK joint-position loss (metres).", minimum=0.0)
    nll_beta: float = option(
        0.5, "beta of the beta-NLL pose loss of the Gaussian head (diagonal covariance; "
             "Seitzer et al. 2022): 0 = plain NLL, which divides each dimension's gradient by "
             "its variance and let the mean stall; 0.5 took image->pose val PA-MPJPE from "
             "148.4 to 129.9 mm (docs/embedded_world.md).", minimum=0.0, maximum=1.0)
    joint_frame: str = option(
        "both", "Joint loss frame. local: both root rotations set to identity (articulation "
        "only; the root orientation is learnt through the pose loss). global: joints include "
        "the global orientation, so orientation errors dominate and, under orientation "
        "uncertainty, the loss pulls limbs towards the body axis. both: mean of the two.",
        choices=("local", "global", "both"))
    text2pose_remove_yaw: bool = option(
        True, "Remove the root's twist about the vertical (y) axis from text->pose targets: a "
              "caption never says which way the body faces (as for retrieval).")
    init_pose_bias_from_data: bool = option(
        True, "Start the pose head's mean at the training split's mean 6D pose (instead of "
              "the rest pose).")
    eval_samples: int = option(200, "Val examples per task for the end-of-training check "
                               "(greedy format rate, image->pose MPJPE vs the mean pose); 0 skips.",
                               minimum=0)
    max_new_tokens: int = option(24, "Generation budget for the end-of-training check.", minimum=1)
    optim: OptimConfig = option(OptimConfig(), "Optimizer and LR schedule.")
    engine: EngineConfig = option(EngineConfig(), "Training engine.")

    def check(self, where: str) -> None:
        check_data_weights(f"{where}.data", self.data)
        unknown = sorted(set(self.task_weights) - set(SFT_TASKS))
        if unknown:
            raise ConfigError(f"{where}.task_weights: unknown task(s) {unknown}; known: {list(SFT_TASKS)}")
        if any(w < 0 for w in self.task_weights.values()) or not any(
                w > 0 for w in self.task_weights.values()):
            raise ConfigError(f"{where}.task_weights: weights must be >= 0 with at least one > 0, "
                              f"got {self.task_weights}")
