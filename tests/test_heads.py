"""Pose heads: densities against torch.distributions, sampling moments, bounds, errors."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from poserft.model.heads import (POSE_DIM, DeterministicPoseHead, GaussianPoseHead, PointPose,
                                 PoseGaussian, UndefinedForDeterministicHead, identity_pose_vec)


def _random_gaussian(b, k, rank, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(b, k, generator=g, dtype=torch.float64)
    std = torch.rand(b, k, generator=g, dtype=torch.float64) * 1.5 + 0.1
    factor = None if rank == 0 else torch.randn(b, k, rank, generator=g, dtype=torch.float64) * 0.7
    return PoseGaussian(mean, std, factor)


def _reference(d: PoseGaussian) -> MultivariateNormal:
    return MultivariateNormal(d.mean, covariance_matrix=d.covariance_matrix())


@pytest.mark.parametrize("rank", [0, 3])
def test_log_prob_and_entropy_match_torch(rank):
    d = _random_gaussian(5, 12, rank, seed=rank)
    ref = _reference(d)
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.entropy(), ref.entropy(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.log_det_cov(), torch.logdet(d.covariance_matrix()))


@pytest.mark.parametrize("rank_p,rank_q", [(0, 0), (2, 0), (0, 3), (2, 4)])
def test_kl_matches_torch(rank_p, rank_q):
    p = _random_gaussian(4, 10, rank_p, seed=10 + rank_p)
    q = _random_gaussian(4, 10, rank_q, seed=20 + rank_q)
    torch.testing.assert_close(p.kl(q), kl_divergence(_reference(p), _reference(q)),
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p.kl(p), torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("covariance", ["diag", "lowrank"])
def test_head_distribution_matches_torch_full_size(covariance):
    torch.manual_seed(0)
    head = GaussianPoseHead(16, 32, covariance=covariance, rank=4).double()
    # Perturb the near-zero initial output weights so mean/std/factor depend on the input.
    for p in head.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    hidden = torch.randn(6, 16, dtype=torch.float64)
    d = head(hidden)
    assert d.mean.shape == (6, POSE_DIM) and d.rank == (4 if covariance == "lowrank" else 0)
    ref = _reference(PoseGaussian(d.mean.double(), d.std.double(),
                                  None if d.factor is None else d.factor.double()))
    x = d.sample()
    torch.testing.assert_close(d.log_prob(x).double(), ref.log_prob(x.double()), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(d.entropy().double(), ref.entropy(), rtol=1e-4, atol=1e-3)


def test_log_std_is_bounded_for_extreme_hidden_states():
    head = GaussianPoseHead(8, 16, log_std_min=-3.0, log_std_max=0.5)
    for p in head.parameters():
        p.data.normal_(0, 1.0)
    d = head(torch.randn(4, 8) * 1e4)
    log_std = d.std.log()
    assert torch.isfinite(log_std).all()
    assert (log_std >= -3.0 - 1e-5).all() and (log_std <= 0.5 + 1e-5).all()
    # ...and both bounds are actually reached by saturated inputs (not squashed to a point)
    assert log_std.min() < -2.9 and log_std.max() > 0.4


def test_sampling_moments_match_covariance():
    d = _random_gaussian(1, 6, 2, seed=3)
    n = 200_000
    big = PoseGaussian(d.mean.expand(n, -1), d.std.expand(n, -1), d.factor.expand(n, -1, -1))
    x = big.sample(torch.Generator().manual_seed(0))
    emp_cov = torch.cov(x.T)
    torch.testing.assert_close(x.mean(0), d.mean[0], atol=0.02, rtol=0)
    torch.testing.assert_close(emp_cov, d.covariance_matrix()[0], atol=0.03, rtol=0.03)


def test_rsample_is_differentiable_and_sample_is_not():
    head = GaussianPoseHead(8, 16, covariance="lowrank", rank=2)
    d = head(torch.randn(3, 8))
    x = d.rsample()
    x.sum().backward()
    assert head.mean_out.weight.grad is not None and head.log_std_out.weight.grad.abs().sum() > 0
    assert not d.sample().requires_grad


def test_initial_mean_is_rest_pose_and_row_indexing():
    head = GaussianPoseHead(8, 16)
    d = head(torch.randn(5, 8))
    torch.testing.assert_close(d.mean, identity_pose_vec().expand(5, -1), atol=0.05, rtol=0)
    sub = d[torch.tensor([True, False, True, False, True])]
    assert len(sub) == 3
    torch.testing.assert_close(sub.mean, d.mean[[0, 2, 4]])


def test_deterministic_head_interface():
    head = DeterministicPoseHead(8, 16)
    d = head(torch.randn(4, 8))
    assert isinstance(d, PointPose) and d.mean.shape == (4, POSE_DIM)
    torch.testing.assert_close(d.sample(), d.mean)
    torch.testing.assert_close(d.mode(), d.mean)
    for call in (lambda: d.log_prob(d.mean), d.entropy, lambda: d.kl(d)):
        with pytest.raises(UndefinedForDeterministicHead, match="deterministic pose head"):
            call()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="must both be"):
        PoseGaussian(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="factor"):
        PoseGaussian(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 4, 1))


def test_log_prob_closed_form_diag_1d():
    # N(1, 2^2) at x = 0: -0.5 log(2 pi) - log 2 - 1/8
    d = PoseGaussian(torch.tensor([[1.0]]), torch.tensor([[2.0]]))
    expected = -0.5 * math.log(2 * math.pi) - math.log(2.0) - 0.125
    assert d.log_prob(torch.tensor([[0.0]])).item() == pytest.approx(expected, rel=1e-6)


def test_beta_nll_limits_and_gradient():
    """beta 0 is the plain per-dimension NLL; the mean's gradient is the NLL's scaled by
    stop_grad(std^(2 beta)) with weights normalised to mean 1 (beta 1: MSE-like)."""
    from poserft.model.heads import PoseGaussian, beta_nll
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    std = (0.1 + torch.rand(3, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    plain = -PoseGaussian(mean, std).log_prob(x) / 6
    torch.testing.assert_close(beta_nll(mean, std, x, 0.0), plain)
    for beta in (0.5, 1.0):
        (gm,) = torch.autograd.grad(beta_nll(mean, std, x, beta).sum(), mean)
        w = std.detach() ** (2 * beta)
        want = (mean.detach() - x) / std.detach() ** 2 * w / w.sum(-1, keepdim=True)
        torch.testing.assert_close(gm, want)
    (gm1,) = torch.autograd.grad(beta_nll(mean, std, x, 1.0).sum(), mean)
    var = std.detach() ** 2
    torch.testing.assert_close(gm1, (mean.detach() - x) / var.sum(-1, keepdim=True))


def test_joint_distances_frames():
    """global: FK of both poses; local: the root rotations replaced by the identity, so a
    different root orientation alone gives zero; both: their mean."""
    from poserft.body import SkeletonModel, vec6d_to_rotmats
    from poserft.model.heads import joint_distances

    body = SkeletonModel()
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, POSE_DIM, generator=g), torch.randn(4, POSE_DIM, generator=g)
    glob = joint_distances(body, pred, target, "global")
    ref = (body.forward_rotmats(vec6d_to_rotmats(pred))
           - body.forward_rotmats(vec6d_to_rotmats(target))).norm(dim=-1)
    torch.testing.assert_close(glob, ref)
    same_body = torch.cat([target[:, :6] + 1.0, target[:, 6:]], 1)      # only the root differs
    assert float(joint_distances(body, same_body, target, "global").max()) > 0.01
    assert float(joint_distances(body, same_body, target, "local").max()) < 1e-6
    local = joint_distances(body, pred.bfloat16(), target, "local")          # any float dtype
    assert local.shape == (4, 24) and local.dtype == torch.float32
    torch.testing.assert_close(joint_distances(body, pred, target, "both"),
                               0.5 * (glob + joint_distances(body, pred, target, "local")))
    with pytest.raises(ValueError, match="joint frame"):
        joint_distances(body, pred, target, "camera")


@pytest.mark.parametrize("covariance", ["diag", "lowrank"])
def test_fixed_scale_passes_gradients_to_the_mean_only(covariance):
    """rft.learn_pose_std: false -> log_prob/KL gradients reach the mean, not std/factor;
    the values are those of the original distribution."""
    torch.manual_seed(0)
    head = GaussianPoseHead(8, hidden=16, pose_dim=6, covariance=covariance, rank=2)
    if head.factor_out is not None:
        torch.nn.init.normal_(head.factor_out.weight, std=0.3)
    dist = head(torch.randn(3, 8))
    x = torch.randn(3, 6)
    fixed = dist.with_fixed_scale()
    torch.testing.assert_close(fixed.log_prob(x), dist.log_prob(x))
    fixed.log_prob(x).sum().backward()
    assert head.mean_out.weight.grad.abs().sum() > 0
    assert head.log_std_out.weight.grad is None or head.log_std_out.weight.grad.abs().sum() == 0
    if head.factor_out is not None:
        assert head.factor_out.weight.grad is None or head.factor_out.weight.grad.abs().sum() == 0
    # the mean's gradient is the same as through the full distribution (d/dmu does not
    # depend on whether the scale is learnt)
    head.zero_grad()
    mean_grad = torch.autograd.grad(dist.log_prob(x).sum(), dist.mean, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(fixed.log_prob(x).sum(), fixed.mean)[0], mean_grad)
