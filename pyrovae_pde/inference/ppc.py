"""Posterior predictive checks of a fitted mixture.

Replicated cohorts come from the posterior, drawn jointly per global draw g (see
``evidence.sample_posterior``): the globals from their posterior, each subject's subtype from
p(subtype | x_i, g) (its posterior: Pyro's ``Predictive`` would draw enumerated sites from the
prior), its (D, r) resampled from the importance-weighted particles of that subtype, the PDE
solved from the subject's own first visit, Gaussian noise of sd sigma_g added to the later visits
the subject actually has.

Test statistics per subject and visit (later visits only):

* ``total_burden``: sum of the signal over nodes (voxels);
* ``spread``: number of nodes above ``threshold`` (default 0.1: in the model's normalised units
  u in [0, 1] that is 10% of saturation and 5 noise sd at the benchmarks' noise 0.02, so noise
  alone rarely crosses it);
* ``max``: the largest value over nodes.

Each statistic is averaged over the subjects present at a visit slot (and over all later
visits); the cohort-level posterior predictive p-value is P(mean T(x_rep) >= mean T(x)) (ties
count one half), and p outside (0.05, 0.95) flags a misfit. The verdict of a statistic uses
its p-value pooled over all later visits: per-visit p-values of statistics dominated by noise
are close to uniform under a correct model (measured: 95% of them inside (0.05, 0.95) on the
graph benchmark), so with several visits one of them often lands outside by chance.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # torch and Pyro load only when a check runs
    from ..data.cohort import CohortTensors
    from ..model.module import MixturePDE

STATISTICS = ("total_burden", "spread", "max")
LABELS = {"total_burden": "total burden", "spread": "spread", "max": "max"}
DEFAULT_THRESHOLD = 0.1
P_RANGE = (0.05, 0.95)


def visit_statistics(signal: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
    """Statistics over the last axis (nodes): ``signal`` (..., n) -> each (...); NaN stays NaN."""
    with np.errstate(invalid="ignore"):
        missing = np.isnan(signal).all(axis=-1)
        out = {"total_burden": np.nansum(signal, axis=-1),
               "spread": (signal > threshold).sum(axis=-1).astype(float),
               "max": np.nanmax(np.where(np.isnan(signal), -np.inf, signal), axis=-1)}
    for values in out.values():
        values[missing] = np.nan
    return out


@dataclass
class PPCResult:
    """p-values per statistic and visit, per-subject statistics and the replicated cohort's."""

    table: pd.DataFrame
    observed: dict[str, np.ndarray] = field(repr=False)  # name -> (N, T)
    replicated: dict[str, np.ndarray] = field(repr=False)  # name -> (G, N, T)
    subjects: list[str] = field(repr=False)
    threshold: float = DEFAULT_THRESHOLD

    def verdicts(self) -> list[str]:
        return verdict_lines(self.table)

    def inference_data(self):
        """observed_data / posterior_predictive of the per-subject statistics, one variable per
        statistic and visit (dims ``subject_visitJ``: the subjects present at visit J)."""
        from .arviz_export import from_dict

        obs, pp, coords, dims = {}, {}, {}, {}
        for name in STATISTICS:
            later = ~np.isnan(self.observed[name][:, 1:])
            if later.any():
                var, dim = f"{name}_all", f"{name}_subject_visit"
                obs[var] = self.observed[name][:, 1:][later]
                pp[var] = self.replicated[name][:, :, 1:][:, later][None]
                subj, vis = np.nonzero(later)
                coords[dim] = np.array([f"{self.subjects[i]}/visit{j + 1}" for i, j in zip(subj, vis)], dtype=object)
                dims[var] = [dim]
            for j in range(1, self.observed[name].shape[1]):
                present = ~np.isnan(self.observed[name][:, j])
                if not present.any():
                    continue
                var, dim = f"{name}_visit{j}", f"subject_visit{j}"
                obs[var] = self.observed[name][present, j]
                pp[var] = self.replicated[name][:, present, j][None]
                coords[dim] = np.array(self.subjects, dtype=object)[present]
                dims[var] = [dim]
        return from_dict({"posterior_predictive": pp, "observed_data": obs}, coords, dims,
                         {"observed_data": {"threshold": self.threshold}})


def _p_value(t_rep: np.ndarray, t_obs: float) -> float:
    return float((t_rep > t_obs).mean() + 0.5 * (t_rep == t_obs).mean())


def p_value_table(observed: dict[str, np.ndarray], replicated: dict[str, np.ndarray]) -> pd.DataFrame:
    """Cohort-level p-values per statistic: pooled over all later visits (``visit = "all"``, the
    verdict's) and per visit slot >= 1 with at least one subject."""
    rows = []
    lo, hi = P_RANGE
    for name in STATISTICS:
        obs, rep = observed[name], replicated[name]
        later = ~np.isnan(obs[:, 1:])
        parts = [("all", later, obs[:, 1:], rep[:, :, 1:])]
        parts += [(str(j), ~np.isnan(obs[:, j]), obs[:, j], rep[:, :, j]) for j in range(1, obs.shape[1])]
        for label, present, o, r in parts:
            if not present.any():
                continue
            t_obs = float(o[present].mean())
            t_rep = r[:, present].mean(axis=1)
            p = _p_value(t_rep, t_obs)
            rows.append({"statistic": name, "visit": label, "n_values": int(present.sum()), "observed": t_obs,
                         "replicated_mean": float(t_rep.mean()), "replicated_q05": float(np.quantile(t_rep, 0.05)),
                         "replicated_q95": float(np.quantile(t_rep, 0.95)), "p_value": p,
                         "consistent": bool(lo < p < hi)})
    return pd.DataFrame(rows)


def verdict_lines(table: pd.DataFrame) -> list[str]:
    """One line per statistic, judged by its p-value pooled over the later visits; the per-visit
    p-values follow (``*``: outside the range; under a correct model about one in ten
    per-visit p-values lands there by chance, which is why they do not decide the verdict)."""
    lines = []
    lo, hi = P_RANGE
    for name in STATISTICS:
        part = table[table["statistic"] == name]
        pooled = part[part["visit"] == "all"]
        if pooled.empty:
            continue
        p = float(pooled["p_value"].iloc[0])
        per_visit = part[part["visit"] != "all"]
        detail = ", ".join(f"{v} {q:.2f}{'' if ok else '*'}" for v, q, ok in
                           zip(per_visit["visit"], per_visit["p_value"], per_visit["consistent"]))
        verdict = "consistent" if lo < p < hi else f"model misfit (p outside ({lo}, {hi}))"
        lines.append(f"{LABELS[name]}, all later visits: p = {p:.2f} (by visit: {detail}) — {verdict}")
    return lines


def posterior_predictive_check(module: MixturePDE, data: CohortTensors, n_draws: int = 200, n_particles: int = 32,
                               seed: int = 0, threshold: float = DEFAULT_THRESHOLD, evidence=None) -> PPCResult:
    """Replicate the cohort ``data`` from a fitted module's posterior and compute p-values.

    ``evidence``: a precomputed importance ``model_evidence`` on ``data`` with ``keep_fields=True``
    (otherwise computed here with ``n_particles`` particles and ``n_draws`` draws of the globals).
    """
    from .arviz_export import replicate_signal
    from .evidence import model_evidence

    if evidence is None or evidence.stats.fields is None:
        evidence = model_evidence(module, data, method="importance", n_particles=n_particles, n_draws=n_draws,
                                  seed=seed, keep_fields=True, elbo_repeats=0)
    post = evidence.posterior_draws(seed)
    rep = replicate_signal(evidence, data, post, seed)  # (G, N, T, n), NaN at missing visits
    obs = data.signal.numpy().astype(np.float64).copy()
    obs[~data.observed.numpy()] = np.nan
    observed = visit_statistics(obs, threshold)
    replicated = visit_statistics(rep.astype(np.float64), threshold)
    return PPCResult(p_value_table(observed, replicated), observed, replicated, list(data.subjects), threshold)


def plot_ppc_figures(result: PPCResult, out_dir: str | os.PathLike, num_pp_samples: int = 100) -> list[Path]:
    """One PNG per statistic (``ppc_<statistic>.png``), a panel per visit, drawn by ``az.plot_ppc``."""
    import arviz as az
    import matplotlib.pyplot as plt

    from ..data.contract import atomic_write

    idata = result.inference_data()
    out_dir = Path(out_dir)
    paths = []
    names = list(idata["observed_data"].data_vars)
    for name in STATISTICS:
        var_names = [v for v in names if v == name + "_all" or v.startswith(name + "_visit")]
        if not var_names:
            continue
        n_pp = min(num_pp_samples, result.replicated[name].shape[0])
        if hasattr(az, "plot_ppc"):  # arviz 0.x
            axes = az.plot_ppc(idata, var_names=var_names, num_pp_samples=n_pp, random_seed=0,
                               kind="kde" if name != "spread" else "cumulative")
            fig = np.atleast_1d(axes).ravel()[0].figure
        else:  # arviz 1.x (matplotlib backend)
            plot = az.plot_ppc_dist(idata, var_names=var_names, num_samples=n_pp)
            fig = plot.viz["chart"].item() if hasattr(plot, "viz") else plt.gcf()
        fig.suptitle(f"Posterior predictive check: {LABELS[name]} per subject (all later visits, then by visit)")
        path = out_dir / f"ppc_{name}.png"
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
        plt.close(fig)
        paths.append(path)
    return paths
