"""The pose policy-gradient alignment diagnostic against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from poserft.rl.diagnostics import score_gradient_alignment


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_linear_reward_in_one_dimension_is_perfectly_aligned():
    # 1-D linear reward: every group's estimate points along +w, the reference too
    out = score_gradient_alignment(lambda x: 3.0 * x[:, 0], torch.zeros(1), torch.ones(1),
                                   group_size=4, trials=10, reference_pairs=64, generator=_gen())
    assert out["cos_raw"] == pytest.approx(1.0)
    assert out["reference_reliability"] == pytest.approx(1.0)
    assert out["cos"] == pytest.approx(1.0)
    assert out["odd_share"] == pytest.approx(1.0)


def test_even_reward_has_no_odd_part():
    mean = torch.tensor([0.5, -1.0, 2.0])
    out = score_gradient_alignment(lambda x: -((x - mean) ** 2).sum(-1), mean, torch.ones(3),
                                   group_size=8, trials=2, reference_pairs=64, generator=_gen())
    assert out["odd_share"] == pytest.approx(0.0, abs=1e-12)
    # no direction to estimate: the reference halves are noise, no corrected cosine
    assert math.isnan(out["cos"]) or abs(out["cos"]) < 0.5


def _direct_cosine(k, group_size, trials, seed):
    """Mean cosine of the GRPO score estimate with the exact gradient of
    J(mu) = E[-|mu + std*eps - c|^2], which is -2 (mu - c) for any std."""
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.zeros(k, dtype=torch.float64), torch.full((k,), 0.5, dtype=torch.float64)
    c = torch.linspace(-1, 1, k, dtype=torch.float64) * 0.1
    exact = -2 * (mean - c)
    cos = []
    for _ in range(trials):
        e = torch.randn(group_size, k, dtype=torch.float64, generator=g)
        r = -((mean + std * e - c) ** 2).sum(-1)
        a = (r - r.mean()) / (r.std() + 1e-6)
        cos.append(torch.nn.functional.cosine_similarity((a[:, None] * e).mean(0) / std, exact, 0))
    return torch.stack(cos).mean().item(), mean, std, c


@pytest.mark.parametrize("k,group_size", [(16, 32), (64, 32), (16, 256)])
def test_corrected_cosine_matches_the_exact_gradient(k, group_size):
    direct, mean, std, c = _direct_cosine(k, group_size, 300, seed=1)
    out = score_gradient_alignment(lambda x: -((x - c) ** 2).sum(-1), mean, std,
                                   group_size=group_size, trials=300, reference_pairs=20000,
                                   generator=_gen(2))
    # the quadratic's even part is noise for the estimate: the alignment is far from 1
    assert direct < 0.9
    assert out["cos"] == pytest.approx(direct, abs=0.05)
    # and the raw cosine (against a noisy reference) is lower whenever the reference is noisy
    assert out["cos_raw"] <= out["cos"] + 1e-9


def test_alignment_falls_with_dimension_and_rises_with_group_size():
    def run(k, g):
        c = torch.full((k,), 0.1)
        return score_gradient_alignment(lambda x: -((x - c) ** 2).sum(-1), torch.zeros(k),
                                        torch.full((k,), 0.5), group_size=g, trials=100,
                                        reference_pairs=8000, generator=_gen(3))["cos"]
    assert run(64, 32) < run(8, 32)
    assert run(64, 256) > run(64, 32)


def test_bad_arguments_are_refused():
    f = lambda x: x.sum(-1)  # noqa: E731
    with pytest.raises(ValueError, match="must be equal"):
        score_gradient_alignment(f, torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="even when antithetic"):
        score_gradient_alignment(f, torch.zeros(3), torch.ones(3), group_size=5, antithetic=True)


def test_correction_for_a_noisy_reference():
    """A reward whose odd part is mostly a fast oscillation with (almost) no smoothed
    gradient: the reference gradient of J is itself noisy, and only the corrected cosine
    matches the cosine with the exact gradient (w; the sine's smoothed gradient is
    40 exp(-40^2 0.5^2 / 2) ~ 1e-86)."""
    k, s, big_g = 16, 0.5, 256
    w = torch.full((k,), 0.1, dtype=torch.float64)
    u = torch.ones(k, dtype=torch.float64) / 4

    def reward(x):
        return x.double() @ w + 7.0 * torch.sin(40.0 * (x.double() @ u))

    g = _gen(1)
    direct = []
    for _ in range(400):
        e = torch.randn(big_g, k, dtype=torch.float64, generator=g)
        r = reward(s * e)
        a = (r - r.mean()) / (r.std() + 1e-6)
        direct.append(torch.nn.functional.cosine_similarity((a[:, None] * e).mean(0), w, 0))
    direct = torch.stack(direct).mean().item()
    out = score_gradient_alignment(reward, torch.zeros(k), torch.full((k,), s), group_size=big_g,
                                   trials=400, reference_pairs=20000, generator=_gen(2))
    assert 0.3 < out["reference_reliability"] < 0.95
    assert out["odd_share"] == pytest.approx(1.0)
    assert out["cos"] == pytest.approx(direct, abs=0.012)
    assert abs(out["cos_raw"] - direct) > 0.015


def test_shift_alignment_of_a_linear_reward():
    from poserft.rl.diagnostics import shift_alignment

    k = 6
    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 1.0])
    mean, std = torch.zeros(k), torch.full((k,), 0.5)

    def reward(x):
        return x.double() @ w.double()

    up = shift_alignment(reward, mean, std, 0.1 * w, reference_pairs=8192, generator=_gen())
    assert up["shift_cos"] == pytest.approx(1.0, abs=0.03)
    assert up["shift_rms_std"] == pytest.approx((0.1 * w / 0.5).pow(2).mean().sqrt().item())
    assert up["reward_after"] - up["reward_before"] == pytest.approx(0.1 * w.pow(2).sum().item())
    across = torch.tensor([0.0, 0.0, 0.0, 1.0, -1.0, 0.0])      # orthogonal to w
    side = shift_alignment(reward, mean, std, across, reference_pairs=8192, generator=_gen())
    assert side["shift_cos"] == pytest.approx(0.0, abs=0.03)
    assert side["reward_after"] == pytest.approx(side["reward_before"])
    with pytest.raises(ValueError, match="must be equal"):
        shift_alignment(reward, mean, std, torch.zeros(k + 1))
