"""Per-subject integrals of the latents, as weighted points: importance particles or quadrature nodes.

Everything downstream (evidence, LOO, posterior draws, PPC, forecasts) rests on one observation:
the PDE solutions depend only on each subject's own latents (D, r), never on the globals (mixture
weights w, noise scale sigma, population priors h). So each subject gets P points per component,
solved once; what is kept per (point p, subject i, component k) is

* ``sse``: the sum of squared residuals over the subject's later observed visits,
* ``log_ratio``: the log weight of the point without the likelihood, under the population prior
  the points were made with: log prior - log q for an importance particle drawn from q (with
  the 1/P of the mean), or log(rule weight x Jacobian) + log prior + log P for a quadrature node
  (``quadrature``), so that in both cases

    log Z_ik(sigma) = logmeanexp_p [ -sse/(2 sigma^2) - n_obs log(sigma sqrt(2 pi)) + log_ratio ],

* ``log_prior_ref``: that prior's log density at the point, so the integral under another
  population prior h costs array operations too (add log p_h - log_prior_ref).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pyro.distributions as dist
import torch

from ..data.cohort import CohortTensors
from ..errors import InputError
from ..model.likelihood import NOISE_FLOOR, gaussian_log_likelihood, observation_sd
from ..model.module import MixturePDE
from . import distributed as ddp
from .encoding import GuideSummary, encode_cohort
from .laplace import laplace_fit, pooled_residual_variance
from .quadrature import DEFAULT_TOLERANCE, log_prior, node_sse, quadrature_nodes
from .search import search_modes
from .surrogate import ResidualSurrogate, fit_surrogate

DTYPE = torch.float64


@dataclass
class ParticleStats:
    """Sufficient statistics of the likelihood of P points per subject and component.

    sse, log_ratio, log_prior_ref: (P, N, K); n_obs: (N,); diffusivity: (P, N, K); reaction:
    (P, N, K), NaN for components without a rate. All float64. ``proposal``: "laplace", "guide",
    "custom" (importance particles) or "quadrature" (Gauss-Hermite nodes, whose integration error
    per (subject, component) is ``error`` (N, K), nats). ``noise_ref``: the noise scale the points
    were placed for.
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
    log_prior_ref: torch.Tensor | None = field(default=None, repr=False)
    error: torch.Tensor | None = field(default=None, repr=False)
    surrogate: ResidualSurrogate | None = field(default=None, repr=False)  # quadrature nodes only
    surrogate_sse: torch.Tensor | None = field(default=None, repr=False)  # (P, N, K): the surrogate at the points

    @property
    def n_particles(self) -> int:
        return self.sse.shape[0]

    @property
    def n_subjects(self) -> int:
        return self.sse.shape[1]

    @property
    def has_rate(self) -> torch.Tensor:
        """(K,) bool: components with a reaction rate."""
        return ~torch.isnan(self.reaction[0, 0]) if self.n_subjects else torch.zeros(len(self.components), dtype=bool)

    @property
    def theta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log D, log r) of every point, (P, N, K) each; log r is 0 without a rate."""
        return torch.log(self.diffusivity), torch.nan_to_num(torch.log(self.reaction), nan=0.0)

    @property
    def quadrature(self) -> bool:
        return self.proposal == "quadrature"

    def log_weights(self, noise: float) -> torch.Tensor:
        """Unnormalised log importance weights (P, N, K) of the particles at noise sd ``noise``."""
        s = observation_sd(torch.tensor(float(noise), dtype=DTYPE))
        return gaussian_log_likelihood(self.sse, self.n_obs[:, None], s) + self.log_ratio

    def ess(self, noise: float | None = None) -> torch.Tensor:
        """Effective sample size (N, K) of the particles of each subject and component."""
        w = torch.softmax(self.log_weights(self.noise_ref if noise is None else noise), dim=0)
        return 1.0 / (w ** 2).sum(dim=0)

    def subset(self, index) -> "ParticleStats":
        """The statistics of the subjects ``index`` (a list or tensor of positions)."""
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[:, index]  # noqa: E731
        return dataclasses.replace(
            self, subjects=[self.subjects[i] for i in index.tolist()], sse=self.sse[:, index],
            log_ratio=self.log_ratio[:, index], n_obs=self.n_obs[index], diffusivity=self.diffusivity[:, index],
            reaction=self.reaction[:, index], fields=pick(self.fields), log_prior_ref=pick(self.log_prior_ref),
            error=None if self.error is None else self.error[index],
            surrogate=None if self.surrogate is None else self.surrogate.subset(index),
            surrogate_sse=pick(self.surrogate_sse))


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

    def sample(self, n: int, generator: torch.Generator,
               share: ddp.Share | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws of (log D, log r), each (n, N, K); log r is 0 where there is no rate. ``share``
        (distributed): the N subjects are ``share.rows`` of ``share.n_total``; the random numbers
        are drawn for all of them, as one process draws them, and these subjects' kept."""
        d_loc, d_scale, r_loc, r_scale = self._guide_params()
        shape = d_loc.shape if share is None else (share.n_total, *d_loc.shape[1:])
        keep = (lambda t: t) if share is None else (lambda t: t[:, share.rows])  # noqa: E731
        # drawn on the (CPU) generator, then moved: the same draws on CPU and CUDA
        eps = keep(torch.randn((n, *shape, 2), generator=generator, dtype=DTYPE)).to(d_loc.device)
        a = d_loc + d_scale * eps[..., 0]
        b = r_loc + r_scale * eps[..., 1]
        if self.mean is not None:
            chol = torch.linalg.cholesky(self.cov)  # (N, K, 2, 2)
            lap = self.mean + (chol @ eps[..., None])[..., 0]
            uniform = keep(torch.rand((n, *shape), generator=generator, dtype=DTYPE)).to(d_loc.device)
            use_guide = uniform < self.defensive
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


def particle_stats(module: MixturePDE, data: CohortTensors, n_particles: int = 32, seed: int = 0,
                   proposal: str | Proposal = "laplace", batch_size: int | None = None,
                   keep_fields: bool = False, share: ddp.Share | None = None) -> ParticleStats:
    """Draw ``n_particles`` per subject and component from the proposal, solve, keep the statistics.

    ``proposal``: ``"laplace"`` (default: the guide refined by ``laplace_proposal``, mixed with
    the guide), ``"guide"`` (the amortized guide alone), or a ``Proposal``. ``keep_fields`` also
    keeps every particle's solution (float32) for posterior predictive draws. ``share``
    (distributed; with a ``Proposal``): ``data`` holds this rank's subjects, ``share.rows`` of
    ``share.n_total``: their particles are the ones one process draws for them
    (``Proposal.sample``); ``noise_ref``, a cohort-wide profile, is left NaN.
    """
    if n_particles < 1:
        raise InputError(f"n_particles must be >= 1, got {n_particles}")
    if isinstance(proposal, str):
        if proposal not in ("laplace", "guide"):
            raise InputError(f"proposal must be 'laplace' or 'guide', got {proposal!r}")
        kind = proposal
        proposal = laplace_proposal(module, data) if proposal == "laplace" else guide_proposal(module, data)
    else:
        kind = "custom"
    generator = torch.Generator().manual_seed(seed)
    a, b = proposal.sample(n_particles, generator, share)
    prior = log_prior(module, a, b, proposal.has_rate)
    log_ratio = prior - proposal.log_prob(a, b)  # densities of log D, log r: the Jacobians cancel
    d = torch.exp(a)
    r = torch.where(proposal.has_rate, torch.exp(b), torch.full_like(b, math.nan))
    out = node_sse(module, data, d, r, batch_size=batch_size, keep_fields=keep_fields)
    sse, kept = out if keep_fields else (out, None)
    n_obs = data.observed[:, 1:].to(DTYPE).sum(dim=1) * data.signal.shape[-1]
    # the solves may run on CUDA; the statistics are small and everything downstream is on CPU
    stats = ParticleStats(list(data.subjects), tuple(module.components), sse.cpu(), log_ratio.cpu(), n_obs.cpu(),
                          d.cpu(), r.cpu(), proposal=kind, fields=kept, log_prior_ref=prior.cpu())
    if share is None:
        stats.noise_ref = profile_noise(stats)
    return stats


def searched_modes(module: MixturePDE, data: CohortTensors, start: GuideSummary | None = None,
                   grid_size: int = 7):
    """Every (subject, component) posterior mode by ``search.search_modes`` (a grid over the prior's
    support, then Levenberg-Marquardt to convergence; ``start``, e.g. the encoder's guess, is one
    more candidate), at the pooled least-squares noise of the modes. Returns (fit, noise sd)."""
    data = data.to(data.signal.device, DTYPE)
    sd = observation_sd(module.priors.noise_median)
    fit = search_modes(module, data, sd, grid_size=grid_size, start=start, tolerance=1e-3)
    pooled = pooled_residual_variance(fit.sse, fit.n_obs)
    if pooled is not None:  # the modes again at the data's own noise (from where the search ended)
        sd = max(pooled, NOISE_FLOOR ** 2) ** 0.5
        fit = search_modes(module, data, sd, start=GuideSummary(fit.mean[..., 0], fit.mean[..., 0], fit.mean[..., 1],
                                                                  fit.mean[..., 1]), grid=False, tolerance=1e-3)
    return fit, sd


def quadrature_stats(module: MixturePDE, data: CohortTensors, tolerance: float = DEFAULT_TOLERANCE,
                     start: GuideSummary | None = None, grid_size: int = 7, searched=None) -> ParticleStats:
    """Gauss-Hermite nodes of every (subject, component) integral as weighted points.

    The nodes are centred at the modes of ``searched_modes`` (or ``searched``: its result under
    the module's current priors, if already computed), and they and their error come from
    ``quadrature.quadrature_nodes`` (orders 5, 7, ... until two agree within ``tolerance``).
    """
    data = data.to(data.signal.device, DTYPE)
    fit, sd = searched if searched is not None else searched_modes(module, data, start, grid_size)
    nodes = quadrature_nodes(module, data, fit, sd, tolerance=tolerance)
    p = nodes.sse.shape[0]
    has_rate = fit.has_rate.to(nodes.a.device)
    log_ratio = nodes.log_rule + nodes.log_prior + math.log(p)
    r = torch.where(has_rate, torch.exp(nodes.b), torch.full_like(nodes.b, math.nan))
    noise = math.sqrt(max(sd ** 2 - NOISE_FLOOR ** 2, 1e-12))
    log_posterior = log_ratio + gaussian_log_likelihood(nodes.sse, nodes.n_obs[:, None], sd)
    a, b = nodes.a.cpu(), nodes.b.cpu()
    surrogate = fit_surrogate(a, b, nodes.sse.cpu(), log_posterior.cpu(), has_rate.cpu(), sd ** 2)
    return ParticleStats(list(data.subjects), tuple(module.components), nodes.sse.cpu(), log_ratio.cpu(),
                         nodes.n_obs.cpu(), torch.exp(nodes.a).cpu(), r.cpu(), noise_ref=noise, proposal="quadrature",
                         log_prior_ref=nodes.log_prior.cpu(), error=nodes.error.cpu(), surrogate=surrogate,
                         surrogate_sse=surrogate.sse(a, b))


def profile_noise(stats: ParticleStats) -> float:
    """The noise sd maximising sum_i log p_hat(x_i | sigma) with equal weights (grid + refinement)."""
    k = len(stats.components)
    w = torch.full((1, k), 1.0 / k, dtype=DTYPE)
    log_w = torch.log(w)

    def total(s: float) -> float:
        lw = stats.log_weights(s)
        log_z = torch.logsumexp(lw, dim=0) - math.log(stats.n_particles)
        return float(torch.logsumexp(log_w + log_z, dim=-1).sum())
    grid = np.exp(np.linspace(np.log(1e-4), np.log(10.0), 61))
    values = [total(s) for s in grid]
    best = int(np.argmax(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda x: -total(math.exp(x)), bounds=(math.log(lo), math.log(hi)), method="bounded",
                          options={"xatol": 1e-4})
    return float(math.exp(res.x))
