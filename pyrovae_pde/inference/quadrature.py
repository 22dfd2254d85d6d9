"""Per-subject marginal likelihoods by adaptive Gauss-Hermite quadrature, with a known error.

For subject i and component k, with theta = (log D, log r) (d = 2; d = 1 for rate-free
components),

    Z_ik(sigma) = p(x_i | subtype k, sigma) = integral of N(x_i | u_k(theta), sigma^2) p(theta) dtheta.

The integral is 1- or 2-dimensional, so product Gauss-Hermite quadrature centred and scaled by the
posterior (*adaptive* GHQ: theta_j = m + sqrt(2) L z_j, with m the mode and L L^T the Laplace
covariance from ``search.search_modes``) is exact for a Gaussian posterior at any order and
converges fast for the skewed ones:

    Z = 2^(d/2) |L| sum_j v_j exp(|z_j|^2) f(theta_j),   f = likelihood x prior.

Orders 5, 7, 9, ... points per coordinate are tried in turn for every (subject, component) until
the error estimate, twice the difference of two successive orders, is within ``tolerance`` nats;
the higher order's value is kept. (The difference alone estimates the lower order's error; on
skewed posteriors the convergence is not monotone, and the higher order's error was seen to exceed
the difference by up to 1.7 times against a dense-grid reference.) What is kept is
each node's sum of squared residuals, so Z_ik(sigma) is available for any noise sd sigma at the
cost of array operations (the nodes are placed for the noise at the modes; the posterior of sigma
is far narrower than the nodes' spread).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data.cohort import CohortTensors
from ..errors import InputError
from ..model.likelihood import gaussian_log_likelihood
from ..model.module import MixturePDE
from .laplace import LaplaceFit

DTYPE = torch.float64
ORDERS = (5, 7, 9, 11, 13)
DEFAULT_TOLERANCE = 0.01  # nats
ERROR_SAFETY = 2.0  # the error estimate is this times the difference of the last two orders


def hermite_rule(order: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Product Gauss-Hermite rule for weight exp(-|z|^2): nodes (P, dim), log(weight * exp(|z|^2)) (P,)."""
    x, w = np.polynomial.hermite.hermgauss(order)
    grids = np.meshgrid(*([x] * dim), indexing="ij")
    z = np.stack([g.reshape(-1) for g in grids], axis=1)
    log_w = sum(np.log(np.meshgrid(*([w] * dim), indexing="ij")[a].reshape(-1)) for a in range(dim))
    return torch.as_tensor(z, dtype=DTYPE), torch.as_tensor(log_w + (z ** 2).sum(1), dtype=DTYPE)


def log_prior(module: MixturePDE, a: torch.Tensor, b: torch.Tensor, has_rate: torch.Tensor) -> torch.Tensor:
    """log p(theta) under the module's population prior of (log D, log r): a, b (..., K); b ignored
    where there is no rate."""
    out, rate = module.population_log_prob(a, b)
    return out + torch.where(has_rate.to(a.device), rate, torch.zeros_like(rate))


def node_sse(module: MixturePDE, data: CohortTensors, d: torch.Tensor, r: torch.Tensor,
             batch_size: int | None = None, keep_fields: bool = False):
    """Sums of squared residuals (P, N, K) of the PDE solved at P parameter points per subject and
    component: d, r (P, N, K) (r ignored for rate-free components), float64 solves of the model's
    own solver over the later observed visits. With ``keep_fields`` also the fields (P, N, K, T, n)
    as float32 on the CPU."""
    n_p, n, k = d.shape
    if batch_size is None:  # keep a batch's fields around 1e7 values
        per_subject = n_p * k * data.signal.shape[1] * data.signal.shape[2]
        batch_size = max(1, int(1e7 // per_subject))
    rate = module.rate_index
    sse = torch.zeros(n_p, n, k, dtype=DTYPE, device=d.device)
    observed = data.observed[:, 1:].to(DTYPE)
    kept = torch.zeros((n_p, n, k, *data.signal.shape[1:]), dtype=torch.float32) if keep_fields else None
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        signal = data.signal[sl].to(DTYPE)
        b = signal.shape[0]
        rep = lambda x: x.to(DTYPE).repeat(n_p, *([1] * (x.dim() - 1)))  # noqa: E731  (P*b, ...)
        with torch.no_grad():
            fields = module.predict(rep(signal[:, 0]), rep(data.times[sl]), d[:, sl].reshape(n_p * b, k).to(DTYPE),
                                    r[:, sl][..., rate].reshape(n_p * b, len(rate)).to(DTYPE) if rate else None)
        fields = fields.reshape(n_p, b, k, *fields.shape[2:])
        resid = (signal[None, :, None, 1:] - fields[:, :, :, 1:]) * observed[sl][None, :, None, :, None]
        sse[:, sl] = (resid ** 2).sum(dim=(-1, -2))
        if kept is not None:
            kept[:, sl] = fields.to(torch.float32).cpu()
    return (sse, kept) if keep_fields else sse


@dataclass
class QuadratureNodes:
    """Weighted nodes of every (subject, component) integral, padded to P nodes.

    a, b (P, N, K): log D and log r at each node (b = 0 without a rate); sse (P, N, K);
    log_rule (P, N, K): log of the rule's weight times the Jacobian (-inf on padding); log_prior
    (P, N, K): the population prior's log density at the node, so that
    Z_ik(sigma) = sum_p exp(log_rule + log_prior + log N(x | u(theta_p), sigma^2));
    n_obs (N,); error (N, K): twice the difference of the last two orders' log Z at ``noise_ref`` (nats);
    order (N, K): the final order; converged (N, K): error <= tolerance.
    """

    a: torch.Tensor
    b: torch.Tensor
    sse: torch.Tensor
    log_rule: torch.Tensor
    log_prior: torch.Tensor
    n_obs: torch.Tensor
    error: torch.Tensor
    order: torch.Tensor
    converged: torch.Tensor
    noise_ref: float

    def log_evidence(self, noise_sd: float | torch.Tensor) -> torch.Tensor:
        """log Z_ik at observation sd ``noise_sd`` (scalar, noise floor included): (N, K)."""
        s = torch.as_tensor(noise_sd, dtype=DTYPE)
        log_lik = gaussian_log_likelihood(self.sse, self.n_obs[:, None], s)
        return torch.logsumexp(self.log_rule + self.log_prior + log_lik, dim=0)


def _rule_nodes(fit: LaplaceFit, rows: torch.Tensor, order: int):
    """Nodes (P, R, K) a, b and log weights (Jacobian included, prior not) for the fit's rows."""
    mean, cov = fit.mean[rows].to(DTYPE), fit.cov[rows].to(DTYPE)
    has_rate = fit.has_rate.to(mean.device)
    z2, lw2 = (t.to(mean.device) for t in hermite_rule(order, 2))
    z1, lw1 = (t.to(mean.device) for t in hermite_rule(order, 1))
    p2, p1 = z2.shape[0], z1.shape[0]
    l00 = cov[..., 0, 0].clamp_min(1e-300).sqrt()  # (R, K)
    l10 = cov[..., 0, 1] / l00
    l11 = (cov[..., 1, 1] - l10 ** 2).clamp_min(1e-300).sqrt()
    sq2 = math.sqrt(2.0)
    a2 = mean[..., 0] + sq2 * l00 * z2[:, 0, None, None]  # (P2, R, K)
    b2 = mean[..., 1] + sq2 * (l10 * z2[:, 0, None, None] + l11 * z2[:, 1, None, None])
    w2 = lw2[:, None, None] + math.log(2.0) + torch.log(l00) + torch.log(l11)
    pad = torch.full((p2 - p1, *l00.shape), -math.inf, dtype=DTYPE, device=mean.device)
    a1 = torch.cat([mean[..., 0] + sq2 * l00 * z1[:, 0, None, None], mean[..., 0].expand(p2 - p1, -1, -1)])
    w1 = torch.cat([lw1[:, None, None] + 0.5 * math.log(2.0) + torch.log(l00), pad])
    a = torch.where(has_rate, a2, a1)
    b = torch.where(has_rate, b2, torch.zeros_like(b2))
    return a, b, torch.where(has_rate, w2, w1)


def quadrature_nodes(module: MixturePDE, data: CohortTensors, fit: LaplaceFit, noise_sd: float,
                     tolerance: float = DEFAULT_TOLERANCE, orders: tuple[int, ...] = ORDERS) -> QuadratureNodes:
    """Adaptive Gauss-Hermite nodes around ``fit``'s modes (N, K) for every subject and component.

    Every (subject, component) starts with the first two ``orders``; subjects with a component
    whose two last orders disagree by more than ``tolerance`` nats at ``noise_sd`` go on to the
    next order, up to the last one. Returns the final order's nodes and the error estimates.
    """
    if len(orders) < 2:
        raise InputError("adaptive quadrature needs at least two orders")
    n, k = fit.mean.shape[:2]
    device = data.signal.device
    has_rate = fit.has_rate.to(device)
    n_obs = data.observed[:, 1:].to(DTYPE).sum(1) * data.signal.shape[-1]
    s = float(noise_sd)

    def evaluate(rows: torch.Tensor, order: int):
        a, b, lw = _rule_nodes(fit, rows, order)
        sub = CohortTensors([data.subjects[i] for i in rows.tolist()], data.signal[rows], data.times[rows],
                            data.observed[rows])
        sse = node_sse(module, sub, torch.exp(a), torch.exp(b))
        lp = log_prior(module, a, b, has_rate)
        log_lik = gaussian_log_likelihood(sse, n_obs[rows][:, None], s)
        return a, b, sse, lw, lp, torch.logsumexp(lw + lp + log_lik, dim=0)

    p_max = orders[-1] ** 2
    a_all = torch.zeros(p_max, n, k, dtype=DTYPE, device=device)
    b_all, sse_all, lp_all = torch.zeros_like(a_all), torch.zeros_like(a_all), torch.zeros_like(a_all)
    lw_all = torch.full_like(a_all, -math.inf)
    rows = torch.arange(n, device=device)
    previous = evaluate(rows, orders[0])[-1] if n else torch.zeros(0, k, dtype=DTYPE)
    error = torch.full((n, k), math.inf, dtype=DTYPE, device=device)
    order = torch.full((n, k), orders[0], dtype=torch.long, device=device)
    pending = rows
    for o in orders[1:]:
        if pending.numel() == 0:
            break
        a, b, sse, lw, lp, log_z = evaluate(pending, o)
        p = a.shape[0]
        a_all[:p, pending], b_all[:p, pending], sse_all[:p, pending], lp_all[:p, pending] = a, b, sse, lp
        lw_all[:, pending] = -math.inf
        lw_all[:p, pending] = lw
        error[pending] = ERROR_SAFETY * (log_z - previous[pending]).abs()
        order[pending] = o
        previous = previous.clone()
        previous[pending] = log_z
        pending = pending[(error[pending] > tolerance).any(dim=1)]
    used = int(order.max()) ** 2 if n else 1
    return QuadratureNodes(a_all[:used], b_all[:used], sse_all[:used], lw_all[:used], lp_all[:used], n_obs, error,
                           order, error <= tolerance, s)
