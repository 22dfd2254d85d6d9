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

A tied population can also be a mixture of M Gaussians per coordinate (``Population.terms``,
``MixturePDE.population_term_*``; each term's (mu, log tau) with the hyperprior above, the term
weights Dirichlet(``TERM_CONCENTRATION``)): the prior of (log D, log r) is then a mixture of the
M x M products of terms, and every integral under it a log-sum-exp of closed forms
(``reweight_mixture``). A single Gaussian cannot follow a skewed or bounded distribution (D
uniform on a linear scale is skewed in log D, with a sharp upper edge); on the paper grid that
misfit cost accuracy and calibration (benchmarks/RESULTS.md).

``em_population`` is the EM algorithm for the MAP hyperparameters (and mixture weights) given
per-(subject, component) Laplace approximations. Changing the prior of a Laplace approximation
needs no new PDE solve: the likelihood is Gaussian to the same order, so the posterior and the
evidence under another Gaussian prior follow in closed form (``reweight_laplace``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..model.likelihood import LOG_2PI
from ..model.priors import Priors

# log tau ~ Normal(log(s0 / 2), 1): a population's spread is typically half the base range's, between
# 0.07 and 3.6 times its sd (95%); the MAP stays in [e^-3, e^2] x s0 / 2 (see _map_coordinate).
HYPER_LOG_SCALE_SHIFT = -math.log(2.0)
HYPER_LOG_SCALE_SD = 1.0


# Mixture populations (tied): each term's weight has a Dirichlet(TERM_CONCENTRATION) hyperprior, which
# keeps a term the data do not need at a small weight instead of a degenerate zero.
TERM_CONCENTRATION = 2.0
MIXTURE_EM_ITERATIONS = 200


@dataclass
class Population:
    """Population prior over (log D, log r): the Gaussian loc (K, 2) and scale (K, 2), or, with
    ``terms`` = (weight, loc, scale), each (K, 2, M), a mixture of M Gaussians per coordinate
    whose mean and sd are loc and scale."""

    loc: torch.Tensor
    scale: torch.Tensor
    terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def n_terms(self) -> int:
        return 1 if self.terms is None else self.terms[1].shape[-1]

    @classmethod
    def of(cls, module) -> "Population":
        """The population priors of a ``MixturePDE`` (float64): its Gaussian, with its terms if a mixture."""
        terms = None if module.population_terms == 1 else tuple(
            t.double() for t in (module.population_term_weight, module.population_term_loc,
                                 module.population_term_scale))
        return cls(module.population_loc.double(), module.population_scale.double(), terms)


def mixture_moments(weight: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd (...) of the mixtures sum_m weight_m N(loc_m, scale_m^2), each (..., M)."""
    w = weight / weight.sum(-1, keepdim=True)
    mean = (w * loc).sum(-1)
    var = (w * (scale ** 2 + (loc - mean[..., None]) ** 2)).sum(-1)
    return mean, var.sqrt()


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


def reweight_mixture(mean: torch.Tensor, jtj: torch.Tensor, variance: float, log_evidence: torch.Tensor,
                     old: Population, new: Population, has_rate: torch.Tensor):
    """``reweight_laplace`` to a mixture population ``new`` (``terms`` with M terms per coordinate):
    the prior is a mixture of the M x M products of a log D term a and a log r term b, and each
    product's integral is a Laplace evidence in closed form.

    Returns (mean (N, K, M, M, 2), cov (N, K, M, M, 2, 2), log evidence of each term pair with its
    prior weight, (N, K, M, M), log evidence under the mixture (N, K)). For rate-free components
    the log r terms sum out (their weights sum to one).
    """
    if new.terms is None:
        m, c, z = reweight_laplace(mean, jtj, variance, log_evidence, old, new, has_rate)
        return m[:, :, None, None], c[:, :, None, None], z[:, :, None, None], z
    weight, loc, scale = (t.to(mean) for t in new.terms)
    n_terms = loc.shape[-1]
    means, covs, log_z = [], [], []
    for a in range(n_terms):
        for b in range(n_terms):
            pair = Population(torch.stack([loc[:, 0, a], loc[:, 1, b]], -1),
                              torch.stack([scale[:, 0, a], scale[:, 1, b]], -1))
            m, c, z = reweight_laplace(mean, jtj, variance, log_evidence, old, pair, has_rate)
            means.append(m)
            covs.append(c)
            log_z.append(z + torch.log(weight[:, 0, a]) + torch.log(weight[:, 1, b]))
    n, k = mean.shape[:2]
    shape = (n, k, n_terms, n_terms)
    pair_log_z = torch.stack(log_z, -1).reshape(shape)
    return (torch.stack(means, 2).reshape(*shape, 2), torch.stack(covs, 2).reshape(*shape, 2, 2), pair_log_z,
            torch.logsumexp(pair_log_z.reshape(n, k, -1), dim=-1))


def mixture_posterior(mean: torch.Tensor, cov: torch.Tensor, pair_log_z: torch.Tensor):
    """Mean (N, K, 2) and covariance (N, K, 2, 2) of each (subject, component) posterior under a
    mixture population, from ``reweight_mixture``'s per-pair posteriors and evidences."""
    n, k = mean.shape[:2]
    rho = torch.softmax(pair_log_z.reshape(n, k, -1), dim=-1)[..., None]  # (N, K, P, 1)
    m = mean.reshape(n, k, -1, 2)
    centre = (rho * m).sum(2)
    dev = m - centre[:, :, None]
    c = (rho[..., None] * (cov.reshape(n, k, -1, 2, 2) + dev[..., :, None] * dev[..., None, :])).sum(2)
    return centre, c


def _em_mixture(mean, jtj, variance, log_evidence, current: Population, start: Population, w: torch.Tensor,
                priors: Priors, has_rate: torch.Tensor, n_terms: int, update_weights: bool, tolerance: float,
                n_iter: int = MIXTURE_EM_ITERATIONS):
    """EM of a tied mixture population (M = ``n_terms`` Gaussians per coordinate) from ``start``
    (a mixture, or a Gaussian whose terms are spread over its range); see ``em_population``."""
    dtype, device = mean.dtype, mean.device
    k = mean.shape[1]
    m0, s0 = base_hyperprior(priors, k, dtype, device)
    conc = priors.weights_concentration
    if start.n_terms == n_terms:
        weight, loc, scale = (t.to(dtype=dtype, device=device).clone() for t in start.terms)
    else:  # terms spread over the Gaussian: means at loc +- scale, each a little narrower
        spread = torch.linspace(-1.0, 1.0, n_terms, dtype=dtype, device=device)
        loc = start.loc[..., None].to(mean) + start.scale[..., None].to(mean) * spread
        scale = (start.scale[..., None].to(mean) / 1.5).expand_as(loc).clone()
        weight = torch.full_like(loc, 1.0 / n_terms)
    users = {0: list(range(k)), 1: [j for j in range(k) if bool(has_rate[j])]}
    for _ in range(n_iter):
        pop = Population(*mixture_moments(weight, loc, scale), (weight, loc, scale))
        m_new, cov, pair_log_z, log_z = reweight_mixture(mean, jtj, variance, log_evidence, current, pop, has_rate)
        resp = torch.softmax(torch.log(w) + log_z, dim=1)  # (N, K)
        if update_weights:
            w = (resp.sum(0) + conc - 1).clamp_min(1e-6)
            w = w / w.sum()
        joint = resp[..., None, None] * torch.softmax(pair_log_z.reshape(*resp.shape, -1), -1).reshape(pair_log_z.shape)
        new = [weight.clone(), loc.clone(), scale.clone()]
        for c, rows in users.items():
            if not rows:
                continue
            for t in range(n_terms):
                pick = (slice(None), rows, t) if c == 0 else (slice(None), rows, slice(None), t)
                r, mm, vv = joint[pick], m_new[pick][..., c], cov[pick][..., c, c]
                j = rows[0]
                # a term no wider than the base prior: a wider one only gathers the subjects this
                # mechanism cannot fit, whose quadratic approximations extrapolate far off the mode
                mu, u = _map_coordinate(r.reshape(-1), mm.reshape(-1), vv.reshape(-1), float(m0[0, c]),
                                        float(s0[0, c]), float(loc[j, c, t]), math.log(float(scale[j, c, t])),
                                        max_log_scale=math.log(float(s0[0, c])))
                new[1][:, c, t], new[2][:, c, t] = mu, math.exp(u)
                new[0][:, c, t] = float(r.sum()) + TERM_CONCENTRATION - 1.0
            new[0][:, c] = new[0][:, c] / new[0][:, c].sum(-1, keepdim=True)
        change = max(float((new[1] - loc).abs().max()), float((new[2].log() - scale.log()).abs().max()),
                     float((new[0] - weight).abs().max()))
        weight, loc, scale = new
        if change < tolerance:
            break
    pop = Population(*mixture_moments(weight, loc, scale), (weight, loc, scale))
    log_z = reweight_mixture(mean, jtj, variance, log_evidence, current, pop, has_rate)[3]
    resp = torch.softmax(torch.log(w) + log_z, dim=1)
    return pop, w, resp, log_z


def _map_coordinate(r: torch.Tensor, m: torch.Tensor, v: torch.Tensor, m0: float, s0: float,
                    loc: float, log_scale: float, n_iter: int = 20,
                    max_log_scale: float | None = None) -> tuple[float, float]:
    """MAP (mu, log tau) of one coordinate of one component: responsibilities r (N,), posterior
    means m and variances v (N,) under the current prior; alternating closed-form mu and Newton
    steps in u = log tau on sum_i r_i E[log N(theta_i | mu, tau^2)] + log hyperprior; log tau at
    most ``max_log_scale`` if given."""
    big_r = float(r.sum())
    u0 = math.log(s0) + HYPER_LOG_SCALE_SHIFT
    # The MAP stays within a few hyperprior sds: a misspecified component's modes can pile up at
    # the edges of the search range, and its Laplace approximations are then no guide to the spread.
    u_lo, u_hi = u0 - 3 * HYPER_LOG_SCALE_SD, u0 + 2 * HYPER_LOG_SCALE_SD
    if max_log_scale is not None:
        u_hi = min(u_hi, max_log_scale)
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
                  update_population: bool = True, tied: bool = False, n_terms: int = 1):
    """EM for the MAP population prior (and, with ``update_weights``, the MAP mixture weights).

    Inputs are Laplace approximations of every (subject, component) posterior under ``current``'s
    Gaussian (loc, scale; see ``reweight_laplace``). ``tied``: one population of log D shared by all
    components and one of log r shared by the components with a rate (fitted from every subject,
    whatever its subtype), so that subtypes differ in mechanism only, not in where their parameters
    lie. ``n_terms`` > 1 (tied only): each population is a mixture of that many Gaussians (each
    term's (mu, log tau) with the Gaussian's hyperprior, the term weights Dirichlet(2)), started from
    ``current``'s terms when it has as many, else spread over the fitted Gaussian. Returns
    (population, weights (K,), responsibilities (N, K), log evidence (N, K) under the returned
    population).
    """
    dtype = torch.float64
    mean, jtj, log_evidence = mean.to(dtype), jtj.to(dtype), log_evidence.to(dtype)
    k = mean.shape[1]
    w = (torch.full((k,), 1.0 / k, dtype=dtype) if weights is None else weights.to(dtype).clone()).to(mean.device)
    if n_terms > 1 and not tied:
        raise ValueError("mixture populations (n_terms > 1) are tied")
    if update_population and n_terms > 1:
        start = current
        if current.n_terms != n_terms:  # first the Gaussian, then its terms
            start, w, _, _ = em_population(mean, jtj, variance, log_evidence, Population(current.loc, current.scale),
                                           priors, has_rate, w, n_iter, update_weights, tolerance, True, True)
        return _em_mixture(mean, jtj, variance, log_evidence, current, start, w, priors, has_rate, n_terms,
                           update_weights, tolerance)
    if current.n_terms > 1 and not update_population:  # the mixture as it is: weights only
        pop = current
        for _ in range(n_iter if update_weights else 0):
            log_z = reweight_mixture(mean, jtj, variance, log_evidence, current, pop, has_rate)[3]
            resp = torch.softmax(torch.log(w) + log_z, dim=1)
            w = (resp.sum(0) + priors.weights_concentration - 1).clamp_min(1e-6)
            w = w / w.sum()
        log_z = reweight_mixture(mean, jtj, variance, log_evidence, current, pop, has_rate)[3]
        return pop, w, torch.softmax(torch.log(w) + log_z, dim=1), log_z
    current = Population(current.loc, current.scale)
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


def under_mixture_population(module, fit):
    """``fit`` (a ``laplace.LaplaceFit`` under the Gaussian of ``module``'s population, at its
    observation variance ``fit.variance``) re-weighted to the module's mixture population: log
    evidence under the mixture, posterior mean and covariance of the resulting mixture of
    Gaussians (N, K, 2) and (N, K, 2, 2). Unchanged for a Gaussian population."""
    if module.population_terms == 1:
        return fit
    mixture = Population.of(module)
    gaussian = Population(mixture.loc, mixture.scale)
    mean, cov, pair_log_z, log_z = reweight_mixture(fit.mean.double(), fit.jtj.double(), fit.variance,
                                                    fit.log_evidence.double(), gaussian, mixture,
                                                    fit.has_rate)
    centre, spread = mixture_posterior(mean, cov, pair_log_z)
    # The closed forms extrapolate the likelihood's quadratic approximation at the Gaussian's mode;
    # where that lands outside the parameter range the model solves over (a subject this mechanism
    # cannot fit, whose likelihood is flat or one-sided), keep the Gaussian's approximation.
    a, b = module.clamp_theta(centre[..., 0], centre[..., 1])
    has_rate = fit.has_rate.to(centre.device)
    off = (a != centre[..., 0]) | ((b != centre[..., 1]) & has_rate) | ~torch.isfinite(log_z)
    off = off | ~torch.isfinite(spread).flatten(-2).all(-1)
    centre = torch.where(off[..., None], fit.mean.double(), centre)
    spread = torch.where(off[..., None, None], fit.cov.double(), spread)
    log_z = torch.where(off, fit.log_evidence.double(), log_z)
    return dataclasses.replace(fit, mean=centre.to(fit.mean), cov=spread.to(fit.cov),
                               log_evidence=log_z.to(fit.log_evidence))
