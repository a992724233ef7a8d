"""The pose MLLM policy: prompt building, KV-cached group generation, teacher-forced scoring
(each prompt's prefix computed once for its G rows), and the SFT loss. One class,
:class:`PoseMLLM`, used by SFT, RFT (HyGRPO) and evaluation.

Sequence layout (shared by ``generate``, ``score`` and ``sft_loss`` so that they agree to
float precision)::

    [pad .. pad] <s> USER: <image>x N_img  prompt text  ASSISTANT: | completion ... </s> [pad ..]
    `--------------- prompt, LEFT-padded (B,Tp) ----------------' `--- RIGHT-padded (.,Tc) ---'

Position ids are ``cumsum(attention_mask) - 1``, so padding never shifts positions. The
single ``<image>`` placeholder of a prompt is expanded to ``N_img`` tokens (the CLIP patch
grid) whose embeddings are replaced by the fused vision features.

The pose head reads the final hidden state at the (first) ``<POSE>`` token of the
completion, i.e. the output of the step that consumed ``<POSE>``. Rows without ``<POSE>``
(``pose_valid`` False) read the last prompt position instead; their pose is meaningless
and must be masked by the caller.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from poserft.model.config import IMAGE_TOKEN, POSE_TOKEN, ModelConfig
from poserft.model.fusion import VisionFusion
from poserft.model.heads import POSE_DIM, PointPose, PoseGaussian, beta_nll, build_pose_head, \
    joint_distances
from poserft.model.vision import PoseViTEncoder, clip_grid, clip_patch_features, to_unit_images

__all__ = ["Rollout", "ScoreOutput", "PoseMLLM", "build_policy", "resolve_device",
           "resolve_dtype", "cast_policy", "NoLoraError"]

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class NoLoraError(RuntimeError):
    """A LoRA-only operation was asked of a policy without adapters (model.lora.enabled false)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` -> the current CUDA device when one is visible, else CPU; ``"cpu"``,
    ``"cuda"``, ``"cuda:k"`` or a ``torch.device`` as given; None -> CPU (the caller, e.g.
    the training engine, places the policy itself)."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is visible; use cpu or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None
                  ) -> torch.dtype:
    """``model.dtype`` (a name of :data:`poserft.model.config.DTYPES` or a ``torch.dtype``) as
    a ``torch.dtype``. ``auto``/None: bfloat16 where the policy runs on CUDA, float32 on CPU;
    "where it runs" is ``device`` when given, else CUDA whenever a GPU is visible (the
    training engine's ``device: auto`` moves the policy there)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype}: expected float32, bfloat16 or float16")
        return dtype
    if dtype is None or dtype == "auto":
        on_cuda = (torch.cuda.is_available() if device is None or str(device) == "auto"
                   else torch.device(device).type == "cuda")
        return torch.bfloat16 if on_cuda else torch.float32
    try:
        return _DTYPE_NAMES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16") from None


def cast_policy(model: "PoseMLLM", dtype: torch.dtype) -> "PoseMLLM":
    """Cast every floating PARAMETER of the policy to ``dtype`` in place (parameter objects,
    and so ties and optimizer references, are kept; buffers such as the LLM's float32 rotary
    frequencies are left alone) and record it in the LLaVA config."""
    from poserft.model.backbone import cast_parameters, record_config_dtype
    cast_parameters(model, dtype)
    record_config_dtype(model.backbone.config, dtype)
    return model


def _enable_checkpointing(module: nn.Module) -> None:
    """HF activation checkpointing (non-reentrant) on ``module``'s layers that support it."""
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.x name
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # non-reentrant checkpointing needs no input grads; the hooks HF adds for the reentrant
    # kind would set requires_grad on embedding outputs (refused under inference_mode)
    if getattr(module, "_require_grads_hooks", None):
        module.disable_input_require_grads()


@dataclass
class Rollout:
    """G sampled completions per prompt. N = B*G rows, rows of prompt b are b*G .. b*G+G-1.

    Tensors are on the policy's device and carry no gradient.
    """

    prompt_index: torch.Tensor      # (N,) long: row -> index into the prompts list
    completion_ids: torch.Tensor    # (N,Tc) long, right-padded with pad_token_id
    completion_mask: torch.Tensor   # (N,Tc) float 1.0 for generated tokens (incl. </s>)
    texts: list[str]                # N decoded completions (up to </s>; <POSE> kept)
    token_logprobs: torch.Tensor    # (N,Tc) log pi(token) under the sampling policy, 0 at pads
    pose_valid: torch.Tensor        # (N,) bool: completion contains <POSE>
    pose_mean: torch.Tensor         # (N,144) head mean (6D pose)
    pose_sample: torch.Tensor       # (N,144) head sample (= mean when do_sample False / deterministic head)
    pose_logprob: torch.Tensor      # (N,) log density of pose_sample (0 for the deterministic head)
    pose_token_pos: torch.Tensor    # (N,) long: index of the first <POSE> in the completion, -1 if none
    pose_std: torch.Tensor | None = None  # (N,144) head std per dimension (None for the deterministic head)
    num_samples: int = 1            # G
    temperature: float = 1.0
    do_sample: bool = True

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, rows: torch.Tensor | list[int] | slice) -> "Rollout":
        """Row subset (e.g. an RL micro-batch); ``prompt_index`` still points into the
        original prompts list, so pass the same prompts/images to :meth:`PoseMLLM.score`."""
        if isinstance(rows, list):
            rows = torch.tensor(rows, dtype=torch.long)
        if isinstance(rows, torch.Tensor):
            rows = rows.to(self.completion_ids.device)
            idx = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
            texts = [self.texts[i] for i in idx.tolist()]
        else:
            texts = self.texts[rows]
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[rows] if isinstance(v, torch.Tensor) else v
        out["texts"] = texts
        return Rollout(**out)

    def to(self, device) -> "Rollout":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def smpl(self, which: str = "sample") -> tuple[torch.Tensor, torch.Tensor]:
        """SMPL axis-angle (global_orient (N,3), body_pose (N,23,3)) of pose_sample/pose_mean."""
        from poserft.model.heads import pose_to_smpl
        return pose_to_smpl(self.pose_sample if which == "sample" else self.pose_mean)


@dataclass
class ScoreOutput:
    """Teacher-forced recompute of a rollout, WITH gradient."""

    token_logprobs: torch.Tensor    # (N,Tc) log pi(completion token), 0 at pads
    completion_mask: torch.Tensor   # (N,Tc) float (the rollout's)
    pose_dist: PoseGaussian | PointPose   # over all N rows; rows with pose_valid False are meaningless
    pose_valid: torch.Tensor        # (N,) bool mask for pose_dist rows
    entropy: torch.Tensor | None = None   # (N,Tc) token entropy (with_entropy=True), 0 at pads


def _unique_rows(prompt_index: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Distinct prompt indices (sorted) and the map row -> position among them."""
    uniq, inverse = torch.unique(prompt_index, sorted=True, return_inverse=True)
    return uniq.tolist(), inverse


class PoseMLLM(nn.Module):
    """LLaVA-style MLLM + pose-aware ViT + fusion + pose head.

    Build with :func:`build_policy` (from a config) or :func:`poserft.model.io.load_policy`.
    """

    # how score() runs the LLM: "auto" (cached prefix where possible), "cached" or "full";
    # set on an instance to force one (tests, benchmarks), see score()
    _score_path = "auto"

    def __init__(self, config: ModelConfig, tokenizer, backbone: nn.Module,
                 pose_encoder: PoseViTEncoder | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.backbone = backbone  # LlavaForConditionalGeneration
        llava = backbone.model
        if config.fusion != "clip_only" and pose_encoder is None:
            raise ValueError(f"model.fusion={config.fusion} needs a pose encoder")
        self.pose_encoder = pose_encoder if config.fusion != "clip_only" else None
        llm_dim = backbone.config.text_config.hidden_size
        # LLaVA's own projector becomes W_a (moved, not shared, so the state dict has one copy).
        pretrained_proj = llava.multi_modal_projector
        if not isinstance(pretrained_proj, nn.Identity):
            llava.multi_modal_projector = nn.Identity()
        self.fusion = VisionFusion(
            config.fusion, backbone.config.vision_config.hidden_size,
            None if self.pose_encoder is None else self.pose_encoder.hidden_size, llm_dim,
            clip_grid(llava.vision_tower),
            None if self.pose_encoder is None else self.pose_encoder.grid,
            clip_projector=None if isinstance(pretrained_proj, nn.Identity) else pretrained_proj)
        self.pose_head = build_pose_head(config, llm_dim)
        if config.freeze_vision:
            for module in (llava.vision_tower, self.pose_encoder):
                if module is not None:
                    module.requires_grad_(False)
        tok = tokenizer
        self.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pose_token_id = tok.convert_tokens_to_ids(POSE_TOKEN)
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        for name in ("image_token_id", "pose_token_id", "eos_token_id", "pad_token_id"):
            tid = getattr(self, name)
            if tid is None or tid == tok.unk_token_id:
                raise ValueError(f"tokenizer lacks the token for {name}; build it with "
                                 "poserft.text.tokenizer (special tokens <image>, <POSE>, </s>, <pad>)")
        self.num_image_tokens = self.fusion.num_tokens
        self._body = None  # skeleton/SMPL body model for the joint loss, built on first use

    def forward(self, method, *args, **kwargs):
        """Run ``method`` (a method of this class: ``PoseMLLM.sft_loss`` or
        ``PoseMLLM.score``) through ``forward``, so that DDP/DeepSpeed wrappers see the call
        (gradient sync hooks): ``wrapped(PoseMLLM.score, prompts, images, rollout)``."""
        if method not in (PoseMLLM.sft_loss, PoseMLLM.score):
            raise TypeError(f"PoseMLLM.forward: expected PoseMLLM.sft_loss or PoseMLLM.score, "
                            f"got {method!r}")
        return method(self, *args, **kwargs)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The policy's floating dtype (one for all parameters after build/load_policy)."""
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    @property
    def language_model(self) -> nn.Module:
        """The LLM (decoder without LM head); a ``peft.PeftModel`` around it with LoRA."""
        return self.backbone.model.language_model

    # ------------------------------------------------------------------ LoRA / memory
    @property
    def has_lora(self) -> bool:
        """True when the LLM carries peft LoRA adapters (:meth:`apply_lora`)."""
        peft = sys.modules.get("peft")
        return peft is not None and isinstance(self.language_model, peft.PeftModel)

    def apply_lora(self) -> "PoseMLLM":
        """Wrap the LLM with peft LoRA adapters of ``config.lora`` (r, alpha, dropout,
        target_modules), in the policy's dtype; freezes the LLM's own weights, and the LM head
        unless ``lora.train_lm_head``.
        The projections, the pose encoder (unless ``freeze_vision``) and the pose head keep
        training. :func:`build_policy` / ``load_policy`` call this when ``lora.enabled``."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        if self.has_lora:
            raise RuntimeError("PoseMLLM.apply_lora: the policy already has LoRA adapters")
        lc = self.config.lora
        dtype = self.dtype
        peft_cfg = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                  target_modules=list(lc.target_modules), bias="none")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(self.config.seed + 2)     # adapter init: seeded, RNG left alone
            # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            try:
                wrapped = get_peft_model(self.language_model, peft_cfg,
                                         autocast_adapter_dtype=False)
            except ValueError as exc:   # e.g. no module matches target_modules
                raise ValueError(f"model.lora.target_modules={list(lc.target_modules)}: "
                                 f"{str(exc).splitlines()[0]}") from None
        self.backbone.model.language_model = wrapped
        self.backbone.lm_head.requires_grad_(bool(lc.train_lm_head))
        cast_policy(self, dtype)     # adapters in the policy's one dtype
        return self

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Context in which the policy computes with its LLM as the base model, without the
        LoRA adapters (peft ``disable_adapter()``): the frozen reference of RFT without a
        second copy of the LLM. Only the LLM changes: the projections, pose encoder and pose
        head are the current ones. :class:`NoLoraError` if the policy has no adapters."""
        if not self.has_lora:
            raise NoLoraError("PoseMLLM.adapters_disabled: the policy has no LoRA adapters "
                              "(model.lora.enabled is false); keep a frozen copy of the "
                              "policy as the reference instead")
        with self.language_model.disable_adapter():
            yield self

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing in the LLM's decoder layers and in the vision towers
        that train and support it (HF models; the conv pose encoder has none)."""
        _enable_checkpointing(self.backbone)   # LLM + CLIP tower (frozen: stores nothing anyway)
        enc = self.pose_encoder
        hf = getattr(enc, "backbone", None)
        if hf is not None and getattr(hf, "supports_gradient_checkpointing", False) \
                and not self.config.freeze_vision:
            _enable_checkpointing(hf)

    @contextlib.contextmanager
    def _checkpointing_off(self):
        """Switch HF activation checkpointing off (generation in training mode: with it on,
        transformers drops the KV cache, silently breaking cached decoding)."""
        # own attribute only: peft wrappers forward attribute reads to the model they wrap
        flagged = [m for m in self.modules() if vars(m).get("gradient_checkpointing") is True] \
            if self.training else []
        for m in flagged:
            m.gradient_checkpointing = False
        try:
            yield
        finally:
            for m in flagged:
                m.gradient_checkpointing = True

    def body_model(self):
        if self._body is None:
            from poserft.body import load
            object.__setattr__(self, "_body", load(None))  # not a submodule: no state_dict entries
        return self._body.to(self.device)

    def text2pose_prompt(self, caption: str) -> str:
        return self.config.text2pose_prompt.format(caption=caption)

    def image2pose_prompt(self) -> str:
        return self.config.image2pose_prompt

    def vqa_prompt(self, question: str) -> str:
        return self.config.vqa_prompt.format(question=question)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of one prompt: <s> + chat-wrapped text, <image> expanded to N_img ids."""
        text = self.config.prompt_format.format(prompt=prompt)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        n_img = sum(1 for t in ids if t == self.image_token_id)
        if n_img > 1:
            raise ValueError(f"prompt has {n_img} {IMAGE_TOKEN} placeholders; one image per "
                             f"prompt is supported: {prompt!r}")
        out = [] if self.bos_token_id is None else [self.bos_token_id]
        for t in ids:
            out.extend([t] * self.num_image_tokens if t == self.image_token_id else [t])
        return out

    def encode_answer(self, answer: str) -> list[int]:
        """Completion ids of a target answer: text ids + </s>."""
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos_token_id]

    # ------------------------------------------------------------------ inputs
    def build_inputs(self, prompts: list[str], images=None) -> dict:
        """Tokenise prompts (left-padded) and collect the images of rows that have <image>.

        ``images``: None, a (B,H,W,3) uint8 / (B,3,H,W) float batch aligned with prompts
        (rows without <image> are ignored), or a list of B entries (array or None).
        Returns ``input_ids (B,Tp)``, ``attention_mask (B,Tp)``, ``position_ids (B,Tp)``,
        ``image_rows (Bi,)`` and ``pixels (Bi,3,H,W)`` in [0,1] (or None).
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        ids = [self.encode_prompt(p) for p in prompts]
        t = max(len(x) for x in ids)
        dev = self.device
        input_ids = torch.full((len(ids), t), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(ids), t, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, t - len(x):] = torch.tensor(x)
            mask[i, t - len(x):] = 1
        has_image = [IMAGE_TOKEN in p for p in prompts]
        image_rows = [i for i, h in enumerate(has_image) if h]
        pixels = None
        if image_rows:
            if images is None:
                raise ValueError(f"prompts {image_rows[:5]} contain {IMAGE_TOKEN} but images=None")
            if isinstance(images, (list, tuple)):
                if len(images) != len(prompts):
                    raise ValueError(f"images has {len(images)} entries for {len(prompts)} prompts")
                missing = [i for i in image_rows if images[i] is None]
                if missing:
                    raise ValueError(f"prompts {missing[:5]} contain {IMAGE_TOKEN} but their image is None")
                pixels = to_unit_images(torch.stack([torch.as_tensor(images[i]) for i in image_rows]))
            else:
                if len(images) != len(prompts):
                    raise ValueError(f"images has {len(images)} rows for {len(prompts)} prompts")
                pixels = to_unit_images(images)[torch.tensor(image_rows)]
            pixels = pixels.to(dev)
        return {"input_ids": input_ids.to(dev), "attention_mask": mask.to(dev),
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(dev),
                "image_rows": torch.tensor(image_rows, dtype=torch.long, device=dev),
                "pixels": pixels}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(Bi,3,H,W) in [0,1] -> fused image embeddings (Bi, N_img, D)."""
        llava = self.backbone.model
        clip = clip_patch_features(llava.vision_tower, pixels, self.backbone.config.vision_feature_layer)
        pose = None if self.pose_encoder is None else self.pose_encoder(pixels)
        return self.fusion(clip, pose)

    def embed_prompts(self, batch: dict) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by vision features (B,Tp,D)."""
        embeds = self.language_model.get_input_embeddings()(batch["input_ids"])
        if batch["pixels"] is not None:
            feats = self.image_features(batch["pixels"]).to(embeds.dtype)     # (Bi,N_img,D)
            rows = batch["image_rows"]
            sub_ids = batch["input_ids"][rows]
            slot = sub_ids == self.image_token_id                          # (Bi,Tp)
            counts = slot.sum(-1)
            if not bool((counts == self.num_image_tokens).all()):
                raise ValueError(f"image rows have {counts.tolist()} image slots, expected "
                                 f"{self.num_image_tokens} each")
            sub = embeds[rows].masked_scatter(slot.unsqueeze(-1), feats)
            embeds = embeds.index_copy(0, rows, sub)
        return embeds

    def _lm(self, inputs_embeds, attention_mask, position_ids, past_key_values=None,
            use_cache=False):
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   use_cache=use_cache, return_dict=True)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: list[str], images=None, num_samples: int = 1,
                 max_new_tokens: int = 24, temperature: float = 1.0, do_sample: bool = True,
                 generator: torch.Generator | None = None) -> Rollout:
        """Sample ``num_samples`` (G) completions per prompt, plus a pose per completion.

        The prompt prefix (vision encoders + LLM prefill) runs ONCE per prompt; its KV cache
        is then repeated G times (``repeat_interleave``) for the G decoding rows.
        Returns a :class:`Rollout` with N = len(prompts) * G rows.
        """
        if num_samples < 1 or max_new_tokens < 1:
            raise ValueError(f"num_samples ({num_samples}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        with self._checkpointing_off():
            return self._generate(prompts, images, num_samples, max_new_tokens, temperature,
                                  do_sample, generator)

    def _generate(self, prompts, images, num_samples, max_new_tokens, temperature, do_sample,
                  generator) -> Rollout:
        g = num_samples
        batch = self.build_inputs(prompts, images)
        embeds = self.embed_prompts(batch)
        out = self._lm(embeds, batch["attention_mask"], batch["position_ids"], use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(g)
        last_prompt_hidden = out.last_hidden_state[:, -1].repeat_interleave(g, 0)   # (N,D)
        logits = self.backbone.lm_head(out.last_hidden_state[:, -1]).float().repeat_interleave(g, 0)
        attn = batch["attention_mask"].repeat_interleave(g, 0)
        next_pos = batch["position_ids"][:, -1].repeat_interleave(g, 0) + 1
        n, dev = logits.shape[0], logits.device
        emb = self.language_model.get_input_embeddings()
        lp_temp = temperature if do_sample else 1.0

        tokens, logps, masks = [], [], []
        finished = torch.zeros(n, dtype=torch.bool, device=dev)
        pose_hidden = last_prompt_hidden.clone()
        pose_pos = torch.full((n,), -1, dtype=torch.long, device=dev)
        for t in range(max_new_tokens):
            logp_all = torch.log_softmax(logits / lp_temp, dim=-1)
            if do_sample:
                tok = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
            else:
                tok = logits.argmax(-1)
            alive = ~finished
            tok = torch.where(alive, tok, torch.full_like(tok, self.pad_token_id))
            tokens.append(tok)
            logps.append(torch.where(alive, logp_all.gather(-1, tok.unsqueeze(-1)).squeeze(-1),
                                     torch.zeros((), device=dev)))
            masks.append(alive.float())
            new_pose = alive & (tok == self.pose_token_id) & (pose_pos < 0)
            pose_pos = torch.where(new_pose, torch.full_like(pose_pos, t), pose_pos)
            finished = finished | (tok == self.eos_token_id)
            needs_pose_hidden = bool(new_pose.any())
            if (bool(finished.all()) or t == max_new_tokens - 1) and not needs_pose_hidden:
                break
            # Feed the sampled token: its output gives the next logits and, for <POSE>, the
            # hidden state the pose head reads.
            attn = torch.cat([attn, alive.long().unsqueeze(-1)], dim=-1)
            out = self._lm(emb(tok.unsqueeze(-1)), attn, next_pos.unsqueeze(-1), cache, use_cache=True)
            cache = out.past_key_values
            h = out.last_hidden_state[:, -1]
            pose_hidden = torch.where(new_pose.unsqueeze(-1), h, pose_hidden)
            logits = self.backbone.lm_head(h).float()
            next_pos = next_pos + 1
            if bool(finished.all()) or t == max_new_tokens - 1:
                break

        completion_ids = torch.stack(tokens, 1)
        completion_mask = torch.stack(masks, 1)
        token_logprobs = torch.stack(logps, 1)
        pose_valid = pose_pos >= 0
        dist = self.pose_head(pose_hidden)
        pose_mean = dist.mean.detach()
        if isinstance(dist, PoseGaussian):
            pose_sample = dist.sample(generator) if do_sample else pose_mean.clone()
            pose_logprob = dist.log_prob(pose_sample)
            pose_std = dist.std.detach()
        else:
            pose_sample, pose_logprob = pose_mean.clone(), torch.zeros(n, device=dev)
            pose_std = None
        return Rollout(
            prompt_index=torch.arange(len(prompts), device=dev).repeat_interleave(g),
            completion_ids=completion_ids, completion_mask=completion_mask,
            texts=self.decode_completions(completion_ids, completion_mask),
            token_logprobs=token_logprobs, pose_valid=pose_valid, pose_mean=pose_mean,
            pose_sample=pose_sample, pose_logprob=pose_logprob.detach(), pose_token_pos=pose_pos,
            pose_std=pose_std,
            num_samples=g, temperature=float(temperature), do_sample=bool(do_sample))

    def decode_completions(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
        """Text of each completion up to (excluding) </s>; special tokens like <POSE> kept."""
        texts = []
        for ids, m in zip(completion_ids.tolist(), completion_mask.tolist()):
            keep = [t for t, v in zip(ids, m) if v > 0]
            if keep and keep[-1] == self.eos_token_id:
                keep = keep[:-1]
            texts.append(self.tokenizer.decode(keep, skip_special_tokens=False))
        return texts

    # ------------------------------------------------------------------ teacher forcing
    def _prompt_inputs(self, prompts: list[str], images, prompt_index: torch.Tensor
                       ) -> tuple[dict, torch.Tensor]:
        """:meth:`build_inputs` of the distinct prompts among the rows, and the map row ->
        position among them ((N,) long), so vision and prompt work run once per prompt."""
        uniq, row_map = _unique_rows(prompt_index)
        sub_images = None
        if images is not None:
            sub_images = ([images[i] for i in uniq] if isinstance(images, (list, tuple))
                          else images[torch.as_tensor(uniq)] if isinstance(images, torch.Tensor)
                          else images[uniq])
        return self.build_inputs([prompts[i] for i in uniq], sub_images), row_map

    @staticmethod
    def _row_attention(batch: dict, row_map: torch.Tensor, completion_mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask (N,Tp+Tc) of prompt (left-padded) + completion (right-padded) and
        its position ids (N,Tp+Tc): ``cumsum - 1``, so padding never shifts a position. Both
        scoring paths take positions from here, which keeps them identical."""
        attn = torch.cat([batch["attention_mask"].index_select(0, row_map),
                          (completion_mask > 0).long()], dim=1)
        return attn, (attn.cumsum(-1) - 1).clamp(min=0)

    def _full_hidden(self, batch: dict, row_map: torch.Tensor, completion_ids: torch.Tensor,
                     completion_mask: torch.Tensor) -> torch.Tensor:
        """One LLM forward over every row's whole prompt+completion: (N,Tp+Tc,D). Each
        row recomputes its prompt prefix (G times per prompt)."""
        prompt_embeds = self.embed_prompts(batch).index_select(0, row_map)       # (N,Tp,D)
        comp_embeds = self.language_model.get_input_embeddings()(completion_ids)
        embeds = torch.cat([prompt_embeds, comp_embeds.to(prompt_embeds.dtype)], dim=1)
        attn, pos = self._row_attention(batch, row_map, completion_mask)
        return self._lm(embeds, attn, pos).last_hidden_state

    def _cached_tail(self, batch: dict, row_map: torch.Tensor, completion_ids: torch.Tensor,
                     completion_mask: torch.Tensor) -> torch.Tensor | None:
        """Prefill the U distinct prompts once, expand the KV cache to the N rows, then one
        forward of the (N,Tc) completions: the final hidden states from the last prompt
        position on, (N,1+Tc,D) (as ``full_hidden[:, Tp-1:]``). None when the LLM returned
        no transformers ``Cache`` (it does not take ``past_key_values``).

        Everything keeps its graph: the cached keys/values are outputs of the prefill, and
        their expansion is an ``index_select`` per layer (``Cache.reorder_cache``, which takes
        repeated and unordered indices), whose backward sums the rows of each prompt, as
        the full path's ``prompt_embeds[row_map]`` does.
        """
        from transformers.cache_utils import Cache

        tp = batch["input_ids"].shape[1]
        prompt_embeds = self.embed_prompts(batch)                                # (U,Tp,D)
        out = self._lm(prompt_embeds, batch["attention_mask"], batch["position_ids"],
                       use_cache=True)
        cache = out.past_key_values
        if not isinstance(cache, Cache):
            return None
        cache.reorder_cache(row_map)                                             # (U,..) -> (N,..)
        # left padding: column Tp-1 is every prompt's last real token
        last = out.last_hidden_state[:, -1].index_select(0, row_map)             # (N,D)
        comp_embeds = self.language_model.get_input_embeddings()(completion_ids)
        attn, pos = self._row_attention(batch, row_map, completion_mask)
        hidden = self._lm(comp_embeds.to(prompt_embeds.dtype), attn, pos[:, tp:], cache,
                          use_cache=True).last_hidden_state                      # (N,Tc,D)
        return torch.cat([last.unsqueeze(1), hidden.to(last.dtype)], dim=1)

    def _llm_checkpointing_active(self) -> bool:
        """True when HF activation checkpointing runs in the LLM now: a module flagged for
        it (own attribute: peft wrappers forward attribute reads) and in training mode.
        Its layers then drop ``past_key_values``, so a cached forward would silently attend
        to the completion alone."""
        return any(m.training and vars(m).get("gradient_checkpointing") is True
                   for m in self.language_model.modules())

    def _score_uses_cache(self) -> bool:
        """Which path :meth:`score` takes (``_score_path``: "auto", "cached" or "full")."""
        path = self._score_path
        if path not in ("auto", "cached", "full"):
            raise ValueError(f"PoseMLLM._score_path={path!r}: expected auto, cached or full")
        if path == "full":
            return False
        if self._llm_checkpointing_active():
            if path == "cached":
                raise ValueError("PoseMLLM._score_path='cached' with activation checkpointing "
                                 "active in the LLM: its layers drop the KV cache")
            return False
        return True

    def _score_hidden(self, prompts: list[str], images, rollout: Rollout) -> torch.Tensor:
        """Final hidden states (N,1+Tc,D) of ``rollout``'s rows from the last prompt
        position on: [:, 0] at the last prompt token, [:, 1+t] at completion token t."""
        ids, mask = rollout.completion_ids, rollout.completion_mask
        batch, row_map = self._prompt_inputs(prompts, images, rollout.prompt_index)
        if self._score_uses_cache():
            tail = self._cached_tail(batch, row_map, ids, mask)
            if tail is not None:
                return tail
            if self._score_path == "cached":
                raise RuntimeError("PoseMLLM._score_path='cached': the LLM returned no KV cache")
        hidden = self._full_hidden(batch, row_map, ids, mask)
        return hidden[:, batch["input_ids"].shape[1] - 1:]

    def _pose_hidden(self, hidden: torch.Tensor, tp: int, pose_token_pos: torch.Tensor) -> torch.Tensor:
        """Hidden state (N,D) the pose head reads: at completion position ``pose_token_pos``
        of ``hidden`` whose completion starts at column ``tp``; the last prompt position
        (``tp - 1``) for rows without ``<POSE>``."""
        idx = torch.where(pose_token_pos >= 0, tp + pose_token_pos, torch.full_like(pose_token_pos, tp - 1))
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]

    def score(self, prompts: list[str], images, rollout: Rollout, temperature: float | None = None,
              with_entropy: bool = False) -> ScoreOutput:
        """Teacher-forced log-probs of the rollout's tokens and its pose distribution, with grad.

        ``temperature`` defaults to the rollout's (so ratios start at exactly 1).

        The vision encoders run once per distinct prompt of the rows. The LLM runs one of two
        ways, with the same results up to float rounding (gradients included):

        * cached (the default): prefill of the distinct prompts once, its KV cache expanded
          to the rows by their prompt (any rows: partial groups, subsets, any order), then
          one forward of the completions (N,Tc). Saves recomputing each prefix G times. With
          dropout in the LLM in training mode (e.g. LoRA dropout) the rows of one prompt
          share the prefix's dropout mask instead of drawing one each.
        * full: one forward of every row's whole prompt+completion (N,Tp+Tc). Runs when HF
          activation checkpointing is active in the LLM (enabled and training mode: its
          layers drop the KV cache), and when the LLM returns no KV cache (a backbone
          without ``past_key_values`` support; the prefill is then repeated in full).

        ``_score_path`` (instance attribute, default "auto") forces "cached" or "full"
        (tests, benchmarks); "cached" raises where it cannot run.
        """
        temperature = rollout.temperature if temperature is None else temperature
        if not rollout.do_sample and temperature == rollout.temperature:
            temperature = 1.0  # greedy rollouts record temperature-1 log-probs
        mask = rollout.completion_mask
        tail = self._score_hidden(prompts, images, rollout)                      # (N,1+Tc,D)
        logits = self.backbone.lm_head(tail[:, :-1]).float() / temperature      # (N,Tc,V)
        logp_all = torch.log_softmax(logits, dim=-1)
        tok_lp = logp_all.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
        valid = mask > 0
        tok_lp = torch.where(valid, tok_lp, torch.zeros((), device=tok_lp.device))
        entropy = None
        if with_entropy:
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            entropy = torch.where(valid, entropy, torch.zeros((), device=entropy.device))
        dist = self.pose_head(self._pose_hidden(tail, 1, rollout.pose_token_pos))
        return ScoreOutput(tok_lp, mask, dist, rollout.pose_valid, entropy)

    # ------------------------------------------------------------------ SFT
    def sft_batch(self, prompts: list[str], answers: list[str], images=None,
                  poses: torch.Tensor | None = None, has_pose: torch.Tensor | None = None) -> dict:
        """Collate one supervised batch.

        ``poses`` (B,144) 6D targets; ``has_pose`` (B,) bool marks rows whose pose is a
        target (text->pose, image->pose). Answers of those rows must contain <POSE>.
        """
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        comp = [self.encode_answer(a) for a in answers]
        tc = max(len(c) for c in comp)
        ids = torch.full((len(comp), tc), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(comp), tc)
        pose_pos = torch.full((len(comp),), -1, dtype=torch.long)
        for i, c in enumerate(comp):
            ids[i, :len(c)] = torch.tensor(c)
            mask[i, :len(c)] = 1.0
            if self.pose_token_id in c:
                pose_pos[i] = c.index(self.pose_token_id)
        if has_pose is None:
            has_pose = torch.zeros(len(comp), dtype=torch.bool)
        has_pose = torch.as_tensor(has_pose, dtype=torch.bool)
        bad = (has_pose & (pose_pos < 0)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"rows {bad[:5]} have a pose target but their answer has no {POSE_TOKEN}")
        if bool(has_pose.any()) and poses is None:
            raise ValueError("has_pose marks rows with pose targets but poses=None")
        dev = self.device
        return {"prompts": list(prompts), "images": images,
                "completion_ids": ids.to(dev), "completion_mask": mask.to(dev),
                "pose_token_pos": pose_pos.to(dev), "has_pose": has_pose.to(dev),
                "poses": None if poses is None else torch.as_tensor(poses, dtype=torch.float32).to(dev)}

    def sft_loss(self, batch: dict, lm_weight: float = 1.0, pose_weight: float = 1.0,
                 joint_weight: float = 1.0, joint_frame: str = "global",
                 nll_beta: float = 0.0, prompt_lm_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
        """Next-token CE on answers + pose loss + FK joint loss on pose rows
        (+ ``prompt_lm_weight`` x next-token CE on the prompts' own text tokens).

        Pose loss: Gaussian NLL per dimension (``-log p(x) / 144``) for the Gaussian head
        (``nll_beta`` > 0, diagonal covariance: the beta-NLL of :func:`beta_nll` instead),
        mean squared error on the 6D vector for the deterministic head. Joint loss: mean
        per-joint Euclidean distance (metres) between FK(predicted mean) and FK(target),
        both through ``poserft.body.load(None)`` (no translation), with the global
        orientation (``joint_frame="global"``), with both root rotations set to identity
        (``"local"``: articulation only; the root is then supervised by the pose loss alone),
        or the mean of the two (``"both"``).
        Prompt LM loss: next-token CE over the prompt's real tokens (captions, questions,
        the template), image slots and padding excluded. A language model that was never
        pretrained learns from it which word follows which, the word-order features that
        a caption's pose depends on ("left" with "knee"); 0 = off.
        Returns ``(loss, metrics)``; metrics are floats.
        """
        n = len(batch["prompts"])
        ids, mask = batch["completion_ids"], batch["completion_mask"]
        inputs, row_map = self._prompt_inputs(batch["prompts"], batch["images"],
                                              torch.arange(n, device=ids.device))
        hidden = self._full_hidden(inputs, row_map, ids, mask)                  # (B,Tp+Tc,D)
        tp = inputs["input_ids"].shape[1]
        logits = self.backbone.lm_head(hidden[:, tp - 1:-1]).float()
        valid = mask > 0
        ce = F.cross_entropy(logits[valid], ids[valid])
        acc = (logits[valid].argmax(-1) == ids[valid]).float().mean()
        loss = lm_weight * ce
        metrics = {"lm_loss": ce.item(), "token_acc": acc.item()}
        if prompt_lm_weight:
            prompt_ce = self._prompt_lm_loss(hidden[:, :tp], inputs, row_map)
            loss = loss + prompt_lm_weight * prompt_ce
            metrics["prompt_lm_loss"] = prompt_ce.item()
        rows = batch["has_pose"].nonzero().flatten()
        metrics["n_pose"] = float(rows.numel())
        if rows.numel():
            dist = self.pose_head(self._pose_hidden(hidden[rows], tp, batch["pose_token_pos"][rows]))
            target = batch["poses"][rows]
            if isinstance(dist, PoseGaussian) and nll_beta and dist.factor is None:
                pose_loss = beta_nll(dist.mean, dist.std, target, nll_beta).mean()
                metrics["pose_nll"] = (-dist.log_prob(target).mean() / POSE_DIM).item()
                metrics["pose_std"] = dist.std.mean().item()
            elif isinstance(dist, PoseGaussian):
                pose_loss = -dist.log_prob(target).mean() / POSE_DIM
                metrics["pose_nll"] = pose_loss.item()
                metrics["pose_std"] = dist.std.mean().item()
            else:
                pose_loss = F.mse_loss(dist.mean, target)
            metrics["pose_mse"] = F.mse_loss(dist.mean.detach(), target).item()
            joint_err = self.joint_error(dist.mean, target, joint_frame)     # (R,24) metres
            joint_loss = joint_err.mean()
            metrics["joint_err_mm"] = 1000.0 * joint_loss.item()
            loss = loss + pose_weight * pose_loss + joint_weight * joint_loss
        metrics["loss"] = loss.item()
        return loss, metrics

    def _prompt_lm_loss(self, prompt_hidden: torch.Tensor, inputs: dict,
                        row_map: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE of the prompts (B,Tp,D hidden states): position t predicts
        token t+1 where both are real (left padding) and t+1 is not an image slot (its
        "token" is a vision feature)."""
        ids = inputs["input_ids"].index_select(0, row_map)                       # (B,Tp)
        real = inputs["attention_mask"].index_select(0, row_map) > 0
        target = ids[:, 1:]
        keep = real[:, 1:] & real[:, :-1] & (target != self.image_token_id)
        if not bool(keep.any()):
            return prompt_hidden.sum() * 0.0
        logits = self.backbone.lm_head(prompt_hidden[:, :-1][keep]).float()     # (K,V)
        return F.cross_entropy(logits, target[keep])

    def joint_error(self, pred: torch.Tensor, target: torch.Tensor, frame: str = "global") -> torch.Tensor:
        """Per-joint distance (R,24) in metres between FK of two (R,144) 6D poses.

        ``frame="local"`` replaces both root rotations by the identity first (articulation
        only); ``"both"`` is the mean of the global and local errors.
        """
        return joint_distances(self.body_model(), pred, target, frame)


def build_policy(config: ModelConfig | None, tokenizer=None,
                 device: str | torch.device | None = None) -> PoseMLLM:
    """A fresh policy from ``model`` config: pretrained LLaVA (``config.checkpoint``, its own
    tokenizer extended) or the tiny random model (needs the project ``tokenizer``).

    Every parameter ends in one dtype, ``config.dtype`` resolved by :func:`resolve_dtype`
    against ``device`` (None: left on CPU for the caller to place; ``auto`` then means
    bfloat16 when a GPU is visible). LoRA adapters (``config.lora.enabled``) and activation
    checkpointing (``config.gradient_checkpointing``) are applied here.
    """
    from poserft.model.backbone import build_tiny_backbone, load_pretrained_backbone
    from poserft.model.vision import build_pose_vit

    config = ModelConfig.expect(config, "build_policy: config")
    dtype = resolve_dtype(config.dtype, device)
    place = resolve_device(device)
    if config.checkpoint:
        backbone, tokenizer = load_pretrained_backbone(config.checkpoint, dtype,
                                                       config.attn_implementation)
    else:
        if tokenizer is None:
            raise ValueError("build_policy: model.checkpoint is null (tiny model), so the project "
                             "tokenizer must be given (poserft.text.tokenizer.load_tokenizer)")
        backbone = build_tiny_backbone(config, tokenizer, dtype, config.attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        encoder = None if config.fusion == "clip_only" else build_pose_vit(config.pose_vit)
        model = PoseMLLM(config, tokenizer, backbone, encoder)
    cast_policy(model, dtype)     # the new parts (pose encoder, projections, head) too
    if config.lora.enabled:
        model.apply_lora()
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.to(place)
