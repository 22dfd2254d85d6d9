"""Model evidence in one call: what model comparison needs for one fitted model on one cohort.

``model_evidence`` integrates every subject's latents under every component (``particles``:
adaptive Gauss-Hermite quadrature around modes found by a global search, the default, or
importance particles from Laplace proposals, which PPC and forecasts resample), then the globals
(``marginal``: weights, noise and the learned population priors, by a Laplace approximation and
IWAE). The result does not depend on the encoder (it only adds a candidate to the search) nor,
beyond the learned priors the nodes are centred for, on the fit.
"""
from __future__ import annotations

import copy
import dataclasses
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
# The nodes are placed again under the globals' own mode when its population priors lie further than
# this from those the nodes were placed for (in the mode's population sds, and in log tau), at most
# PLACEMENT_ROUNDS times: re-weighting nodes to a population far narrower or elsewhere is inaccurate.
PLACEMENT_SHIFT = 0.25
PLACEMENT_ROUNDS = 6


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
                   keep_fields: bool = False, stats: ParticleStats | None = None) -> ModelEvidence:
    """Per-subject integrals, posterior draws of the globals, pointwise marginal log-likelihood,
    IWAE evidence and the ELBO.

    ``method``: ``"quadrature"`` (default; ``tolerance`` nats between two quadrature orders) or
    ``"importance"`` (``n_particles`` draws per subject and component from Laplace proposals;
    ``keep_fields`` keeps their solutions for predictive draws). ``stats``: the per-subject
    integrals, if already computed (e.g. ``share_integrals``) under the module's fixed priors.
    Learned Gaussian populations are integrated with the globals; mixture populations
    (``population_terms`` > 1) are held at their fitted values (an empirical-Bayes evidence, which
    omits their terms' Occam factor: rank models with ``comparison.compare_models``, under the
    base priors).
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if stats is not None:
        if bool(module.population_learned):
            raise InputError("precomputed integrals need fixed population priors")
        draws = laplace_globals(stats, module, n_draws, seed)
    elif method == "quadrature":
        guide = _encoder_start(module, data)
        stats = quadrature_stats(module, data, tolerance=tolerance, start=guide)
        stats, draws = place_at_globals_mode(module, data, stats, n_draws, seed, tolerance, start=guide)
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


def _encoder_start(module: MixturePDE, data: CohortTensors):
    with torch.no_grad():
        return encode_cohort(module, data.to(data.signal.device, next(module.parameters()).dtype))


def searched_quadrature(module: MixturePDE, data: CohortTensors, tolerance: float = DEFAULT_TOLERANCE) -> ParticleStats:
    """Every (subject, mechanism) integral by quadrature around its searched mode (the encoder's
    guess one candidate of the search), under the module's current priors."""
    return quadrature_stats(module, data, tolerance=tolerance, start=_encoder_start(module, data))


def prior_key(module: MixturePDE) -> tuple:
    """What a (subject, mechanism) integral depends on besides the mechanism: the module's base
    priors of D and r and its solver settings. Fixed-prior modules with equal keys share integrals."""
    p = module.priors
    return (tuple(p.diffusivity.as_dict().items()), tuple(p.reaction.as_dict().items()), module.reaction_step,
            module.initial_reaction_step)


def _padded(stats: ParticleStats, n_points: int) -> ParticleStats:
    """``stats`` with its points padded to ``n_points`` (weightless points), the mean's 1/P kept."""
    extra = n_points - stats.n_particles
    if extra == 0:
        return stats

    def pad(t, value):
        return torch.cat([t, torch.full((extra, *t.shape[1:]), value, dtype=t.dtype)])
    reaction = torch.cat([stats.reaction, stats.reaction[:1].expand(extra, -1, -1)])
    return dataclasses.replace(
        stats, sse=pad(stats.sse, 0.0), log_ratio=pad(stats.log_ratio + math.log(n_points / stats.n_particles),
                                                       -math.inf),
        diffusivity=pad(stats.diffusivity, 1.0), reaction=reaction,
        log_prior_ref=None if stats.log_prior_ref is None else pad(stats.log_prior_ref, 0.0))


def share_integrals(stats: list[ParticleStats]) -> list[ParticleStats]:
    """Give every model, per (subject, mechanism), the quadrature that found the most mass.

    ``stats``: quadrature of models that share their priors and solver (``prior_key``): the integral
    of subject i under mechanism c is then the same quantity in every model that has c, and the
    searches differ only in where they started (each fit's encoder seeds one candidate). Where they
    found different modes (typically for subjects a mechanism cannot fit), the largest integral is
    the most complete one. Returns the statistics, every column replaced by the best one found.
    """
    n_points = max(s.n_particles for s in stats)
    stats = [_padded(s, n_points) for s in stats]
    noise = min(s.noise_ref for s in stats)
    log_z = [torch.logsumexp(s.log_weights(noise), dim=0) for s in stats]  # (N, K) each
    columns = {}
    for m, s in enumerate(stats):
        for k, name in enumerate(s.components):
            columns.setdefault(name, []).append((m, k))
    out = [dict(sse=s.sse.clone(), log_ratio=s.log_ratio.clone(), diffusivity=s.diffusivity.clone(),
                reaction=s.reaction.clone(), log_prior_ref=s.log_prior_ref.clone(), error=s.error.clone())
           for s in stats]
    for where in columns.values():
        best = torch.stack([log_z[m][:, k] for m, k in where]).argmax(dim=0)  # (N,)
        for m, k in where:
            for j, (src_m, src_k) in enumerate(where):
                rows = best == j
                if (src_m, src_k) == (m, k) or not bool(rows.any()):
                    continue
                for field_name in ("sse", "log_ratio", "diffusivity", "reaction", "log_prior_ref"):
                    out[m][field_name][:, rows, k] = getattr(stats[src_m], field_name)[:, rows, src_k]
                out[m]["error"][rows, k] = stats[src_m].error[rows, src_k]
    # (the surrogates serve re-weighting to other population priors, which fixed priors never need)
    return [dataclasses.replace(s, **o, surrogate=None, surrogate_sse=None) for s, o in zip(stats, out)]


def with_population(module: MixturePDE, loc: torch.Tensor, scale: torch.Tensor,
                    learned: bool | None = None) -> MixturePDE:
    """A copy of ``module`` (encoder included) whose population priors are the Gaussians ``loc``,
    ``scale`` (K, 2); ``learned``: also set whether they count as learned (None: as in ``module``)."""
    other = copy.deepcopy(module)
    with torch.no_grad():
        other.set_population(loc, scale)
        if learned is not None:
            other.population_learned.fill_(learned)
    return other


def population_shift(module: MixturePDE, population: tuple[torch.Tensor, torch.Tensor]) -> float:
    """How far ``population`` (loc, scale), each (K, 2), lies from the module's population priors:
    the largest |mu - mu_module| / tau and |log tau - log tau_module| over the used coordinates."""
    loc, scale = (t.double().cpu() for t in population)
    ref_loc, ref_scale = module.population_loc.double().cpu(), module.population_scale.double().cpu()
    used = torch.ones_like(loc, dtype=torch.bool)
    used[:, 1] = torch.tensor([t.has_rate for t in module.terms])
    shift = torch.maximum((loc - ref_loc).abs() / scale, (scale.log() - ref_scale.log()).abs())
    return float(shift[used].max())


def place_at_globals_mode(module: MixturePDE, data: CohortTensors, stats: ParticleStats, n_draws: int, seed: int,
                          tolerance: float = DEFAULT_TOLERANCE, start=None) -> tuple[ParticleStats, GlobalDraws]:
    """Draws of the globals (``laplace_globals``) from quadrature nodes placed for the population
    priors at the globals' own posterior mode, not for the fit's.

    ``stats``: nodes placed under ``module``'s population priors. When the mode of the globals'
    posterior puts a population further than ``PLACEMENT_SHIFT`` from them (e.g. a component the
    data do not need, whose population collapses to a narrow range), every node is placed again
    under the mode's populations (on a copy of the module) and the globals integrated again, up to
    ``PLACEMENT_ROUNDS`` times. Returns (stats, draws); the evidence then depends on the data, not on
    the populations the fit happened to learn.
    """
    draws = laplace_globals(stats, module, n_draws, seed, trust_region=True)
    reference = module
    for _ in range(PLACEMENT_ROUNDS):
        if draws.mode_population is None or population_shift(reference, draws.mode_population) < PLACEMENT_SHIFT:
            break
        reference = with_population(module, *draws.mode_population)
        stats = quadrature_stats(reference, data, tolerance=tolerance, start=start)
        draws = laplace_globals(stats, reference, n_draws, seed, trust_region=True)
    return stats, draws


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
                                              fit.has_rate, n_iter=50, tied=bool(module.population_tied))
        with torch.no_grad():
            module.set_population(pop.loc, pop.scale)
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
    sub_stats, draws = place_at_globals_mode(sub, data, sub_stats, n_draws, seed)
    return iwae_log_evidence(sub_stats, draws)


def subset_evidence(module: MixturePDE, data: CohortTensors, n_draws: int = 200, seed: int = 0,
                    full: ModelEvidence | None = None):
    """Evidence of every non-empty subset of the fitted components (the paper's subset comparison),
    each as its own sub-model (``submodel_evidence``); ``full``: the model's own evidence, if
    already computed. Returns a ``pandas.DataFrame`` sorted by evidence (subset, n_components,
    log_evidence, log_evidence_se, rank). A module with mixture populations, which the evidence
    does not integrate (see ``model_evidence``), is compared under its base priors, as ``compare``
    does by default (``full`` is then ignored)."""
    import itertools

    import pandas as pd

    from .population import base_hyperprior

    if module.population_terms > 1:
        base = base_hyperprior(module.priors, module.n_components)
        module, full = with_population(module, *base, learned=False), None
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
