"""HyGRPO math against independent references (loops, closed forms, torch.distributions)."""

import math

import numpy as np
import pytest
import torch

from poserft.rl import core
from poserft.rl.config import RFT_MODES
from poserft.rl.core import HyGRPOParams, hygrpo_loss


# ----------------------------------------------------------------- independent references

def loop_grpo_advantages(rewards, groups, eps):
    """GRPO advantages with python loops: (r - mean) / (stdev + eps); constant group -> 0."""
    out = [0.0] * len(rewards)
    for g in set(groups):
        members = [i for i, gi in enumerate(groups) if gi == g]
        vals = [rewards[i] for i in members]
        if len(vals) < 2 or max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i in members:
            out[i] = (rewards[i] - mean) / (std + eps)
    return out


def loop_grpo_loss(logp, old, ref, mask, adv, eps_clip, beta):
    """DeepSeekMath GRPO objective (to minimise), one token at a time:
    1/G sum_i 1/|o_i| sum_t [ -min(r A, clip(r) A) + beta * (pi_ref/pi - log(pi_ref/pi) - 1) ]."""
    per_seq = []
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            r = torch.exp(logp[i, t] - old[i, t])
            a = adv[i]
            surrogate = torch.minimum(r * a, torch.clamp(r, 1 - eps_clip, 1 + eps_clip) * a)
            q = torch.exp(ref[i, t] - logp[i, t])
            kl = q - (ref[i, t] - logp[i, t]) - 1
            terms.append(-surrogate + beta * kl)
        if terms:
            per_seq.append(sum(terms) / len(terms))
    return sum(per_seq) / len(per_seq)


def random_batch(seed, B=3, G=4, T=6):
    gen = torch.Generator().manual_seed(seed)
    N = B * G
    groups = torch.arange(B).repeat_interleave(G)
    lengths = torch.randint(1, T + 1, (N,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(N, T, generator=gen) * 3
    logp = (old + 0.4 * torch.randn(N, T, generator=gen)).requires_grad_(True)
    ref = old + 0.3 * torch.randn(N, T, generator=gen)
    rewards = torch.rand(N, generator=gen)
    rewards[:G] = 0.7  # one zero-variance group
    return groups, mask, old, logp, ref, rewards


# ----------------------------------------------------------------- tests

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discrete_only_equals_plain_grpo(seed):
    groups, mask, old, logp, ref, rewards = random_batch(seed)
    eps_adv, eps_clip, beta = 1e-6, 0.2, 0.05
    adv, _ = core.grpo_advantage(rewards.double(), groups, eps=eps_adv)
    ref_adv = loop_grpo_advantages(rewards.double().tolist(), groups.tolist(), eps_adv)
    assert adv.tolist() == pytest.approx(ref_adv, abs=1e-12)

    params = HyGRPOParams(mode="grpo", clip_eps_token=eps_clip, beta_token=beta,
                          loss_agg_mode="seq-mean-token-mean", dual_clip_c=None)
    loss, metrics = hygrpo_loss(params=params, token_logprobs=logp, old_token_logprobs=old,
                                ref_token_logprobs=ref, completion_mask=mask,
                                token_advantages=adv.float())
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_(True)
    expected = loop_grpo_loss(logp2, old, ref, mask, ref_adv, eps_clip, beta)
    (grad_ref,) = torch.autograd.grad(expected, logp2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)
    assert 0.0 <= metrics["token/clipfrac"] <= 1.0
    assert "pose/pg_loss" not in metrics


def test_hygrpo_discrete_part_matches_grpo_and_modes_add_up():
    """hygrpo = grpo-mode loss + continuous-mode loss (the backbone gets the summed gradient)."""
    groups, mask, old, logp, ref, rewards = random_batch(5)
    adv, _ = core.grpo_advantage(rewards, groups)
    gen = torch.Generator().manual_seed(1)
    N = logp.shape[0]
    plp = torch.randn(N, generator=gen, requires_grad=True)
    pold = plp.detach() + 0.1 * torch.randn(N, generator=gen)
    valid = torch.rand(N, generator=gen) > 0.3
    padv, _ = core.grpo_advantage(torch.rand(N, generator=gen), groups, valid)
    pkl = torch.rand(N, generator=gen)
    common = dict(token_logprobs=logp, old_token_logprobs=old, ref_token_logprobs=ref,
                  completion_mask=mask, token_advantages=adv, pose_logprob=plp,
                  old_pose_logprob=pold, pose_kl_to_ref=pkl, pose_valid=valid,
                  pose_advantages=padv)
    losses = {m: hygrpo_loss(params=HyGRPOParams(mode=m), **common)[0] for m in RFT_MODES}
    assert losses["hygrpo"].item() == pytest.approx(losses["grpo"].item() + losses["continuous"].item(),
                                                    rel=1e-6)


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", lambda l, m: (l * m).sum() / m.sum()),
    ("seq-mean-token-sum", lambda l, m: sum((l[i] * m[i]).sum() for i in range(len(l))
                                            if m[i].any()) / int(m.any(-1).sum())),
    ("seq-mean-token-sum-norm", lambda l, m: (l * m).sum() / (l.shape[0] * l.shape[1])),
])
def test_loss_aggregation_modes(mode, expected):
    gen = torch.Generator().manual_seed(3)
    loss = torch.randn(5, 4, generator=gen)
    mask = torch.rand(5, 4, generator=gen) > 0.4
    mask[2] = False  # an empty completion
    got = core.aggregate_loss(loss, mask, mode)
    assert got.item() == pytest.approx(float(expected(loss, mask.float())), rel=1e-6)


def test_gaussian_clipped_gradient_matches_closed_form():
    """d/d(mu, log s) of -1/V sum_valid min(r D, clip(r) D) for a diagonal Gaussian:
    unclipped (A>0 & r<=1+eps, or A<0 & r>=1-eps): -A r (x-mu)/s^2 and -A r ((x-mu)^2/s^2 - 1),
    clipped: 0."""
    gen = torch.Generator().manual_seed(7)
    N, D, eps = 16, 3, 0.2
    mu = torch.randn(N, D, generator=gen, dtype=torch.float64).requires_grad_(True)
    log_s = (0.3 * torch.randn(N, D, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mu_old = mu.detach() + 0.25 * torch.randn(N, D, generator=gen, dtype=torch.float64)
    s_old = log_s.detach().exp()
    x = mu_old + s_old * torch.randn(N, D, generator=gen, dtype=torch.float64)
    adv = torch.randn(N, generator=gen, dtype=torch.float64)
    valid = torch.ones(N, dtype=torch.bool)
    valid[[3, 11]] = False

    new = torch.distributions.Independent(torch.distributions.Normal(mu, log_s.exp()), 1)
    old = torch.distributions.Independent(torch.distributions.Normal(mu_old, s_old), 1)
    loss, metrics = hygrpo_loss(
        params=HyGRPOParams(mode="continuous", clip_eps_pose=eps, beta_pose=0.0, dual_clip_c=None),
        pose_logprob=new.log_prob(x), old_pose_logprob=old.log_prob(x),
        pose_valid=valid, pose_advantages=adv)
    g_mu, g_ls = torch.autograd.grad(loss, (mu, log_s))

    with torch.no_grad():
        s = log_s.exp()
        logp = (-(x - mu) ** 2 / (2 * s ** 2) - log_s - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp_old = (-(x - mu_old) ** 2 / (2 * s_old ** 2) - s_old.log()
                    - 0.5 * math.log(2 * math.pi)).sum(-1)
        r = torch.exp(logp - logp_old)
        active = ((adv > 0) & (r <= 1 + eps)) | ((adv < 0) & (r >= 1 - eps))
        V = valid.sum()
        coef = torch.where(active & valid, -adv * r / V, torch.zeros_like(r))[:, None]
        mu_closed = coef * (x - mu) / s ** 2
        ls_closed = coef * ((x - mu) ** 2 / s ** 2 - 1)
    # the sample must exercise both branches, or the comparison proves little
    assert bool((active & valid).any()) and bool((~active & valid).any())
    torch.testing.assert_close(g_mu, mu_closed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ls, ls_closed, rtol=1e-10, atol=1e-12)
    assert metrics["pose/clipfrac"] == pytest.approx(float((~active & valid).sum() / V))


def test_zero_variance_groups_give_zero_advantage_and_no_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0,   0.2, 0.9, 0.4,   5.0, float("nan"), 7.0,
                            3.0, float("nan"), float("nan")])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    valid = ~torch.isnan(rewards)
    for name in core.ADVANTAGE_ESTIMATORS:
        adv, metrics = core.ADVANTAGE_ESTIMATORS.get(name)(rewards, groups, valid)
        assert torch.isfinite(adv).all(), name
        assert adv[:3].tolist() == [0.0, 0.0, 0.0], name           # identical rewards
        assert adv[9:].tolist() == [0.0, 0.0, 0.0], name           # one valid member only
        assert adv[7].item() == 0.0, name                           # invalid member
        assert adv[6].item() < 0 < adv[8].item(), name
        assert adv[3:6].sum().abs().item() < 1e-6, name            # centred
        assert metrics["adv/zero_var_group_frac"] == pytest.approx(0.5)
    # std-normalised advantages of a valid 2-member group are -+1/sqrt(2) (Bessel std)
    adv, _ = core.grpo_advantage(rewards, groups, valid, eps=0.0)
    assert adv[6].item() == pytest.approx(-1 / math.sqrt(2))
    # a whole group of identical numbers whose float mean is off by an ulp stays exactly 0
    x = torch.full((7,), 0.1) * 3
    adv, _ = core.grpo_advantage(x, torch.zeros(7, dtype=torch.long), eps=1e-12)
    assert adv.abs().max().item() == 0.0


def test_non_finite_valid_reward_is_an_error():
    with pytest.raises(ValueError, match="finite"):
        core.grpo_advantage(torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]))


def test_k3_is_nonnegative_and_unbiased():
    gen = torch.Generator().manual_seed(0)
    # elementwise non-negativity on arbitrary log-prob pairs
    a, b = torch.randn(1000, generator=gen) * 5, torch.randn(1000, generator=gen) * 5
    assert (core.kl_k3(a, b) >= 0).all()
    # categorical: the exact expectation of k3 and k1 under p is KL(p||q)
    p = torch.softmax(torch.randn(7, generator=gen), 0)
    q = torch.softmax(torch.randn(7, generator=gen), 0)
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(p),
                                           torch.distributions.Categorical(q))
    for est in ("k1", "k3"):
        exp_est = (p * core.TOKEN_KL_ESTIMATORS.get(est)(p.log(), q.log())).sum()
        assert exp_est.item() == pytest.approx(kl.item(), rel=1e-5)
    # Gaussian: Monte Carlo mean of k3 within 4 standard errors of the analytic KL
    torch.manual_seed(0)
    D = 4
    mp, sp = torch.randn(D, generator=gen, dtype=torch.float64), torch.rand(D, generator=gen, dtype=torch.float64) + 0.5
    mq, sq = mp + 0.3 * torch.randn(D, generator=gen, dtype=torch.float64), sp * 1.2
    P = torch.distributions.Independent(torch.distributions.Normal(mp, sp), 1)
    Q = torch.distributions.Independent(torch.distributions.Normal(mq, sq), 1)
    x = P.sample((200_000,))
    k3 = core.pose_kl("k3", P, Q, x)
    true = torch.distributions.kl_divergence(P, Q).item()
    se = k3.std().item() / math.sqrt(len(k3))
    assert abs(k3.mean().item() - true) < 4 * se
    assert se < 0.05 * true  # the tolerance is meaningful
    assert core.diag_gaussian_kl(mp, sp, mq, sq).item() == pytest.approx(true, rel=1e-10)
    from poserft.model.heads import PoseGaussian   # the policy's pose distribution
    analytic = core.pose_kl("analytic", PoseGaussian(mp[None], sp[None], None),
                            PoseGaussian(mq[None], sq[None], None), x[:1])
    assert analytic.item() == pytest.approx(true, rel=1e-10)


def test_no_valid_pose_gives_zero_but_differentiable_continuous_term():
    lp = torch.randn(4, requires_grad=True)
    loss, metrics = hygrpo_loss(params=HyGRPOParams(mode="continuous"),
                                pose_logprob=lp, old_pose_logprob=lp.detach(),
                                pose_kl_to_ref=torch.full((4,), float("nan")),
                                pose_valid=torch.zeros(4, dtype=torch.bool),
                                pose_advantages=torch.zeros(4))
    loss.backward()
    assert loss.item() == 0.0 and lp.grad.abs().sum().item() == 0.0
    assert metrics["pose/valid_frac"] == 0.0


def test_clear_errors():
    with pytest.raises(KeyError, match="known"):
        core.aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "seq-mean")
    with pytest.raises(ValueError, match="needs pose_logprob"):
        hygrpo_loss(params=HyGRPOParams(mode="continuous"))
    with pytest.raises(ValueError, match="mode"):
        hygrpo_loss(params=HyGRPOParams(mode="ppo"))


@pytest.mark.parametrize("agg", sorted(core.LOSS_AGG_MODES))
def test_weighted_micro_batches_sum_to_the_full_batch_loss(agg):
    groups, mask, old, logp, ref, rewards = random_batch(11, B=4, G=3, T=5)
    mask[4] = False  # an empty completion in one micro-batch
    N = logp.shape[0]
    gen = torch.Generator().manual_seed(2)
    adv, _ = core.grpo_advantage(rewards, groups)
    plp = torch.randn(N, generator=gen, requires_grad=True)
    pold = plp.detach() + 0.2 * torch.randn(N, generator=gen)
    valid = torch.rand(N, generator=gen) > 0.4
    padv, _ = core.grpo_advantage(torch.rand(N, generator=gen), groups, valid)
    pkl = torch.rand(N, generator=gen)
    params = HyGRPOParams(mode="hygrpo", loss_agg_mode=agg)

    def loss_of(rows, **w):
        return hygrpo_loss(params=params, token_logprobs=logp[rows], old_token_logprobs=old[rows],
                           ref_token_logprobs=ref[rows], completion_mask=mask[rows],
                           token_advantages=adv[rows], pose_logprob=plp[rows],
                           old_pose_logprob=pold[rows], pose_kl_to_ref=pkl[rows],
                           pose_valid=valid[rows], pose_advantages=padv[rows], **w)[0]

    full = loss_of(torch.arange(N))
    total = 0.0
    for rows in torch.arange(N).split(5):  # uneven: 5, 5, 2
        wt, wp = core.micro_batch_weights(mask[rows], mask, valid[rows], valid, agg)
        total = total + loss_of(rows, token_weight=wt, pose_weight=wp)
    assert total.item() == pytest.approx(full.item(), rel=1e-5)
    g_full = torch.autograd.grad(full, (logp, plp))
    g_acc = torch.autograd.grad(total, (logp, plp))
    for a, b in zip(g_full, g_acc):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------- k3 cap, dual clip, 1/V per group

def test_k3_log_ratio_is_clamped_to_10_and_unchanged_inside():
    logp = torch.tensor([0.0, 0.0, 0.0, 0.0, -3.0, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([1e4, -1e4, 50.0, -50.0, -1.0, -4.0, -5.0], dtype=torch.float64)
    k3 = core.kl_k3(logp, ref)
    assert torch.isfinite(k3).all()
    # beyond the clamp: the closed form exp(l) - l - 1 at l = +-10
    assert k3[0].item() == pytest.approx(math.exp(10) - 11, rel=1e-12)
    assert k3[2].item() == pytest.approx(math.exp(10) - 11, rel=1e-12)
    assert k3[1].item() == pytest.approx(math.exp(-10) + 9, rel=1e-12)
    assert k3[3].item() == pytest.approx(math.exp(-10) + 9, rel=1e-12)
    # inside: the unclamped formula, in numpy
    l = (ref - logp).detach().numpy()[4:]
    np.testing.assert_allclose(k3[4:].detach().numpy(), np.exp(l) - l - 1, rtol=1e-14)
    (g,) = torch.autograd.grad(k3.sum(), logp)
    assert g[:4].abs().max().item() == 0.0                        # no gradient past the clamp
    np.testing.assert_allclose(g[4:].numpy(), 1 - np.exp(l), rtol=1e-12)
    # the pose k3 path goes through the same cap: two far-apart Gaussians stay finite
    P = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(1, 3), torch.ones(1, 3)), 1)
    Q = torch.distributions.Independent(torch.distributions.Normal(torch.full((1, 3), 50.0), torch.ones(1, 3)), 1)
    kl = core.pose_kl("k3", P, Q, torch.zeros(1, 3))
    assert kl.item() == pytest.approx(math.exp(-10) + 9, rel=1e-6)


def np_ppo_elements(logp, old, adv, eps, c):
    """Per-element (dual-)clipped PPO loss and the clip / dual-clip indicators, in a loop."""
    loss, clipped, dual = (np.zeros(len(logp)) for _ in range(3))
    for i in range(len(logp)):
        r = math.exp(min(max(logp[i] - old[i], -20.0), 20.0))
        a = adv[i]
        unclipped, clip = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
        li = max(unclipped, clip)
        clipped[i] = clip > unclipped
        if c is not None and a < 0 and li > -a * c:
            li, dual[i] = -a * c, 1.0
        loss[i] = li
    return loss, clipped.astype(bool), dual.astype(bool)


def _dual_clip_batch(seed, N=40, T=5):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(N, T, generator=gen, dtype=torch.float64) * 3
    logp = (old + 1.2 * torch.randn(N, T, generator=gen, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(N, generator=gen, dtype=torch.float64)
    mask = torch.rand(N, T, generator=gen) > 0.3
    return logp, old, adv, mask


@pytest.mark.parametrize("c", [3.0, 1.5, None])
def test_token_dual_clip_matches_numpy_loop(c):
    logp, old, adv, mask = _dual_clip_batch(0)
    eps = 0.2
    loss, m = core.ppo_clip_loss(logp, old, adv, mask, clip_eps=eps, dual_clip_c=c,
                                 loss_agg_mode="seq-mean-token-mean")
    (g,) = torch.autograd.grad(loss, logp)
    lp, o, msk = logp.detach().numpy(), old.numpy(), mask.numpy()
    per_seq, grad_ref = [], np.zeros_like(lp)
    all_dual, all_clip = [], []
    n_seq = int(msk.any(1).sum())
    for i in range(lp.shape[0]):
        idx = np.flatnonzero(msk[i])
        if not len(idx):
            continue
        a = np.full(len(idx), adv[i].item())
        l, clipped, dual = np_ppo_elements(lp[i, idx], o[i, idx], a, eps, c)
        per_seq.append(l.mean())
        all_dual += dual.tolist()
        all_clip += clipped.tolist()
        # d/dlogp of -A r is -A r where neither clip is active, else 0
        r = np.exp(lp[i, idx] - o[i, idx])
        grad_ref[i, idx] = np.where(~clipped & ~dual, -a * r, 0.0) / len(idx) / n_seq
    assert loss.item() == pytest.approx(float(np.mean(per_seq)), rel=1e-12)
    np.testing.assert_allclose(g.numpy(), grad_ref, rtol=1e-10, atol=1e-14)
    assert m["dual_clipfrac"] == pytest.approx(float(np.mean(all_dual)))
    assert m["clipfrac"] == pytest.approx(float(np.mean(all_clip)))
    if c is None:
        assert m["dual_clipfrac"] == 0.0
    else:
        assert 0.0 < m["dual_clipfrac"] < 1.0  # the sample exercises the dual clip


@pytest.mark.parametrize("c", [3.0, None])
def test_pose_dual_clip_matches_numpy_loop(c):
    gen = torch.Generator().manual_seed(4)
    N, eps, beta = 48, 0.2, 0.05
    old = torch.randn(N, generator=gen, dtype=torch.float64) * 5
    lp = (old + 1.3 * torch.randn(N, generator=gen, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(N, generator=gen, dtype=torch.float64)
    valid = torch.rand(N, generator=gen) > 0.25
    kl = torch.rand(N, generator=gen, dtype=torch.float64)
    loss, m = hygrpo_loss(params=HyGRPOParams(mode="continuous", clip_eps_pose=eps, beta_pose=beta,
                                              dual_clip_c=c),
                          pose_logprob=lp, old_pose_logprob=old, pose_valid=valid,
                          pose_advantages=adv * valid, pose_kl_to_ref=kl)
    v = valid.numpy()
    l, clipped, dual = np_ppo_elements(lp.detach().numpy()[v], old.numpy()[v], adv.numpy()[v], eps, c)
    expected = float(np.mean(l + beta * kl.numpy()[v]))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["pose/dual_clipfrac"] == pytest.approx(float(dual.mean()))
    assert m["pose/pg_loss"] == pytest.approx(float(l.mean()), rel=1e-12)
    assert (m["pose/dual_clipfrac"] > 0) == (c is not None)


def test_dual_clip_c_must_exceed_one():
    logp, old, adv, mask = _dual_clip_batch(1)
    for c in (1.0, 0.5, 0.0):
        with pytest.raises(ValueError, match="dual_clip_c"):
            core.ppo_clip_loss(logp, old, adv, mask, dual_clip_c=c)
        with pytest.raises(ValueError, match="dual_clip_c"):
            core.gaussian_ppo_clip_loss(logp[:, 0], old[:, 0], adv, mask[:, 0], dual_clip_c=c)


def _pose_groups_batch(seed, B=5, G=4):
    gen = torch.Generator().manual_seed(seed)
    N = B * G
    groups = torch.arange(B).repeat_interleave(G)[torch.randperm(N, generator=gen)]
    old = torch.randn(N, generator=gen, dtype=torch.float64)
    lp = (old + 0.3 * torch.randn(N, generator=gen, dtype=torch.float64)).requires_grad_(True)
    valid = torch.rand(N, generator=gen) > 0.4
    valid[groups == 2] = False                     # a group without any pose (V_g = 0)
    valid[(groups == 3).nonzero()[0]] = True       # and make sure the others differ in V_g
    adv = torch.randn(N, generator=gen, dtype=torch.float64) * valid
    kl = torch.rand(N, generator=gen, dtype=torch.float64)
    return groups, old, lp, valid, adv, kl


def loop_pose_group_mean(lp, old, adv, valid, kl, groups, eps, beta, c):
    """Eq. (6) per prompt: 1/V_g sum over the group's valid candidates, then mean over groups."""
    terms = []
    for g in sorted(set(groups.tolist())):
        members = [i for i in range(len(lp)) if groups[i] == g and valid[i]]
        if not members:
            terms.append(0.0)
            continue
        acc = 0.0
        for i in members:
            r = torch.exp(lp[i] - old[i])
            a = adv[i]
            li = torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps, 1 + eps))
            if c is not None and a < 0:
                li = torch.minimum(li, -a * c)
            acc = acc + li + beta * kl[i]
        terms.append(acc / len(members))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("seed", [0, 1])
def test_group_mean_pose_aggregation_matches_python_loop(seed):
    groups, old, lp, valid, adv, kl = _pose_groups_batch(seed)
    eps, beta, c = 0.2, 0.03, 3.0
    params = HyGRPOParams(mode="continuous", clip_eps_pose=eps, beta_pose=beta, dual_clip_c=c,
                          pose_loss_agg_mode="group-mean-candidate-mean")
    loss, _ = hygrpo_loss(params=params, pose_logprob=lp, old_pose_logprob=old, pose_valid=valid,
                          pose_advantages=adv, pose_kl_to_ref=kl, pose_group_index=groups)
    (g,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_(True)
    expected = loop_pose_group_mean(lp2, old, adv, valid, kl, groups, eps, beta, c)
    (g_ref,) = torch.autograd.grad(expected, lp2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)
    # it differs from the default candidate-mean (1/V over the batch) on this batch
    default, _ = hygrpo_loss(params=HyGRPOParams(mode="continuous", clip_eps_pose=eps,
                                                 beta_pose=beta, dual_clip_c=c),
                             pose_logprob=lp, old_pose_logprob=old, pose_valid=valid,
                             pose_advantages=adv, pose_kl_to_ref=kl)
    assert abs(default.item() - loss.item()) > 1e-6
    # weights: 1/(B V_g) on valid candidates, computed in a loop
    w = core.pose_agg_weights(valid, groups, "group-mean-candidate-mean", torch.float64)
    B = len(set(groups.tolist()))
    for i in range(len(w)):
        V_g = sum(bool(valid[j]) for j in range(len(w)) if groups[j] == groups[i])
        assert w[i].item() == pytest.approx(1 / (B * V_g) if valid[i] else 0.0, rel=1e-15)


def test_group_mean_without_poses_is_zero_and_differentiable():
    lp = torch.randn(6, requires_grad=True)
    params = HyGRPOParams(mode="continuous", pose_loss_agg_mode="group-mean-candidate-mean")
    loss, _ = hygrpo_loss(params=params, pose_logprob=lp, old_pose_logprob=lp.detach(),
                          pose_kl_to_ref=torch.full((6,), float("nan")),
                          pose_valid=torch.zeros(6, dtype=torch.bool), pose_advantages=torch.zeros(6),
                          pose_group_index=torch.tensor([0, 0, 1, 1, 2, 2]))
    loss.backward()
    assert loss.item() == 0.0 and lp.grad is not None and lp.grad.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="group_index"):
        hygrpo_loss(params=params, pose_logprob=lp, old_pose_logprob=lp.detach(),
                    pose_kl_to_ref=torch.zeros(6), pose_valid=torch.ones(6, dtype=torch.bool),
                    pose_advantages=torch.zeros(6))


@pytest.mark.parametrize("mode", sorted(core.POSE_LOSS_AGG_MODES))
def test_pose_micro_batches_with_split_groups_sum_to_the_full_batch_loss(mode):
    groups, old, lp, valid, adv, kl = _pose_groups_batch(3)
    params = HyGRPOParams(mode="continuous", pose_loss_agg_mode=mode)
    common = dict(params=params)

    def loss_of(rows, **kw):
        return hygrpo_loss(pose_logprob=lp[rows], old_pose_logprob=old[rows], pose_valid=valid[rows],
                           pose_advantages=adv[rows], pose_kl_to_ref=kl[rows],
                           pose_group_index=groups[rows], **common, **kw)[0]

    N = len(lp)
    full = loss_of(torch.arange(N))
    w_full = core.pose_agg_weights(valid, groups, mode, torch.float64)
    assert w_full.sum().item() == pytest.approx(1.0 if mode == "candidate-mean" else 4 / 5)
    total = 0.0
    for rows in torch.arange(N).split(7):  # groups are shuffled: every group straddles
        w, share = core.split_agg_weights(w_full[rows])
        total = total + loss_of(rows, pose_agg_weights=w, pose_weight=share)
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(total, lp)[0], torch.autograd.grad(full, lp)[0],
                               rtol=1e-12, atol=1e-15)
