"""PoseMLLM: prompt layout, KV-cached group generation vs teacher-forced scoring, SFT loss."""

import pytest
import torch

from poserft.model.heads import PointPose, PoseGaussian, UndefinedForDeterministicHead
from poserft.model.testing import make_test_split, tiny_policy
from poserft.model.policy import PoseMLLM

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _images(b, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8)


def _full_sequence(policy, prompts, images, completion_ids, completion_mask):
    """(hidden (B,Tp+Tc,D), Tp) of one row per prompt through the full teacher-forced path."""
    inputs, row_map = policy._prompt_inputs(prompts, images, torch.arange(len(prompts)))
    return (policy._full_hidden(inputs, row_map, completion_ids, completion_mask),
            inputs["input_ids"].shape[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny policy after a few SFT steps on the toy split, so it emits <POSE>."""
    torch.set_num_threads(1)
    from poserft.train.data import SFTTaskData
    d = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    policy, tok = tiny_policy(d)
    data = SFTTaskData(make_test_split(d / "train.h5", 32), policy.config,
                       {"text2pose": 1.0, "image2pose": 1.0, "image2text": 0.5})
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3, betas=(0.9, 0.95))
    for step in range(80):
        mb = data.batch(step, 0, 8)
        loss, _ = policy.sft_loss(policy.sft_batch(mb["prompts"], mb["answers"], mb["images"],
                                                   mb["poses"], mb["has_pose"]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    policy.eval()
    return policy, data


def test_build_inputs_layout(tmp_path):
    policy, tok = tiny_policy(tmp_path)
    prompts = [policy.text2pose_prompt("The person is squatting."), policy.image2pose_prompt()]
    b = policy.build_inputs(prompts, _images(2))
    ids, mask = b["input_ids"], b["attention_mask"]
    n_img = policy.num_image_tokens
    assert n_img == 4  # 16x16 image, patch 8
    # the image prompt has exactly N_img image ids, the text prompt none
    assert (ids[1] == policy.image_token_id).sum() == n_img and (ids[0] == policy.image_token_id).sum() == 0
    assert b["image_rows"].tolist() == [1] and b["pixels"].shape == (1, 3, 16, 16)
    # left padding: every row ends at the last column, padding only on the left
    lengths = [len(policy.encode_prompt(p)) for p in prompts]
    for row, n in enumerate(lengths):
        assert mask[row].tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert b["position_ids"][row, -n:].tolist() == list(range(n))
    assert ids[0, -lengths[0]] == tok.bos_token_id
    # missing images give a clear error
    with pytest.raises(ValueError, match="images=None"):
        policy.build_inputs(prompts, None)
    with pytest.raises(ValueError, match="one image per"):
        policy.encode_prompt("<image> <image> two")


def test_generate_rollout_invariants(tmp_path):
    policy, tok = tiny_policy(tmp_path)
    prompts = [policy.text2pose_prompt("The person is squatting."), policy.image2pose_prompt()]
    torch.manual_seed(0)
    r = policy.generate(prompts, _images(2), num_samples=3, max_new_tokens=7, temperature=1.3)
    n = 6
    assert len(r) == n and r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.completion_ids.shape == r.completion_mask.shape == r.token_logprobs.shape
    assert r.completion_ids.shape[1] <= 7 and len(r.texts) == n
    assert r.pose_mean.shape == r.pose_sample.shape == (n, 144) and r.pose_logprob.shape == (n,)
    assert (r.token_logprobs <= 0).all() and (r.token_logprobs[r.completion_mask == 0] == 0).all()
    # right padding: the mask is a prefix of ones, pads after it
    m = r.completion_mask
    assert ((m[:, 1:] <= m[:, :-1])).all()
    assert (r.completion_ids[m == 0] == policy.pad_token_id).all()
    assert not r.token_logprobs.requires_grad and not r.pose_sample.requires_grad
    assert r.pose_valid.tolist() == [p >= 0 for p in r.pose_token_pos.tolist()]
    sub = r.select(torch.tensor([1, 4]))
    assert sub.prompt_index.tolist() == [0, 1] and sub.texts == [r.texts[1], r.texts[4]]
    # samples map to SMPL axis-angle, consistently with the body package's 6D convention
    from poserft.body import smpl_to_vec6d, vec6d_to_rotmats
    go, bp = r.smpl("sample")
    assert go.shape == (n, 3) and bp.shape == (n, 23, 3)
    torch.testing.assert_close(vec6d_to_rotmats(smpl_to_vec6d(go, bp)), vec6d_to_rotmats(r.pose_sample),
                               atol=1e-4, rtol=0)


def test_generate_then_score_agree(trained):
    """Token log-probs and pose distribution from the KV-cached generation equal the
    teacher-forced recompute (which never uses a cache)."""
    policy, data = trained
    b = data.collate([data.example("text2pose", 0), data.example("image2pose", 1),
                      data.example("image2text", 2)])
    torch.manual_seed(1)
    r = policy.generate(b["prompts"], b["images"], num_samples=4, max_new_tokens=16, temperature=1.0)
    assert r.pose_valid.sum() >= 4, r.texts  # the trained model emits <POSE> for pose prompts
    s = policy.score(b["prompts"], b["images"], r)
    assert s.token_logprobs.requires_grad and isinstance(s.pose_dist, PoseGaussian)
    torch.testing.assert_close(s.token_logprobs, r.token_logprobs, atol=2e-5, rtol=0)
    valid = r.pose_valid
    torch.testing.assert_close(s.pose_dist.mean[valid], r.pose_mean[valid], atol=2e-5, rtol=0)
    torch.testing.assert_close(s.pose_dist.std[valid], r.pose_std[valid], atol=2e-5, rtol=0)
    torch.testing.assert_close(s.pose_dist.log_prob(r.pose_sample)[valid], r.pose_logprob[valid],
                               atol=1e-3, rtol=1e-5)
    # <POSE> rows decode with the placeholder kept
    for text, v in zip(r.texts, valid.tolist()):
        assert ("<POSE>" in text) == v
    # gradient reaches the LLM, the vision encoders and the head
    (s.token_logprobs.sum() + s.pose_dist.log_prob(r.pose_sample)[valid].sum()).backward()
    for module in (policy.backbone.lm_head, policy.pose_encoder, policy.fusion, policy.pose_head,
                   policy.backbone.model.vision_tower):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), type(module).__name__
    policy.zero_grad()


def test_score_entropy_and_subset(trained):
    policy, data = trained
    b = data.collate([data.example("image2pose", 0), data.example("text2pose", 3)])
    torch.manual_seed(2)
    r = policy.generate(b["prompts"], b["images"], num_samples=3, max_new_tokens=14)
    sub = r.select(torch.tensor([4, 1]))
    with torch.no_grad():
        s = policy.score(b["prompts"], b["images"], sub, with_entropy=True)
    torch.testing.assert_close(s.token_logprobs, sub.token_logprobs, atol=2e-5, rtol=0)
    assert s.entropy.shape == sub.completion_ids.shape and (s.entropy >= 0).all()
    assert (s.entropy[sub.completion_mask == 0] == 0).all()


def test_prefix_is_computed_once_and_shared(trained):
    policy, data = trained
    b = data.collate([data.example("image2pose", 0), data.example("image2pose", 1)])
    vision_batches, lm_calls = [], []
    h1 = policy.backbone.model.vision_tower.register_forward_hook(
        lambda m, i, o: vision_batches.append(i[0].shape[0]))
    h2 = policy.language_model.register_forward_hook(
        lambda m, a, kw, o: lm_calls.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        r = policy.generate(b["prompts"], b["images"], num_samples=8, max_new_tokens=6)
    finally:
        h1.remove()
        h2.remove()
    assert vision_batches == [2]                       # images encoded once, not 16 times
    tp = policy.build_inputs(b["prompts"], b["images"])["input_ids"].shape[1]
    assert lm_calls[0] == (2, tp)                      # prefill on B=2 rows
    assert all(c == (16, 1) for c in lm_calls[1:])     # decoding: one token for B*G rows
    assert len(r) == 16


def test_greedy_samples_are_identical_and_pose_sample_is_mean(trained):
    policy, data = trained
    b = data.collate([data.example("image2pose", 2)])
    r = policy.generate(b["prompts"], b["images"], num_samples=3, do_sample=False, max_new_tokens=14)
    assert r.texts[0] == r.texts[1] == r.texts[2]
    torch.testing.assert_close(r.pose_sample, r.pose_mean)
    assert r.texts[0] == policy.config.pose_answer


def test_sft_loss_components_match_independent_computation(trained):
    from poserft.body import load, vec6d_to_smpl
    policy, data = trained
    mb = data.batch(123, 0, 6)
    batch = policy.sft_batch(mb["prompts"], mb["answers"], mb["images"], mb["poses"], mb["has_pose"])
    with torch.no_grad():
        joint_only, m = policy.sft_loss(batch, lm_weight=0.0, pose_weight=0.0, joint_weight=1.0)
        pose_only, _ = policy.sft_loss(batch, lm_weight=0.0, pose_weight=1.0, joint_weight=0.0)
        beta_only, _ = policy.sft_loss(batch, lm_weight=0.0, pose_weight=1.0, joint_weight=0.0,
                                       nll_beta=0.5)
        lm_only, _ = policy.sft_loss(batch, lm_weight=1.0, pose_weight=0.0, joint_weight=0.0)
        rows = batch["has_pose"].nonzero().flatten()
        # recompute the pose distribution via score() on a rollout-shaped input
        hidden, tp = _full_sequence(policy, batch["prompts"], batch["images"],
                                    batch["completion_ids"], batch["completion_mask"])
        dist = policy.pose_head(policy._pose_hidden(hidden, tp, batch["pose_token_pos"]))[rows]
        target = batch["poses"][rows]
        # joints through the axis-angle interface of the body model (independent path)
        body = load(None)
        jp = body(*vec6d_to_smpl(dist.mean))
        jt = body(*vec6d_to_smpl(target))
        expected_joint = (jp - jt).norm(dim=-1).mean()
        ref = torch.distributions.MultivariateNormal(dist.mean, covariance_matrix=dist.covariance_matrix())
        expected_pose = -ref.log_prob(target).mean() / 144
        w = dist.std                                              # std^(2 * 0.5)
        per_dim = (-torch.distributions.Normal(dist.mean, dist.std).log_prob(target))
        expected_beta = ((per_dim * w).sum(-1) / w.sum(-1)).mean()
        logits = policy.backbone.lm_head(hidden[:, tp - 1:-1])
        valid = batch["completion_mask"] > 0
        expected_lm = torch.nn.functional.cross_entropy(logits[valid], batch["completion_ids"][valid])
    assert m["n_pose"] == len(rows) > 0
    torch.testing.assert_close(joint_only, expected_joint, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pose_only, expected_pose, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(beta_only, expected_beta, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lm_only, expected_lm, atol=1e-5, rtol=1e-5)


def test_prompt_lm_loss_matches_a_prompt_only_forward(trained):
    """sft.prompt_lm_weight: next-token CE over each prompt's own real tokens, computed
    independently from a causal forward of the prompts alone, row by row, token by token;
    image slots and left padding are never targets; the weight 0 leaves the loss as it was."""
    policy, data = trained
    mb = data.batch(7, 0, 8)
    batch = policy.sft_batch(mb["prompts"], mb["answers"], mb["images"], mb["poses"], mb["has_pose"])
    assert mb["images"] is not None and any(p.count("<image>") for p in mb["prompts"])
    with torch.no_grad():
        base, m0 = policy.sft_loss(batch, nll_beta=0.5)
        off, _ = policy.sft_loss(batch, nll_beta=0.5, prompt_lm_weight=0.0)
        with_lm, m = policy.sft_loss(batch, nll_beta=0.5, prompt_lm_weight=0.3)
        inputs = policy.build_inputs(batch["prompts"], batch["images"])
        h = policy._lm(policy.embed_prompts(inputs), inputs["attention_mask"],
                       inputs["position_ids"]).last_hidden_state                 # prompts only
        logp = torch.log_softmax(policy.backbone.lm_head(h).float(), -1)
        terms = []
        for row, ids in enumerate(policy.encode_prompt(p) for p in batch["prompts"]):
            start = inputs["input_ids"].shape[1] - len(ids)                    # left padding
            for t in range(len(ids) - 1):
                if ids[t + 1] != policy.image_token_id:
                    terms.append(-logp[row, start + t, ids[t + 1]])
        expected = torch.stack(terms).mean()
    assert "prompt_lm_loss" not in m0 and torch.equal(base, off)
    torch.testing.assert_close(torch.tensor(m["prompt_lm_loss"]), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_lm, base + 0.3 * expected, atol=1e-5, rtol=1e-5)
    # it trains the LLM's word embeddings through the prompt positions
    policy.zero_grad()
    policy.train()
    loss, _ = policy.sft_loss(batch, lm_weight=0.0, pose_weight=0.0, joint_weight=0.0,
                              prompt_lm_weight=1.0)
    loss.backward()
    policy.eval()
    grad = policy.language_model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    policy.zero_grad()


def test_joint_error_frames(trained):
    from poserft.body.rotations import axis_angle_to_rot6d
    policy, data = trained
    a, b = data.sources[0].poses.canonical[:3].clone(), data.sources[0].poses.canonical[3:6].clone()
    g = torch.Generator().manual_seed(0)
    a_rot, b_rot = a.clone(), b.clone()
    a_rot[:, :6] = axis_angle_to_rot6d(torch.randn(3, 3, generator=g))
    b_rot[:, :6] = axis_angle_to_rot6d(torch.randn(3, 3, generator=g))
    ident = axis_angle_to_rot6d(torch.zeros(3, 3))
    a_id, b_id = a.clone(), b.clone()
    a_id[:, :6], b_id[:, :6] = ident, ident
    local = policy.joint_error(a_rot, b_rot, "local")
    torch.testing.assert_close(local, policy.joint_error(a_id, b_id, "global"), atol=1e-5, rtol=0)
    # same articulation, different root: zero locally, non-zero globally
    same = b.clone()
    same[:, :6] = b_rot[:, :6]
    assert policy.joint_error(b, same, "local").abs().max() < 1e-5
    assert policy.joint_error(b, same, "global").mean() > 0.05
    both = policy.joint_error(a_rot, b_rot, "both")
    torch.testing.assert_close(both, 0.5 * (local + policy.joint_error(a_rot, b_rot, "global")))
    with pytest.raises(ValueError, match="joint frame"):
        policy.joint_error(a, b, "camera")


def test_sft_learns_format_and_kinds(trained):
    """After 80 steps the toy task is learnt: exact answers and poses closer than the mean."""
    from poserft.train.sft import mpjpe_mm, quick_eval
    policy, data = trained
    res = quick_eval(policy, data, {t: data.mean_pose6d(t) for t in ("text2pose", "image2pose")},
                     n=16, max_new_tokens=14)
    assert res["image2pose/format_rate"] == 1.0 and res["text2pose/format_rate"] == 1.0
    assert res["image2pose/mpjpe_mm"] < 0.7 * res["image2pose/mean_pose_mpjpe_mm"]
    body = policy.body_model()
    same = mpjpe_mm(body, data.sources[0].poses.canonical[:4], data.sources[0].poses.canonical[:4])
    assert torch.allclose(same, torch.zeros(4), atol=1e-3)


def test_mean_pose_floor_is_per_task(trained):
    """Text targets (canonical, yaw removed) and image targets (camera frame) have different
    means; each task's floor is the mean of its own targets, not of the two pooled."""
    _, data = trained
    for task in ("text2pose", "image2pose"):
        torch.testing.assert_close(data.mean_pose6d(task), data.task_targets(task).mean(0))
    n_text, n_img = len(data.sources[0].caption_pose), data.sources[0].poses.image.shape[0]
    pooled = (n_text * data.mean_pose6d("text2pose") + n_img * data.mean_pose6d("image2pose")) / (n_text + n_img)
    torch.testing.assert_close(data.mean_pose6d(), pooled)
    with pytest.raises(ValueError, match="no pose targets"):
        data.task_targets("image2text")


def test_freeze_vision_freezes_both_encoders_only(tmp_path):
    """model.freeze_vision (the embedded default): no gradient reaches CLIP or the pose
    encoder, while the projectors, the LLM and the head still train."""
    policy, _ = tiny_policy(tmp_path, freeze_vision=True)
    frozen = (policy.backbone.model.vision_tower, policy.pose_encoder)
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    prompts = [policy.image2pose_prompt()] * 2
    r = policy.generate(prompts, _images(2), num_samples=2, max_new_tokens=12)
    s = policy.score(prompts, _images(2), r)
    (s.token_logprobs.sum() + s.pose_dist.mean.sum()).backward()
    for module in frozen:
        assert all(p.grad is None for p in module.parameters())
    for module in (policy.fusion, policy.pose_head, policy.backbone.lm_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_deterministic_head_policy(tmp_path):
    policy, _ = tiny_policy(tmp_path, head="deterministic")
    prompts = [policy.image2pose_prompt()]
    r = policy.generate(prompts, _images(1), num_samples=2, max_new_tokens=4)
    torch.testing.assert_close(r.pose_sample, r.pose_mean)
    assert (r.pose_logprob == 0).all() and r.pose_std is None
    s = policy.score(prompts, _images(1), r)
    assert isinstance(s.pose_dist, PointPose)
    with pytest.raises(UndefinedForDeterministicHead):
        s.pose_dist.log_prob(r.pose_sample)
    batch = policy.sft_batch(prompts, [policy.config.pose_answer], _images(1),
                             torch.randn(1, 144), torch.tensor([True]))
    loss, m = policy.sft_loss(batch, lm_weight=0.0, pose_weight=1.0, joint_weight=0.0)
    dist = policy.pose_head(policy._pose_hidden(
        *_full_sequence(policy, prompts, _images(1), batch["completion_ids"],
                        batch["completion_mask"]), batch["pose_token_pos"]))
    torch.testing.assert_close(loss, ((dist.mean - batch["poses"]) ** 2).mean())
    assert "pose_nll" not in m


@pytest.mark.parametrize("fusion", ["separate", "concat", "clip_only"])
def test_fusion_variants_build_and_run(tmp_path, fusion):
    policy, _ = tiny_policy(tmp_path, fusion=fusion)
    assert (policy.pose_encoder is None) == (fusion == "clip_only")
    feats = policy.image_features(torch.rand(3, 3, 16, 16))
    assert feats.shape == (3, policy.num_image_tokens, policy.backbone.config.text_config.hidden_size)
    r = policy.generate([policy.image2pose_prompt()], _images(1), num_samples=2, max_new_tokens=3)
    assert len(r) == 2


def test_sft_batch_validation(tmp_path):
    policy, _ = tiny_policy(tmp_path)
    with pytest.raises(ValueError, match="no <POSE>"):
        policy.sft_batch(["a"], ["no placeholder"], None, torch.zeros(1, 144), torch.tensor([True]))
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        policy.sft_batch(["a", "b"], ["x"])
    with pytest.raises(TypeError, match="expected PoseMLLM.sft_loss or PoseMLLM.score"):
        policy("sft_loss")   # no dispatch by string
    with pytest.raises(TypeError, match="expected PoseMLLM.sft_loss or PoseMLLM.score"):
        policy(PoseMLLM.generate, ["a"])
