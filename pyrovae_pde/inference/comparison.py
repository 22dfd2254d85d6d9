"""Model comparison that holds up: evidence with every error source, one verdict, no silent ranking.

For each candidate model (a set of mechanisms), ``compare_models`` takes one or more fits (repeats
with other seeds) and reports

* the log evidence (``evidence.model_evidence``: quadrature of every subject's latents, the
  globals and population priors integrated), averaged over the repeats, with an SE combining the
  Monte Carlo and quadrature errors (``mc_se``) and the fit-to-fit spread of the repeats
  (``fit_spread``, the sd of their estimates);
* PSIS-LOO (``az.loo`` on the pointwise marginal likelihood, Pareto k) and a K-fold
  cross-validated log predictive density of whole held-out subjects (``marginal.cross_validated_lpd``),
  both with SEs of their differences paired over subjects;
* whether every fit converged. A model whose fits did not converge is flagged and not ranked, and
  so is one whose evidence is not finite or rests on a few draws of the globals (Pareto k of their
  importance weights above 0.7 and under a quarter of them effective). A model's evidence and a
  larger model's subset evidence for the same mechanisms must agree (``_check_consistency``).

The verdict ranks the remaining models by log evidence: the best, or "not decided" when the top
two lie within 2 combined SE.

Population priors (``population``). By default (``"base"``) every model is compared under its
base priors of (log D, log r), the user's ``--prior`` or the cohort's default, shared by all its
mechanisms; the fits only seed the searches. Learned population priors (``"learned"``, the
fitted model's own evidence) also model the *shape* of the cohort's distribution of D and r, and
a mixture can then win by splitting one mechanism's population in two: on diffusion-only data
whose D is uniform over a 20-fold range, the Fisher-KPP + diffusion mixture (its Fisher-KPP
component at a negligible r, with a D population of its own) beat diffusion alone by 6-7 nats at
z > 30, while with D nearly constant diffusion alone won by 5.6 nats. Under the base priors a
mechanism's evidence does not depend on how the others' populations are shaped.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..data.cohort import CohortTensors
from ..errors import InputError
from ..model.module import MixturePDE
from .evidence import (
    ModelEvidence,
    elbo_estimate,
    model_evidence,
    prior_key,
    searched_quadrature,
    share_integrals,
    subset_evidence,
    with_population,
)
from .marginal import cross_validated_lpd
from .population import base_hyperprior

LOGGER = logging.getLogger(__name__)
POPULATIONS = ("base", "learned")
PARETO_K_MAX = 0.7
# with Pareto k above PARETO_K_MAX, the globals' IWAE evidence is unreliable when fewer than this share
# of its draws carry the weight (k alone is noisy when the weights are nearly uniform)
GLOBALS_ESS_SHARE_MIN = 0.25
DECISION_Z = 2.0  # the top two models must differ by this many combined SE for a verdict
CONSISTENCY_Z = 3.0  # a model's evidence and a larger model's subset evidence may differ by this many SE
CONSISTENCY_FLOOR = 1.0  # ... plus this many nats
COMPARISON_COLUMNS = ["rank", "model", "n_components", "converged", "repeats", "log_evidence", "log_evidence_se",
                      "mc_se", "fit_spread", "log_evidence_diff", "log_evidence_diff_se", "z", "elpd_loo",
                      "elpd_loo_se", "elpd_loo_diff", "elpd_loo_diff_se", "p_loo", "max_pareto_k", "elpd_cv",
                      "elpd_cv_se", "elpd_cv_diff", "elpd_cv_diff_se", "elbo", "status"]


@dataclass
class FittedRun:
    """One fit of a candidate model: its module, the cohort as it sees it, whether its training
    converged, and its seed."""

    module: MixturePDE
    data: CohortTensors
    converged: bool
    seed: int = 0


@dataclass
class Comparison:
    """``table`` (one row per model, ``COMPARISON_COLUMNS``), the ``verdict`` line, ``warnings``
    (one line each), the evidences of every repeat and the subset-evidence tables of mixtures."""

    table: pd.DataFrame
    verdict: str
    warnings: list[str]
    evidences: dict[str, list[ModelEvidence]] = field(repr=False)
    subsets: dict[str, pd.DataFrame] = field(repr=False)


def _loo(evidence: ModelEvidence) -> dict:
    """elpd_loo, its SE, p_loo, the Pareto k and the pointwise elpd of ``az.loo`` (arviz 0.x and 1.x)."""
    import arviz as az

    from .arviz_export import loo_inference_data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(loo_inference_data(evidence), pointwise=True)

    def get(*names):
        for name in names:
            try:
                value = loo[name]
            except (KeyError, TypeError, IndexError):
                value = getattr(loo, name, None)
            if value is not None:
                return value
        raise KeyError(names[0])

    return {"elpd_loo": float(get("elpd_loo", "elpd")), "elpd_loo_se": float(get("se")),
            "p_loo": float(get("p_loo", "p")), "pareto_k": np.asarray(get("pareto_k"), dtype=float).ravel(),
            "loo_i": np.asarray(get("loo_i", "elpd_i"), dtype=float).ravel()}


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = a - b
    return float(d.sum()), float(math.sqrt(d.size) * d.std(ddof=1)) if d.size > 1 else math.nan


def under_base_priors(module: MixturePDE) -> MixturePDE:
    """A copy of ``module`` whose population priors are its base priors, fixed (not learned)."""
    return with_population(module, *base_hyperprior(module.priors, module.n_components), learned=False)


def compare_models(runs: dict[str, list[FittedRun]], n_draws: int = 200, seed: int = 0, folds: int = 5,
                   elbo_draws: int = 4, population: str = "base") -> Comparison:
    """Compare candidate models (name -> fits of that model, e.g. several seeds) on one cohort.

    See the module docstring; ``folds`` is K of the cross-validation, ``elbo_draws`` the draws of
    each fit's ELBO (0: not computed), ``population`` the population priors the models are
    compared under (``"base"`` or ``"learned"``).
    """
    if not runs:
        raise InputError("give at least one model to compare")
    if population not in POPULATIONS:
        raise InputError(f"population must be one of {POPULATIONS}, got {population!r}")
    if population == "learned":
        for name, fits in runs.items():
            if any(f.module.population_terms > 1 for f in fits):
                raise InputError(f"model {name!r} was fitted with mixture population priors, which the learned-"
                                 "population evidence does not integrate; compare under the base priors (the "
                                 "default) or refit with --population-terms 1")
    if population == "base":  # the ELBO stays the fit's own
        elbos = {name: [elbo_estimate(f.module, f.data, elbo_draws, seed) if elbo_draws else (math.nan, math.nan)
                        for f in fits] for name, fits in runs.items()}
        runs = {name: [dataclasses.replace(f, module=under_base_priors(f.module)) for f in fits]
                for name, fits in runs.items()}
    shared = _shared_integrals(runs) if population == "base" else {}
    evidences, rows, pointwise = {}, {}, {}
    for name, fits in runs.items():
        evs = [model_evidence(f.module, f.data, n_draws=n_draws, seed=seed, stats=shared.get((name, j)),
                              elbo_repeats=elbo_draws if population == "learned" else 0) for j, f in enumerate(fits)]
        if population == "base":
            evs = [dataclasses.replace(e, elbo=elbo, elbo_se=elbo_se) for e, (elbo, elbo_se) in zip(evs, elbos[name])]
        evidences[name] = evs
        LOGGER.info("compare: %s: log evidence %s", name, ", ".join(f"{e.log_evidence:.1f} +- {e.log_evidence_se:.1f}"
                                                                  for e in evs))
        rows[name], pointwise[name] = _model_row(name, fits, evs, folds, n_draws, seed)
    notes: list[str] = []
    subsets = {name: subset_evidence(fits[0].module, fits[0].data, n_draws=n_draws, seed=seed,
                                     full=evidences[name][0])
               for name, fits in runs.items() if len(fits[0].module.components) > 1}
    _check_consistency(runs, subsets, rows, notes, population)
    for name, row in rows.items():
        _set_status(name, row, notes)
        if len(runs[name]) == 1:
            row["fit_spread"] = math.nan
    table, verdict = _ranked_table(rows, pointwise, runs)
    return Comparison(table, verdict, notes, evidences, subsets)


def _model_row(name: str, fits: list[FittedRun], evs: list[ModelEvidence], folds: int, n_draws: int,
               seed: int) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """One model's row of the table (evidence over its repeats, LOO and CV of its first fit) and its
    pointwise (elpd_loo_i, lpd_cv_i)."""
    values = np.array([e.log_evidence for e in evs])
    mc_se = float(math.sqrt(np.mean([e.log_evidence_se ** 2 for e in evs])))
    spread = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    loo = _loo(evs[0])
    cv, cv_se, cv_i = cross_validated_lpd(evs[0].stats, fits[0].module, folds=folds, n_draws=n_draws, seed=seed)
    loo_i, k = loo.pop("loo_i"), loo.pop("pareto_k")
    unconverged = [e.unconverged.float().mean() if e.unconverged is not None else 0.0 for e in evs]
    row = {"model": name, "n_components": len(fits[0].module.components),
           "converged": all(f.converged for f in fits), "repeats": len(fits),
           "log_evidence": float(values.mean()), "mc_se": mc_se, "fit_spread": spread,
           "log_evidence_se": math.hypot(mc_se, 0.0 if math.isnan(spread) else spread), **loo,
           "max_pareto_k": float(k.max()), "pareto_k_ok_fraction": float((k <= PARETO_K_MAX).mean()),
           "elpd_cv": cv, "elpd_cv_se": cv_se, "quadrature_error": float(np.mean([e.quadrature_error for e in evs])),
           "unconverged_integrals": float(np.mean(unconverged)), "elbo": float(np.mean([e.elbo for e in evs])),
           "globals_pareto_k": float(np.nanmax([e.pareto_k_globals for e in evs] + [-np.inf])),
           "globals_ess_share": float(min(e.ess_globals / e.draws.n_draws for e in evs)), "status": "ranked"}
    return row, (loo_i, cv_i)


def _set_status(name: str, row: dict, notes: list[str]) -> None:
    """Flag a model that cannot be ranked (its status and a note), and note unreliable diagnostics."""
    if not (math.isfinite(row["log_evidence"]) and math.isfinite(row["log_evidence_se"])):
        row["status"] = "evidence failed"
        notes.append(f"{name}: not ranked: its log evidence is not finite (a numerical failure of the estimator; "
                     "please report it with the cohort)")
    elif row["globals_pareto_k"] > PARETO_K_MAX and row["globals_ess_share"] < GLOBALS_ESS_SHARE_MIN:
        row["status"] = "evidence unreliable"
        notes.append(f"{name}: not ranked: its evidence rests on a few draws of the globals (Pareto k "
                     f"{row['globals_pareto_k']:.2f} > {PARETO_K_MAX}, effective draws "
                     f"{100 * row['globals_ess_share']:.0f}%): the posterior of its weights, noise and population "
                     "priors is far from Gaussian; compare with --evidence-population base")
    elif not row["converged"]:
        row["status"] = "not converged"
        notes.append(f"{name}: not ranked: its fit did not converge (see its warning; refit with a larger --epochs "
                     "or --restarts)")
    if row["max_pareto_k"] > PARETO_K_MAX:
        notes.append(f"{name}: Pareto k > {PARETO_K_MAX} for {100 * (1 - row['pareto_k_ok_fraction']):.1f}% of "
                     f"subjects (max {row['max_pareto_k']:.2f}): its PSIS-LOO is unreliable there")
    if row["unconverged_integrals"] > 0:
        notes.append(f"{name}: the quadrature of {100 * row['unconverged_integrals']:.1f}% of (subject, mechanism) "
                     "integrals did not reach its tolerance; their error is in the SE")


def _ranked_table(rows: dict, pointwise: dict, runs: dict) -> tuple[pd.DataFrame, str]:
    """The comparison table (ranks, differences to the best model with their SEs) and the verdict."""
    table = pd.DataFrame(list(rows.values()))
    ranked = table[table["status"] == "ranked"].sort_values("log_evidence", ascending=False)
    table["rank"] = np.nan
    table.loc[ranked.index, "rank"] = np.arange(1, len(ranked) + 1)
    verdict = _verdict(ranked, rows, runs)
    by_evidence = ranked if len(ranked) else table.sort_values("log_evidence", ascending=False)
    best = by_evidence.iloc[0]["model"]
    ref = rows[best]
    table["log_evidence_diff"] = ref["log_evidence"] - table["log_evidence"]
    table["log_evidence_diff_se"] = np.where(table["model"] == best, 0.0,
                                             np.sqrt(ref["log_evidence_se"] ** 2 + table["log_evidence_se"] ** 2))
    table["z"] = np.where(table["log_evidence_diff_se"] > 0, table["log_evidence_diff"] / table["log_evidence_diff_se"],
                          0.0)
    for j, prefix in enumerate(("elpd_loo", "elpd_cv")):
        diffs = [_paired(pointwise[best][j], pointwise[name][j]) for name in table["model"]]
        table[f"{prefix}_diff"] = [d for d, _ in diffs]
        table[f"{prefix}_diff_se"] = [0.0 if name == best else s for name, (_, s) in zip(table["model"], diffs)]
    table = table.sort_values(["rank", "log_evidence"], ascending=[True, False], na_position="last",
                              ignore_index=True)
    extra = [c for c in table.columns if c not in COMPARISON_COLUMNS]
    return table[COMPARISON_COLUMNS + extra], verdict


def _shared_integrals(runs: dict[str, list[FittedRun]]) -> dict:
    """(model, repeat) -> its quadrature, each (subject, mechanism) integral the best any model's
    search found (``evidence.share_integrals``), among fits with the same priors, solver and subjects."""
    groups: dict = {}
    for name, fits in runs.items():
        for j, f in enumerate(fits):
            groups.setdefault((prior_key(f.module), tuple(f.data.subjects)), []).append((name, j))
    shared = {}
    for members in groups.values():
        stats = [searched_quadrature(runs[name][j].module, runs[name][j].data) for name, j in members]
        shared.update(zip(members, share_integrals(stats)))
    return shared


def _check_consistency(runs, subsets, rows, notes, population: str = "base") -> None:
    """A model S fitted on its own and a larger model M containing S's mechanisms must agree on the
    evidence of S (M's subset evidence starts from M's own fit).

    With learned population priors each evidence rests on its fit's populations, so beyond their
    errors one fit failed: neither is ranked. Under the base priors neither depends on a fit (the
    fits only seed the mode searches); a disagreement is then the estimator's (the searches found
    different modes, typically for subjects a mechanism cannot fit), and it enters both models' SE.
    """
    names = list(runs)
    spread = {name: 0.0 for name in names}
    for small in names:
        comps_s = runs[small][0].module.components
        for big in names:
            comps_b = runs[big][0].module.components
            if big == small or big not in subsets or not set(comps_s) < set(comps_b):
                continue
            sub = subsets[big].set_index("subset").loc[",".join(c for c in comps_b if c in comps_s)]
            diff = rows[small]["log_evidence"] - sub["log_evidence"]
            se = math.hypot(rows[small]["log_evidence_se"], sub["log_evidence_se"])
            if abs(diff) <= CONSISTENCY_Z * se + CONSISTENCY_FLOOR:
                continue
            if population == "base":
                for name in (small, big):
                    spread[name] = max(spread[name], abs(diff))
                notes.append(f"{small} and {big}: {small}'s evidence from its own mode search "
                             f"({rows[small]['log_evidence']:.1f}) and from {big}'s ({sub['log_evidence']:.1f}) "
                             f"differ by {diff:+.1f} nats (> {CONSISTENCY_Z:g} SE): the searches found different "
                             "modes; the SE of both includes the difference")
                continue
            for name in (small, big):
                rows[name]["status"] = "inconsistent"
            notes.append(f"{small} and {big}: {small}'s evidence ({rows[small]['log_evidence']:.1f}) "
                         "disagrees with "
                         f"the subset evidence of {big} for the same mechanisms ({sub['log_evidence']:.1f}) by "
                         f"{diff:+.1f} nats (> {CONSISTENCY_Z:g} SE): one of the two fits failed; "
                         "neither is ranked. "
                         "Refit both with --restarts 3")
    for name, value in spread.items():
        rows[name]["search_spread"] = value
        rows[name]["log_evidence_se"] = math.hypot(rows[name]["log_evidence_se"], value)


def _verdict(ranked: pd.DataFrame, rows: dict, runs: dict) -> str:
    if len(ranked) == 0:
        return "verdict: none: no model's fit converged and agreed with the others (see the warnings)"
    first = ranked.iloc[0]
    if len(ranked) == 1:
        return f"verdict: {first['model']} (the only model ranked; see the warnings for the others)"
    second = ranked.iloc[1]
    diff = first["log_evidence"] - second["log_evidence"]
    se = math.hypot(first["log_evidence_se"], second["log_evidence_se"])
    repeats = min(len(runs[first["model"]]), len(runs[second["model"]]))
    caveat = "" if repeats > 1 else " (fit-to-fit spread not measured: --repeats 1)"
    if diff < DECISION_Z * se:
        return (f"verdict: not decided between {first['model']} and {second['model']}: their log evidences differ by "
                f"{diff:.1f} +- {se:.1f} nats (z = {diff / se:.1f} < {DECISION_Z:g}){caveat}")
    return (f"verdict: {first['model']}: ahead of {second['model']} by {diff:.1f} +- {se:.1f} nats of log evidence "
            f"(z = {diff / se:.1f}){caveat}")
