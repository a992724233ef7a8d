"""The HyGRPO trainer on a tiny saved policy, a tiny reward model and small split files."""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch

from poserft.rl.config import RFTConfig
from poserft.rl import trainer as T

N_POSES, IMG = 12, 16


def _split(path, seed):
    from poserft.body import load
    from poserft.data.h5io import write_split
    from poserft.model.testing import TEST_TEXTS

    rng = np.random.default_rng(seed)
    body_pose = (rng.normal(size=(N_POSES, 23, 3)) * 0.3).astype(np.float32)
    orient = (rng.normal(size=(N_POSES, 3)) * 0.3).astype(np.float32)
    joints = load(None)(torch.as_tensor(orient), torch.as_tensor(body_pose)).numpy()
    arrays = {
        "poses/global_orient": orient, "poses/body_pose": body_pose,
        "poses/betas": np.zeros((N_POSES, 10), np.float32), "joints": joints,
        "images": rng.integers(0, 256, size=(N_POSES, IMG, IMG, 3), dtype=np.uint8),
        "image_pose/global_orient": orient,
        "captions/text": [TEST_TEXTS[i % 3] for i in range(N_POSES)],
        "captions/pose_index": np.arange(N_POSES),
    }
    return write_split(path, arrays, {"source": "unit", "split": path.stem,
                                      "body_model": "skeleton", "converter_params": {}})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: thread oversubscription costs 10-30x
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    from poserft.model.io import save_policy
    from poserft.model.testing import tiny_policy
    from poserft.retrieval.checkpoint import save_retrieval_model
    from poserft.retrieval.config import RetrievalConfig
    from poserft.retrieval.model import RetrievalArch, RetrievalModel
    from poserft.train.testing import teach_answer_format

    root = tmp_path_factory.mktemp("rftworld")
    torch.manual_seed(0)
    policy, tok = tiny_policy(root)
    splits = {"train": _split(root / "train.h5", 0), "val": _split(root / "val.h5", 1)}
    save_policy(teach_answer_format(policy, splits["train"]), root / "sft" / "final")
    rcfg = RetrievalConfig.from_dict(dict(d_model=16, n_layers=1, n_heads=2, ff_dim=32,
                                          pose_hidden_dim=32, latent_dim=8), where="retrieval")
    arch = RetrievalArch.from_config(rcfg, len(tok), tok.pad_token_id, tok.bos_token_id)
    save_retrieval_model(RetrievalModel(arch, tok).eval(), root / "reward", {"role": "reward"})
    return {"root": root, "sft": root / "sft", "reward": root / "reward", "splits": splits}


def _cfg(**kw):
    d = dict(steps=2, batch_size=2, group_size=4, micro_batch_size=4, mu=2, max_new_tokens=12,
             eval_prompts=2, eval_samples=2, beta_token=0.05, beta_pose=0.05,
             optim={"lr": 1e-3, "warmup_steps": 0, "min_lr_ratio": 1.0},
             engine={"checkpoint_every": 1, "log_every": 1})
    d.update(kw)
    return RFTConfig.from_dict(d, where="rft")


def _setup(world, cfg, tmp_path):
    from poserft.model.io import load_policy
    from poserft.rl.rollout import PromptSampler
    from poserft.train.data import SFTTaskData
    from poserft.train.engine import TrainEngine

    policy = load_policy(world["sft"])
    reference = copy.deepcopy(policy).requires_grad_(False)
    mix = {t: w for t, w in cfg.task_weights.items() if w > 0}
    sampler = PromptSampler(SFTTaskData(world["splits"]["train"], policy.config, mix), mix)
    ctx = T.build_reward_context(cfg, {"body_model", "semantic_model"}, world["reward"])
    engine = TrainEngine(policy, cfg.optim, cfg.engine, cfg.steps * cfg.mu, tmp_path,
                         grad_accum=2, micro_batch_size=cfg.micro_batch_size)
    return policy, reference, sampler, ctx, engine


def test_first_update_pass_has_unit_ratios_and_exact_micro_shares(world, tmp_path):
    cfg = _cfg()
    policy, reference, sampler, ctx, engine = _setup(world, cfg, tmp_path)
    from poserft.rl.rewards import compute_rewards
    from poserft.rl.rollout import generate_group, reward_inputs

    batch = sampler.sample(0, cfg.batch_size)
    rollout = generate_group(policy, batch, cfg.group_size, cfg.max_new_tokens, 1.0,
                             torch.Generator().manual_seed(0))
    rewards = compute_rewards(reward_inputs(batch, rollout), ctx, cfg.reward_weights,
                              cfg.discrete_rewards, cfg.continuous_rewards)
    micro, adv_m = T.prepare_micro_batches(batch, rollout, rewards, cfg, reference)
    assert len(micro) == 2 and "adv_token/mean" in adv_m
    assert sum(m.token_weight for m in micro) == pytest.approx(1.0)
    old = T.OldLogProbs.empty(len(micro))
    # a later pass without the first pass's pi_old is an error, not a silent on-policy pass
    with pytest.raises(ValueError, match="old_token_logprobs"):
        T.make_loss_fn(batch, cfg, len(micro), old, on_policy=False)(policy, micro[0])
    loss_fn = T.make_loss_fn(batch, cfg, len(micro), old, on_policy=True)
    policy.train()
    for mb in micro:
        _, metrics = loss_fn(policy, mb)
        assert metrics["token/ratio/mean"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["token/clipfrac"] == 0.0
        # the reference is the same weights: every KL estimate is ~0
        assert abs(metrics["token/kl_ref"]) < 1e-6
        # the recorded pi_old is the teacher-forced recompute, which agrees with the
        # rollout's sampling-time log-probs (their gap is logged)
        tok_mask = mb.rollout.completion_mask > 0
        torch.testing.assert_close(old.token[mb.index][tok_mask],
                                   mb.rollout.token_logprobs[tok_mask], rtol=1e-4, atol=1e-4)
        assert metrics["rollout/token_logprob_gap"] < 1e-4
        if mb.pose_valid.any():
            assert metrics["pose/ratio/mean"] == pytest.approx(1.0, abs=1e-6)
            assert abs(metrics["pose/kl_ref"]) < 1e-6
            torch.testing.assert_close(old.pose[mb.index][mb.pose_valid],
                                       mb.rollout.pose_logprob[mb.pose_valid], rtol=1e-4, atol=1e-3)
    # pass 2 reads the recorded pi_old: same weights, so its ratios are 1 as well
    replay = T.make_loss_fn(batch, cfg, len(micro), old, on_policy=False)
    recorded = [t.clone() for t in old.token]
    for mb in micro:
        _, metrics = replay(policy, mb)
        assert metrics["token/ratio/mean"] == pytest.approx(1.0, abs=1e-6)
        assert "rollout/token_logprob_gap" not in metrics
    assert all(torch.equal(a, b) for a, b in zip(recorded, old.token))


def test_backbone_gets_the_summed_gradient(world, tmp_path):
    """grad(hygrpo) == grad(grpo) + grad(continuous) on the real policy, same micro-batch."""
    cfg = _cfg()
    policy, reference, sampler, ctx, engine = _setup(world, cfg, tmp_path)
    from poserft.rl.rollout import generate_group

    batch = sampler.sample(1, cfg.batch_size)
    rollout = generate_group(policy, batch, cfg.group_size, cfg.max_new_tokens, 1.0,
                             torch.Generator().manual_seed(1))
    n = len(rollout)
    gen = torch.Generator().manual_seed(3)
    valid = rollout.pose_valid.clone()
    assert valid.any()
    grads = {}
    for mode in ("hygrpo", "grpo", "continuous"):
        mb = T.MicroBatch(rollout=rollout, index=0, token_advantages=torch.randn(n, generator=gen),
                          pose_advantages=torch.randn(n, generator=gen) * valid, pose_valid=valid,
                          token_weight=1.0, pose_weight=1.0)
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(3)  # same advantages for every mode
        policy.zero_grad(set_to_none=True)
        loss, _ = T.make_loss_fn(batch, _cfg(mode=mode, beta_token=0.0, beta_pose=0.0), 1,
                                 T.OldLogProbs.empty(1), on_policy=True)(policy, mb)
        loss.backward()
        grads[mode] = {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                       for k, p in policy.named_parameters()}
    lm = [k for k in grads["hygrpo"] if "language_model" in k]
    head = [k for k in grads["hygrpo"] if k.startswith("pose_head")]
    assert lm and head
    for k in lm + head:
        torch.testing.assert_close(grads["hygrpo"][k], grads["grpo"][k] + grads["continuous"][k],
                                   rtol=1e-4, atol=1e-6)
    # the discrete branch never reaches the pose head; the continuous one reaches the backbone
    assert all(grads["grpo"][k].abs().sum() == 0 for k in head)
    assert any(grads["continuous"][k].abs().sum() > 0 for k in lm)


@pytest.mark.parametrize("mode", ["hygrpo", "grpo"])
def test_run_rft_end_to_end_and_resume(world, tmp_path, mode):
    from poserft.model.io import load_policy

    out = tmp_path / "rft"
    cfg = _cfg(mode=mode, steps=1)
    s1 = T.run_rft(cfg, world["sft"], world["reward"], world["splits"], out)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "rft_summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "rft_summary.json").read_text())
    assert summary == json.loads(json.dumps(s1))
    assert summary["optimizer_steps"] == cfg.mu
    for part in ("heldout_before", "heldout_after"):
        for key in ("image2pose/joint", "image2pose/joint_mean_pose", "image2pose/mpjpe_mm_mean_pose",
                    "text2pose/semantic", "text2pose/semantic_mean_pose"):
            assert np.isfinite(summary[part][key]), (part, key)
        for key in ("image2pose/pose_std", "text2pose/pose_std"):
            assert 0 < summary[part][key] < 1.0, (part, key)
    # paired before/after statistics over the same held-out prompts (eval_prompts=2 each)
    paired = summary["heldout_paired"]
    for key in ("image2pose/joint", "image2pose/joint_mean_pose", "text2pose/semantic",
                "text2pose/semantic_mean_pose"):
        assert paired[key]["n_prompts"] == 2, key
        assert np.isfinite(paired[key]["delta"]) and paired[key]["se"] >= 0, key
    last = summary["last_step"]
    assert np.isfinite(last["loss/total"])
    # precondition of the parameter checks below: the rollout had something to learn
    assert last["adv_token/std"] > 0 if mode == "grpo" else last["adv_pose/std"] > 0
    sft, rft = load_policy(world["sft"]), load_policy(out)
    sft_sd, rft_sd = sft.state_dict(), rft.state_dict()
    changed = {k for k in sft_sd if not torch.equal(sft_sd[k], rft_sd[k])}
    assert any("language_model" in k for k in changed)
    head_changed = any(k.startswith("pose_head") for k in changed)
    assert head_changed == (mode == "hygrpo")

    # resume: a longer run continues from the checkpoint, keeps the SFT-start measurement
    s2 = T.run_rft(_cfg(mode=mode, steps=2), world["sft"], world["reward"],
                   world["splits"], out)
    assert s2["optimizer_steps"] == 2 * cfg.mu
    assert s2["heldout_before"] == s1["heldout_before"]
    # the per-prompt SFT-start values survive the resume, so the pairing is still possible
    assert set(s2["heldout_paired"]) == set(s1["heldout_paired"])

    # a rerun after a config change (what Snakemake does when the rft section is edited)
    # must not continue these checkpoints: it starts from the SFT policy again
    s3 = T.run_rft(_cfg(mode=mode, steps=1, clip_eps_pose=0.25), world["sft"],
                   world["reward"], world["splits"], out)
    assert s3["optimizer_steps"] == cfg.mu
    assert s3["heldout_before"] == s1["heldout_before"]   # measured afresh on the SFT policy


_KILLED_RUN = """
import os, signal
import torch
from poserft.rl.config import RFTConfig
from poserft.rl.trainer import run_rft
torch.set_num_threads(1)


class KillAfterCheckpoint:
    # a tracker that SIGKILLs the process at an RL step after the step-2 checkpoint
    def log_metrics(self, m, step=None):
        if step == {kill_step} and any(k.startswith("rft/") for k in m):
            os.kill(os.getpid(), signal.SIGKILL)
    def log_params(self, p): ...
    def log_artifact(self, *a, **k): ...
    def set_tags(self, t): ...


cfg = RFTConfig.from_dict({cfg!r}, where="rft")
run_rft(cfg, {sft!r}, {reward!r}, {splits!r}, {out!r}, tracker=KillAfterCheckpoint())
"""


def test_rft_killed_after_a_checkpoint_resumes_and_ends_equal_to_an_uninterrupted_run(
        world, tmp_path, caplog):
    """SIGKILL (a real one, in a child process) after the RL-step-2 checkpoint; the rerun logs
    'resumed from step N', continues from there and ends bit-identical to a run never killed."""
    import logging
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    cfg = _cfg(steps=4, engine={"checkpoint_every": 2, "log_every": 1})
    splits = {k: str(v) for k, v in world["splits"].items()}
    full = T.run_rft(cfg, world["sft"], world["reward"], splits, tmp_path / "full" / "rft")

    out = tmp_path / "killed" / "rft"
    script = _KILLED_RUN.format(kill_step=3 * cfg.mu, cfg=cfg.to_dict(), sft=str(world["sft"]),
                                reward=str(world["reward"]), splits=splits, out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = sorted(p.name for p in (out.parent / "rft_checkpoints" / "checkpoints").iterdir())
    assert ckpts == [f"step_{2 * cfg.mu:08d}"] and not (out / "model.safetensors").exists()

    with caplog.at_level(logging.INFO, logger="poserft.train.engine"):
        resumed = T.run_rft(cfg, world["sft"], world["reward"], splits, out)
    assert f"resumed from step {2 * cfg.mu}" in caplog.text
    assert resumed["optimizer_steps"] == full["optimizer_steps"] == 4 * cfg.mu
    assert resumed["heldout_before"] == full["heldout_before"]
    assert resumed["heldout_after"] == full["heldout_after"]
    a = load_file(tmp_path / "full" / "rft" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rft_checkpoints_by_default():
    assert RFTConfig().engine.checkpoint_every > 0


def test_group_means_match_a_loop():
    rng = np.random.default_rng(0)
    n_groups, n = 5, 23
    group = torch.as_tensor(rng.integers(0, n_groups, n))
    values = torch.as_tensor(rng.normal(size=n), dtype=torch.float32)
    ok = torch.as_tensor(rng.random(n) < 0.6)
    ok[group == 3] = False                     # a group with no valid member -> NaN
    got = T._group_means(torch.where(ok, values, torch.tensor(float("nan"))), ok, group, n_groups)
    for g in range(n_groups):
        sel = [float(values[i]) for i in range(n) if int(group[i]) == g and bool(ok[i])]
        if sel:
            assert float(got[g]) == pytest.approx(sum(sel) / len(sel), rel=1e-6)
        else:
            assert np.isnan(float(got[g]))


def test_paired_deltas_match_scipy_paired_t_test():
    from scipy import stats

    rng = np.random.default_rng(1)
    before = rng.normal(size=40)
    after = before + 0.3 + 0.2 * rng.normal(size=40)   # large between-prompt spread, small shift
    before[3], after[7] = np.nan, np.nan                # prompts without a valid candidate
    got = T.paired_heldout_deltas({"a/r": before.tolist(), "b/r": [1.0]},
                                  {"a/r": after.tolist(), "c/r": [2.0]})
    assert set(got) == {"a/r"}                          # only keys measured both times
    keep = np.isfinite(before) & np.isfinite(after)
    ref = stats.ttest_rel(after[keep], before[keep])
    assert got["a/r"]["n_prompts"] == keep.sum() == 38
    assert got["a/r"]["delta"] == pytest.approx(np.mean(after[keep] - before[keep]), rel=1e-12)
    assert got["a/r"]["t"] == pytest.approx(ref.statistic, rel=1e-10)
    # pairing is what makes the shift visible: the unpaired SE is several times larger
    unpaired_se = np.sqrt(before[keep].var(ddof=1) / 38 + after[keep].var(ddof=1) / 38)
    assert got["a/r"]["se"] < unpaired_se / 3
    # mismatched lengths (a different eval_prompts) are not paired
    assert T.paired_heldout_deltas({"a/r": [1.0, 2.0]}, {"a/r": [1.0]}) == {}


def test_mode_needs_gaussian_head(world, tmp_path):
    from poserft.model.io import save_policy
    from poserft.model.testing import tiny_policy

    policy, _ = tiny_policy(tmp_path, head="deterministic")
    save_policy(policy, tmp_path / "det")
    with pytest.raises(ValueError, match="model.head=gaussian"):
        T.run_rft(_cfg(), tmp_path / "det", world["reward"], world["splits"], tmp_path / "o")


def test_out_dir_with_foreign_content_is_refused(world, tmp_path):
    run_dir = tmp_path / "seed0"
    (run_dir / "sft").mkdir(parents=True)
    with pytest.raises(ValueError, match="would delete"):
        T.run_rft(_cfg(), world["sft"], world["reward"], world["splits"], run_dir)
    assert (run_dir / "sft").is_dir()


def test_rft_text_targets_are_yaw_free_like_sft(world):
    """RFT's text->pose ground truth is in SFT's frame (root yaw removed), so a joint reward
    on text2pose prompts compares like with like; image targets keep the camera frame."""
    from poserft.body.rotations import rot6d_to_matrix
    from poserft.model.io import load_policy
    from poserft.retrieval.features import yaw_angle
    from poserft.rl.rollout import PromptSampler
    from poserft.train.data import SFTTaskData

    policy = load_policy(world["sft"])
    mix = {"image2pose": 1.0, "text2pose": 1.0}
    data = T.rft_task_data(world["splits"]["train"], policy.config, mix, seed=0)
    sft = SFTTaskData(world["splits"]["train"], policy.config, mix, 0, text2pose_remove_yaw=True)
    torch.testing.assert_close(data.task_targets("text2pose"), sft.task_targets("text2pose"))
    raw = SFTTaskData(world["splits"]["train"], policy.config, mix, 0)
    assert yaw_angle(rot6d_to_matrix(raw.task_targets("text2pose")[:, :6])).abs().max() > 0.05
    batch = PromptSampler(data, mix, seed=0).sample(0, 16)
    text_rows = [i for i, t in enumerate(batch.tasks) if t == "text2pose"]
    assert text_rows
    yaw = yaw_angle(rot6d_to_matrix(batch.gt_poses[text_rows, :6]))
    assert yaw.abs().max() < 1e-5
    torch.testing.assert_close(data.task_targets("image2pose"), raw.task_targets("image2pose"))


def test_prompt_sampler_is_deterministic_and_checks_the_mix(world, tmp_path):
    from poserft.data.h5io import SplitReader, write_split
    from poserft.model.io import load_policy
    from poserft.rl.rollout import PromptSampler, generate_group, reward_inputs
    from poserft.train.data import SFTTaskData

    policy = load_policy(world["sft"])
    mix = {"image2pose": 1.0, "text2pose": 3.0}
    sampler = PromptSampler(SFTTaskData(world["splits"]["train"], policy.config, mix), mix, seed=5)
    assert sampler.items(3, 6) == sampler.items(3, 6) != sampler.items(4, 6)
    batch = sampler.sample(3, 6)
    for task, cap, prompt in zip(batch.tasks, batch.captions, batch.prompts):
        assert (cap is not None) == (task == "text2pose")
        assert ("<image>" in prompt) == (task == "image2pose")
        if cap is not None:
            assert cap in prompt
    # candidates inherit their prompt's data; mode grpo scores the head mean
    rollout = generate_group(policy, batch, 3, 12, 1.0, torch.Generator().manual_seed(0))
    inp = reward_inputs(batch, rollout, "mean")
    assert inp.tasks == [t for t in batch.tasks for _ in range(3)]
    torch.testing.assert_close(inp.poses, rollout.pose_mean)
    torch.testing.assert_close(inp.gt_poses, batch.gt_poses.repeat_interleave(3, 0))
    torch.testing.assert_close(reward_inputs(batch, rollout).poses, rollout.pose_sample)

    # a split without images cannot serve image2pose prompts: a clear error, not a silent drop
    with SplitReader(world["splits"]["train"]) as r:
        arrays = {k: r.read(k) for k in ("poses/global_orient", "poses/body_pose", "poses/betas",
                                         "joints", "captions/text", "captions/pose_index")}
    arrays["captions/text"] = [str(t) for t in arrays["captions/text"]]
    no_img = write_split(tmp_path / "noimg.h5", arrays, {"source": "unit", "split": "train",
                                                         "body_model": "skeleton",
                                                         "converter_params": {}})
    with pytest.raises(ValueError, match="image2pose"):
        PromptSampler(SFTTaskData(no_img, policy.config, mix), mix)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_run_rft_on_two_ranks(world, tmp_path, backend):
    """2 gloo ranks through launch_local (torchrun). Before the fixes, DDP failed with
    'marked ready twice' (the pose distribution in the model output hid its tensors) and
    ZeRO-2 with a gloo collective size mismatch (ranks produced gradients for different
    parameters)."""
    from poserft.model.io import load_policy
    from poserft.rl.trainer import run_rft
    from poserft.train.launch import launch_local

    out = tmp_path / "rft"
    cfg = _cfg(steps=2, engine={"checkpoint_every": 0, "log_every": 1, "backend": backend,
                                "device": "cpu", "precision": "fp32"})
    kwargs = dict(rft_cfg=cfg, sft_dir=str(world["sft"]),
                  reward_model_dir=str(world["reward"]),
                  split_paths={k: str(v) for k, v in world["splits"].items()}, out_dir=str(out),
                  checkpoint_dir=str(tmp_path / "ckpt"))
    summary = launch_local(run_rft, kwargs, 2)
    assert summary["optimizer_steps"] == 2 * cfg.mu
    # rft.batch_size is global: 2 prompts per step, one per rank (the blocks of the step's
    # one-rank draw, test_prompt_share_of_each_rank_is_a_block_of_the_global_draw)
    assert (summary["world_size"], summary["prompts_per_step"], summary["prompts_per_rank"]) \
        == (2, cfg.batch_size, cfg.batch_size // 2)
    assert summary["last_step"]["rollout/prompts"] == cfg.batch_size // 2
    sft_sd, rft_sd = load_policy(world["sft"]).state_dict(), load_policy(out).state_dict()
    assert any(not torch.equal(sft_sd[k], rft_sd[k]) for k in sft_sd)


# --------------------------------------------------------------------------- issue #14

def test_reference_without_lora_is_a_frozen_copy_on_the_engine_device(world, tmp_path):
    """rft.reference_device auto: each rank's own training device, frozen, a separate copy
    equal to the SFT policy; it follows the dtypes the engine trains the policy in."""
    cfg = _cfg(eval_prompts=0)
    assert RFTConfig().reference_device == "auto"
    run = T.setup_rft(cfg, world["sft"], world["reward"], world["splits"], tmp_path / "rft")
    ref, policy = run.reference, run.engine.module
    assert isinstance(ref, T.Reference) and not ref.shares_policy
    assert ref.device == run.engine.device
    assert ref.model is not policy and not ref.model.training
    assert not any(p.requires_grad for p in ref.model.parameters())
    assert any(p.requires_grad for p in policy.parameters())
    pol_sd = policy.state_dict()
    for k, v in ref.model.state_dict().items():
        assert v.data_ptr() != pol_sd[k].data_ptr() and torch.equal(v, pol_sd[k]), k

    # a policy the engine converted (DeepSpeed bf16): the copy taken before takes its dtypes
    class _Engine:
        device = torch.device("cpu")
        autocast = staticmethod(contextlib.nullcontext)
    trained = copy.deepcopy(policy).to(torch.bfloat16)
    ref = T.build_reference(cfg, trained, _Engine(), copy.deepcopy(policy))
    assert {p.dtype for p in ref.model.parameters()} == {torch.bfloat16}
    # an explicit device puts the copy there; no KL term, no reference
    assert T.build_reference(_cfg(reference_device="cpu"), policy, _Engine()).device.type == "cpu"
    assert T.build_reference(_cfg(beta_token=0.0, beta_pose=0.0), policy, _Engine()) is None


def _lora_stub(policy, record):
    """``policy`` as a stand-in for a LoRA policy: ``has_lora`` True, a counting
    ``adapters_disabled()`` context, a deep copy is an error, and every ``score`` call from
    outside the training forward (i.e. the reference's) records whether adapters were off."""
    base = type(policy)

    @contextlib.contextmanager
    def adapters_disabled(self):
        record["entered"] += 1
        record["inside"] = True
        try:
            yield
        finally:
            record["inside"] = False

    def score(self, *args, **kwargs):
        record["scores"].append(record["inside"])
        return base.score(self, *args, **kwargs)

    def deepcopy(self, memo):
        raise AssertionError("the LoRA policy was deep-copied")

    policy.__class__ = type("LoraStub", (base,), {
        "has_lora": property(lambda self: True), "adapters_disabled": adapters_disabled,
        "score": score, "__deepcopy__": deepcopy})
    return policy


def test_reference_under_lora_is_the_policy_with_adapters_disabled(world, tmp_path, monkeypatch):
    import poserft.model.io as io

    record = {"entered": 0, "inside": False, "scores": []}
    real_load = io.load_policy
    monkeypatch.setattr(io, "load_policy",
                        lambda path, *a, **k: _lora_stub(real_load(path, *a, **k), record))
    cfg = _cfg(steps=1, mu=1, eval_prompts=0, reference_device="cpu")
    run = T.setup_rft(cfg, world["sft"], world["reward"], world["splits"], tmp_path / "rft")
    assert run.reference.shares_policy and run.reference.model is run.engine.module
    last = T.train_rft(run)
    n_micro = cfg.batch_size * cfg.group_size // cfg.micro_batch_size
    # one reference forward per micro-batch, each inside adapters_disabled()
    assert record["entered"] == n_micro and record["scores"] == [True] * n_micro
    assert not record["inside"] and run.engine.module.training
    # the stub's "disabled adapters" change nothing: pi_ref == pi_theta on the first pass
    assert abs(last["token/kl_ref"]) < 1e-5


def test_lora_reference_keeps_the_sft_values_outside_the_llm(world):
    """adapters_disabled() only switches the LLM's adapters off; the trainable parameters
    outside the LLM (projections, pose head) are snapshotted when the reference is built
    and swapped in while it scores, then the trained values are put back."""
    from poserft.model.io import load_policy
    from poserft.rl.rollout import PromptSampler, generate_group
    from poserft.train.data import SFTTaskData

    record = {"entered": 0, "inside": False, "scores": []}
    sft = load_policy(world["sft"])
    policy = _lora_stub(load_policy(world["sft"]), record)
    ref = T.Reference.adapters_off(policy)
    names = {n for n, p in policy.named_parameters()
             if any(p is q for q, _ in ref._snapshot)}
    assert names and not any(n.startswith("backbone.model.language_model") for n in names)
    assert any(n.startswith("pose_head") for n in names)
    with torch.no_grad():                     # "training" moves the pose head and projections
        for n, p in policy.named_parameters():
            if n in names:
                p.add_(0.1 * torch.randn_like(p))
    trained = {n: p.detach().clone() for n, p in policy.named_parameters()}
    mix = {"image2pose": 1.0, "text2pose": 1.0}
    batch = PromptSampler(SFTTaskData(world["splits"]["train"], sft.config, mix), mix).sample(0, 2)
    roll = generate_group(sft, batch, 3, 12, 1.0, torch.Generator().manual_seed(0))
    policy.train()
    got = ref.score(batch.prompts, batch.images, roll)
    with torch.no_grad():
        want = sft.score(batch.prompts, batch.images, roll)
    torch.testing.assert_close(got.token_logprobs, want.token_logprobs)
    torch.testing.assert_close(got.pose_dist.mean, want.pose_dist.mean)
    torch.testing.assert_close(got.pose_dist.std, want.pose_dist.std)
    assert record["scores"] == [True] and policy.training
    assert all(torch.equal(p, trained[n]) for n, p in policy.named_parameters())


def test_reference_of_a_real_lora_policy_is_the_sft_policy(world, tmp_path, monkeypatch):
    """With peft LoRA (fresh adapters on the SFT policy, as load_policy puts them), setup_rft
    copies nothing and, after RL updates, the reference still scores as the SFT policy."""
    import inspect
    import types

    import poserft.model.io as io
    if "lora" not in inspect.signature(io.load_policy).parameters:
        pytest.skip("load_policy has no LoRA support yet")
    real_load = io.load_policy
    monkeypatch.setattr(io, "load_policy", lambda path, *a, **k: real_load(path, lora=True))

    def no_copy(*a, **k):
        raise AssertionError("the LoRA policy was deep-copied")
    monkeypatch.setattr(T, "copy", types.SimpleNamespace(deepcopy=no_copy))
    cfg = _cfg(steps=1, eval_prompts=0)
    run = T.setup_rft(cfg, world["sft"], world["reward"], world["splits"], tmp_path / "rft")
    assert run.engine.module.has_lora and run.reference.shares_policy
    before = {n: p.detach().clone() for n, p in run.engine.module.named_parameters()}
    last = T.train_rft(run)
    assert np.isfinite(last["loss/total"])
    moved = [n for n, p in run.engine.module.named_parameters() if not torch.equal(p, before[n])]
    assert any("lora_" in n for n in moved) and any(n.startswith("pose_head") for n in moved)

    sft = real_load(world["sft"])
    batch = run.sampler.sample(5, 2)
    roll = _rollout(sft, batch)
    got = run.reference.score(batch.prompts, batch.images, roll)
    with torch.no_grad():
        want = sft.score(batch.prompts, batch.images, roll)
    torch.testing.assert_close(got.token_logprobs, want.token_logprobs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pose_dist.mean, want.pose_dist.mean, rtol=1e-4, atol=1e-5)


def _rollout(policy, batch):
    from poserft.rl.rollout import generate_group
    return generate_group(policy, batch, 3, 12, 1.0, torch.Generator().manual_seed(0))


def test_prompt_share_of_each_rank_is_a_block_of_the_global_draw(world):
    from poserft.model.io import load_policy
    from poserft.rl.rollout import PromptSampler
    from poserft.train.data import SFTTaskData

    policy = load_policy(world["sft"])
    mix = {"image2pose": 1.0, "text2pose": 1.0}
    sampler = PromptSampler(SFTTaskData(world["splits"]["train"], policy.config, mix), mix, seed=3)
    for step in range(4):
        one = sampler.rank_items(step, 8)
        assert one == sampler.items(step, 8)
        for world_size in (2, 4, 8):
            shares = [sampler.rank_items(step, 8, r, world_size) for r in range(world_size)]
            assert all(len(s) == 8 // world_size for s in shares)
            assert [it for s in shares for it in s] == one
        b = sampler.sample(step, 8, 1, 2)
        assert b.prompts == sampler.batch(one[4:]).prompts
    with pytest.raises(ValueError, match="multiple"):
        sampler.rank_items(0, 3, 0, 2)


def test_batch_size_is_global_and_must_split_over_the_ranks(world, tmp_path, monkeypatch):
    from poserft.configbase import ConfigError

    cfg = _cfg(batch_size=4, group_size=4, micro_batch_size=8)
    assert cfg.prompts_per_rank(1) == 4 and cfg.prompts_per_rank(2) == 2
    with pytest.raises(ConfigError) as e:
        cfg.prompts_per_rank(3)
    msg = str(e.value)
    assert "rft.batch_size=4" in msg and "3 ranks" in msg and "multiple of 3" in msg
    # the micro-batch must divide each rank's rollout: 4 / 4 ranks * 4 = 4 candidates
    with pytest.raises(ConfigError, match=r"rft.micro_batch_size \(8\).*= 4 candidates"):
        cfg.prompts_per_rank(4)
    # setup_rft fails with that message before loading anything (2 ranks from the env)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="rft.batch_size=3 .* 2 ranks"):
        T.setup_rft(_cfg(batch_size=3, group_size=4, micro_batch_size=4), tmp_path / "nope",
                    None, {"train": tmp_path / "nope.h5"}, tmp_path / "rft")


def test_chunked_rollout(world):
    """rft.rollout_chunk_size: one call when the chunk covers the batch (identical rollout);
    smaller chunks give the same greedy rollout up to float rounding and a sampled rollout
    that is a valid, reproducible draw of the same policy (its teacher-forced log-probs are
    its sampling-time ones)."""
    from poserft.model.io import load_policy
    from poserft.rl.rollout import PromptSampler, generate_group
    from poserft.train.data import SFTTaskData

    policy = load_policy(world["sft"])
    mix = {"image2pose": 1.0, "text2pose": 1.0}
    sampler = PromptSampler(SFTTaskData(world["splits"]["train"], policy.config, mix), mix, seed=1)
    batch = sampler.sample(0, 5)
    assert len(set(batch.tasks)) == 2

    def roll(chunk, sample=True, seed=0):
        return generate_group(policy, batch, 4, 12, 1.0, torch.Generator().manual_seed(seed),
                              do_sample=sample, chunk_size=chunk)

    def same(a, b, exact):
        assert a.texts == b.texts
        for f in ("prompt_index", "completion_ids", "completion_mask", "pose_valid",
                  "pose_token_pos"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        for f in ("token_logprobs", "pose_mean", "pose_sample", "pose_logprob", "pose_std"):
            if exact:
                assert torch.equal(getattr(a, f), getattr(b, f)), f
            else:
                torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-4, atol=1e-4)

    full = roll(0)
    same(roll(5), full, exact=True)
    same(roll(16), full, exact=True)
    same(roll(2, sample=False), roll(0, sample=False), exact=False)
    same(roll(1, sample=False), roll(0, sample=False), exact=False)
    chunked = roll(2)
    same(roll(2), chunked, exact=True)                 # reproducible for a seed
    assert chunked.prompt_index.tolist() == full.prompt_index.tolist()
    assert chunked.texts != full.texts                 # other draws (not bit-identical)
    with torch.no_grad():
        sc = policy.score(batch.prompts, batch.images, chunked)
    m = chunked.completion_mask > 0
    torch.testing.assert_close(sc.token_logprobs[m], chunked.token_logprobs[m], rtol=1e-4, atol=1e-4)
    assert torch.equal(sc.token_logprobs[~m], torch.zeros_like(sc.token_logprobs[~m]))
    v = chunked.pose_valid
    assert v.any()
    torch.testing.assert_close(sc.pose_dist.log_prob(chunked.pose_sample)[v],
                               chunked.pose_logprob[v], rtol=1e-4, atol=1e-3)


def test_rft_step_with_rollout_chunks(world, tmp_path):
    cfg = _cfg(rollout_chunk_size=1)
    policy, reference, sampler, ctx, engine = _setup(world, cfg, tmp_path)
    m = T.rft_step(engine, sampler, 0, ctx, cfg, reference)
    assert m["rollout/prompts"] == cfg.batch_size and np.isfinite(m["loss/total"])


@pytest.mark.slow
def test_two_ranks_refuse_a_batch_that_does_not_split(world, tmp_path):
    from poserft.rl.trainer import run_rft
    from poserft.train.launch import LaunchError, launch_local

    cfg = _cfg(batch_size=3, micro_batch_size=4,
               engine={"device": "cpu", "precision": "fp32", "checkpoint_every": 0})
    kwargs = dict(rft_cfg=cfg, sft_dir=str(world["sft"]), reward_model_dir=str(world["reward"]),
                  split_paths={k: str(v) for k, v in world["splits"].items()},
                  out_dir=str(tmp_path / "rft"), checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(LaunchError) as e:
        launch_local(run_rft, kwargs, 2)
    assert "rft.batch_size=3" in str(e.value) and "2 ranks" in str(e.value)
    assert not (tmp_path / "rft").exists()


@pytest.mark.parametrize("learn_std", [True, False])
def test_learn_pose_std_false_leaves_the_std_output_alone(world, tmp_path, learn_std):
    """rft.learn_pose_std: false -> the continuous loss's gradient reaches the head's mean
    output, never its log-std output (true: both)."""
    cfg = _cfg(mode="hygrpo", learn_pose_std=learn_std, beta_token=0.0)
    policy, reference, sampler, ctx, engine = _setup(world, cfg, tmp_path)
    from poserft.rl.rewards import compute_rewards
    from poserft.rl.rollout import generate_group, reward_inputs

    batch = sampler.sample(0, cfg.batch_size)
    rollout = generate_group(policy, batch, cfg.group_size, cfg.max_new_tokens, 1.0,
                             torch.Generator().manual_seed(0))
    assert bool(rollout.pose_valid.any())
    rewards = compute_rewards(reward_inputs(batch, rollout), ctx, cfg.reward_weights,
                              cfg.discrete_rewards, cfg.continuous_rewards)
    micro, _ = T.prepare_micro_batches(batch, rollout, rewards, cfg, reference)
    loss_fn = T.make_loss_fn(batch, cfg, len(micro), T.OldLogProbs.empty(len(micro)), on_policy=True)
    policy.train()
    policy.zero_grad()
    for mb in micro:
        loss, _ = loss_fn(policy, mb)
        loss.backward()
    head = policy.pose_head
    std_grad = head.log_std_out.weight.grad
    assert head.mean_out.weight.grad.abs().sum() > 0
    assert (std_grad is not None and std_grad.abs().sum() > 0) == learn_std


def test_pose_gradient_diagnostic_runs_on_a_saved_policy(world, capsys):
    """`python -m poserft.rl.diagnostics` at the SFT policy: both pose tasks, both rewards,
    finite cosines in [-1, 1] for iid and mirrored groups."""
    from poserft.rl.diagnostics import main

    assert main(["--policy", str(world["sft"] / "final"), "--split", str(world["splits"]["val"]),
                 "--reward-model", str(world["reward"]), "--prompts", "2", "--group-sizes", "4,8",
                 "--trials", "3", "--reference-pairs", "64", "--antithetic"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {f"{t}/G{g}{a}" for t in ("image2pose/joint", "text2pose/semantic")
                           for g in (4, 8) for a in ("", "/antithetic")}
    for row in report.values():
        assert row["prompts"] >= 1 and row["std_mean"] > 0
        assert -1.0 <= row["cos_raw"] <= 1.0 and 0.0 <= row["odd_share"] <= 1.0
    # --compare against itself: nothing moved
    assert main(["--policy", str(world["sft"] / "final"), "--split", str(world["splits"]["val"]),
                 "--compare", str(world["sft"] / "final"), "--prompts", "2",
                 "--reference-pairs", "64"]) == 0
    shift = json.loads(capsys.readouterr().out)
    assert set(shift) == {"image2pose/joint/shift"}
    assert shift["image2pose/joint/shift"]["shift_rms_std"] == 0.0
    assert shift["image2pose/joint/shift"]["reward_after"] == pytest.approx(
        shift["image2pose/joint/shift"]["reward_before"])
