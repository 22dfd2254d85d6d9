"""Population priors: each component's distribution of (log D, log r) learned from the cohort.

The model's prior of subject i's parameters under component k is Normal(mu_k, diag(tau_k^2)) over
theta = (log D, log r) (``MixturePDE.population_loc`` / ``population_scale``); tied (the training
default, ``MixturePDE.population_tied``), every component shares one (mu, tau) per coordinate. Its
hyperparameters h_k = (mu_k, log tau_k) have the hyperprior

    mu_kc ~ Normal(m0_c, s0_c^2),   log tau_kc ~ Normal(log(s0_c / 2), 1),

where (m0_c, s0_c) is the base prior of coordinate c (the user's ``--prior`` or the cohort default,
``model.priors``): a component's population lies somewhere in the base range, with a spread
typically half the base width (anything from a few percent of it to a few times it). With many
subjects the data decide; an unused component keeps about the base prior. This makes the subtype
decision and the model evidence depend little on the user's guess of the ranges (the base prior
only has to contain the populations).

``em_population`` is the EM algorithm for the MAP hyperparameters (and mixture weights) given
per-(subject, component) Laplace approximations. Changing the prior of a Laplace approximation
needs no new PDE solve: the likelihood is Gaussian to the same order, so the posterior and the
evidence under another Gaussian prior follow in closed form (``reweight_laplace``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model.likelihood import LOG_2PI
from ..model.priors import Priors

# log tau ~ Normal(log(s0 / 2), 1): a population's spread is typically half the base range's, between
# 0.07 and 3.6 times its sd (95%); the MAP stays in [e^-3, e^2] x s0 / 2 (see _map_coordinate).
HYPER_LOG_SCALE_SHIFT = -math.log(2.0)
HYPER_LOG_SCALE_SD = 1.0


@dataclass
class Population:
    """Population prior: loc (K, 2) and scale (K, 2) over (log D, log r)."""

    loc: torch.Tensor
    scale: torch.Tensor


def base_hyperprior(priors: Priors, k: int, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(m0, s0) of the hyperprior, each (K, 2), from the base priors."""
    m0 = torch.tensor([[priors.diffusivity.loc, priors.reaction.loc]] * k, dtype=dtype, device=device)
    s0 = torch.tensor([[priors.diffusivity.scale, priors.reaction.scale]] * k, dtype=dtype, device=device)
    return m0, s0


def hyperprior_log_density(loc: torch.Tensor, log_scale: torch.Tensor, priors: Priors,
                           has_rate: torch.Tensor, tied: bool = False) -> torch.Tensor:
    """log p(h) of hyperparameters loc, log_scale (..., K, 2) in the coordinates (mu, log tau);
    the log r column of rate-free components does not enter; ``tied``: the rows are one population
    per coordinate (equal rows), counted once. Returns (...)."""
    m0, s0 = base_hyperprior(priors, loc.shape[-2], loc.dtype, loc.device)
    term = (-0.5 * ((loc - m0) / s0) ** 2 - torch.log(s0) - 0.5 * LOG_2PI
            - 0.5 * ((log_scale - torch.log(s0) - HYPER_LOG_SCALE_SHIFT) / HYPER_LOG_SCALE_SD) ** 2
            - math.log(HYPER_LOG_SCALE_SD)
            - 0.5 * LOG_2PI)
    used = torch.stack([torch.ones_like(has_rate), has_rate], -1).to(loc.dtype)  # (K, 2)
    if tied:  # only the first component using a coordinate carries its hyperparameters
        used = used * (used.cumsum(0) == 1).to(loc.dtype)
    return (term * used).sum(dim=(-1, -2))


def _prior_parts(loc: torch.Tensor, scale: torch.Tensor, has_rate: torch.Tensor):
    """Precisions (K, 2) and locs with the unused log r coordinate of rate-free components set to
    a fixed standard normal (it then cancels between priors)."""
    rate = has_rate[:, None].expand_as(loc) | torch.tensor([True, False], device=loc.device)
    return torch.where(rate, loc, 0.0), torch.where(rate, scale, 1.0) ** -2


def reweight_laplace(mean: torch.Tensor, jtj: torch.Tensor, variance: float, log_evidence: torch.Tensor,
                     old: Population, new: Population, has_rate: torch.Tensor):
    """The Laplace approximation under another population prior, without new solves.

    mean (N, K, 2): modes under ``old``; jtj (N, K, 3): the likelihood's J^T J entries (aa, ab, bb)
    at the modes, for observation variance ``variance``; log_evidence (N, K): Laplace log evidence
    under ``old``. With log L(theta) ~ log L(m) + g.(theta - m) - (theta - m)' Lambda (theta - m) / 2,
    Lambda = J^T J / variance and g = P_old (m - mu_old) (stationarity of the old posterior), the
    new posterior has precision P = Lambda + P_new, mode m + P^-1 h with h = g - P_new (m - mu_new),
    and log evidence log L(m) + log p_new(m) + h' P^-1 h / 2 + (d/2) log 2 pi - log det P / 2.
    Returns (mean (N, K, 2), cov (N, K, 2, 2), log_evidence (N, K)).
    """
    dtype = mean.dtype
    has_rate = has_rate.to(mean.device)
    rate_f = has_rate.to(dtype)
    lam_aa, lam_ab, lam_bb = (jtj[..., j] / variance for j in range(3))
    lam_ab, lam_bb = lam_ab * rate_f, lam_bb * rate_f
    mo, po = _prior_parts(old.loc.to(dtype), old.scale.to(dtype), has_rate)
    mn, pn = _prior_parts(new.loc.to(dtype), new.scale.to(dtype), has_rate)
    m = torch.where(torch.stack([torch.ones_like(has_rate), has_rate], -1), mean, 0.0)

    def log_prior(theta, loc, prec):  # Normal log density over the used coordinates
        term = -0.5 * prec * (theta - loc) ** 2 + 0.5 * torch.log(prec) - 0.5 * LOG_2PI
        return term[..., 0] + rate_f * term[..., 1]

    def logdet(aa, ab, bb):
        return torch.log(aa * bb - ab ** 2)

    d = 1.0 + rate_f
    # log L(m): the old Laplace evidence minus the old prior and Gaussian-volume terms
    log_lik_m = (log_evidence - log_prior(m, mo, po) - 0.5 * d * LOG_2PI
                 + 0.5 * logdet(lam_aa + po[:, 0], lam_ab, lam_bb + po[:, 1]))
    g = po * (m - mo)
    h = g - pn * (m - mn)
    p_aa, p_ab, p_bb = lam_aa + pn[:, 0], lam_ab, lam_bb + pn[:, 1]
    det = p_aa * p_bb - p_ab ** 2
    c_aa, c_ab, c_bb = p_bb / det, -p_ab / det, p_aa / det
    delta_a = c_aa * h[..., 0] + c_ab * h[..., 1]
    delta_b = (c_ab * h[..., 0] + c_bb * h[..., 1]) * rate_f
    quad = h[..., 0] * delta_a + h[..., 1] * delta_b
    new_log_evidence = log_lik_m + log_prior(m, mn, pn) + 0.5 * quad + 0.5 * d * LOG_2PI - 0.5 * torch.log(det)
    new_mean = torch.stack([m[..., 0] + delta_a, m[..., 1] + delta_b], -1)
    cov = torch.stack([torch.stack([c_aa, c_ab], -1), torch.stack([c_ab, c_bb], -1)], -2)
    return new_mean, cov, new_log_evidence


def _map_coordinate(r: torch.Tensor, m: torch.Tensor, v: torch.Tensor, m0: float, s0: float,
                    loc: float, log_scale: float, n_iter: int = 20) -> tuple[float, float]:
    """MAP (mu, log tau) of one coordinate of one component: responsibilities r (N,), posterior
    means m and variances v (N,) under the current prior; alternating closed-form mu and Newton
    steps in u = log tau on sum_i r_i E[log N(theta_i | mu, tau^2)] + log hyperprior."""
    big_r = float(r.sum())
    u0 = math.log(s0) + HYPER_LOG_SCALE_SHIFT
    # The MAP stays within a few hyperprior sds: a misspecified component's modes can pile up at
    # the edges of the search range, and its Laplace approximations are then no guide to the spread.
    u_lo, u_hi = u0 - 3 * HYPER_LOG_SCALE_SD, u0 + 2 * HYPER_LOG_SCALE_SD
    mu, u = loc, min(max(log_scale, u_lo), u_hi)
    for _ in range(n_iter):
        tau2 = math.exp(2 * u)
        mu = float(((r * m).sum() / tau2 + m0 / s0 ** 2) / (big_r / tau2 + 1 / s0 ** 2))
        mu = min(max(mu, m0 - 3 * s0), m0 + 3 * s0)
        s = float((r * (v + (m - mu) ** 2)).sum())
        for _ in range(5):  # Newton in u on the concave -R u - S e^{-2u}/2 - (u - u0)^2 / (2 w^2)
            grad = -big_r + s * math.exp(-2 * u) - (u - u0) / HYPER_LOG_SCALE_SD ** 2
            hess = -2 * s * math.exp(-2 * u) - 1 / HYPER_LOG_SCALE_SD ** 2
            u = min(max(u - grad / hess, u_lo), u_hi)
    return mu, u


def em_population(mean: torch.Tensor, jtj: torch.Tensor, variance: float, log_evidence: torch.Tensor,
                  current: Population, priors: Priors, has_rate: torch.Tensor, weights: torch.Tensor | None = None,
                  n_iter: int = 30, update_weights: bool = True, tolerance: float = 1e-6,
                  update_population: bool = True, tied: bool = False):
    """EM for the MAP population prior (and, with ``update_weights``, the MAP mixture weights).

    Inputs are Laplace approximations of every (subject, component) posterior under ``current``
    (see ``reweight_laplace``). ``tied``: one population of log D shared by all components and one of
    log r shared by the components with a rate (fitted from every subject, whatever its subtype), so
    that subtypes differ in mechanism only, not in where their parameters lie. Returns (population,
    weights (K,), responsibilities (N, K), log evidence (N, K) under the returned population).
    """
    dtype = torch.float64
    mean, jtj, log_evidence = mean.to(dtype), jtj.to(dtype), log_evidence.to(dtype)
    k = mean.shape[1]
    w = (torch.full((k,), 1.0 / k, dtype=dtype) if weights is None else weights.to(dtype).clone()).to(mean.device)
    pop = Population(current.loc.to(dtype).clone(), current.scale.to(dtype).clone())
    m0, s0 = base_hyperprior(priors, k, dtype, mean.device)
    conc = priors.weights_concentration
    for _ in range(n_iter):
        m_new, cov, log_z = reweight_laplace(mean, jtj, variance, log_evidence, current, pop, has_rate)
        resp = torch.softmax(torch.log(w) + log_z, dim=1)  # (N, K)
        if update_weights:
            w = (resp.sum(0) + conc - 1).clamp_min(1e-6)
            w = w / w.sum()
        new_loc, new_scale = pop.loc.clone(), pop.scale.clone()
        for c in (0, 1) if (update_population and tied) else ():
            users = [j for j in range(k) if c == 0 or bool(has_rate[j])]
            if not users:
                continue
            mu, u = _map_coordinate(resp[:, users].T.reshape(-1), m_new[:, users, c].T.reshape(-1),
                                    cov[:, users, c, c].T.reshape(-1), float(m0[users[0], c]),
                                    float(s0[users[0], c]), float(pop.loc[users[0], c]),
                                    math.log(float(pop.scale[users[0], c])))
            new_loc[users, c], new_scale[users, c] = mu, math.exp(u)
        for j in range(k if (update_population and not tied) else 0):
            for c in (0, 1) if bool(has_rate[j]) else (0,):
                mu, u = _map_coordinate(resp[:, j], m_new[:, j, c], cov[:, j, c, c], float(m0[j, c]), float(s0[j, c]),
                                        float(pop.loc[j, c]), math.log(float(pop.scale[j, c])))
                new_loc[j, c], new_scale[j, c] = mu, math.exp(u)
        change = float(torch.maximum((new_loc - pop.loc).abs().max(), (new_scale.log() - pop.scale.log()).abs().max()))
        pop = Population(new_loc, new_scale)
        if change < tolerance:
            break
    m_new, cov, log_z = reweight_laplace(mean, jtj, variance, log_evidence, current, pop, has_rate)
    resp = torch.softmax(torch.log(w) + log_z, dim=1)
    return pop, w, resp, log_z
