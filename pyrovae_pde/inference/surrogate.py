"""A quadratic surrogate of each integrand's residuals: integrals under any population prior.

Quadrature nodes are placed for one population prior (the reference). The globals' posterior
asks for each subject's integral Z_ik(sigma, h) under many other population priors h, and
re-weighting the nodes (log p_h - log p_ref) is accurate only while p_h is about as wide as the
posterior the nodes were placed for: when a draw's population is much narrower (a component the
data do not need collapses onto a narrow range), the nodes sample a narrow peak of the integrand
and overestimate it by a factor that grows like 1 / tau, for every subject at once.

Each (subject, component) therefore gets a quadratic surrogate of its sum of squared residuals,

    sse(theta) ~= q0 + 2 beta . x + x' A x,    x = theta - centre,  A positive semi-definite,

fitted by weighted least squares to the nodes (weights: the nodes' posterior weights at the
reference noise, so the surrogate is right where the posterior is). Against a Gaussian prior the
surrogate's integral is closed-form (``log_integral``), for any noise and population. The
estimate used is the ratio (control-variate) estimator

    Z(sigma, h) = Z_surrogate(sigma, h) x Z_nodes(sigma, h) / Z_surrogate,nodes(sigma, h),

where the nodes' re-weighting error cancels between numerator and denominator: it is the nodes'
own estimate when the surrogate is exact on them, and the surrogate's closed form corrected by
the integrand's non-Gaussian part (measured on the nodes) otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..model.likelihood import LOG_2PI

DTYPE = torch.float64
MINIMUM_DROP = 4.0  # the surrogate's minimum may lie at most this many observation variances below the best node
WEIGHT_FLOOR = 1e-3  # share of the fit's weight spread evenly over the nodes (keeps the design full rank)


@dataclass
class ResidualSurrogate:
    """Per (subject, component) quadratic surrogate of the sum of squared residuals in theta =
    (log D, log r): centre (N, K, 2), q0 (N, K), beta (N, K, 2), hessian (N, K, 2, 2) (the
    matrix A, positive semi-definite; zero in the log r coordinate of rate-free components) and
    its eigenvalues (N, K, 2) and eigenvectors (N, K, 2, 2) (columns)."""

    centre: torch.Tensor
    q0: torch.Tensor
    beta: torch.Tensor
    hessian: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor

    def components(self, index: list[int]) -> "ResidualSurrogate":
        """The surrogates of the components ``index``."""
        return ResidualSurrogate(*(getattr(self, f.name)[:, index] for f in dataclasses.fields(self)))

    def subset(self, index: torch.Tensor) -> "ResidualSurrogate":
        """The surrogates of the subjects ``index``."""
        return ResidualSurrogate(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def sse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Surrogate sums of squared residuals at points a = log D, b = log r (..., N, K)."""
        x = torch.stack([a, b], -1) - self.centre
        quad = torch.einsum("...i,...ij,...j->...", x, self.hessian, x)
        return self.q0 + 2 * (self.beta * x).sum(-1) + quad

    def log_integral(self, sd: torch.Tensor, n_obs: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                     has_rate: torch.Tensor) -> torch.Tensor:
        """log of the integral of N(x_i | surrogate, sd^2) x Normal(theta; loc, diag(scale^2)) dtheta.

        sd (G, 1, 1): observation sd; n_obs (N,); loc, scale (G, K, 2): the population prior
        (the log r coordinate is ignored where ``has_rate`` (K,) is False). Returns (G, N, K).
        """
        rate = has_rate.to(loc.device)
        # In the prior's standard coordinates y (theta = loc + scale * y, y ~ N(0, I)) the integral is
        # E_y exp(-sse(y) / (2 var)) = |M|^-1/2 exp(-q0' / (2 var) + g' M^-1 g / 2), M = I + B,
        # B = S A S / var, g = -S (beta + A x0) / var. With A = sum_j lam_j e_j e_j' (lam_j >= 0) every
        # term below is a sum of non-negative parts: |M| = 1 + tr B + det B and g' M^-1 g =
        # (|g|^2 + g' adj(B) g) / |M|, so nothing cancels however wide or narrow the prior is.
        loc = torch.stack([loc[..., 0], torch.where(rate, loc[..., 1], torch.zeros_like(loc[..., 1]))], -1)[:, None]
        scale = torch.stack([scale[..., 0], torch.where(rate, scale[..., 1], torch.ones_like(scale[..., 1]))],
                            -1)[:, None]  # (G, 1, K, 2)
        centre = torch.stack([self.centre[..., 0], torch.where(rate, self.centre[..., 1], 0.0)], -1)
        x0 = loc - centre  # (G, N, K, 2): the prior's location relative to the surrogate's centre
        a_x0 = (self.hessian @ x0[..., None])[..., 0]
        q0 = self.q0 + 2 * (self.beta * x0).sum(-1) + (x0 * a_x0).sum(-1)  # (G, N, K)
        var = (sd ** 2)[..., None]  # (G, 1, 1, 1)
        g = -scale * (self.beta + a_x0) / var  # (G, N, K, 2)
        lam, vec = self.eigenvalues, self.eigenvectors  # (N, K, 2), (N, K, 2, 2): columns e_j
        trace_b = (lam * ((scale[..., :, None] * vec) ** 2).sum(-2)).sum(-1) / var[..., 0]
        det_b = (scale[..., 0] * scale[..., 1]) ** 2 * lam[..., 0] * lam[..., 1] / var[..., 0] ** 2
        det_m = 1 + trace_b + det_b
        swapped = torch.stack([scale[..., 1] * g[..., 0], scale[..., 0] * g[..., 1]], -1)  # diag(s_b, s_a) g
        proj = (vec * swapped[..., :, None]).sum(-2)  # e_j . diag(s_b, s_a) g
        adj_term = (lam.flip(-1) * proj ** 2).sum(-1) / var[..., 0]  # adj(A) = lam_2 e_1 e_1' + lam_1 e_2 e_2'
        quad = ((g ** 2).sum(-1) + adj_term) / det_m
        exponent = -0.5 * q0 / var[..., 0] + 0.5 * quad - 0.5 * torch.log(det_m)
        return exponent - n_obs[:, None] * (torch.log(sd) + 0.5 * LOG_2PI)


def fit_surrogate(a: torch.Tensor, b: torch.Tensor, sse: torch.Tensor, log_weight: torch.Tensor,
                  has_rate: torch.Tensor, variance: float) -> ResidualSurrogate:
    """Weighted least-squares quadratic fit of ``sse`` (P, N, K) over the nodes a, b (P, N, K).

    ``log_weight`` (P, N, K): the nodes' unnormalised log posterior weights (-inf on padding). The
    fit is done in coordinates standardised by the weighted spread. Then, as for a sum of squares
    |r0 + J x|^2 (the Gauss-Newton model), its quadratic part is projected onto the positive
    semi-definite cone, its slope removed along directions without curvature, and its minimum kept
    no lower than the best node's sse less ``MINIMUM_DROP`` x ``variance`` (the observation variance
    the nodes were placed for): outside the nodes the surrogate may not promise a fit better than
    any node found (a plateau, e.g. log r -> -inf where a reaction no longer acts, would otherwise
    become an endless downhill slope).
    """
    valid = torch.isfinite(log_weight)
    w = torch.softmax(torch.where(valid, log_weight, -math.inf), dim=0)
    n_valid = valid.sum(0).clamp_min(1)
    w = (1 - WEIGHT_FLOOR) * w + WEIGHT_FLOOR * valid / n_valid
    rate = has_rate.to(a.device)
    centre = torch.stack([(w * a).sum(0), torch.where(rate, (w * b).sum(0), 0.0)], -1)  # (N, K, 2)
    spread_a = ((w * (a - centre[..., 0]) ** 2).sum(0)).sqrt().clamp_min(1e-6)
    spread_b = torch.where(rate, ((w * (b - centre[..., 1]) ** 2).sum(0)).sqrt().clamp_min(1e-6), 1.0)
    za = (a - centre[..., 0]) / spread_a
    zb = torch.where(rate, (b - centre[..., 1]) / spread_b, 0.0)
    design = torch.stack([torch.ones_like(za), za, zb, za ** 2, za * zb, zb ** 2], -1)  # (P, N, K, 6)
    design = design.permute(1, 2, 0, 3)  # (N, K, P, 6)
    target = sse.permute(1, 2, 0)[..., None]  # (N, K, P, 1)
    sw = w.permute(1, 2, 0)[..., None].sqrt()
    gram = (sw * design).transpose(-1, -2) @ (sw * design)
    ridge = 1e-10 * gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * torch.eye(6, dtype=DTYPE,
                                                                                          device=a.device)
    coef = torch.linalg.solve(gram + ridge, (sw * design).transpose(-1, -2) @ (sw * target))[..., 0]  # (N, K, 6)
    coef = torch.where(torch.isfinite(target).all(-2), coef, torch.full_like(coef, math.nan))
    beta = 0.5 * torch.stack([coef[..., 1] / spread_a, torch.where(rate, coef[..., 2] / spread_b, 0.0)], -1)
    a_aa = coef[..., 3] / spread_a ** 2
    a_ab = torch.where(rate, 0.5 * coef[..., 4] / (spread_a * spread_b), 0.0)
    a_bb = torch.where(rate, coef[..., 5] / spread_b ** 2, 0.0)
    hess = torch.stack([torch.stack([a_aa, a_ab], -1), torch.stack([a_ab, a_bb], -1)], -2)
    evals, evecs = torch.linalg.eigh(torch.nan_to_num(hess))
    evals = evals.clamp_min(0.0)
    hess = evecs @ torch.diag_embed(evals) @ evecs.transpose(-1, -2)
    flat = evals <= 1e-9 * evals.amax(-1, keepdim=True).clamp_min(1e-300)
    slope = torch.where(flat, 0.0, (evecs * beta[..., :, None]).sum(-2))  # beta along each eigenvector
    drop = (slope ** 2 / torch.where(flat, 1.0, evals)).sum(-1)  # q0 - (the quadratic's minimum)
    best = torch.where(valid, sse, math.inf).amin(0)  # (N, K)
    floor = (best - MINIMUM_DROP * variance).clamp_min(0.0)
    q0 = torch.maximum(coef[..., 0], floor)
    shrink = torch.where(q0 - drop < floor, ((q0 - floor) / drop.clamp_min(1e-300)).clamp(0.0, 1.0).sqrt(), 1.0)
    beta = (evecs * (shrink[..., None] * slope)[..., None, :]).sum(-1)
    return ResidualSurrogate(centre, q0, beta, hess, evals, evecs)
