"""The globals of a fitted mixture, integrated: weights w, noise scale sigma and, when the model
learns them, the population priors h = (mu_k, log tau_k) of every component (Gaussian populations;
mixture populations are held at their fitted values).

With every subject's latents integrated by its weighted points (``particles.ParticleStats``),

    log p(x_i | g)  = logsumexp_k [ log w_k + log Z_ik(sigma, h_k) ]

costs array operations for any globals g = (w, sigma, h): the subject's latents AND its subtype
are integrated out, which is the pointwise likelihood PSIS-LOO needs. The posterior of g is
approximated by a Laplace approximation in unconstrained coordinates u = (log sigma, additive
log-ratios of w, mu_kc, log tau_kc), found by L-BFGS with autograd gradients (``laplace_globals``);
its draws serve as posterior draws (LOO, PPC) and as the proposal of the IWAE estimate

    log p(X) ~= log mean_g [ p(g) / q(g) prod_i p_hat(x_i | g) ]            (``iwae_log_evidence``)

whose error has three parts: the globals' Monte Carlo error (delta method, 1/ESS - 1/G), the
subjects' (delta method over importance particles; zero for quadrature nodes), and for
quadrature nodes the integration error bound, sum_i of each subject's responsibility-weighted
two-order difference. ``cross_validated_lpd`` holds whole subjects out: the globals' posterior from
the other folds predicts them. (Sub-models of a subset of the components: ``evidence.subset_evidence``.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyro.distributions as dist
import torch

from ..model.likelihood import gaussian_log_likelihood, normal_log_density, observation_sd
from ..model.module import MixturePDE
from .particles import DTYPE, ParticleStats
from .population import hyperprior_log_density

GLOBAL_SEARCH_HALF_WIDTH = 20.0  # nats of log scale / logit around the start: e^20 either way
TRUST_LOC = 1.0  # population sds a trust-region search may move each population's location
TRUST_LOG_SCALE = 0.5  # and its log sd


@dataclass
class GlobalDraws:
    """G draws of the globals: weights (G, K), noise (G,), log q and log prior (G,) (densities in
    the unconstrained coordinates), and the population priors (loc, scale), each (G, K, 2), or
    None where the model's priors are fixed."""

    weights: torch.Tensor
    noise: torch.Tensor
    log_q: torch.Tensor
    log_prior: torch.Tensor
    population: tuple[torch.Tensor, torch.Tensor] | None = None
    mode_population: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_draws(self) -> int:
        return self.noise.shape[0]

    def chunk(self, sl: slice) -> "GlobalDraws":
        pop = None if self.population is None else (self.population[0][sl], self.population[1][sl])
        return GlobalDraws(self.weights[sl], self.noise[sl], self.log_q[sl], self.log_prior[sl], pop)


# --------------------------------------------------------------------------- per-subject integrals
def _point_log_lik(stats: ParticleStats, noise: torch.Tensor, population, components: list[int] | None,
                   sse: torch.Tensor | None = None):
    """log p(x_i | point, sigma) + log_ratio under the population priors: (G, P, N, K').
    ``sse`` (P, N, K): sums of squared residuals to use instead of the points' own."""
    comps = list(range(len(stats.components))) if components is None else list(components)
    sse, ratio = (stats.sse if sse is None else sse)[..., comps], stats.log_ratio[..., comps]
    s = observation_sd(noise[:, None, None, None])
    out = gaussian_log_likelihood(sse, stats.n_obs[:, None], s) + ratio
    if population is not None:  # re-weight every point from the prior it was made with to h_g
        loc, scale = (t[:, None, None] for t in population)  # (G, 1, 1, K', 2)
        a, b = (t[..., comps] for t in stats.theta)
        has_rate = stats.has_rate[comps]
        lp = normal_log_density(a, loc[..., 0], scale[..., 0]) + torch.where(
            has_rate, normal_log_density(b, loc[..., 1], scale[..., 1]), torch.zeros_like(b))
        out = out + lp - stats.log_prior_ref[..., comps]
    return out


def _log_z(stats: ParticleStats, noise: torch.Tensor, population, components: list[int] | None):
    """(point log weights (G, P, N, K'), log Z_ik (G, N, K')) at the draws (noise, population).

    For quadrature nodes re-weighted to other population priors, log Z is the ratio estimator of
    ``surrogate``: the surrogate's closed-form integral times the nodes' estimate over the
    surrogate's estimate on the same nodes (the re-weighting error cancels)."""
    lw = _point_log_lik(stats, noise, population, components)
    log_z = torch.logsumexp(lw, dim=1) - math.log(stats.n_particles)
    if population is not None and stats.surrogate is not None:
        comps = list(range(len(stats.components))) if components is None else list(components)
        on_nodes = torch.logsumexp(_point_log_lik(stats, noise, population, components, stats.surrogate_sse), dim=1)
        exact = stats.surrogate.components(comps).log_integral(observation_sd(noise[:, None, None]), stats.n_obs,
                                                               population[0], population[1], stats.has_rate[comps])
        log_z = log_z + exact - (on_nodes - math.log(stats.n_particles))
    return lw, log_z


def component_log_evidence(stats: ParticleStats, noise: torch.Tensor, population=None, chunk: int = 16,
                           components: list[int] | None = None) -> torch.Tensor:
    """log Z_ik(sigma, h) = log p(x_i | subtype k, sigma, h) for each global draw: (G, N, K').

    ``population``: (loc, scale) each (G, K', 2), or None for the priors the points were made with.
    """
    out = []
    for start in range(0, noise.shape[0], chunk):
        sl = slice(start, start + chunk)
        pop = None if population is None else (population[0][sl], population[1][sl])
        out.append(_log_z(stats, noise[sl], pop, components)[1])
    return torch.cat(out)


def pointwise_log_likelihood(stats: ParticleStats, draws: GlobalDraws,
                             subset: tuple[int, ...] | None = None) -> torch.Tensor:
    """log p(x_i | g) with the subject's latents and subtype integrated out: (G, N).

    ``draws.weights`` (and ``draws.population``) hold one column per component of ``subset``.
    """
    log_z = component_log_evidence(stats, draws.noise, draws.population,
                                   components=None if subset is None else list(subset))
    return torch.logsumexp(torch.log(draws.weights)[:, None, :] + log_z, dim=-1)


# --------------------------------------------------------------------------- the globals' space
class GlobalSpace:
    """Unconstrained coordinates u (D,) of the globals of the sub-model ``subset``.

    u = (log sigma, additive log-ratios of w (|S| - 1), then for every learned population
    coordinate (component k in S, coordinate c: log D, and log r where k has a rate) its mu and log
    tau; with tied populations one pair per coordinate c, shared by the components using it).
    ``prior`` is the log density of the globals' prior in these coordinates (Jacobians included),
    the sub-model's own: Dirichlet(c 1_|S|) on its weights.
    """

    def __init__(self, module: MixturePDE, stats: ParticleStats, subset: list[int]):
        self.module, self.subset = module, subset
        p = module.priors
        # LogNormal on sigma, written on u_0 = log sigma (Jacobian included): finite wherever exp underflows
        self.noise_prior = dist.Normal(torch.tensor(math.log(p.noise_median), dtype=DTYPE),
                                       torch.tensor(p.noise_log_sd, dtype=DTYPE))
        self.weights_prior = dist.Dirichlet(torch.full((len(subset),), float(p.weights_concentration), dtype=DTYPE))
        # Mixture populations are plugged in at their fitted (empirical-Bayes) values, not integrated
        self.learned = bool(getattr(module, "population_learned", torch.tensor(False))) and module.population_terms == 1
        self.base_loc = module.population_loc.to(DTYPE)[subset]  # (|S|, 2)
        self.base_scale = module.population_scale.to(DTYPE)[subset]
        has_rate = stats.has_rate[subset]
        self.has_rate = has_rate
        self.tied = bool(getattr(module, "population_tied", torch.tensor(False)))
        used = [(j, c) for j in range(len(subset)) for c in ((0, 1) if bool(has_rate[j]) else (0,))]
        # groups of (component, coordinate) sharing one (mu, log tau)
        self.free = ([[(j, c) for j, c in used if c == coord] for coord in (0, 1) if any(c == coord for _, c in used)]
                     if self.tied else [[pair] for pair in used])
        self.dim = 1 + (len(subset) - 1) + (2 * len(self.free) if self.learned else 0)

    def start(self, noise: float) -> np.ndarray:
        x = np.zeros(self.dim)
        x[0] = math.log(noise)
        if self.learned:
            off = len(self.subset)
            for f, ((j, c), *_) in enumerate(self.free):
                x[off + 2 * f] = float(self.base_loc[j, c])
                x[off + 2 * f + 1] = math.log(float(self.base_scale[j, c]))
        return x

    def unpack(self, u: torch.Tensor):
        """u (G, D) -> (noise (G,), log w (G, |S|), population or None, log prior (G,))."""
        k = len(self.subset)
        sigma = torch.exp(u[:, 0])
        logits = torch.cat([torch.zeros_like(u[:, :1]), u[:, 1:k]], dim=1)
        log_w = torch.log_softmax(logits, dim=1)
        log_prior = self.noise_prior.log_prob(u[:, 0])
        if k > 1:  # Dirichlet density times the additive-log-ratio Jacobian prod_k w_k
            log_prior = log_prior + self.weights_prior.log_prob(torch.exp(log_w)) + log_w.sum(dim=1)
        population = None
        if self.learned:
            g = u.shape[0]
            loc = self.base_loc.expand(g, k, 2).clone()
            log_scale = torch.log(self.base_scale).expand(g, k, 2).clone()
            for f, group in enumerate(self.free):
                for j, c in group:
                    loc[:, j, c] = u[:, k + 2 * f]
                    log_scale[:, j, c] = u[:, k + 2 * f + 1]
            population = (loc, torch.exp(log_scale))
            log_prior = log_prior + hyperprior_log_density(loc, log_scale, self.module.priors, self.has_rate,
                                                           tied=self.tied)
        return sigma, log_w, population, log_prior

    def log_joint(self, stats: ParticleStats, u: torch.Tensor):
        """(log p(X_hat, u), log p(u), pointwise (G, N)) at u (G, D)."""
        sigma, log_w, population, log_prior = self.unpack(u)
        log_z = component_log_evidence(stats, sigma, population, components=self.subset)
        pointwise = torch.logsumexp(log_w[:, None, :] + log_z, dim=-1)
        return pointwise.sum(dim=1) + log_prior, log_prior, pointwise


def laplace_globals(stats: ParticleStats, module: MixturePDE, n_draws: int = 200, seed: int = 0,
                    subset: tuple[int, ...] | None = None, trust_region: bool = False) -> GlobalDraws:
    """Draws of the globals from a Laplace approximation of their posterior p(g | X), the
    subjects' latents and subtypes integrated out by ``stats``; ``subset``: the sub-model of those
    components (its own weights and population priors). ``trust_region``: search the population
    priors only within ``TRUST_LOC`` population sds and ``TRUST_LOG_SCALE`` in log sd of the
    module's (those the points were made with), where re-weighting the points is accurate."""
    from scipy.optimize import minimize

    subset = list(range(len(stats.components))) if subset is None else list(subset)
    space = GlobalSpace(module, stats, subset)
    noise0 = stats.noise_ref if math.isfinite(stats.noise_ref) else module.priors.noise_median

    def neg(x: np.ndarray):
        u = torch.tensor(x, dtype=DTYPE, requires_grad=True)
        value = -space.log_joint(stats, u[None])[0][0]
        value.backward()
        return float(value.detach()), u.grad.numpy().copy()

    start = space.start(noise0)
    # bounds keep the line search away from values where exp under- or overflows (sigma = 0)
    bounds = [(x - GLOBAL_SEARCH_HALF_WIDTH, x + GLOBAL_SEARCH_HALF_WIDTH) for x in start]
    if trust_region and space.learned:
        off = len(subset)
        for f in range(len(space.free)):
            mu, log_tau = start[off + 2 * f], start[off + 2 * f + 1]
            bounds[off + 2 * f] = (mu - TRUST_LOC * math.exp(log_tau), mu + TRUST_LOC * math.exp(log_tau))
            bounds[off + 2 * f + 1] = (log_tau - TRUST_LOG_SCALE, log_tau + TRUST_LOG_SCALE)
    res = minimize(neg, start, jac=True, method="L-BFGS-B", bounds=bounds)
    mode = torch.tensor(res.x, dtype=DTYPE)
    hess = torch.autograd.functional.hessian(lambda u: -space.log_joint(stats, u[None])[0][0], mode)
    # The data can only add precision to the prior's: where the likelihood's part of the Hessian is
    # flat or non-concave at the optimiser's end point (e.g. the weight and population of a component
    # no subject uses), the proposal keeps the prior's precision there; the importance weights of the
    # IWAE estimate correct for the approximation.
    prior_hess = torch.autograd.functional.hessian(lambda u: -space.unpack(u[None])[3][0], mode)
    prior_hess = 0.5 * (prior_hess + prior_hess.T)
    data_evals, data_evecs = torch.linalg.eigh(0.5 * (hess + hess.T) - prior_hess)
    precision = prior_hess + data_evecs @ torch.diag(data_evals.clamp_min(0.0)) @ data_evecs.T
    evals, evecs = torch.linalg.eigh(precision)
    cov = evecs @ torch.diag(1.0 / evals.clamp_min(1e-6)) @ evecs.T
    q = dist.MultivariateNormal(mode, covariance_matrix=cov)
    generator = torch.Generator().manual_seed(seed + 7907)
    chol = torch.linalg.cholesky(cov)
    u = mode + torch.randn(n_draws, space.dim, generator=generator, dtype=DTYPE) @ chol.T
    with torch.no_grad():
        sigma, log_w, population, log_prior = space.unpack(u)
        mode_population = space.unpack(mode[None])[2]
    if mode_population is not None:
        mode_population = (mode_population[0][0], mode_population[1][0])
    return GlobalDraws(torch.exp(log_w), sigma, q.log_prob(u), log_prior, population, mode_population)


# --------------------------------------------------------------------------- the evidence
def _subject_variance(stats: ParticleStats, draws: GlobalDraws, subset: tuple[int, ...] | None,
                      chunk: int = 16) -> torch.Tensor:
    """Delta-method Var[log p_hat(x_i | g)] over importance particles, summed over subjects, for
    each draw g: (G,). Zero for quadrature nodes (their error is a bound, not a variance)."""
    if stats.quadrature or stats.n_particles < 2:
        return torch.zeros(draws.n_draws, dtype=DTYPE)
    comps = list(subset) if subset is not None else None
    out = []
    for start in range(0, draws.n_draws, chunk):
        part = draws.chunk(slice(start, start + chunk))
        lw = _point_log_lik(stats, part.noise, part.population, comps)  # (g, P, N, K)
        m = torch.logsumexp(lw + torch.log(part.weights)[:, None, None, :], dim=-1)  # (g, P, N)
        e = torch.exp(m - m.max(dim=1, keepdim=True).values)
        mean = e.mean(dim=1)
        out.append((e.var(dim=1, unbiased=True) / (stats.n_particles * mean ** 2)).sum(dim=-1))
    return torch.cat(out)


def quadrature_error_bound(stats: ParticleStats, draws: GlobalDraws, subset: tuple[int, ...] | None = None) -> float:
    """Bound on the log evidence's integration error: sum over subjects of each component's
    two-order difference weighted by the subject's posterior subtype probabilities (at the
    draws' weighted centre). Zero for importance particles."""
    if not stats.quadrature or stats.error is None:
        return 0.0
    comps = list(range(len(stats.components))) if subset is None else list(subset)
    centre = draws.chunk(slice(0, 1))
    log_z = component_log_evidence(stats, centre.noise, centre.population, components=comps)[0]  # (N, K')
    resp = torch.softmax(torch.log(centre.weights[0]) + log_z, dim=-1)
    return float((resp * stats.error[:, comps]).sum())


@dataclass
class EvidenceEstimate:
    """IWAE log evidence (total over the cohort) and its error: ``se`` combines the globals' and
    subjects' Monte Carlo errors with half the quadrature error bound (``quadrature_error``)."""

    log_evidence: float
    se: float
    ess_globals: float
    se_subjects: float
    se_globals: float
    quadrature_error: float = 0.0
    pointwise: torch.Tensor = field(default=None, repr=False)  # (G, N) log p(x_i | g)
    pareto_k: float = math.nan  # of the importance weights of the globals' draws (> 0.7: unreliable)


def iwae_log_evidence(stats: ParticleStats, draws: GlobalDraws, subset: tuple[int, ...] | None = None,
                      pointwise: torch.Tensor | None = None) -> EvidenceEstimate:
    """log p(X) ~= log mean_g [p(g)/q(g) prod_i p_hat(x_i | g)] and its error."""
    if pointwise is None:
        pointwise = pointwise_log_likelihood(stats, draws, subset)
    log_w = draws.log_prior - draws.log_q + pointwise.sum(dim=1)  # (G,)
    g = draws.n_draws
    value = float(torch.logsumexp(log_w, 0) - math.log(g))
    norm = torch.softmax(log_w, 0)
    ess = float(1.0 / (norm ** 2).sum())
    var_globals = max(0.0, 1.0 / ess - 1.0 / g)
    var_subjects = float((norm * _subject_variance(stats, draws, subset)).sum())
    bound = quadrature_error_bound(stats, draws, subset)
    se = math.sqrt(var_globals + var_subjects + (bound / 2) ** 2)
    return EvidenceEstimate(value, se, ess, math.sqrt(var_subjects), math.sqrt(var_globals), bound, pointwise,
                            globals_pareto_k(log_w))


def globals_pareto_k(log_weights: torch.Tensor) -> float:
    """Pareto k of the importance weights (G,) of the globals' draws (PSIS, ``az.psislw``): above
    0.7 the IWAE estimate rests on a few draws and its SE is not to be trusted."""
    import arviz as az

    values = log_weights.detach().double().cpu().numpy()
    if values.size < 10 or not np.isfinite(values).all():
        return math.nan
    return float(np.asarray(az.psislw(values - values.max())[1]))


def cross_validated_lpd(stats: ParticleStats, module: MixturePDE, folds: int = 5, n_draws: int = 200,
                        seed: int = 0) -> tuple[float, float, np.ndarray]:
    """K-fold cross-validated log predictive density of whole subjects.

    Subjects are split into ``folds`` folds (seeded); for each fold, the posterior of the globals
    is re-inferred from the other folds' subjects (``laplace_globals``) and predicts each held-out
    subject: lpd_i = log mean_g p(x_i | g), its latents and subtype integrated out under the
    globals it did not inform. Returns (sum over subjects, its SE sqrt(N) sd(lpd_i), lpd_i (N,)).
    """
    n = stats.n_subjects
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed + 4099).permutation(n)
    lpd = np.zeros(n)
    for f in range(folds):
        held = np.sort(order[f::folds])
        kept = np.setdiff1d(np.arange(n), held)
        draws = laplace_globals(stats.subset(kept), module, n_draws, seed + f)
        point = pointwise_log_likelihood(stats.subset(held), draws)  # (G, held)
        lpd[held] = (torch.logsumexp(point, dim=0) - math.log(draws.n_draws)).numpy()
    return float(lpd.sum()), float(math.sqrt(n) * lpd.std(ddof=1)) if n > 1 else math.nan, lpd


# --------------------------------------------------------------------------- posterior draws
@dataclass
class PosteriorDraws:
    """Joint posterior draws per global draw g and subject i (sampling-importance-resampling).

    subtype (G, N): k ~ p(k | x_i, g); particle (G, N, K): for every component, the index of a
    point resampled from that component's conditional weights at g (so the point of the drawn
    subtype is a draw of (D, r) from p(D, r | x_i, subtype, g)); subtype_log_prob (G, N, K).
    """

    subtype: torch.Tensor
    particle: torch.Tensor
    subtype_log_prob: torch.Tensor


def sample_posterior(stats: ParticleStats, draws: GlobalDraws, seed: int = 0, chunk: int = 16) -> PosteriorDraws:
    """Draw subtypes from their posterior (not the prior) and points by their weights."""
    generator = torch.Generator().manual_seed(seed + 15485863)
    subtypes, particles, log_probs = [], [], []
    for start in range(0, draws.n_draws, chunk):
        part = draws.chunk(slice(start, start + chunk))
        lw, log_z = _log_z(stats, part.noise, part.population, None)  # (g, P, N, K), (g, N, K)
        joint = torch.log(part.weights)[:, None, :] + log_z
        log_prob = joint - torch.logsumexp(joint, dim=-1, keepdim=True)
        g, n, k = log_prob.shape
        subtype = torch.multinomial(log_prob.exp().reshape(g * n, k), 1, generator=generator).reshape(g, n)
        probs = torch.softmax(lw, dim=1).permute(0, 2, 3, 1).reshape(-1, stats.n_particles)  # (g*N*K, P)
        particle = torch.multinomial(probs, 1, generator=generator).reshape(g, n, k)
        subtypes.append(subtype)
        particles.append(particle)
        log_probs.append(log_prob)
    return PosteriorDraws(torch.cat(subtypes), torch.cat(particles), torch.cat(log_probs))


def conditional_log_likelihood(stats: ParticleStats, draws: GlobalDraws, posterior: PosteriorDraws) -> torch.Tensor:
    """log p(x_i | subject's own draw of subtype and (D, r), sigma_g): (G, N).

    The naive pointwise likelihood, for diagnostics only: each subject's latents are informed by
    that subject alone, so leaving it out moves them far and PSIS-LOO on this matrix breaks down
    (Pareto k > 0.7 for most subjects); use ``pointwise_log_likelihood`` for LOO.
    """
    g, n = posterior.subtype.shape
    subj = torch.arange(n)[None, :].expand(g, n)
    k = posterior.subtype
    p = torch.gather(posterior.particle, 2, k[..., None])[..., 0]
    sse = stats.sse[p, subj, k]
    s = observation_sd(draws.noise[:, None])
    return gaussian_log_likelihood(sse, stats.n_obs[None, :], s)
