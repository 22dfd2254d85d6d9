"""Marginal likelihoods of a fitted mixture: pointwise (for LOO), IWAE log evidence, ELBO, subsets.

Everything here rests on one observation: the PDE solutions depend only on each subject's own
latents (D, r), never on the globals (mixture weights w, noise scale sigma). So each subject gets
P particles per component, drawn once from the amortized guide q_k(D, r | x_i), and solved once;
what is kept per (particle p, subject i, component k) is

* ``sse``: the sum of squared residuals over the subject's later observed visits,
* ``log_ratio``: log prior(D, r) - log q_k(D, r | x_i) (the importance weight without likelihood),

and per subject the number of observed values ``n_obs``. Then for ANY globals g = (w, sigma)

    log Z_ik(sigma)  = logmeanexp_p [ -sse/(2 sigma^2) - n_obs log(sigma sqrt(2 pi)) + log_ratio ]
    log p(x_i | g)   = logsumexp_k [ log w_k + log Z_ik(sigma) ]

costs a few array operations: the subject's latents AND its subtype are integrated out, which is
the pointwise likelihood PSIS-LOO needs (the likelihood given the subject's own draw makes every
Pareto k explode, because each subject's latents are informed by that subject alone).

The log evidence is the importance-weighted (IWAE) estimate over G draws of the globals from the
guide q(w) q(sigma), with the per-subject estimates above inside:

    log p(X) ~= log mean_g [ p(g) / q(g) * prod_i p_hat(x_i | g) ]

It is a stochastic lower bound of log p(X) (exact as P, G -> infinity). Its Monte Carlo standard
error is the delta-method one, from two independent sources of variance:

* subjects: Var[log p_hat(x_i | g)] ~= Var_p(m_ip) / (P mean_p(m_ip)^2), where
  m_ip = sum_k w_k exp(loglik_ipk + log_ratio_ipk) are i.i.d. over p (the K particles of index p
  are independent draws), summed over subjects and averaged over g with the normalised weights;
* globals: Var[log mean_g W_g] ~= Var(W) / (G mean(W)^2) = 1/ESS - 1/G.

The delta method understates the error when the weights are heavy-tailed (ESS of a few); the
effective sample sizes are returned so callers can see it.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pyro.distributions as dist
import torch
from torch.nn.functional import softplus

from ..data.cohort import CohortTensors
from ..model import module as _module_def
from ..model.module import MixturePDE
from .encoding import GuideSummary, encode_cohort
from .laplace import LOG_2PI, laplace_fit, pooled_residual_variance

DTYPE = torch.float64
NOISE_FLOOR = float(getattr(_module_def, "NOISE_FLOOR", 0.0))


def observation_sd(noise):
    """The model's observation sd for noise scale ``noise``: sqrt(noise^2 + NOISE_FLOOR^2)."""
    return (noise ** 2 + NOISE_FLOOR ** 2) ** 0.5


# --------------------------------------------------------------------------- particles
@dataclass
class ParticleStats:
    """Sufficient statistics of the likelihood of P particles per subject and component.

    sse, log_ratio: (P, N, K); n_obs: (N,); diffusivity: (P, N, K); reaction: (P, N, K), NaN for
    components without a rate. All float64. ``ess`` (N, K): effective sample size of each
    subject's particles for each component at the reference noise ``noise_ref``.
    """

    subjects: list[str]
    components: tuple[str, ...]
    sse: torch.Tensor
    log_ratio: torch.Tensor
    n_obs: torch.Tensor
    diffusivity: torch.Tensor
    reaction: torch.Tensor
    noise_ref: float = math.nan
    proposal: str = "guide"
    fields: torch.Tensor | None = field(default=None, repr=False)  # (P, N, K, T, n) float32, if kept

    @property
    def n_particles(self) -> int:
        return self.sse.shape[0]

    @property
    def n_subjects(self) -> int:
        return self.sse.shape[1]

    def log_weights(self, noise: float) -> torch.Tensor:
        """Unnormalised log importance weights (P, N, K) of the particles at noise sd ``noise``."""
        s = observation_sd(torch.tensor(float(noise), dtype=DTYPE))
        return -0.5 * self.sse / s ** 2 - self.n_obs[:, None] * (torch.log(s) + 0.5 * LOG_2PI) + self.log_ratio

    def ess(self, noise: float | None = None) -> torch.Tensor:
        """Effective sample size (N, K) of the particles of each subject and component."""
        w = torch.softmax(self.log_weights(self.noise_ref if noise is None else noise), dim=0)
        return 1.0 / (w ** 2).sum(dim=0)


@dataclass
class Proposal:
    """Per (subject, component) importance proposal over theta = (log D, log r).

    A defensive mixture ``(1 - defensive) * Normal(mean, cov) + defensive * guide``: the Gaussian
    is a Laplace approximation of p(theta | x_i, subtype k) (``cov`` inflated), the guide is the
    amortized q_k(theta | x_i). With ``mean = None`` the proposal is the guide alone. For
    components without a rate only the log D coordinate is used.
    """

    d_loc: torch.Tensor  # (N, K) guide, log space
    d_scale: torch.Tensor
    r_loc: torch.Tensor  # (N, K), NaN where no rate
    r_scale: torch.Tensor
    has_rate: torch.Tensor  # (K,) bool
    mean: torch.Tensor | None = None  # (N, K, 2)
    cov: torch.Tensor | None = None  # (N, K, 2, 2)
    defensive: float = 0.1

    def _guide_params(self):
        rate = self.has_rate
        r_loc = torch.where(rate, self.r_loc, torch.zeros_like(self.r_loc))
        r_scale = torch.where(rate, self.r_scale, torch.ones_like(self.r_scale))
        return self.d_loc, self.d_scale, r_loc, r_scale

    def log_prob(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """log q(theta) for a = log D, b = log r (..., N, K); b ignored where there is no rate."""
        rate = self.has_rate
        d_loc, d_scale, r_loc, r_scale = self._guide_params()
        b = torch.where(rate, b, torch.zeros_like(b))
        log_g = dist.Normal(d_loc, d_scale).log_prob(a) + rate * dist.Normal(r_loc, r_scale).log_prob(b)
        if self.mean is None:
            return log_g
        m, c = self.mean, self.cov
        caa, cab, cbb = c[..., 0, 0], c[..., 0, 1], c[..., 1, 1]
        cond_var = (cbb - cab ** 2 / caa).clamp_min(1e-12)
        cond_mean = m[..., 1] + cab / caa * (a - m[..., 0])
        log_l = (dist.Normal(m[..., 0], caa.sqrt()).log_prob(a)
                 + rate * dist.Normal(cond_mean, cond_var.sqrt()).log_prob(b))
        return torch.logaddexp(math.log1p(-self.defensive) + log_l, math.log(self.defensive) + log_g)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws of (log D, log r), each (n, N, K); log r is 0 where there is no rate."""
        d_loc, d_scale, r_loc, r_scale = self._guide_params()
        # drawn on the (CPU) generator, then moved: the same draws on CPU and CUDA
        eps = torch.randn((n, *d_loc.shape, 2), generator=generator, dtype=DTYPE).to(d_loc.device)
        a = d_loc + d_scale * eps[..., 0]
        b = r_loc + r_scale * eps[..., 1]
        if self.mean is not None:
            chol = torch.linalg.cholesky(self.cov)  # (N, K, 2, 2)
            lap = self.mean + (chol @ eps[..., None])[..., 0]
            use_guide = torch.rand((n, *d_loc.shape), generator=generator, dtype=DTYPE).to(d_loc.device) < self.defensive
            a = torch.where(use_guide, a, lap[..., 0])
            b = torch.where(use_guide, b, lap[..., 1])
        b = torch.where(self.has_rate, b, torch.zeros_like(b))
        return a, b


def guide_proposal(module: MixturePDE, data: CohortTensors, summary: GuideSummary | None = None) -> Proposal:
    """The amortized guide as proposal (``posterior_dataset(refine=False)`` uses it); ``summary``:
    the cohort's guide if already encoded."""
    dtype = next(module.parameters()).dtype
    s = summary if summary is not None else encode_cohort(module, data.to(data.signal.device, dtype))
    has_rate = torch.zeros(module.n_components, dtype=torch.bool, device=s.d_loc.device)
    has_rate[module.rate_index] = True
    return Proposal(s.d_loc.to(DTYPE), s.d_scale.to(DTYPE), s.r_loc.to(DTYPE), s.r_scale.to(DTYPE), has_rate)


def laplace_proposal(module: MixturePDE, data: CohortTensors, n_iter: int = 10, inflate: float = 2.0,
                     defensive: float = 0.1, batch_size: int | None = None, step: float = 1e-4,
                     tol: float = 1e-2) -> Proposal:
    """Refine the guide into a Laplace proposal per (subject, component).

    ``laplace.laplace_fit`` in float64 (Levenberg-Marquardt from the guide's means, at most
    ``n_iter`` iterations), with the guide's median noise during the search and the least-squares
    noise estimate (each subject's best component) for the final Gauss-Newton Hessian, whose
    inverse times ``inflate`` is the Gaussian's covariance. Subjects without later visits keep the
    prior's curvature.
    """
    guide = guide_proposal(module, data)
    sigma = float(observation_sd(torch.exp(module.noise_loc.detach())))
    fit = laplace_fit(module, data, sigma, n_iter=n_iter, step=step, tol=tol, batch_size=batch_size,
                      dtype=DTYPE, start=GuideSummary(guide.d_loc, guide.d_scale, guide.r_loc, guide.r_scale),
                      broyden=False)
    pooled = pooled_residual_variance(fit.sse, fit.n_obs)
    cov = fit.covariance(sigma ** 2 if pooled is None else pooled, module.prior_terms(DTYPE, fit.mean.device))
    return dataclasses.replace(guide, mean=fit.mean, cov=cov * inflate, defensive=defensive)


def solve_particles(module: MixturePDE, u0: torch.Tensor, times: torch.Tensor, diffusivity: torch.Tensor,
                    reaction: torch.Tensor) -> torch.Tensor:
    """Fields of particles: u0 (B, n), times (B, T), D and r (P, B, K) -> (P, B, K, T, n), float64."""
    n_p, b, k = diffusivity.shape
    rep = lambda x: x.to(DTYPE).repeat(n_p, *([1] * (x.dim() - 1)))  # noqa: E731
    rate = module.rate_index
    with torch.no_grad():
        fields = module.predict(rep(u0), rep(times), diffusivity.reshape(n_p * b, k).to(DTYPE),
                                reaction[..., rate].reshape(n_p * b, len(rate)).to(DTYPE) if rate else None)
    return fields.reshape(n_p, b, k, *fields.shape[2:])


def particle_stats(module: MixturePDE, data: CohortTensors, n_particles: int = 32, seed: int = 0,
                   proposal: str | Proposal = "laplace", batch_size: int | None = None,
                   keep_fields: bool = False) -> ParticleStats:
    """Draw ``n_particles`` per subject and component from the proposal, solve, keep the statistics.

    ``proposal``: ``"laplace"`` (default: the guide refined by ``laplace_proposal``, mixed with
    the guide), ``"guide"`` (the amortized guide alone), or a ``Proposal``. ``keep_fields`` also
    keeps every particle's solution (float32) for posterior predictive draws.
    """
    if n_particles < 1:
        raise ValueError(f"n_particles must be >= 1, got {n_particles}")
    if isinstance(proposal, str):
        if proposal not in ("laplace", "guide"):
            raise ValueError(f"proposal must be 'laplace' or 'guide', got {proposal!r}")
        kind = proposal
        proposal = laplace_proposal(module, data) if proposal == "laplace" else guide_proposal(module, data)
    else:
        kind = "custom"
    generator = torch.Generator().manual_seed(seed)
    a, b = proposal.sample(n_particles, generator)
    la, sa, lb, sb = module.prior_terms(DTYPE, a.device)
    log_ratio = (dist.Normal(la, sa).log_prob(a) + proposal.has_rate * dist.Normal(lb, sb).log_prob(b)
                 - proposal.log_prob(a, b))  # densities of log D, log r: the Jacobians cancel
    d = torch.exp(a)
    r = torch.where(proposal.has_rate, torch.exp(b), torch.full_like(b, math.nan))
    if batch_size is None:  # keep a batch's fields around 1e7 values
        per_subject = n_particles * module.n_components * data.signal.shape[1] * data.signal.shape[2]
        batch_size = max(1, int(1e7 // per_subject))
    sse = torch.zeros_like(d)
    observed = data.observed[:, 1:].to(DTYPE)  # (N, T-1)
    n_obs = observed.sum(dim=1) * data.signal.shape[-1]
    kept = (torch.zeros((*d.shape, *data.signal.shape[1:]), dtype=torch.float32) if keep_fields else None)
    for start in range(0, data.n_subjects, batch_size):
        sl = slice(start, start + batch_size)
        signal = data.signal[sl].to(DTYPE)
        fields = solve_particles(module, signal[:, 0], data.times[sl], d[:, sl], r[:, sl])  # (P, b, K, T, n)
        resid = (signal[None, :, None, 1:] - fields[:, :, :, 1:]) * observed[sl][None, :, None, :, None]
        sse[:, sl] = (resid ** 2).sum(dim=(-1, -2))
        if kept is not None:
            kept[:, sl] = fields.to(torch.float32).cpu()
    # the solves may run on CUDA; the statistics are small and everything downstream is on CPU
    stats = ParticleStats(list(data.subjects), tuple(module.components), sse.cpu(), log_ratio.cpu(), n_obs.cpu(),
                          d.cpu(), r.cpu(), proposal=kind, fields=kept)
    stats.noise_ref = profile_noise(stats)
    return stats


def profile_noise(stats: ParticleStats) -> float:
    """The noise sd maximising sum_i log p_hat(x_i | sigma) with equal weights (grid + refinement)."""
    k = len(stats.components)
    w = torch.full((1, k), 1.0 / k, dtype=DTYPE)
    total = lambda s: float(pointwise_log_likelihood(  # noqa: E731
        stats, GlobalDraws(w, torch.tensor([s], dtype=DTYPE), torch.zeros(1), torch.zeros(1))).sum())
    grid = np.exp(np.linspace(np.log(1e-4), np.log(10.0), 61))
    values = [total(s) for s in grid]
    best = int(np.argmax(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda x: -total(math.exp(x)), bounds=(math.log(lo), math.log(hi)), method="bounded",
                          options={"xatol": 1e-4})
    return float(math.exp(res.x))


# --------------------------------------------------------------------------- globals
@dataclass
class GlobalDraws:
    """G draws of the globals from the guide: weights (G, K), noise (G,), log q and log prior (G,)."""

    weights: torch.Tensor
    noise: torch.Tensor
    log_q: torch.Tensor
    log_prior: torch.Tensor

    @property
    def n_draws(self) -> int:
        return self.noise.shape[0]


def _global_guide(module: MixturePDE) -> tuple[dist.Dirichlet, dist.LogNormal]:
    with torch.no_grad():
        conc = module.weights_concentration().to(DTYPE)
        noise_scale = (softplus(module.noise_scale_raw) + 1e-4).to(DTYPE)
        return dist.Dirichlet(conc), dist.LogNormal(module.noise_loc.detach().to(DTYPE), noise_scale)


def _global_prior(module: MixturePDE, k: int) -> tuple[dist.Dirichlet, dist.LogNormal]:
    p = module.priors
    return (dist.Dirichlet(torch.full((k,), float(p.weights_concentration), dtype=DTYPE)),
            dist.LogNormal(torch.tensor(math.log(p.noise_median), dtype=DTYPE),
                           torch.tensor(p.noise_log_sd, dtype=DTYPE)))


def draw_globals(module: MixturePDE, n_draws: int = 200, seed: int = 0) -> GlobalDraws:
    """Draws of (weights, noise) from the guide with their guide and prior log densities."""
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    generator = torch.Generator().manual_seed(seed + 104729)
    q_w, q_s = _global_guide(module)
    gamma = torch.from_numpy(np.random.default_rng(seed + 104729).gamma(
        q_w.concentration.numpy(), size=(n_draws, module.n_components)))
    weights = (gamma / gamma.sum(dim=-1, keepdim=True)).clamp_min(1e-300)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    noise = torch.exp(q_s.loc + q_s.scale * torch.randn(n_draws, generator=generator, dtype=DTYPE))
    p_w, p_s = _global_prior(module, module.n_components)
    return GlobalDraws(weights, noise, q_w.log_prob(weights) + q_s.log_prob(noise),
                       p_w.log_prob(weights) + p_s.log_prob(noise))


def subset_globals(module: MixturePDE, draws: GlobalDraws, subset: tuple[int, ...]) -> GlobalDraws:
    """The same draws seen by the sub-model of ``subset``: weights renormalised over the subset.

    By the aggregation property of the Dirichlet, renormalised weights are Dirichlet(conc_S) under
    the guide and Dirichlet(c 1_|S|) under the prior, which is the sub-model's own prior.
    """
    idx = list(subset)
    w = draws.weights[:, idx]
    w = w / w.sum(dim=-1, keepdim=True)
    q_w, q_s = _global_guide(module)
    p_w, p_s = _global_prior(module, len(idx))
    if len(idx) == 1:
        log_q_w = log_p_w = torch.zeros(draws.n_draws, dtype=DTYPE)
    else:
        log_q_w = dist.Dirichlet(q_w.concentration[idx]).log_prob(w)
        log_p_w = p_w.log_prob(w)
    return GlobalDraws(w, draws.noise, log_q_w + q_s.log_prob(draws.noise), log_p_w + p_s.log_prob(draws.noise))


# --------------------------------------------------------------------------- marginals
def _loglik(stats: ParticleStats, noise: torch.Tensor, components: list[int] | None = None) -> torch.Tensor:
    """log p(x_i | particle, sigma) + log prior/q for noise (G,): (G, P, N, K)."""
    sse, ratio = stats.sse, stats.log_ratio
    if components is not None:
        sse, ratio = sse[..., components], ratio[..., components]
    s = observation_sd(noise[:, None, None, None])
    return -0.5 * sse / s ** 2 - stats.n_obs[:, None] * (torch.log(s) + 0.5 * LOG_2PI) + ratio


def component_log_evidence(stats: ParticleStats, noise: torch.Tensor, chunk: int = 16,
                           components: list[int] | None = None) -> torch.Tensor:
    """log Z_ik(sigma) = log p(x_i | subtype k, sigma) for each noise draw: (G, N, K)."""
    out = []
    for start in range(0, noise.shape[0], chunk):
        lw = _loglik(stats, noise[start:start + chunk], components)
        out.append(torch.logsumexp(lw, dim=1) - math.log(stats.n_particles))
    return torch.cat(out)


def pointwise_log_likelihood(stats: ParticleStats, draws: GlobalDraws,
                             subset: tuple[int, ...] | None = None) -> torch.Tensor:
    """log p(x_i | weights_g, noise_g) with the subject's latents and subtype integrated out: (G, N).

    ``draws.weights`` has one column per component of ``subset`` (all components by default).
    """
    log_z = component_log_evidence(stats, draws.noise, components=None if subset is None else list(subset))
    return torch.logsumexp(torch.log(draws.weights)[:, None, :] + log_z, dim=-1)


def _log_joint_u(stats: ParticleStats, module: MixturePDE, u: torch.Tensor, subset: list[int]):
    """Unconstrained globals u = (log sigma, alr(w)) (G, |S|): (log p(X_hat, u), log p(u), pointwise)."""
    k = len(subset)
    sigma = torch.exp(u[:, 0])
    logits = torch.cat([torch.zeros_like(u[:, :1]), u[:, 1:]], dim=1)
    log_w = torch.log_softmax(logits, dim=1)
    p_w, p_s = _global_prior(module, k)
    log_prior = p_s.log_prob(sigma) + u[:, 0]  # Jacobian of sigma = exp(u_0)
    if k > 1:  # Dirichlet density times the additive-log-ratio Jacobian prod_k w_k
        log_prior = log_prior + p_w.log_prob(torch.exp(log_w)) + log_w.sum(dim=1)
    log_z = component_log_evidence(stats, sigma, components=subset)
    pointwise = torch.logsumexp(log_w[:, None, :] + log_z, dim=-1)
    return pointwise.sum(dim=1) + log_prior, log_prior, pointwise


def laplace_globals(stats: ParticleStats, module: MixturePDE, n_draws: int = 200, seed: int = 0,
                    subset: tuple[int, ...] | None = None) -> GlobalDraws:
    """Draws of the globals from a Laplace approximation of p(w, sigma | X).

    The target is the posterior of the globals with every subject's latents and subtype
    integrated out by the particles, in u = (log sigma, additive log-ratios of w); the draws
    serve as posterior draws (LOO, PPC) and as the IWAE proposal of the globals (log_q, log_prior
    are densities in u). ``subset``: the sub-model of those components (weights renormalised).
    """
    from scipy.optimize import minimize

    subset = list(range(len(stats.components))) if subset is None else list(subset)
    dim = len(subset)
    noise0 = stats.noise_ref if math.isfinite(stats.noise_ref) else module.priors.noise_median

    def neg(x: np.ndarray):
        u = torch.tensor(x, dtype=DTYPE, requires_grad=True)
        value = -_log_joint_u(stats, module, u[None], subset)[0][0]
        value.backward()
        return float(value.detach()), u.grad.numpy().copy()

    x0 = np.zeros(dim)
    x0[0] = math.log(noise0)
    res = minimize(neg, x0, jac=True, method="L-BFGS-B")
    mode = torch.tensor(res.x, dtype=DTYPE)
    hess = torch.autograd.functional.hessian(
        lambda u: -_log_joint_u(stats, module, u[None], subset)[0][0], mode)
    hess = 0.5 * (hess + hess.T)
    evals, evecs = torch.linalg.eigh(hess)
    evals = evals.clamp_min(1e-6)  # guard a flat or numerically indefinite direction
    cov = evecs @ torch.diag(1.0 / evals) @ evecs.T
    q = dist.MultivariateNormal(mode, covariance_matrix=cov)
    generator = torch.Generator().manual_seed(seed + 7907)
    chol = torch.linalg.cholesky(cov)
    u = mode + torch.randn(n_draws, dim, generator=generator, dtype=DTYPE) @ chol.T
    with torch.no_grad():
        _, log_prior, _ = _log_joint_u(stats, module, u, subset)
    logits = torch.cat([torch.zeros_like(u[:, :1]), u[:, 1:]], dim=1)
    return GlobalDraws(torch.softmax(logits, dim=1), torch.exp(u[:, 0]), q.log_prob(u), log_prior)


def _subject_variance(stats: ParticleStats, draws: GlobalDraws, subset: tuple[int, ...] | None,
                      chunk: int = 16) -> torch.Tensor:
    """Delta-method Var[log p_hat(x_i | g)] summed over subjects, for each draw g: (G,)."""
    comps = list(subset) if subset is not None else None
    out = []
    for start in range(0, draws.n_draws, chunk):
        sl = slice(start, start + chunk)
        lw = _loglik(stats, draws.noise[sl], comps)  # (g, P, N, K)
        m = torch.logsumexp(lw + torch.log(draws.weights[sl])[:, None, None, :], dim=-1)  # (g, P, N)
        m = m - m.max(dim=1, keepdim=True).values
        e = torch.exp(m)
        mean = e.mean(dim=1)
        var = e.var(dim=1, unbiased=True) if stats.n_particles > 1 else torch.zeros_like(mean)
        out.append((var / (stats.n_particles * mean ** 2)).sum(dim=-1))
    return torch.cat(out)


@dataclass
class EvidenceEstimate:
    """IWAE log evidence (total over the cohort) with its delta-method MC standard error."""

    log_evidence: float
    se: float
    ess_globals: float
    se_subjects: float
    se_globals: float
    pointwise: torch.Tensor = field(repr=False)  # (G, N) log p(x_i | g)


def iwae_log_evidence(stats: ParticleStats, draws: GlobalDraws, subset: tuple[int, ...] | None = None,
                      pointwise: torch.Tensor | None = None) -> EvidenceEstimate:
    """log p(X) ~= log mean_g [p(g)/q(g) prod_i p_hat(x_i | g)] and its standard error."""
    if pointwise is None:
        pointwise = pointwise_log_likelihood(stats, draws, subset)
    log_w = draws.log_prior - draws.log_q + pointwise.sum(dim=1)  # (G,)
    g = draws.n_draws
    value = float(torch.logsumexp(log_w, 0) - math.log(g))
    norm = torch.softmax(log_w, 0)
    ess = float(1.0 / (norm ** 2).sum())
    var_globals = max(0.0, 1.0 / ess - 1.0 / g)
    var_subjects = float((norm * _subject_variance(stats, draws, subset)).sum())
    se = math.sqrt(var_globals + var_subjects)
    return EvidenceEstimate(value, se, ess, math.sqrt(var_subjects), math.sqrt(var_globals), pointwise)


def elbo_estimate(module: MixturePDE, data: CohortTensors, n_repeats: int = 4, seed: int = 0) -> tuple[float, float]:
    """The ELBO summed over the cohort (units of ``log_evidence``), mean and SE over repeats."""
    import pyro

    from .train import evaluate_loss

    values = []
    with torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        for _ in range(n_repeats):
            values.append(-evaluate_loss(module, data) * data.n_subjects)
    values = np.asarray(values)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se


# --------------------------------------------------------------------------- subsets
def subset_evidence(stats: ParticleStats, module: MixturePDE, n_draws: int = 200, seed: int = 0,
                    globals_: str = "laplace"):
    """Evidence of every non-empty subset of the fitted components (the paper's subset comparison).

    Each subset S is evaluated as its own sub-model built from the fitted components' particles:
    per subject log p(x_i | S, g) = logsumexp_{k in S} (log w_k + log Z_ik(sigma)) with w on the
    |S|-simplex under the sub-model's Dirichlet(c 1_|S|) prior, inside the IWAE estimate over the
    globals, whose proposal is the sub-model's own Laplace approximation (``globals_="laplace"``)
    or the fitted guide's weights renormalised over S (``"guide"``). Returns a
    ``pandas.DataFrame`` sorted by evidence (subset, n_components, log_evidence,
    log_evidence_se, rank).
    """
    import pandas as pd

    rows = []
    k = len(stats.components)
    guide_draws = draw_globals(module, n_draws, seed) if globals_ == "guide" else None
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            if guide_draws is not None:
                draws = subset_globals(module, guide_draws, subset)
            else:
                draws = laplace_globals(stats, module, n_draws, seed, subset)
            est = iwae_log_evidence(stats, draws, subset)
            rows.append({"subset": ",".join(stats.components[j] for j in subset), "n_components": size,
                         "log_evidence": est.log_evidence, "log_evidence_se": est.se})
    table = pd.DataFrame(rows).sort_values("log_evidence", ascending=False, ignore_index=True)
    table["rank"] = np.arange(1, len(table) + 1)
    return table


# --------------------------------------------------------------------------- posterior draws
@dataclass
class PosteriorDraws:
    """Joint posterior draws per global draw g and subject i (sampling-importance-resampling).

    subtype (G, N): k ~ p(k | x_i, g); particle (G, N, K): for every component, the index of a
    particle resampled from that component's conditional weights at sigma_g (so the particle of
    the drawn subtype is a draw of (D, r) from p(D, r | x_i, subtype, g));
    subtype_log_prob (G, N, K).
    """

    subtype: torch.Tensor
    particle: torch.Tensor
    subtype_log_prob: torch.Tensor


def sample_posterior(stats: ParticleStats, draws: GlobalDraws, seed: int = 0, chunk: int = 16) -> PosteriorDraws:
    """Draw subtypes from their posterior (not the prior) and particles by their importance weights."""
    generator = torch.Generator().manual_seed(seed + 15485863)
    subtypes, particles, log_probs = [], [], []
    for start in range(0, draws.n_draws, chunk):
        sl = slice(start, start + chunk)
        lw = _loglik(stats, draws.noise[sl])  # (g, P, N, K)
        log_z = torch.logsumexp(lw, dim=1) - math.log(stats.n_particles)  # (g, N, K)
        joint = torch.log(draws.weights[sl])[:, None, :] + log_z
        log_prob = joint - torch.logsumexp(joint, dim=-1, keepdim=True)
        g, n, k = log_prob.shape
        subtype = torch.multinomial(log_prob.exp().reshape(g * n, k), 1, generator=generator).reshape(g, n)
        probs = torch.softmax(lw, dim=1).permute(0, 2, 3, 1).reshape(-1, stats.n_particles)  # (g*N*K, P)
        particle = torch.multinomial(probs, 1, generator=generator).reshape(g, n, k)
        subtypes.append(subtype)
        particles.append(particle)
        log_probs.append(log_prob)
    return PosteriorDraws(torch.cat(subtypes), torch.cat(particles), torch.cat(log_probs))


# --------------------------------------------------------------------------- one call
@dataclass
class ModelEvidence:
    """Everything model comparison needs for one fitted model on one cohort.

    ``pointwise`` (G, N): log p(x_i | g) at posterior draws g of the globals (``draws``), the
    LOO input. ``log_evidence``/``log_evidence_se``: IWAE estimate and MC SE (total over the
    cohort, nats). ``elbo``/``elbo_se``: the fitted guide's ELBO summed over the cohort (mean and
    SE over ``elbo_repeats`` single-draw evaluations). ``ess_subjects`` (N, K): effective
    sample size of each subject's particles per component at the posterior mean noise.
    """

    components: tuple[str, ...]
    subjects: list[str]
    stats: ParticleStats = field(repr=False)
    draws: GlobalDraws = field(repr=False)
    pointwise: torch.Tensor = field(repr=False)
    log_evidence: float
    log_evidence_se: float
    ess_globals: float
    elbo: float
    elbo_se: float
    ess_subjects: torch.Tensor = field(repr=False)

    def posterior_draws(self, seed: int = 0) -> PosteriorDraws:
        return sample_posterior(self.stats, self.draws, seed)


def model_evidence(module: MixturePDE, data: CohortTensors, n_particles: int = 32, n_draws: int = 200,
                   seed: int = 0, proposal: str = "laplace", globals_: str = "laplace", elbo_repeats: int = 4,
                   keep_fields: bool = False) -> ModelEvidence:
    """Particles, posterior draws of the globals, pointwise marginal log-likelihood, IWAE evidence, ELBO.

    ``globals_``: ``"laplace"`` (default) draws the globals from the Laplace approximation of their
    posterior with the subjects' latents integrated out; ``"guide"`` from the fitted variational
    guide q(w) q(sigma). The guide's sigma is biased upward (the ELBO makes sigma absorb the
    encoder's spread), which makes its draws a poor IWAE proposal and poor posterior draws.
    """
    if globals_ not in ("laplace", "guide"):
        raise ValueError(f"globals_ must be 'laplace' or 'guide', got {globals_!r}")
    stats = particle_stats(module, data, n_particles, seed, proposal, keep_fields=keep_fields)
    draws = (laplace_globals(stats, module, n_draws, seed) if globals_ == "laplace"
             else draw_globals(module, n_draws, seed))
    est = iwae_log_evidence(stats, draws)
    elbo, elbo_se = elbo_estimate(module, data, elbo_repeats, seed) if elbo_repeats else (math.nan, math.nan)
    ess = stats.ess(float(draws.noise.mean()))
    return ModelEvidence(tuple(module.components), list(data.subjects), stats, draws, est.pointwise,
                         est.log_evidence, est.se, est.ess_globals, elbo, elbo_se, ess)


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
    return -0.5 * sse / s ** 2 - stats.n_obs[None, :] * (torch.log(s) + 0.5 * LOG_2PI)
