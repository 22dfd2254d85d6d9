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
from ..errors import InputError
from ..model.module import MixturePDE
from .encoding import encode_cohort
from .marginal import (
    EvidenceEstimate,
    GlobalDraws,
    PosteriorDraws,
    iwae_log_evidence,
    laplace_globals,
    sample_posterior,
)
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
    pareto_k_globals: float = math.nan  # PSIS k of the globals' importance weights (> 0.7: unreliable)

    def posterior_draws(self, seed: int = 0) -> PosteriorDraws:
        return sample_posterior(self.stats, self.draws, seed)


def elbo_estimate(module: MixturePDE, data: CohortTensors, n_draws: int = 4, seed: int = 0) -> tuple[float, float]:
    """The fitted model's ELBO summed over the cohort (units of ``log_evidence``) under its
    semi-amortized guide (Laplace approximations refined from the encoder's guess): mean and MC SE."""
    from .objective import evaluate_elbo, refine

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
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
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
                         unconverged, est.pareto_k)


def fit_population(module: MixturePDE, data: CohortTensors, rounds: int = 2):
    """Fit ``module``'s population priors and weights to ``data`` by EM, in place: each round a
    global mode search under the current priors (``particles.searched_modes``), then EM on its
    Laplace approximations. For a sub-model, whose populations can lie far from those of the
    model it came from (its mechanisms must now explain every subject). Returns the last
    round's search under the final priors, (fit, noise sd)."""
    from .particles import searched_modes
    from .population import Population, em_population

    fit, sd = searched_modes(module, data)
    for _ in range(rounds):
        current = Population(module.population_loc.double(), module.population_scale.double())
        pop, weights, resp, _ = em_population(fit.mean, fit.jtj, sd ** 2, fit.log_evidence, current, module.priors,
                                              fit.has_rate, n_iter=50)
        with torch.no_grad():
            module.population_loc.copy_(pop.loc.to(module.population_loc))
            module.population_scale.copy_(pop.scale.to(module.population_scale))
            module.weights_log_concentration.copy_(torch.log(module.priors.weights_concentration + resp.sum(0)).to(
                module.weights_log_concentration))
        fit, sd = searched_modes(module, data)
    return fit, sd


def submodel_evidence(module: MixturePDE, data: CohortTensors, subset: tuple[int, ...], n_draws: int = 200,
                      seed: int = 0, stats: ParticleStats | None = None) -> EvidenceEstimate:
    """Log evidence of the sub-model of the components ``subset`` (its own weights on the
    |S|-simplex and, when learned, its own population priors).

    With fixed priors the full model's points ``stats`` serve as they are. With learned population
    priors the sub-model's populations can lie far from the full model's (a single mechanism must
    explain every subject), so its priors are fitted again (``fit_population``) and its integrals
    placed under them before the globals are integrated.
    """
    if stats is not None and not bool(module.population_learned):
        return iwae_log_evidence(stats, laplace_globals(stats, module, n_draws, seed, subset), subset)
    sub = module.submodel(subset)
    searched = fit_population(sub, data) if bool(sub.population_learned) else None
    sub_stats = quadrature_stats(sub, data, searched=searched)
    return iwae_log_evidence(sub_stats, laplace_globals(sub_stats, sub, n_draws, seed))


def subset_evidence(module: MixturePDE, data: CohortTensors, n_draws: int = 200, seed: int = 0,
                    full: ModelEvidence | None = None):
    """Evidence of every non-empty subset of the fitted components (the paper's subset comparison),
    each as its own sub-model (``submodel_evidence``); ``full``: the model's own evidence, if
    already computed. Returns a ``pandas.DataFrame`` sorted by evidence (subset, n_components,
    log_evidence, log_evidence_se, rank)."""
    import itertools

    import pandas as pd

    k = module.n_components
    full = full or model_evidence(module, data, n_draws=n_draws, seed=seed, elbo_repeats=0)
    rows = []
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            if size == k:
                value, se = full.log_evidence, full.log_evidence_se
            else:
                est = submodel_evidence(module, data, subset, n_draws, seed, full.stats)
                value, se = est.log_evidence, est.se
            rows.append({"subset": ",".join(module.components[j] for j in subset), "n_components": size,
                         "log_evidence": value, "log_evidence_se": se})
    table = pd.DataFrame(rows).sort_values("log_evidence", ascending=False, ignore_index=True)
    table["rank"] = np.arange(1, len(table) + 1)
    return table
