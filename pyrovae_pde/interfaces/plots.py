"""Figures: training curves, recovery against ground truth, model comparison.

Each function draws on a new figure, writes it atomically and closes it; none chooses a
matplotlib backend (the CLI picks Agg; in a notebook the inline backend keeps working)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from ..data.contract import atomic_write


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix[1:] or "png"))
    plt.close(fig)
    return path


def plot_training(history: list[dict], path: str | os.PathLike) -> Path:
    """ELBO per subject against epoch, training and held-out."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_elbo"] for h in history], label="training")
    if history and "val_elbo" in history[0]:
        ax.plot(epochs, [h["val_elbo"] for h in history], label="held-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per subject")
    ax.legend()
    ax.set_title("Training")
    return _save(fig, path)


def plot_recovery(posterior: xr.Dataset, truth: xr.Dataset, path: str | os.PathLike) -> Path:
    """Confusion matrix of subtypes, and estimated vs true D and r on each subject's true component."""
    names = [str(s) for s in posterior["subtype"].values]
    true = np.array([str(s) for s in truth["true_subtype"].values])
    probs = posterior["subtype_prob"].values
    pred = probs.argmax(axis=1)
    known = np.isin(true, names)
    col = np.array([names.index(t) if t in names else -1 for t in true])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    conf = np.zeros((len(names), len(names)))
    for c, p in zip(col[known], pred[known]):
        conf[c, p] += 1
    axes[0].imshow(conf, cmap="Blues")
    for (i, j), v in np.ndenumerate(conf):
        axes[0].text(j, i, int(v), ha="center", va="center")
    axes[0].set_xticks(range(len(names)), names, rotation=30)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set_xlabel("predicted subtype")
    axes[0].set_ylabel("true subtype")
    axes[0].set_title(f"accuracy {(np.array(names)[pred] == true).mean():.3f}")
    rows = np.flatnonzero(known)
    for ax, name, truth_name in ((axes[1], "diffusivity", "true_diffusivity"), (axes[2], "reaction", "true_reaction")):
        est = posterior[name].values[rows, col[rows]]
        lo = posterior[name + "_q05"].values[rows, col[rows]]
        hi = posterior[name + "_q95"].values[rows, col[rows]]
        tv = truth[truth_name].values[rows]
        ok = np.isfinite(est)
        ax.errorbar(tv[ok], est[ok], yerr=[est[ok] - lo[ok], hi[ok] - est[ok]], fmt="o", ms=2.5, alpha=0.5,
                    elinewidth=0.5)
        if ok.any():
            lims = [min(tv[ok].min(), est[ok].min()), max(tv[ok].max(), est[ok].max())]
            ax.plot(lims, lims, "k--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"posterior mean {name} (90% interval)")
        ax.set_title(f"{name} on the true component")
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(table, path) -> Path:
    """Differences from the best model in log evidence, elpd_loo and cross-validated lpd, with 2-SE
    bars; models that are not ranked (not converged, inconsistent) are drawn hollow."""
    names = [f"{m}{'' if s == 'ranked' else f' ({s})'}" for m, s in zip(table["model"], table["status"])]
    ranked = (table["status"] == "ranked").to_numpy()
    y = np.arange(len(names))[::-1]
    panels = (("log_evidence_diff", "log_evidence_diff_se", "log evidence"), ("elpd_loo_diff", "elpd_loo_diff_se",
              "elpd_loo (PSIS)"), ("elpd_cv_diff", "elpd_cv_diff_se", "elpd (K-fold CV)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.6 * len(names) + 1.8), sharey=True)
    for ax, (value, se, title) in zip(axes, panels):
        diff = -table[value].to_numpy(dtype=float)
        err = 2 * np.nan_to_num(table[se].to_numpy(dtype=float))
        for filled in (True, False):
            sel = ranked == filled
            ax.errorbar(diff[sel], y[sel], xerr=err[sel], fmt="o", capsize=4, mfc=None if filled else "white",
                        color="C0" if filled else "grey")
        ax.axvline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=10.0)  # close models and far-off baselines on one axis
        for xi, yi in zip(diff, y):
            ax.annotate(f"{xi + 0.0:.1f}", (xi, yi), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        ax.set_xlabel("minus the best model's (nats, symlog; bars: 2 SE)")
        ax.set_title(title)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names)
    fig.suptitle("Model comparison (rank 1 = best log evidence among converged, consistent fits)")
    fig.tight_layout()
    return _save(fig, path)
