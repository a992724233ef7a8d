"""Issue #14, model side: one dtype through the whole policy (a float16 checkpoint, bf16
autocast), float32 pose-head maths, and LoRA adapters through peft (training, reference
without adapters, merged / adapter export)."""

import json

import pytest
import torch

from poserft.model.testing import make_test_tokenizer, tiny_model_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CAPTION = "The person is squatting with the knees completely bent."


def _images(b, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8)


def _dtypes(module) -> set:
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory):
    """A tiny LLaVA checkpoint saved in float16, as llava-hf/llava-1.5-7b-hf ships."""
    from transformers import LlavaForConditionalGeneration

    from poserft.model.backbone import tiny_llava_config
    d = tmp_path_factory.mktemp("llava_fp16")
    tok = make_test_tokenizer(d / "tokenizer")
    cfg = tiny_model_config()
    llava = LlavaForConditionalGeneration(tiny_llava_config(
        cfg, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id,
        tok.bos_token_id, tok.eos_token_id))
    ckpt = d / "ckpt"
    llava.half().save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    from safetensors import safe_open
    files = list(ckpt.glob("*.safetensors"))
    with safe_open(str(files[0]), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    return ckpt


def _prompts(policy):
    return [policy.text2pose_prompt(CAPTION), policy.image2pose_prompt()]


def _sft_batch(policy, n_rep=1):
    from poserft.model.heads import identity_pose_vec
    prompts = _prompts(policy) * n_rep
    poses = identity_pose_vec().expand(len(prompts), -1) + 0.1
    return policy.sft_batch(prompts, [policy.config.pose_answer] * len(prompts),
                            _images(len(prompts)), poses, torch.ones(len(prompts), dtype=torch.bool))


# ----------------------------------------------------------------------------- dtype

def test_fp16_checkpoint_policy_generates_after_save_and_load(fp16_checkpoint, tmp_path):
    """The bug of issue #14: a float16 checkpoint left the released parts in float16 and the
    new ones (pose encoder, projections, head) in float32; generate then failed with
    "mat1 and mat2 must have the same dtype"."""
    from poserft.model.io import load_policy, save_policy
    from poserft.model.policy import build_policy

    policy = build_policy(tiny_model_config(checkpoint=str(fp16_checkpoint)))
    out = save_policy(policy, tmp_path / "policy")
    loaded = load_policy(out)
    for p in (loaded, policy):
        p.eval()
        torch.manual_seed(0)
        r = p.generate(_prompts(p), _images(2), num_samples=2, max_new_tokens=4)
        assert len(r) == 4 and r.pose_logprob.dtype == torch.float32
    assert _dtypes(policy) == _dtypes(loaded) == {torch.float32}


@pytest.mark.parametrize("dtype, expected", [("auto", torch.float32),
                                             ("bfloat16", torch.bfloat16)])
def test_policy_holds_one_dtype_from_build_to_load(fp16_checkpoint, tmp_path, dtype, expected):
    from poserft.model.io import load_policy, save_policy
    from poserft.model.policy import PoseMLLM, build_policy

    policy = build_policy(tiny_model_config(checkpoint=str(fp16_checkpoint), dtype=dtype))
    assert _dtypes(policy) == {expected} and policy.dtype == expected
    # floating buffers (rotary frequencies) are left in float32, as transformers keeps them
    assert policy.language_model.rotary_emb.inv_freq.dtype == torch.float32

    # one SFT step under bf16 autocast (what the engine does on a GPU)
    policy.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = policy(PoseMLLM.sft_loss, _sft_batch(policy))
    loss.backward()
    assert torch.isfinite(loss) and metrics["n_pose"] == 2
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == expected for g in grads if g is not None)
    assert policy.pose_head.mean_out.weight.grad is not None
    assert policy.fusion.proj_pose.linear_1.weight.grad is not None
    policy.zero_grad(set_to_none=True)

    # pose log-probs are float32 under autocast and with bf16 weights
    policy.eval()
    prompts = _prompts(policy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        r = policy.generate(prompts, _images(2), num_samples=2, max_new_tokens=4)
        sc = policy(PoseMLLM.score, prompts, _images(2), r)
        lp = sc.pose_dist.log_prob(r.pose_sample)
    assert r.pose_logprob.dtype == r.pose_mean.dtype == r.pose_sample.dtype == torch.float32
    assert lp.dtype == torch.float32 and sc.pose_dist.mean.dtype == torch.float32
    assert sc.token_logprobs.dtype == torch.float32

    # export keeps the dtype; config.json records it; load gives the same dtype
    out = save_policy(policy, tmp_path / "policy")
    meta = json.loads((out / "config.json").read_text())
    assert meta["dtype"] == str(expected).removeprefix("torch.")
    assert meta["model"]["dtype"] == dtype and meta["lora_weights"] is None
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys() if "inv_freq" not in k}
    assert stored - {"I64"} == {"F32" if expected == torch.float32 else "BF16"}
    loaded = load_policy(out)
    assert _dtypes(loaded) == {expected}
    for k, v in policy.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    torch.manual_seed(2)
    r1 = policy.generate(prompts, _images(2), num_samples=1, max_new_tokens=4, do_sample=False)
    torch.manual_seed(2)
    r2 = loaded.generate(prompts, _images(2), num_samples=1, max_new_tokens=4, do_sample=False)
    assert r1.texts == r2.texts
    torch.testing.assert_close(r1.pose_mean, r2.pose_mean)
    # an explicit dtype overrides the stored one
    up = load_policy(out, device="cpu", dtype="float32")
    assert _dtypes(up) == {torch.float32} and up.device == torch.device("cpu")


def test_dtype_and_device_resolution(monkeypatch):
    from poserft.configbase import ConfigError
    from poserft.model.config import ModelConfig
    from poserft.model.policy import resolve_device, resolve_dtype
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto") == torch.bfloat16           # runs where the GPU is
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    monkeypatch.undo()
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="expected auto"):
        resolve_dtype("float8")
    with pytest.raises(ConfigError, match="model.dtype"):
        ModelConfig.from_dict({"dtype": "half"}, where="model")
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        ModelConfig.from_dict({"lora": {"enabled": True, "target_modules": []}}, where="model")
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        ModelConfig.from_dict({"attn_implementation": "flash"}, where="model")
    with pytest.raises(ConfigError, match="flash_attention_2 needs model.dtype"):
        ModelConfig.from_dict({"attn_implementation": "flash_attention_2", "dtype": "float32"},
                              where="model")


def test_attn_implementation_reaches_the_tiny_backbone(tmp_path):
    from poserft.model.policy import build_policy
    tok = make_test_tokenizer(tmp_path)
    eager = build_policy(tiny_model_config(attn_implementation="eager"), tok).eval()
    sdpa = build_policy(tiny_model_config(), tok).eval()
    assert eager.backbone.config._attn_implementation == "eager"
    assert eager.backbone.config.text_config._attn_implementation == "eager"
    assert sdpa.backbone.config.text_config._attn_implementation == "sdpa"
    torch.manual_seed(0)
    r1 = eager.generate(_prompts(eager), _images(2), max_new_tokens=4, do_sample=False)
    r2 = sdpa.generate(_prompts(sdpa), _images(2), max_new_tokens=4, do_sample=False)
    assert r1.texts == r2.texts
    torch.testing.assert_close(r1.token_logprobs, r2.token_logprobs, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_same_gradients_and_generation(tmp_path):
    from poserft.model.policy import build_policy
    tok = make_test_tokenizer(tmp_path)
    plain = build_policy(tiny_model_config(), tok)
    ckpt = build_policy(tiny_model_config(gradient_checkpointing=True), tok)
    layers = list(ckpt.language_model.layers)
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    for p in (plain, ckpt):
        p.train()
        loss, _ = p.sft_loss(_sft_batch(p))
        loss.backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=n)
    # generation in training mode keeps its KV cache (transformers would drop it)
    r_train = ckpt.generate(_prompts(ckpt), _images(2), max_new_tokens=5, do_sample=False)
    assert ckpt.training and all(layer.gradient_checkpointing for layer in layers)
    ckpt.eval()
    r_eval = ckpt.generate(_prompts(ckpt), _images(2), max_new_tokens=5, do_sample=False)
    assert r_train.texts == r_eval.texts
    torch.testing.assert_close(r_train.token_logprobs, r_eval.token_logprobs)


# ----------------------------------------------------------------------------- heads

@pytest.mark.parametrize("rank", [0, 3])
def test_gaussian_maths_float32_under_bf16_autocast(rank):
    """bf16 mean/std/factor (bf16 weights) under bf16 autocast: log_prob / kl / entropy /
    samples come out float32 and match a float64 computation of the same inputs."""
    from poserft.model.heads import GaussianPoseHead, PoseGaussian
    g = torch.Generator().manual_seed(0)
    b, k = 5, 144

    def make(seed_shift):
        mean = torch.randn(b, k, generator=g).bfloat16()
        std = (0.05 + torch.rand(b, k, generator=g)).bfloat16()
        factor = (0.3 * torch.randn(b, k, rank, generator=g)).bfloat16() if rank else None
        return mean, std, factor

    p_args, q_args = make(0), make(1)
    x = torch.randn(b, k, generator=g).bfloat16()

    def f64(args):
        return PoseGaussian(*[None if a is None else a.double() for a in args])

    with torch.autocast("cpu", dtype=torch.bfloat16):
        p, q = PoseGaussian(*p_args), PoseGaussian(*q_args)
        lp, kl, ent = p.log_prob(x), p.kl(q), p.entropy()
        s = p.rsample(torch.Generator().manual_seed(1))
    for t in (lp, kl, ent, s, p.mean, p.std):
        assert t.dtype == torch.float32
    ref_p, ref_q = f64(p_args), f64(q_args)
    torch.testing.assert_close(lp.double(), ref_p.log_prob(x.double()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), ref_p.kl(ref_q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_p.entropy(), rtol=1e-5, atol=1e-5)

    # the head itself, with bf16 weights and bf16 hidden states under autocast
    head = GaussianPoseHead(32, 64, covariance="lowrank" if rank else "diag", rank=max(rank, 1))
    head = head.to(torch.bfloat16)
    hidden = torch.randn(b, 32, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist = head(hidden)
        target = dist.mean.detach() + 0.01
        lp = dist.log_prob(target)
    assert dist.mean.dtype == dist.std.dtype == lp.dtype == torch.float32
    ref = PoseGaussian(dist.mean.double(), dist.std.double(),
                       None if dist.factor is None else dist.factor.double())
    torch.testing.assert_close(lp.double(), ref.log_prob(target.double()), rtol=1e-5, atol=1e-5)
    lp.sum().backward()      # gradient flows back into the bf16 weights
    assert head.mean_out.weight.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- LoRA

# LM head frozen here, so that "adapters off" is exactly the base model at the model level
# (with the default train_lm_head the RFT reference restores the head's SFT values itself)
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "train_lm_head": False}


def test_lora_trains_the_lm_head_by_default(tmp_path):
    """The LISA recipe: the LM head trains beside the adapters (the added <POSE> row must)."""
    from poserft.model.policy import build_policy
    tok = make_test_tokenizer(tmp_path)
    policy = build_policy(tiny_model_config(lora={"enabled": True}), tok)
    assert policy.backbone.lm_head.weight.requires_grad
    assert not any(p.requires_grad for n, p in policy.named_parameters()
                   if n.startswith("backbone.model.language_model.") and "lora_" not in n)


def _lm_prefix(name: str) -> bool:
    return name.startswith(("backbone.model.language_model.", "backbone.lm_head."))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(base policy, LoRA policy before training (a deep copy), LoRA policy after a few
    optimizer steps), same seed, tiny float32."""
    import copy

    from poserft.model.policy import build_policy
    d = tmp_path_factory.mktemp("lora")
    tok = make_test_tokenizer(d)
    base = build_policy(tiny_model_config(), tok).eval()
    lora = build_policy(tiny_model_config(lora=LORA), tok)
    fresh = copy.deepcopy(lora).eval()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(4):
        loss, _ = lora.sft_loss(_sft_batch(lora))
        loss.backward()
        opt.step()
        opt.zero_grad()
    lora.eval()
    return base, fresh, lora


def _text_score(policy):
    """Token log-probs and pose mean of a fixed completion of a TEXT prompt (LLM + head only)."""
    prompts = [policy.text2pose_prompt(CAPTION)]
    batch = _sft_batch(policy)
    from poserft.model.policy import Rollout
    ids, mask = batch["completion_ids"][:1], batch["completion_mask"][:1]
    n = ids.shape[0]
    r = Rollout(prompt_index=torch.zeros(n, dtype=torch.long), completion_ids=ids,
                completion_mask=mask, texts=[""], token_logprobs=torch.zeros_like(mask),
                pose_valid=torch.ones(n, dtype=torch.bool), pose_mean=torch.zeros(n, 144),
                pose_sample=torch.zeros(n, 144), pose_logprob=torch.zeros(n),
                pose_token_pos=batch["pose_token_pos"][:1], do_sample=False)
    with torch.no_grad():
        out = policy.score(prompts, None, r)
    return out.token_logprobs, out.pose_dist.mean


def test_lora_trains_adapters_and_the_non_llm_parts_only(lora_run):
    from poserft.model.policy import NoLoraError
    base, fresh, lora = lora_run
    assert lora.has_lora and not base.has_lora
    with pytest.raises(NoLoraError, match="no LoRA adapters"):
        with base.adapters_disabled():
            pass
    names = dict(lora.named_parameters())
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    for n, p in names.items():
        want = ("lora_" in n) if _lm_prefix(n) else True   # tiny config: vision not frozen
        assert p.requires_grad == want, n
    assert _dtypes(lora) == {torch.float32}
    # the LLM's base weights did not move; the adapters and the head did
    base_state = base.state_dict()
    for n, v in lora.state_dict().items():
        plain = n.replace("base_model.model.", "").replace(".base_layer.", ".")
        if _lm_prefix(n) and "lora_" not in n:
            assert torch.equal(v, base_state[plain]), n
    assert not torch.equal(lora.pose_head.mean_out.weight, base.pose_head.mean_out.weight)


def test_adapters_disabled_is_the_base_model(lora_run):
    base, fresh, lora = lora_run
    tok_base, _ = _text_score(base)
    # fresh adapters (B = 0) change nothing
    tok_fresh, pose_fresh = _text_score(fresh)
    torch.testing.assert_close(tok_fresh, tok_base, atol=1e-6, rtol=0)
    # after training: the adapters change the outputs; switched off, the LLM is the base
    tok_lora, _ = _text_score(lora)
    assert (tok_lora - tok_base).abs().max() > 1e-3
    with lora.adapters_disabled():
        tok_off, _ = _text_score(lora)
    torch.testing.assert_close(tok_off, tok_base, atol=1e-6, rtol=0)
    # and the adapters are back on afterwards, still trainable
    torch.testing.assert_close(_text_score(lora)[0], tok_lora)
    assert all(p.requires_grad for n, p in lora.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("export", ["merged", "adapter"])
def test_lora_export_reloads_to_the_same_outputs(lora_run, tmp_path, export):
    import dataclasses

    from safetensors import safe_open

    from poserft.model.io import load_policy, save_policy
    base, _, lora = lora_run
    lora.config.lora = dataclasses.replace(lora.config.lora, export=export)
    try:
        out = save_policy(lora, tmp_path / export)
    finally:
        lora.config.lora = dataclasses.replace(lora.config.lora, export="merged")
    meta = json.loads((out / "config.json").read_text())
    assert meta["lora_weights"] == export and meta["model"]["lora"]["enabled"] is True
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    if export == "merged":      # a plain policy's keys: loadable without peft
        assert keys == set(base.state_dict())
    else:
        assert any("lora_A" in k for k in keys) and any(".base_layer." in k for k in keys)

    prompts = _prompts(lora)
    torch.manual_seed(0)
    want = lora.generate(prompts, _images(2), max_new_tokens=5, do_sample=False)
    want_tok, want_pose = _text_score(lora)
    for flag in (None, False):
        loaded = load_policy(out, lora=flag)
        assert loaded.has_lora == (flag is None)
        if flag is False:
            assert all(p.requires_grad for p in loaded.parameters())
        got = loaded.generate(prompts, _images(2), max_new_tokens=5, do_sample=False)
        assert got.texts == want.texts
        torch.testing.assert_close(got.token_logprobs, want.token_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.pose_mean, want.pose_mean, atol=1e-5, rtol=0)
        tok, pose = _text_score(loaded)
        torch.testing.assert_close(tok, want_tok, atol=1e-5, rtol=0)
        torch.testing.assert_close(pose, want_pose, atol=1e-5, rtol=0)
    # merged + fresh adapters: switching them off gives the exported (SFT) policy itself
    loaded = load_policy(out)
    if export == "merged":
        with loaded.adapters_disabled():
            torch.testing.assert_close(_text_score(loaded)[0], want_tok, atol=1e-5, rtol=0)


def test_lora_in_bf16_and_engine_export(tmp_path):
    """LoRA adapters take the policy's dtype; TrainEngine trains and exports a LoRA policy."""
    from poserft.model.io import load_policy
    from poserft.model.policy import PoseMLLM, build_policy
    from poserft.train.config import EngineConfig, OptimConfig
    from poserft.train.engine import TrainEngine
    tok = make_test_tokenizer(tmp_path)
    bf = build_policy(tiny_model_config(dtype="bfloat16", lora=LORA), tok)
    assert bf.has_lora and _dtypes(bf) == {torch.bfloat16}

    policy = build_policy(tiny_model_config(lora=LORA), tok)
    eng = TrainEngine(policy, OptimConfig(lr=1e-2, warmup_steps=0), EngineConfig(device="cpu"),
                      2, tmp_path / "run")
    for _ in eng.steps():
        eng.train_step([_sft_batch(policy)], lambda m, mb: m(PoseMLLM.sft_loss, mb))
    out = eng.export_policy()
    loaded = load_policy(out)
    policy.eval()
    torch.testing.assert_close(_text_score(loaded)[0], _text_score(policy)[0], atol=1e-5, rtol=0)
    # the merged export comes back with fresh adapters: switched off, it is the trained
    # policy (the reference of the next stage)
    with loaded.adapters_disabled():
        torch.testing.assert_close(_text_score(loaded)[0], _text_score(policy)[0], atol=1e-5,
                                   rtol=0)
