"""Vision side: image preprocessing, CLIP patch features, the pose-aware ViT.

Images enter the model as uint8 ``(B,H,W,3)`` (what the HDF5 splits store) or float
``(B,3,H,W)`` in [0,1]. Each encoder gets its own resize + normalisation (CLIP statistics
for CLIP, ImageNet statistics for the ViTPose-style encoder), so the two can have
different input sizes (LLaVA-1.5: 336x336; ViTPose: 256x192; embedded world: 64x64 both).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poserft.model.config import PoseViTConfig

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "to_unit_images",
           "resize_normalize", "crop_to_aspect", "clip_patch_features", "PoseViTEncoder",
           "ConvPoseEncoder",
           "build_pose_vit", "save_pose_vit", "pose_encoder_config", "pose_encoder_from_config",
           "PoseEncoderCheckpointError", "CONV_MODEL_TYPE"]

# config.json model_type of a ConvPoseEncoder directory (a VitPoseBackbone dir says "vitpose_backbone").
CONV_MODEL_TYPE = "poserft_conv_pose_encoder"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PoseEncoderCheckpointError(ValueError):
    """model.pose_vit.checkpoint does not hold a usable VitPoseBackbone."""


def to_unit_images(images) -> torch.Tensor:
    """uint8 (B,H,W,3) array/tensor or float (B,3,H,W) in [0,1] -> float (B,3,H,W) in [0,1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D (B,H,W,3) uint8 or (B,3,H,W) float, got "
                         f"shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B,H,W,3), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 255.0
    if images.shape[1] != 3:
        raise ValueError(f"float images must be (B,3,H,W) in [0,1], got {tuple(images.shape)}")
    return images.float()


def resize_normalize(unit: torch.Tensor, size: tuple[int, int], mean, std) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> (B,3,h,w) resized (bilinear) and normalised per channel."""
    if tuple(unit.shape[-2:]) != tuple(size):
        unit = F.interpolate(unit, size=tuple(size), mode="bilinear", align_corners=False,
                             antialias=unit.shape[-1] > size[1])
    m = torch.tensor(mean, dtype=unit.dtype, device=unit.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=unit.dtype, device=unit.device).view(1, 3, 1, 1)
    return (unit - m) / s


def crop_to_aspect(unit: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B,3,H,W) -> the centred (B,3,H',W') window with the aspect ratio of ``size`` (h,w).

    Person crops arrive square (the loader's box); ViTPose reads 256x192 (h:w = 4:3) boxes
    of the same person. Taking the central 3/4 of the square's width, instead of squashing the
    whole square to 4:3, keeps the body's proportions as ViTPose was trained on them (a person
    is taller than wide, so the cut columns are background). Square targets: unchanged."""
    h, w = unit.shape[-2:]
    th, tw = size
    if h * tw == w * th:
        return unit
    if w * th > h * tw:                               # too wide: cut columns
        keep = max(1, round(h * tw / th))
        lo = (w - keep) // 2
        return unit[..., lo:lo + keep]
    keep = max(1, round(w * th / tw))                 # too tall: cut rows
    lo = (h - keep) // 2
    return unit[..., lo:lo + keep, :]


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


def clip_patch_features(vision_tower: nn.Module, unit: torch.Tensor, feature_layer: int
                        ) -> torch.Tensor:
    """CLIP patch tokens (CLS dropped, LLaVA's 'default' strategy): (B, (S/p)^2, C)."""
    cfg = vision_tower.config
    pixels = resize_normalize(unit, _pair(cfg.image_size), CLIP_MEAN, CLIP_STD)
    pixels = pixels.to(next(vision_tower.parameters()).dtype)
    out = vision_tower(pixels, output_hidden_states=True, return_dict=True)
    return out.hidden_states[feature_layer][:, 1:]


def clip_grid(vision_tower: nn.Module) -> tuple[int, int]:
    cfg = vision_tower.config
    h, w = _pair(cfg.image_size)
    return h // cfg.patch_size, w // cfg.patch_size


class PoseViTEncoder(nn.Module):
    """ViTPose-style backbone: image -> last-layer patch tokens (B, h*w, C) on an (h,w) grid."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        cfg = backbone.config
        self.image_size = _pair(cfg.image_size)
        ph, pw = _pair(cfg.patch_size)
        self.grid = (self.image_size[0] // ph, self.image_size[1] // pw)
        self.hidden_size = cfg.hidden_size

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        pixels = resize_normalize(crop_to_aspect(unit, self.image_size), self.image_size,
                                  IMAGENET_MEAN, IMAGENET_STD)
        pixels = pixels.to(next(self.backbone.parameters()).dtype)
        # dataset_index selects the expert in MoE ViTPose+ checkpoints; 0 for single-expert.
        idx = torch.zeros(pixels.shape[0], dtype=torch.long, device=pixels.device)
        out = self.backbone(pixels, dataset_index=idx)
        return out.feature_maps[-1]


class ConvPoseEncoder(nn.Module):
    """Small conv pose encoder: image -> (B, h*w, C) tokens, same interface as PoseViTEncoder.

    ``num_layers`` blocks of (3x3 conv stride 2, GroupNorm, GELU) take the image to an (h,w)
    grid; each cell becomes a token (linear to C, plus a learnt position embedding) and every
    token also gets a global embedding of the whole feature map (flatten -> MLP). The global
    part is what a pose regressor needs (the spatial layout of all limbs at once); the MLLM
    reads it from any token, so a tiny LLM does not have to learn spatial attention first.
    GroupNorm, not BatchNorm: outputs must not depend on the batch (RL ratios compare
    forwards of different batches).
    """

    def __init__(self, image_size: int, hidden_size: int, num_layers: int, conv_width: int):
        super().__init__()
        self.image_size = (int(image_size), int(image_size))
        side = image_size // (2 ** num_layers)
        if side < 1 or side * 2 ** num_layers != image_size:
            raise ValueError(f"ConvPoseEncoder: image_size {image_size} is not divisible by "
                             f"2^{num_layers}")
        self.grid = (side, side)
        self.hidden_size = int(hidden_size)
        self.arch = {"image_size": int(image_size), "hidden_size": int(hidden_size),
                     "num_layers": int(num_layers), "conv_width": int(conv_width)}
        blocks, c_in = [], 3
        for i in range(num_layers):
            c_out = min(hidden_size, conv_width * 2 ** i)
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                       nn.GroupNorm(min(8, c_out), c_out), nn.GELU()]
            c_in = c_out
        self.convs = nn.Sequential(*blocks)
        self.token_proj = nn.Linear(c_in, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, hidden_size))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.global_proj = nn.Sequential(nn.Linear(c_in * side * side, hidden_size), nn.GELU(),
                                          nn.Linear(hidden_size, hidden_size))

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        dtype = self.token_proj.weight.dtype
        pixels = resize_normalize(unit, self.image_size, IMAGENET_MEAN, IMAGENET_STD).to(dtype)
        feats = self.convs(pixels)                                         # (B,c,h,w)
        tokens = self.token_proj(feats.flatten(2).transpose(1, 2)) + self.pos_embed
        return tokens + self.global_proj(feats.flatten(1)).unsqueeze(1)    # (B,h*w,C)


def pose_encoder_config(encoder: nn.Module) -> dict:
    """JSON-able architecture of a pose encoder (what :func:`pose_encoder_from_config` rebuilds)."""
    if isinstance(encoder, ConvPoseEncoder):
        return {"model_type": CONV_MODEL_TYPE, **encoder.arch}
    return encoder.backbone.config.to_dict()


def pose_encoder_from_config(config: dict) -> nn.Module:
    """A randomly initialised pose encoder from :func:`pose_encoder_config`'s dict."""
    if config.get("model_type") == CONV_MODEL_TYPE:
        return ConvPoseEncoder(**{k: v for k, v in config.items() if k != "model_type"})
    from transformers import VitPoseBackbone, VitPoseBackboneConfig
    return PoseViTEncoder(VitPoseBackbone(VitPoseBackboneConfig.from_dict(config)))


def _vitpose_config(cfg: PoseViTConfig):
    from transformers import VitPoseBackboneConfig
    return VitPoseBackboneConfig(
        image_size=[cfg.image_size, cfg.image_size], patch_size=[cfg.patch_size, cfg.patch_size],
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        out_indices=[cfg.num_layers])


def build_pose_vit(cfg: PoseViTConfig) -> PoseViTEncoder:
    """Random init from ``cfg`` sizes, or load ``cfg.checkpoint`` (a VitPoseBackbone dir).

    A full ``VitPoseForPoseEstimation`` checkpoint (HF ``usyd-community/vitpose-*``) is
    accepted too: its ``backbone.*`` weights are used and the keypoint head is dropped.
    """
    from transformers import VitPoseBackbone, VitPoseBackboneConfig

    if cfg.checkpoint is None:
        if cfg.arch == "conv":
            return ConvPoseEncoder(cfg.image_size, cfg.hidden_size, cfg.num_layers, cfg.conv_width)
        return PoseViTEncoder(VitPoseBackbone(_vitpose_config(cfg)))
    path = Path(cfg.checkpoint)
    fix = ("set model.pose_vit.checkpoint to a directory written by pretrain_pose_encoder "
           "(config.json + model.safetensors) or to null for a random init")
    if not (path / "config.json").is_file():
        raise PoseEncoderCheckpointError(f"model.pose_vit.checkpoint={str(path)!r}: no config.json "
                                         f"there; {fix}")
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") == CONV_MODEL_TYPE:
        return _load_conv_encoder(path, raw, fix)
    if raw.get("model_type") == "vitpose" and "backbone_config" in raw:
        bcfg = VitPoseBackboneConfig(**{k: v for k, v in raw["backbone_config"].items()
                                        if k not in ("model_type", "transformers_version")})
        prefix = "backbone."
    elif raw.get("model_type") == "vitpose_backbone":
        bcfg = VitPoseBackboneConfig.from_pretrained(path)
        prefix = ""
    else:
        raise PoseEncoderCheckpointError(
            f"{path / 'config.json'}: model_type {raw.get('model_type')!r} is none of "
            f"'vitpose_backbone', 'vitpose', {CONV_MODEL_TYPE!r}; {fix}")
    bcfg.out_indices = [bcfg.num_hidden_layers]
    model = VitPoseBackbone(bcfg)
    _load_weights(model, path / "model.safetensors", fix, prefix=prefix)
    return PoseViTEncoder(model)


def _load_weights(module: nn.Module, weights: Path, fix: str, prefix: str = "",
                  strict: bool = False) -> None:
    """Load ``weights`` (safetensors; keys under ``prefix``) into ``module``; every problem
    (file missing, weights missing or, with ``strict``, unexpected, shapes that differ) is a
    :class:`PoseEncoderCheckpointError` naming the file and the fix."""
    from safetensors.torch import load_file
    if not weights.is_file():
        raise PoseEncoderCheckpointError(f"{weights}: missing; {fix}")
    state = {k[len(prefix):]: v for k, v in load_file(str(weights)).items() if k.startswith(prefix)}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise PoseEncoderCheckpointError(f"{weights}: weights do not match the "
                                         f"{type(module).__name__} of config.json "
                                         f"({str(exc).splitlines()[-1].strip()}); {fix}") from None
    unexpected = unexpected if strict else []
    if missing or unexpected:
        raise PoseEncoderCheckpointError(
            f"{weights}: weights do not match the {type(module).__name__} of config.json "
            f"(missing {missing[:5]} of {len(missing)}, unexpected {unexpected[:5]}); {fix}")


def _load_conv_encoder(path: Path, raw: dict, fix: str) -> ConvPoseEncoder:
    try:
        encoder = pose_encoder_from_config(raw)
    except TypeError as exc:
        raise PoseEncoderCheckpointError(f"{path / 'config.json'}: bad conv encoder config "
                                         f"({exc}); {fix}") from None
    _load_weights(encoder, path / "model.safetensors", fix, strict=True)
    return encoder


def save_pose_vit(encoder: nn.Module, out_dir: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` into out_dir (HF VitPoseBackbone layout
    for the ViT; :data:`CONV_MODEL_TYPE` config + the module's state dict for the conv net).

    Not atomic by itself: callers write into a temp dir and rename it.
    """
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(encoder, ConvPoseEncoder):
        (out / "config.json").write_text(json.dumps(pose_encoder_config(encoder), indent=1))
        module = encoder
    else:
        encoder.backbone.config.save_pretrained(out)
        module = encoder.backbone
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
