"""Config sections of the pose MLLM (``model:``) and of the pose-aware ViT (``pose_encoder:``).

Stdlib-only (the Snakefile imports this at parse time). Defaults are the tiny embedded
world: 64x64 images, a 2-layer CLIP and a 2-layer Llama-style LLM (random, CLIP frozen) and
a 4-block conv pose encoder pretrained on pose estimation by the pretrain_pose_encoder
stage. Paper-scale values (a LLaVA-1.5 checkpoint, ViTPose-B weights) belong in
``configs/paper.yaml``.

Architecture of the pose-aware encoder lives in one place, :class:`PoseViTConfig`, which is
nested both in ``model.pose_vit`` (what the MLLM builds) and in ``pose_encoder.vit`` (what
the pretraining stage trains). When pretraining runs, the workflow passes its output
directory as ``model.pose_vit.checkpoint``; the architecture then comes from the
checkpoint's ``config.json`` and the size fields here are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from poserft.configbase import ConfigError, Section, option

__all__ = ["PoseViTConfig", "LoraConfig", "ModelConfig", "PoseEncoderConfig", "POSE_TOKEN",
           "IMAGE_TOKEN", "DEFAULT_FORMAT_REGEX", "DTYPES"]

# Placeholder tokens shared with poserft.text.tokenizer (kept literal so this file stays
# stdlib-only).
IMAGE_TOKEN = "<image>"
POSE_TOKEN = "<POSE>"
# A well-formatted answer of a pose prompt: the default ``ModelConfig.pose_answer`` up to
# whitespace (default of rft.format_regex, the format reward, and eval.format_regex).
DEFAULT_FORMAT_REGEX = r"\s*The\s+SMPL\s+pose\s+of\s+this\s+person\s+is\s*<POSE>\s*\.\s*"
# Values of model.dtype ("auto": bfloat16 where the policy runs on CUDA, float32 on CPU).
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class PoseViTConfig(Section):
    """Pose-aware encoder: a ViTPose-style ViT (transformers VitPoseBackbone) or, for CPU-sized
    worlds, a small conv net with the same token interface; architecture or a checkpoint."""

    checkpoint: str | None = option(
        None, "Directory of a pose encoder (config.json + model.safetensors): the output of "
              "pretrain_pose_encoder, or converted ViTPose weights (a VitPoseBackbone). null: "
              "random init from the fields below.")
    arch: str = option(
        "conv", "vitpose: transformers VitPoseBackbone (ViTPose checkpoints; paper scale). conv: "
        "stride-2 conv blocks whose last feature map gives the tokens, each plus a global "
        "embedding of the whole image (docs/embedded_world.md: a ViT from scratch does not "
        "learn image->pose from 2000 images in CPU minutes; this does).",
        choices=("vitpose", "conv"))
    image_size: int = option(64, "Input image side (pixels); images are resized to it.", minimum=8)
    patch_size: int = option(8, "vitpose: patch side (pixels); > 4 because the ViTPose patch conv "
                             "pads by 2.", minimum=5)
    hidden_size: int = option(128, "Token width (vitpose: transformer width; conv: output width).",
                              minimum=8)
    num_layers: int = option(4, "vitpose: transformer layers; conv: stride-2 conv blocks (token "
                             "grid side = image_size / 2^num_layers).", minimum=1)
    num_heads: int = option(4, "vitpose: attention heads (must divide hidden_size).", minimum=1)
    mlp_ratio: int = option(2, "vitpose: MLP width / hidden_size.", minimum=1)
    conv_width: int = option(32, "conv: channels of the first block, doubled per block up to "
                             "hidden_size.", minimum=4)

    @property
    def grid_side(self) -> int:
        """Side of the token grid."""
        if self.arch == "conv":
            return self.image_size // (2 ** self.num_layers)
        return self.image_size // self.patch_size

    def check(self, where: str) -> None:
        if self.arch == "conv":
            if self.image_size % (2 ** self.num_layers):
                raise ConfigError(f"{where}.image_size ({self.image_size}) must be divisible by "
                                  f"2^{where}.num_layers (2^{self.num_layers}) for arch=conv")
            return
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{where}.hidden_size ({self.hidden_size}) must be divisible by "
                              f"{where}.num_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{where}.image_size ({self.image_size}) must be a multiple of "
                              f"{where}.patch_size ({self.patch_size})")


@dataclass
class LoraConfig(Section):
    """LoRA adapters (through peft) on the LLM's linear layers; the LLM's own weights frozen."""

    enabled: bool = option(
        False, "Wrap the LLM (the LLaVA text model) with peft LoRA adapters: its base weights "
               "(and the LM head) are frozen and only the adapters train; the projections, the "
               "pose encoder (unless freeze_vision) and the pose head train fully as without "
               "LoRA. The RFT reference is then the policy with the adapters switched off "
               "(PoseMLLM.adapters_disabled()).")
    r: int = option(8, "Rank of each adapter (B @ A with A (r, in), B (out, r)).", minimum=1)
    alpha: int = option(16, "LoRA alpha: the adapter output is scaled by alpha / r.", minimum=1)
    dropout: float = option(0.05, "Dropout on the adapter input (training only).", minimum=0.0,
                            maximum=0.9)
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "Names of the LLM's linear layers that get adapters (peft target_modules: a name "
        "matches a module whose path ends with it), e.g. add gate_proj, up_proj, down_proj "
        "for the MLPs.")
    train_lm_head: bool = option(
        True, "Train the LM head fully beside the adapters (the LISA recipe ChatPose follows "
              "trains lm_head and embeddings): the rows of the added <POSE>/<image> tokens start "
              "random, and with a frozen LM head the policy learns to emit <POSE> far more "
              "slowly (measured on the tiny fp16 stand-in: 0% answer format after 40 SFT steps "
              "with it frozen). The RFT reference (adapters off) restores its SFT values.")
    export: str = option(
        "merged", "What save_policy writes: merged (the adapters folded into the LLM weights: "
        "a plain policy whose weights load without peft; load_policy puts fresh, zero-output "
        "adapters on top when lora.enabled, so RFT continues with LoRA and its reference is "
        "the merged SFT policy) or adapter (the frozen base weights plus the adapter weights "
        "as they are).", choices=("merged", "adapter"))

    def check(self, where: str) -> None:
        if self.enabled and not self.target_modules:
            raise ConfigError(f"{where}.target_modules is empty but {where}.enabled is true; "
                              "name the LLM's linear layers to adapt (e.g. [q_proj, v_proj])")
        bad = [m for m in self.target_modules if not m or any(c.isspace() for c in m)]
        if bad:
            raise ConfigError(f"{where}.target_modules: {bad[0]!r} is not a module name")


@dataclass
class ModelConfig(Section):
    """Pose MLLM: LLaVA-style backbone, vision encoders + fusion, pose head, prompt format."""

    checkpoint: str | None = option(
        None, "LLaVA checkpoint (HF hub name or local directory) loaded with "
              "LlavaForConditionalGeneration.from_pretrained. null: build a tiny random model "
              "from the sizes below (the embedded world). Hubs are unreachable offline: use a "
              "local path.")
    # --- precision, attention kernel, memory, adapters
    dtype: str = option(
        "auto", "Floating dtype of the whole policy: the checkpoint is loaded in it and every "
        "parameter (LLaVA, pose encoder, projections, pose head) is cast to it; the pose "
        "head's density maths run in float32 whatever it is. auto: bfloat16 where the policy "
        "runs on CUDA, float32 on CPU. float16 is for inference only (no loss scaling).",
        choices=DTYPES)
    attn_implementation: str = option(
        "sdpa", "Attention kernel of the HF backbone (LLM and CLIP), for a checkpoint and for "
        "the tiny model alike: sdpa (torch scaled_dot_product_attention), eager, or "
        "flash_attention_2 (needs the flash-attn package and a CUDA GPU; a policy loaded "
        "on CPU falls back to sdpa).", choices=("sdpa", "eager", "flash_attention_2"))
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass instead of storing them (HF "
               "gradient checkpointing, non-reentrant) in the LLM's decoder layers and in the "
               "vision towers that train and support it; active in training mode only. "
               "Trades ~30% more compute for much less activation memory (paper scale).")
    lora: LoraConfig = option(LoraConfig(), "LoRA adapters on the LLM (peft).")
    # --- tiny text model (ignored when checkpoint is set)
    text_hidden_size: int = option(64, "LLM width (tiny model; 64 learnt image->pose faster than "
                                   "128 per CPU minute, docs/embedded_world.md).", minimum=8)
    text_layers: int = option(2, "LLM decoder layers (tiny model).", minimum=1)
    text_heads: int = option(4, "LLM attention heads (tiny model).", minimum=1)
    text_kv_heads: int = option(4, "LLM key/value heads (tiny model; divides text_heads).", minimum=1)
    text_intermediate_size: int = option(128, "LLM MLP width (tiny model).", minimum=8)
    max_positions: int = option(512, "LLM maximum sequence length (tiny model).", minimum=16)
    # --- tiny CLIP vision tower (ignored when checkpoint is set)
    clip_image_size: int = option(64, "CLIP input side (tiny model); images are resized to it.", minimum=8)
    clip_patch_size: int = option(8, "CLIP patch side (tiny model).", minimum=2)
    clip_hidden_size: int = option(64, "CLIP width (tiny model).", minimum=8)
    clip_layers: int = option(2, "CLIP layers (tiny model).", minimum=1)
    clip_heads: int = option(4, "CLIP heads (tiny model).", minimum=1)
    vision_feature_layer: int = option(
        -1, "CLIP hidden-state layer fed to the projector (LLaVA-1.5 uses -2; the tiny "
            "2-layer CLIP uses its last layer).")
    # --- pose-aware encoder + fusion
    pose_vit: PoseViTConfig = option(PoseViTConfig(), "Pose-aware ViT (ViTPose-style) architecture or checkpoint.")
    fusion: str = option(
        "separate", "How the two encoders reach the LLM. separate: each projected by its own "
        "2-layer MLP (W_a, W_b), pose tokens resampled to the CLIP grid, then summed "
        "token-wise; concat: features concatenated channel-wise then ONE projector; "
        "clip_only: no pose encoder.", choices=("separate", "concat", "clip_only"))
    freeze_vision: bool = option(
        True, "Freeze both vision encoders (projectors still train), as LLaVA-1.5 freezes CLIP. "
              "The embedded world's pose encoder comes pretrained on pose estimation "
              "(pretrain_pose_encoder); fine-tuning it at the SFT learning rate was measured "
              "to lose what it learnt (docs/embedded_world.md).")
    # --- pose head
    head: str = option("gaussian", "Pose head on the <POSE> hidden state: gaussian "
                       "(distribution over the 144-D 6D pose) or deterministic (the 'no Dist.' "
                       "baseline).", choices=("gaussian", "deterministic"))
    covariance: str = option("diag", "Gaussian covariance: diag, or lowrank (diag + rank-r factor).",
                             choices=("diag", "lowrank"))
    cov_rank: int = option(4, "Rank of the low-rank covariance factor.", minimum=1)
    log_std_min: float = option(-4.0, "Lower bound of the tanh-squashed per-dim log-std.")
    log_std_max: float = option(0.0, "Upper bound of the tanh-squashed per-dim log-std.")
    factor_max: float = option(0.5, "Bound on each low-rank factor entry (tanh-squashed).", exclusive_minimum=0.0)
    head_hidden_size: int = option(256, "Hidden width of the pose head MLP.", minimum=8)
    # --- prompts (stored with the policy so SFT, RFT and eval prompt identically)
    prompt_format: str = option("USER: {prompt} ASSISTANT:", "Chat wrapper around every prompt; must contain {prompt}.")
    text2pose_prompt: str = option("Generate the SMPL pose described: {caption}",
                                   "Text-to-pose prompt; must contain {caption}.")
    image2pose_prompt: str = option("<image> Estimate the SMPL pose of this person.",
                                    "Image-to-pose prompt; must contain <image>.")
    vqa_prompt: str = option("<image> {question}", "Image-to-text / VQA prompt; must contain <image> and {question}.")
    pose_answer: str = option("The SMPL pose of this person is <POSE>.",
                              "Answer of the pose tasks; must contain <POSE> exactly once.")
    seed: int = option(0, "Seed of the random initialisation.")

    def check(self, where: str) -> None:
        if self.attn_implementation == "flash_attention_2" and self.dtype == "float32":
            raise ConfigError(f"{where}.attn_implementation=flash_attention_2 needs "
                              f"{where}.dtype bfloat16, float16 or auto (GPU: bfloat16), not "
                              "float32; or use sdpa")
        if self.log_std_min >= self.log_std_max:
            raise ConfigError(f"{where}.log_std_min ({self.log_std_min}) must be < "
                              f"{where}.log_std_max ({self.log_std_max})")
        if self.text_hidden_size % self.text_heads:
            raise ConfigError(f"{where}.text_hidden_size must be divisible by {where}.text_heads")
        if self.text_heads % self.text_kv_heads:
            raise ConfigError(f"{where}.text_heads must be divisible by {where}.text_kv_heads")
        if self.clip_hidden_size % self.clip_heads:
            raise ConfigError(f"{where}.clip_hidden_size must be divisible by {where}.clip_heads")
        if self.clip_image_size % self.clip_patch_size:
            raise ConfigError(f"{where}.clip_image_size must be a multiple of {where}.clip_patch_size")
        checks = [("prompt_format", "{prompt}"), ("text2pose_prompt", "{caption}"),
                  ("image2pose_prompt", IMAGE_TOKEN), ("vqa_prompt", IMAGE_TOKEN),
                  ("vqa_prompt", "{question}"), ("pose_answer", POSE_TOKEN)]
        for key, needle in checks:
            if needle not in getattr(self, key):
                raise ConfigError(f"{where}.{key}: {getattr(self, key)!r} must contain {needle!r}")
        if self.pose_answer.count(POSE_TOKEN) != 1:
            raise ConfigError(f"{where}.pose_answer must contain {POSE_TOKEN} exactly once")
        for key in ("prompt_format", "text2pose_prompt", "pose_answer"):
            if IMAGE_TOKEN in getattr(self, key):
                raise ConfigError(f"{where}.{key} must not contain {IMAGE_TOKEN}")
        for key in ("image2pose_prompt", "vqa_prompt"):
            if getattr(self, key).count(IMAGE_TOKEN) != 1:
                raise ConfigError(f"{where}.{key} must contain {IMAGE_TOKEN} exactly once")


@dataclass
class PoseEncoderConfig(Section):
    """Pretraining of the pose-aware encoder on pose estimation: 2D keypoint heatmaps and the
    3D pose (camera frame) read from the mean of its tokens."""

    enabled: bool = option(True, "Run this stage. The workflow then passes its output "
                           "directory to the MLLM as model.pose_vit.checkpoint (the architecture "
                           "comes from there).")
    vit: PoseViTConfig = option(PoseViTConfig(), "Architecture of the encoder to pretrain "
                                "(its `checkpoint` is a warm start; null = random init).")
    steps: int = option(1500, "Optimizer steps.", minimum=0)
    batch_size: int = option(32, "Images per step.", minimum=1)
    lr: float = option(3e-3, "AdamW peak learning rate (one-cycle schedule).", exclusive_minimum=0.0)
    weight_decay: float = option(0.01, "AdamW weight decay.", minimum=0.0)
    heatmap_stride: int = option(4, "Pixels per heatmap cell (heatmap side = image_size / stride); "
                                 "divides the token cell side (image_size / grid side).", minimum=1)
    heatmap_weight: float = option(1.0, "Weight of the 2D keypoint heatmap loss.", minimum=0.0)
    pose_weight: float = option(
        1.0, "Weight of the 3D pose loss (6D MSE + mean joint distance in metres, both joint "
             "frames) of a small head on the mean of the encoder's tokens; the pose tokens then "
             "carry the pose in a form the MLLM reads from the start. 0: heatmaps only.",
        minimum=0.0)
    heatmap_sigma: float = option(1.5, "Gaussian blob std in heatmap cells.", exclusive_minimum=0.0)
    val_samples: int = option(200, "Validation images scored at the end (mean keypoint error, pixels; "
                              "3D pose MPJPE / PA-MPJPE of the pretraining head).", minimum=0)
    num_threads: int = option(1, "torch intra-op CPU threads (0: torch's default); 1 is fastest "
                              "for the tiny encoder on a shared machine.", minimum=0)
    seed: int = option(0, "Seed (init, batch order).")

    def check(self, where: str) -> None:
        cell = self.vit.image_size // self.vit.grid_side
        if cell % self.heatmap_stride:
            raise ConfigError(f"{where}.heatmap_stride ({self.heatmap_stride}) must divide the "
                              f"token cell side ({cell} px = {where}.vit.image_size / grid side): "
                              "each token is unfolded into (cell/stride)^2 heatmap cells")
        if self.heatmap_weight == 0 and self.pose_weight == 0:
            raise ConfigError(f"{where}: heatmap_weight and pose_weight are both 0; nothing to train")
