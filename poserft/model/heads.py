"""Pose heads on the hidden state of the ``<POSE>`` token, and the distributions they return.

Two heads share one interface so that SFT, RFT and evaluation never branch on the head:

* :class:`GaussianPoseHead` -> :class:`PoseGaussian`, a Gaussian over the 144-D continuous
  6D pose (24 joints x 6, joint 0 = global orientation) with covariance
  ``diag(std^2) + W W^T`` (``W`` is ``(144, r)``; ``r = 0`` is the diagonal case). The
  per-dimension log-std is tanh-squashed into ``[log_std_min, log_std_max]`` and the
  factor entries into ``[-factor_max, factor_max]`` so that an exploding hidden state can
  never produce a degenerate or infinite covariance.
* :class:`DeterministicPoseHead` -> :class:`PointPose`, the paper's "no Dist." baseline:
  a point estimate with the same ``mean/mode()/sample()`` but no density
  (``log_prob``/``entropy``/``kl`` raise :class:`UndefinedForDeterministicHead`).

All density math is closed form (Woodbury identity and the matrix-determinant lemma for
the low-rank part), batched over rows, in float32 whatever the backbone dtype: a
:class:`PoseGaussian` upcasts bfloat16/float16 mean, std and factor to float32 when built
(float64 stays float64), and its log_prob / entropy / kl / sampling run with autocast
disabled, so they stay float32 under bf16 autocast (torch or DeepSpeed) and bf16 weights.
Samples are mapped to SMPL axis-angle by :func:`pose_to_smpl` (``poserft.body``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

__all__ = ["POSE_DIM", "beta_nll", "joint_distances", "PoseGaussian", "PointPose", "GaussianPoseHead", "DeterministicPoseHead",
           "UndefinedForDeterministicHead", "build_pose_head", "pose_to_smpl", "identity_pose_vec"]

POSE_DIM = 144  # 24 joints x 6D rotation (poserft.body.POSE_DIM)
_LOG_2PI = math.log(2.0 * math.pi)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """bfloat16/float16 -> float32 (differentiable); float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False)


def _full_precision(fn):
    """Run a PoseGaussian method with autocast disabled (its tensors are >= float32)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with _no_autocast(self._mean.device.type):
            return fn(self, *args, **kwargs)
    return wrapper


class UndefinedForDeterministicHead(NotImplementedError):
    """A density quantity was asked of the deterministic ('no Dist.') head."""


def beta_nll(mean: torch.Tensor, std: torch.Tensor, target: torch.Tensor, beta: float
             ) -> torch.Tensor:
    """(B,) beta-NLL of a diagonal Gaussian (Seitzer et al. 2022, "On the pitfalls of
    heteroscedastic uncertainty estimation"): the per-dimension NLL weighted by
    ``stop_grad(std^(2 beta))``, weights normalised to mean 1 per row, averaged over dims.

    beta = 0 is the plain NLL per dimension (``-log p(x) / k``); beta = 1 gives the mean
    the gradient of a mean squared error. Plain NLL divides each dimension's mean gradient
    by its variance, so dimensions the head is sure about dominate and hard ones stall.
    mean, std, target: (B,k); computed in at least float32, autocast off.
    """
    with _no_autocast(mean.device.type):
        return _beta_nll(_upcast(mean), _upcast(std), target, beta)


def _beta_nll(mean, std, target, beta):
    z = (target.to(mean.dtype) - mean) / std
    nll = 0.5 * z.pow(2) + std.log() + 0.5 * _LOG_2PI                    # (B,k)
    if beta == 0:
        return nll.mean(-1)
    w = std.detach().pow(2.0 * beta)
    return (nll * w).sum(-1) / w.sum(-1)


def identity_pose_vec(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The rest pose (all joint rotations = identity) as a (144,) 6D vector."""
    from poserft.body.rotations import matrix_to_rot6d
    return matrix_to_rot6d(torch.eye(3, dtype=dtype)).repeat(POSE_DIM // 6)


def joint_distances(body, pred: torch.Tensor, target: torch.Tensor, frame: str = "global"
                    ) -> torch.Tensor:
    """Per-joint distance (R,24) in metres between FK of two (R,144) 6D poses through ``body``.

    ``frame="local"`` replaces both root rotations by the identity first (articulation
    only); ``"both"`` is the mean of the global and local distances.
    """
    if frame not in ("global", "local", "both"):
        raise ValueError(f"joint frame must be 'global', 'local' or 'both', got {frame!r}")
    if frame == "both":
        return 0.5 * (joint_distances(body, pred, target, "global")
                      + joint_distances(body, pred, target, "local"))
    if frame == "local":  # root rotation -> identity (its 6D is exact under Gram-Schmidt)
        root = identity_pose_vec(pred.dtype)[:6].to(pred.device).expand(pred.shape[0], 6)
        pred = torch.cat([root, pred[:, 6:]], 1)
        target = torch.cat([root.to(target.dtype), target[:, 6:]], 1)
    return (body.forward_vec6d(pred) - body.forward_vec6d(target)).norm(dim=-1)


def pose_to_smpl(vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,144) 6D pose -> (global_orient (B,3), body_pose (B,23,3)) axis-angle."""
    from poserft.body import vec6d_to_smpl
    return vec6d_to_smpl(vec)


@dataclasses.dataclass(init=False, eq=False, repr=False)
class PoseGaussian:
    """Batch of Gaussians ``N(mean, diag(std^2) + factor @ factor^T)``.

    Shapes: ``mean`` (B,k), ``std`` (B,k), ``factor`` (B,k,r) or None (diagonal).
    bfloat16/float16 inputs are upcast to float32 (with gradient); every density and sample
    is computed with autocast off, so results are float32 (float64 for float64 inputs).
    A dataclass only so that DistributedDataParallel finds the tensors inside a model output
    that holds one (it searches dataclass fields, not plain attributes); otherwise DDP
    thinks the pose head unused and then fails with "marked ready twice".
    """

    _mean: torch.Tensor
    std: torch.Tensor
    factor: torch.Tensor | None

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, factor: torch.Tensor | None = None):
        if mean.shape != std.shape or mean.dim() != 2:
            raise ValueError(f"PoseGaussian: mean {tuple(mean.shape)} and std {tuple(std.shape)} "
                             "must both be (B,k)")
        if factor is not None and (factor.dim() != 3 or factor.shape[:2] != mean.shape):
            raise ValueError(f"PoseGaussian: factor {tuple(factor.shape)} must be (B,k,r) "
                             f"with (B,k) = {tuple(mean.shape)}")
        self._mean, self.std = _upcast(mean), _upcast(std)
        self.factor = None if factor is None else _upcast(factor)
        self._cap_chol: torch.Tensor | None = None

    # ------------------------------------------------------------------ structure
    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def variance_diag(self) -> torch.Tensor:
        """(B,k) diagonal part of the covariance (without the low-rank term)."""
        return self.std.pow(2)

    @property
    def rank(self) -> int:
        return 0 if self.factor is None else self.factor.shape[-1]

    @property
    def pose_dim(self) -> int:
        return self._mean.shape[-1]

    def __len__(self) -> int:
        return self._mean.shape[0]

    def __getitem__(self, index) -> "PoseGaussian":
        """Row subset (a mask, index tensor or slice), e.g. the rows that emitted <POSE>."""
        f = None if self.factor is None else self.factor[index]
        return PoseGaussian(self._mean[index], self.std[index], f)

    def detach(self) -> "PoseGaussian":
        f = None if self.factor is None else self.factor.detach()
        return PoseGaussian(self._mean.detach(), self.std.detach(), f)

    @_full_precision
    def covariance_matrix(self) -> torch.Tensor:
        """(B,k,k) dense covariance (for tests and small batches)."""
        cov = torch.diag_embed(self.variance_diag)
        if self.factor is not None:
            cov = cov + self.factor @ self.factor.transpose(-1, -2)
        return cov

    @_full_precision
    def _capacitance_chol(self) -> torch.Tensor:
        """Cholesky of ``C = I_r + W^T D^{-1} W`` (B,r,r), cached."""
        if self._cap_chol is None:
            w_scaled = self.factor / self.std.unsqueeze(-1)          # D^{-1/2} W  (B,k,r)
            cap = w_scaled.transpose(-1, -2) @ w_scaled
            cap = cap + torch.eye(self.rank, dtype=cap.dtype, device=cap.device)
            self._cap_chol = torch.linalg.cholesky(cap)
        return self._cap_chol

    # ------------------------------------------------------------------ densities
    @_full_precision
    def log_det_cov(self) -> torch.Tensor:
        """(B,) log|Sigma| (matrix-determinant lemma for the low-rank part)."""
        out = 2.0 * self.std.log().sum(-1)
        if self.factor is not None:
            out = out + 2.0 * self._capacitance_chol().diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return out

    @_full_precision
    def _precision_quadratic(self, z: torch.Tensor) -> torch.Tensor:
        """(B,) z^T Sigma^{-1} z for z (B,k) (Woodbury)."""
        a = z / self.variance_diag                                     # D^{-1} z
        out = (z * a).sum(-1)
        if self.factor is not None:
            b = (self.factor.transpose(-1, -2) @ a.unsqueeze(-1))      # W^T D^{-1} z (B,r,1)
            c_inv_b = torch.cholesky_solve(b, self._capacitance_chol())
            out = out - (b * c_inv_b).sum((-1, -2))
        return out

    @_full_precision
    def with_fixed_scale(self) -> "PoseGaussian":
        """The same distribution with its std (and low-rank factor) detached: gradients of
        a log-density or KL through it reach the mean only."""
        return PoseGaussian(self._mean, self.std.detach(),
                            None if self.factor is None else self.factor.detach())

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) log density of x (B,k) (or (k,), broadcast over rows)."""
        x = x.to(self._mean.dtype)
        quad = self._precision_quadratic(x - self._mean)
        return -0.5 * (self.pose_dim * _LOG_2PI + self.log_det_cov() + quad)

    @_full_precision
    def entropy(self) -> torch.Tensor:
        """(B,) differential entropy 0.5 k (1 + log 2 pi) + 0.5 log|Sigma|."""
        return 0.5 * self.pose_dim * (1.0 + _LOG_2PI) + 0.5 * self.log_det_cov()

    @_full_precision
    def kl(self, other: "PoseGaussian") -> torch.Tensor:
        """(B,) analytic KL(self || other) between two Gaussians (any ranks)."""
        if not isinstance(other, PoseGaussian):
            raise TypeError(f"PoseGaussian.kl: other must be a PoseGaussian, got {type(other).__name__}")
        k = self.pose_dim
        a2 = 1.0 / other.variance_diag                                # D2^{-1} (B,k)
        # tr(Sigma2^{-1} Sigma1) with Sigma2^{-1} = A - A W2 C2^{-1} W2^T A
        trace = (a2 * self.variance_diag).sum(-1)
        if self.factor is not None:
            trace = trace + (a2.unsqueeze(-1) * self.factor.pow(2)).sum((-1, -2))
        if other.factor is not None:
            u = a2.unsqueeze(-1) * other.factor                       # A W2 (B,k,r2)
            m = u.transpose(-1, -2) @ (self.variance_diag.unsqueeze(-1) * u)
            if self.factor is not None:
                uw = u.transpose(-1, -2) @ self.factor                # (B,r2,r1)
                m = m + uw @ uw.transpose(-1, -2)
            trace = trace - torch.cholesky_solve(m, other._capacitance_chol()).diagonal(
                dim1=-2, dim2=-1).sum(-1)
        quad = other._precision_quadratic(self._mean - other._mean)
        return 0.5 * (trace + quad - k + other.log_det_cov() - self.log_det_cov())

    # ------------------------------------------------------------------ samples
    @_full_precision
    def rsample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,k) reparameterised sample (differentiable in mean/std/factor)."""
        eps = torch.randn(self._mean.shape, generator=generator, dtype=self._mean.dtype,
                          device=self._mean.device)
        out = self._mean + self.std * eps
        if self.factor is not None:
            eps_r = torch.randn(self._mean.shape[0], self.rank, 1, generator=generator,
                                dtype=self._mean.dtype, device=self._mean.device)
            out = out + (self.factor @ eps_r).squeeze(-1)
        return out

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,k) sample without gradient."""
        with torch.no_grad():
            return self.rsample(generator)

    def mode(self) -> torch.Tensor:
        return self._mean


class PointPose:
    """Point estimate with the distribution interface (deterministic 'no Dist.' head)."""

    def __init__(self, mean: torch.Tensor):
        if mean.dim() != 2:
            raise ValueError(f"PointPose: mean must be (B,k), got {tuple(mean.shape)}")
        self._mean = _upcast(mean)

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def pose_dim(self) -> int:
        return self._mean.shape[-1]

    def __len__(self) -> int:
        return self._mean.shape[0]

    def __getitem__(self, index) -> "PointPose":
        return PointPose(self._mean[index])

    def detach(self) -> "PointPose":
        return PointPose(self._mean.detach())

    def _undefined(self, what: str):
        raise UndefinedForDeterministicHead(
            f"{what} is not defined for the deterministic pose head (model.head=deterministic, "
            "the 'no Dist.' baseline): it predicts a point, not a density. Use "
            "model.head=gaussian for HyGRPO's continuous branch, or disable that branch.")

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        self._undefined("log_prob")

    def entropy(self) -> torch.Tensor:
        self._undefined("entropy")

    def kl(self, other) -> torch.Tensor:
        self._undefined("kl")

    def rsample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._mean.detach().clone()

    def mode(self) -> torch.Tensor:
        return self._mean


def _init_output(layer: nn.Linear, bias: torch.Tensor) -> None:
    # Small weights + rest-pose bias: the untrained head predicts a plausible pose and a
    # moderate std instead of noise, which keeps the first SFT steps stable.
    nn.init.normal_(layer.weight, std=1e-3)
    with torch.no_grad():
        layer.bias.copy_(bias)


class GaussianPoseHead(nn.Module):
    """hidden (B,H) -> :class:`PoseGaussian` over the (B,144) 6D pose."""

    def __init__(self, in_dim: int, hidden: int = 256, pose_dim: int = POSE_DIM,
                 covariance: str = "diag", rank: int = 4, log_std_min: float = -4.0,
                 log_std_max: float = 0.0, factor_max: float = 0.5,
                 init_log_std: float | None = None):
        super().__init__()
        if covariance not in ("diag", "lowrank"):
            raise ValueError(f"covariance must be 'diag' or 'lowrank', got {covariance!r}")
        if not log_std_min < log_std_max:
            raise ValueError(f"log_std_min ({log_std_min}) must be < log_std_max ({log_std_max})")
        self.pose_dim, self.covariance = pose_dim, covariance
        self.rank = rank if covariance == "lowrank" else 0
        self.log_std_min, self.log_std_max, self.factor_max = log_std_min, log_std_max, factor_max
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU())
        self.mean_out = nn.Linear(hidden, pose_dim)
        self.log_std_out = nn.Linear(hidden, pose_dim)
        _init_output(self.mean_out, identity_pose_vec()[:pose_dim] if pose_dim == POSE_DIM
                     else torch.zeros(pose_dim))
        # Start the std in the middle of its range (or at init_log_std) in squashed units.
        target = (log_std_min + log_std_max) / 2 if init_log_std is None else init_log_std
        unit = (target - log_std_min) / (log_std_max - log_std_min) * 2 - 1
        _init_output(self.log_std_out, torch.full((pose_dim,), math.atanh(max(-0.99, min(0.99, unit)))))
        self.factor_out = nn.Linear(hidden, pose_dim * self.rank) if self.rank else None
        if self.factor_out is not None:
            _init_output(self.factor_out, torch.zeros(pose_dim * self.rank))
            nn.init.normal_(self.factor_out.weight, std=1e-2)

    def squash_log_std(self, raw: torch.Tensor) -> torch.Tensor:
        """Map unbounded raw outputs into [log_std_min, log_std_max] (smooth, monotone)."""
        return self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(raw) + 1.0)

    def forward(self, hidden: torch.Tensor) -> PoseGaussian:
        # The layers run in the head's dtype (the policy's), never under autocast; the
        # squashing and everything after in float32: log|Sigma| and the Mahalanobis term of
        # a 144-D Gaussian lose too many digits in bf16.
        with _no_autocast(hidden.device.type):
            h = self.trunk(hidden.to(self.mean_out.weight.dtype))
            mean = _upcast(self.mean_out(h))
            std = self.squash_log_std(_upcast(self.log_std_out(h))).exp()
            factor = None
            if self.factor_out is not None:
                raw = _upcast(self.factor_out(h)).view(-1, self.pose_dim, self.rank)
                factor = self.factor_max * torch.tanh(raw)
            return PoseGaussian(mean, std, factor)


class DeterministicPoseHead(nn.Module):
    """hidden (B,H) -> :class:`PointPose` (B,144) (regression, 'no Dist.' baseline)."""

    def __init__(self, in_dim: int, hidden: int = 256, pose_dim: int = POSE_DIM):
        super().__init__()
        self.pose_dim = pose_dim
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU())
        self.mean_out = nn.Linear(hidden, pose_dim)
        _init_output(self.mean_out, identity_pose_vec()[:pose_dim] if pose_dim == POSE_DIM
                     else torch.zeros(pose_dim))

    def forward(self, hidden: torch.Tensor) -> PointPose:
        with _no_autocast(hidden.device.type):
            return PointPose(self.mean_out(self.trunk(hidden.to(self.mean_out.weight.dtype))))


def build_pose_head(cfg, in_dim: int) -> nn.Module:
    """The head selected by ``cfg.head`` (a :class:`~poserft.model.config.ModelConfig`)."""
    if cfg.head == "gaussian":
        return GaussianPoseHead(in_dim, cfg.head_hidden_size, POSE_DIM, cfg.covariance,
                                cfg.cov_rank, cfg.log_std_min, cfg.log_std_max, cfg.factor_max)
    if cfg.head == "deterministic":
        return DeterministicPoseHead(in_dim, cfg.head_hidden_size, POSE_DIM)
    raise ValueError(f"model.head: unknown head {cfg.head!r} (gaussian|deterministic)")
