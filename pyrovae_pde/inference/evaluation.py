"""Scores of a posterior against simulated ground truth (``true_subtype``, ``true_diffusivity``...)."""
from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.stats import spearmanr

from ..errors import InputError


def recovery_metrics(posterior: xr.Dataset, truth: xr.Dataset) -> dict[str, float]:
    """Subtype accuracy (by component name), Spearman correlations of D and r on the TRUE
    component, 90%-interval coverage of D, mean top subtype probability, and the largest error
    of the mixture weights against the empirical subtype frequencies."""
    if "true_subtype" not in truth:
        raise InputError("the dataset has no ground truth (true_subtype); metrics need simulated data")
    names = [str(s) for s in posterior["subtype"].values]
    true = np.array([str(s) for s in truth["true_subtype"].values])
    unknown = sorted(set(true) - set(names))
    probs = posterior["subtype_prob"].values
    predicted = np.array(names)[probs.argmax(axis=1)]
    out: dict[str, float] = {"accuracy": float((predicted == true).mean()),
                             "mean_top_prob": float(probs.max(axis=1).mean()),
                             "n_subjects": float(len(true))}
    known = np.isin(true, names)
    col = np.array([names.index(t) if t in names else 0 for t in true])
    rows = np.arange(len(true))[known]
    d_true = truth["true_diffusivity"].values[known]
    d_est = posterior["diffusivity"].values[rows, col[known]]
    out["spearman_diffusivity"] = float(spearmanr(d_est, d_true)[0]) if len(rows) > 2 else float("nan")
    lo = posterior["diffusivity_q05"].values[rows, col[known]]
    hi = posterior["diffusivity_q95"].values[rows, col[known]]
    out["coverage90_diffusivity"] = float(((d_true >= lo) & (d_true <= hi)).mean()) if len(rows) else float("nan")
    r_est = posterior["reaction"].values[rows, col[known]]
    has_rate = np.isfinite(r_est)
    if has_rate.sum() > 2:
        r_true = truth["true_reaction"].values[known][has_rate]
        out["spearman_reaction"] = float(spearmanr(r_est[has_rate], r_true)[0])
        rlo = posterior["reaction_q05"].values[rows, col[known]][has_rate]
        rhi = posterior["reaction_q95"].values[rows, col[known]][has_rate]
        out["coverage90_reaction"] = float(((r_true >= rlo) & (r_true <= rhi)).mean())
    freq = np.array([(true == n).mean() for n in names])
    out["weights_max_error"] = float(np.abs(posterior["weights"].values - freq).max())
    if unknown:
        out["subjects_of_unmodelled_subtypes"] = float((~known).sum())
    return out


def format_metrics(metrics: dict[str, float]) -> str:
    """One readable line per metric."""
    labels = {"accuracy": "subtype accuracy", "mean_top_prob": "mean top subtype probability",
              "spearman_diffusivity": "Spearman(D, true D)", "spearman_reaction": "Spearman(r, true r)",
              "coverage90_diffusivity": "90% interval coverage of D",
              "coverage90_reaction": "90% interval coverage of r",
              "weights_max_error": "max |weight - true frequency|", "n_subjects": "subjects scored"}
    return "\n".join(f"  {labels.get(k, k):32s} {v:.3f}" if k != "n_subjects" else f"  {labels[k]:32s} {int(v)}"
                     for k, v in metrics.items())
