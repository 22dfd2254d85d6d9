"""Model evidence in one call: what model comparison needs for one fitted model on one cohort.

``model_evidence`` integrates every subject's latents under every component (``particles``:
adaptive Gauss-Hermite quadrature around modes found by a global search, the default, or
importance particles from Laplace proposals, which PPC and forecasts resample), then the globals
(``marginal``: weights, noise and the learned population priors, by a Laplace approximation and
IWAE). The result does not depend on the encoder (it only adds a candidate to the search) nor,
beyond the learned priors the nodes are centred for, on the fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.cohort import CohortTensors
from ..model.module import MixturePDE
from .encoding import encode_cohort
from .marginal import GlobalDraws, PosteriorDraws, iwae_log_evidence, laplace_globals, sample_posterior
from .particles import ParticleStats, particle_stats, quadrature_stats
from .quadrature import DEFAULT_TOLERANCE

METHODS = ("quadrature", "importance")


@dataclass
class ModelEvidence:
    """Everything model comparison needs for one fitted model on one cohort.

    ``pointwise`` (G, N): log p(x_i | g) at posterior draws g of the globals (``draws``), the LOO
    input. ``log_evidence``/``log_evidence_se``: IWAE estimate and its error (total over the
    cohort, nats; ``quadrature_error``: the integration error bound inside it). ``elbo``/``elbo_se``:
    the fitted model's ELBO summed over the cohort under its semi-amortized guide (mean and MC SE).
    ``ess_subjects`` (N, K): effective sample size of each subject's points per component.
    ``unconverged`` (N, K): (subject, component) integrals whose quadrature did not reach its
    tolerance (None for importance particles).
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
    method: str = "quadrature"
    quadrature_error: float = 0.0
    unconverged: torch.Tensor | None = field(default=None, repr=False)

    def posterior_draws(self, seed: int = 0) -> PosteriorDraws:
        return sample_posterior(self.stats, self.draws, seed)


def elbo_estimate(module: MixturePDE, data: CohortTensors, n_draws: int = 4, seed: int = 0) -> tuple[float, float]:
    """The fitted model's ELBO summed over the cohort (units of ``log_evidence``) under its
    semi-amortized guide (Laplace approximations refined from the encoder's guess): mean and MC SE."""
    from .train import evaluate_elbo, refine

    data = data.to(data.signal.device, next(module.parameters()).dtype)
    refined, _ = refine(module, data, n_iter=4)
    value, se = evaluate_elbo(module, data, refined, n_draws=n_draws, seed=seed)
    return value * data.n_subjects, se * data.n_subjects


def model_evidence(module: MixturePDE, data: CohortTensors, method: str = "quadrature", n_particles: int = 32,
                   n_draws: int = 200, seed: int = 0, tolerance: float = DEFAULT_TOLERANCE, elbo_repeats: int = 4,
                   keep_fields: bool = False) -> ModelEvidence:
    """Per-subject integrals, posterior draws of the globals, pointwise marginal log-likelihood,
    IWAE evidence and the ELBO.

    ``method``: ``"quadrature"`` (default; ``tolerance`` nats between two quadrature orders) or
    ``"importance"`` (``n_particles`` draws per subject and component from Laplace proposals;
    ``keep_fields`` keeps their solutions for predictive draws).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "quadrature":
        with torch.no_grad():
            guide = encode_cohort(module, data.to(data.signal.device, next(module.parameters()).dtype))
        stats = quadrature_stats(module, data, tolerance=tolerance, start=guide)
    else:
        stats = particle_stats(module, data, n_particles, seed, "laplace", keep_fields=keep_fields)
    draws = laplace_globals(stats, module, n_draws, seed)
    est = iwae_log_evidence(stats, draws)
    elbo, elbo_se = elbo_estimate(module, data, elbo_repeats, seed) if elbo_repeats else (math.nan, math.nan)
    ess = stats.ess(float(draws.noise.mean()))
    unconverged = (stats.error > tolerance) if stats.quadrature and stats.error is not None else None
    return ModelEvidence(tuple(module.components), list(data.subjects), stats, draws, est.pointwise,
                         est.log_evidence, est.se, est.ess_globals, elbo, elbo_se, ess, method, est.quadrature_error,
                         unconverged)
