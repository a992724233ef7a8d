"""PoseMLLM.score over a shared prompt prefix: the cached path (prefill each distinct prompt
once, KV cache expanded to its rows, one forward of the completions) gives the values AND
the parameter gradients of the full path (every row's prompt+completion recomputed), on
hand-built rollouts that exercise left padding, early EOS, rows without <POSE>, and row
subsets that are partial groups out of order; and the automatic choice of path
(activation checkpointing, an LLM that returns no KV cache)."""

import copy

import pytest
import torch
from torch import nn

from poserft.model.policy import Rollout
from poserft.model.testing import make_test_tokenizer, tiny_model_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

G = 3
# per row of the 12: completion length, </s> last except in TRUNCATED (cut at Tc=7 by
# max_new_tokens, <POSE> its last token); <POSE> position (-1: none)
LENGTHS = [7, 3, 5, 7, 1, 6, 4, 7, 2, 5, 7, 3]
POSE_POS = [2, -1, 3, 0, -1, 4, 2, -1, 0, 2, 6, -1]
TRUNCATED = {10}
# a micro-batch-like subset: unordered, prompt 1 absent, prompts 0 and 3 partial groups
SUBSET = [10, 1, 7, 6, 2]


def _images(b, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8)


def _build(tmp_path_factory, **overrides):
    """A tiny policy in training mode whose zero-initialised parameters (the pose
    projection's output layer, LoRA's B) are made random: at zero they would cut the
    gradient to the pose encoder (LoRA's A), leaving those comparisons trivial."""
    from poserft.model.policy import build_policy
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("prefix")
    policy = build_policy(tiny_model_config(**overrides), make_test_tokenizer(d))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy.train()


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return _build(tmp_path_factory)


def _prompts(policy):
    """4 prompts of 4 different token lengths (so 3 are left-padded), 2 with an image."""
    return [policy.text2pose_prompt("The person is standing with both arms raised above the head."),
            policy.image2pose_prompt(),
            policy.vqa_prompt("Is the left arm raised?"),
            policy.text2pose_prompt("The person is sitting on the floor.")]


def _rollout(policy, seed=0) -> Rollout:
    """G=3 rows per prompt with random ordinary tokens, <POSE> at POSE_POS, </s> ending each
    row at LENGTHS (right-padded after), as generate would lay them out."""
    g = torch.Generator().manual_seed(seed)
    n, tc = len(LENGTHS), max(LENGTHS)
    special = {policy.image_token_id, policy.pose_token_id, policy.eos_token_id,
               policy.pad_token_id, policy.bos_token_id}
    ordinary = torch.tensor([t for t in range(len(policy.tokenizer)) if t not in special])
    ids = ordinary[torch.randint(0, len(ordinary), (n, tc), generator=g)]
    mask = torch.zeros(n, tc)
    for i, (length, pos) in enumerate(zip(LENGTHS, POSE_POS)):
        if i not in TRUNCATED:
            ids[i, length - 1] = policy.eos_token_id
        if pos >= 0:
            assert pos < length - (i not in TRUNCATED)
            ids[i, pos] = policy.pose_token_id
        ids[i, length:] = policy.pad_token_id
        mask[i, :length] = 1.0
    pose_pos = torch.tensor(POSE_POS)
    zeros = torch.zeros(n, 144)
    return Rollout(prompt_index=torch.arange(n // G).repeat_interleave(G), completion_ids=ids,
                   completion_mask=mask, texts=[""] * n, token_logprobs=torch.zeros(n, tc),
                   pose_valid=pose_pos >= 0, pose_mean=zeros,
                   pose_sample=torch.randn(n, 144, generator=g), pose_logprob=torch.zeros(n),
                   pose_token_pos=pose_pos, num_samples=G, temperature=1.3)


def _score(policy, path, rollout, images=None, backward=True):
    """score() on ``path`` (None: automatic); the LLM call shapes; with ``backward``, the
    gradient of a scalar built from every output, per trainable parameter."""
    prompts = _prompts(policy)
    images = _images(len(prompts)) if images is None else images
    calls = []
    hook = policy.language_model.register_forward_hook(
        lambda m, a, kw, o: calls.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    if path is not None:
        policy._score_path = path
    try:
        out = policy.score(prompts, images, rollout, with_entropy=True)
    finally:
        hook.remove()
        vars(policy).pop("_score_path", None)
    grads = {}
    if backward:
        g = torch.Generator().manual_seed(7)   # random weights: no cancellation between rows
        w_tok = torch.randn(out.token_logprobs.shape, generator=g)
        w_pose = torch.randn(out.pose_dist.mean.shape, generator=g)
        valid = rollout.pose_valid
        loss = ((w_tok * out.token_logprobs).sum() + (w_tok * out.entropy).sum()
                + out.pose_dist.log_prob(rollout.pose_sample)[valid].sum()
                + (w_pose * out.pose_dist.mean)[valid].sum())
        policy.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        policy.zero_grad(set_to_none=True)
    return out, calls, grads


def _assert_same(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=atol, rtol=rtol)
    torch.testing.assert_close(a.entropy, b.entropy, atol=atol, rtol=rtol)
    # all rows: those without <POSE> read the last prompt position in both paths
    torch.testing.assert_close(a.pose_dist.mean, b.pose_dist.mean, atol=atol, rtol=rtol)
    torch.testing.assert_close(a.pose_dist.std, b.pose_dist.std, atol=atol, rtol=rtol)


def _assert_same_grads(ga, gb, atol=1e-5, rtol=1e-4):
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("rows", [None, SUBSET], ids=["all_rows", "partial_unordered_subset"])
def test_cached_equals_full_values_and_gradients(policy, rows):
    r = _rollout(policy)
    r = r if rows is None else r.select(rows)
    prompt_mask = policy.build_inputs(_prompts(policy), _images(4))["attention_mask"]
    tp, pad = prompt_mask.shape[1], (prompt_mask == 0).sum(1)
    assert (pad > 0).sum() == 3 and len(set(pad.tolist())) == 4       # 4 prompt lengths
    n, tc = r.completion_ids.shape
    u = len(set(r.prompt_index.tolist()))

    full, full_calls, full_grads = _score(policy, "full", r)
    cached, cached_calls, cached_grads = _score(policy, "cached", r)
    assert full_calls == [(n, tp + tc)]
    assert cached_calls == [(u, tp), (n, tc)]              # prefix once per distinct prompt
    _assert_same(full, cached)
    assert (cached.token_logprobs[r.completion_mask == 0] == 0).all()
    assert not r.pose_valid.all() and r.pose_valid.any()
    # the comparison covers every part of the policy, and the gradients are not trivial
    for prefix in ("backbone.model.language_model.layers.", "backbone.model.language_model.embed",
                   "backbone.lm_head.", "backbone.model.vision_tower.", "pose_encoder.",
                   "fusion.", "pose_head."):
        assert any(k.startswith(prefix) and v.abs().sum() > 0
                   for k, v in cached_grads.items()), prefix
    # every trainable parameter but CLIP's final norm (features come from an inner layer)
    trainable = {k for k, p in policy.named_parameters() if p.requires_grad}
    assert {k.rsplit(".", 1)[0] for k in trainable - set(cached_grads)} == \
        {"backbone.model.vision_tower.post_layernorm"}
    _assert_same_grads(full_grads, cached_grads)


def test_default_path_is_cached_and_matches_sampled_logprobs(policy):
    """Without forcing, score() takes the cached path (train and eval mode); on a rollout
    sampled by generate it reproduces the sampling log-probs and pose."""
    prompts = _prompts(policy)
    for mode in (True, False):
        policy.train(mode)
        _, calls, _ = _score(policy, None, _rollout(policy), backward=False)
        assert len(calls) == 2, calls
    policy.eval()
    torch.manual_seed(3)
    r = policy.generate(prompts, _images(4), num_samples=G, max_new_tokens=8, temperature=1.3)
    with torch.no_grad():
        s = policy.score(prompts, _images(4), r)
    policy.train()
    torch.testing.assert_close(s.token_logprobs, r.token_logprobs, atol=2e-5, rtol=0)
    torch.testing.assert_close(s.pose_dist.mean, r.pose_mean, atol=2e-5, rtol=0)


def test_gradient_checkpointing_uses_full_path(policy):
    """HF drops the KV cache inside checkpointed layers (training mode), so the automatic
    choice is the full path there, and it still matches the cached path without
    checkpointing; in eval mode checkpointing is inactive and the cache is used."""
    r = _rollout(policy).select(SUBSET)
    n, tc = r.completion_ids.shape
    ref, _, ref_grads = _score(policy, "cached", r)
    ckpt = copy.deepcopy(policy)
    ckpt.enable_gradient_checkpointing()
    assert ckpt._llm_checkpointing_active()
    out, calls, grads = _score(ckpt, None, r)
    assert len(calls) == 1 and calls[0][0] == n
    _assert_same(out, ref)
    _assert_same_grads(grads, ref_grads)
    with pytest.raises(ValueError, match="checkpointing"):
        _score(ckpt, "cached", r, backward=False)
    ckpt.eval()
    assert not ckpt._llm_checkpointing_active()
    with torch.no_grad():
        out, calls, _ = _score(ckpt, None, r, backward=False)
    assert [c[1] for c in calls] == [calls[0][1], tc]
    _assert_same(out, ref)


class _NoCacheLLM(nn.Module):
    """An LLM that takes and returns no KV cache (swallows past_key_values/use_cache)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, past_key_values=None, use_cache=None, **kwargs):
        return self.inner(use_cache=False, **kwargs)


def test_llm_without_cache_falls_back_to_full_path(policy):
    r = _rollout(policy)
    n, tc = r.completion_ids.shape
    ref, _, ref_grads = _score(policy, "full", r)
    nocache = copy.deepcopy(policy)
    nocache.backbone.model.language_model = _NoCacheLLM(nocache.backbone.model.language_model)
    out, calls, grads = _score(nocache, None, r)
    assert calls[-1][0] == n and calls[-1][1] > tc           # the full sequence after the prefill
    _assert_same(out, ref)
    _assert_same_grads({k.replace("language_model.inner.", "language_model."): v
                        for k, v in grads.items()}, ref_grads)
    with pytest.raises(RuntimeError, match="no KV cache"):
        _score(nocache, "cached", r, backward=False)
    with pytest.raises(ValueError, match="expected auto, cached or full"):
        _score(policy, "prefix", r, backward=False)


def test_bf16_autocast_paths_agree(policy):
    """Under CPU bf16 autocast (what the engine does on a GPU) both paths agree to bf16
    precision; values are float32 as before."""
    r = _rollout(policy).select(SUBSET)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _, full_grads = _score(policy, "full", r)
        cached, calls, cached_grads = _score(policy, "cached", r)
    assert len(calls) == 2 and cached.token_logprobs.dtype == torch.float32
    _assert_same(full, cached, atol=5e-2, rtol=2e-2)
    assert full_grads.keys() == cached_grads.keys()
    # per tensor, relative to its norm, plus a floor at the overall gradient scale for the
    # tensors whose exact gradient is 0 (e.g. attention key biases) and holds rounding only
    floor = 1e-4 * max(g.abs().max() for g in full_grads.values())
    for name, g in full_grads.items():
        err = (g - cached_grads[name]).norm()
        assert err <= 2e-2 * g.norm() + floor, (name, err, g.norm())


def test_lora_paths_agree(tmp_path_factory):
    """With peft LoRA adapters (non-zero, no dropout) the cached path passes the cache through
    the PeftModel and the adapter gradients match the full path."""
    lora = _build(tmp_path_factory, lora={"enabled": True, "dropout": 0.0})
    r = _rollout(lora).select(SUBSET)
    full, _, full_grads = _score(lora, "full", r)
    cached, calls, cached_grads = _score(lora, "cached", r)
    assert len(calls) == 2
    _assert_same(full, cached)
    assert any("lora_A" in k and v.abs().sum() > 0 for k, v in cached_grads.items())
    _assert_same_grads(full_grads, cached_grads)
