"""Figures: training curves, subtype probabilities, parameters, recovery, model comparison, PPC.

The figure functions (``elbo_trace``, ``subtype_probabilities``, ``parameters``, ``comparison``,
``ppc``; ``fields`` and ``forecast_bands`` in ``plots_fields``) draw on ``ax`` (or a new figure)
and return the Figure; ``save_figure`` writes one atomically. The ``plot_*`` functions draw on a
new figure, write it and close it. None chooses a matplotlib backend (the CLI picks Agg; in a
notebook the inline backend keeps working). Public face: ``pyrovae_pde.plots``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.colors import ListedColormap
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FormatStrFormatter

from ..data.contract import atomic_write
from ..errors import InputError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..inference.ppc import PPCResult


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110, close: bool = False) -> Path:
    """Write ``fig`` to ``path`` atomically (format from the suffix, default PNG); ``close`` it after."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix[1:] or "png"))
    if close:
        plt.close(fig)
    return path


def _save(fig, path: str | os.PathLike) -> Path:
    return save_figure(fig, path, close=True)


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """``ax`` and its figure, or a new figure with one Axes of ``figsize`` inches."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def subtype_colors(n: int) -> list:
    """One colour per subtype index (the same in every figure of the package)."""
    return [plt.get_cmap("tab10")(k % 10) for k in range(n)]


def map_order(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, MAP subtype) of subjects ``probs`` (N, K): by MAP subtype, then its probability (descending)."""
    best = probs.argmax(axis=1)
    return np.lexsort((-probs[np.arange(len(best)), best], best)), best


def _spread(mean: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Error-bar lengths (2, n) from a mean and its interval (never negative)."""
    return np.clip(np.stack([mean - lo, hi - mean]), 0.0, None)


# ---------------------------------------------------------------------------------------------- figures
def elbo_trace(history: list[dict], ax: Axes | None = None) -> Figure:
    """ELBO per subject against epoch: training, and held-out with a 2-SE band when recorded.

    ``history``: one dict per epoch (``epoch``, ``train_elbo``, optional ``val_elbo``, ``val_elbo_se``)."""
    fig, ax = new_axes(ax, (5, 3.5))
    epochs = np.array([h["epoch"] for h in history], dtype=float)
    ax.plot(epochs, [h["train_elbo"] for h in history], marker=".", label="training")
    if history and "val_elbo" in history[0]:
        val = np.array([h.get("val_elbo", np.nan) for h in history], dtype=float)
        ax.plot(epochs, val, marker=".", label="held-out")
        se = np.array([h.get("val_elbo_se", np.nan) for h in history], dtype=float)
        if np.isfinite(se).any():
            ax.fill_between(epochs, val - 2 * se, val + 2 * se, color="C1", alpha=0.2, label="held-out, 2 SE")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per subject")
    ax.legend()
    ax.set_title("Training")
    return fig


def subtype_probabilities(posterior: xr.Dataset, truth: xr.Dataset | None = None, ax: Axes | None = None) -> Figure:
    """P(subtype | data) as an image: rows the subtypes, columns the subjects sorted by MAP subtype,
    then by its probability (the image's array is ``subtype_prob[order].T``); the MAP groups are
    separated by white lines. With ``truth`` (a cohort with ``true_subtype`` (subject)), a strip
    above shows each subject's true subtype.

    ``posterior``: ``subtype_prob`` (subject, subtype)."""
    names = [str(s) for s in posterior["subtype"].values]
    probs = np.asarray(posterior["subtype_prob"].values, dtype=float)
    order, best = map_order(probs)
    fig, ax = new_axes(ax, (max(6.0, min(14.0, 0.05 * len(order) + 4)), 1.0 + 0.5 * len(names)))
    image = ax.imshow(probs[order].T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    for edge in np.flatnonzero(np.diff(best[order])):
        ax.axvline(edge + 0.5, color="white", lw=1.5)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("subject (sorted by MAP subtype, then its probability)")
    ax.set_ylabel("subtype")
    fig.colorbar(image, ax=ax, label="P(subtype | data)", fraction=0.04, pad=0.02)
    if truth is not None:
        true = np.array([str(s) for s in truth["true_subtype"].sel(subject=posterior["subject"].values).values])
        labels = names + sorted(set(true) - set(names))
        codes = np.array([labels.index(t) for t in true])[order]
        strip = ax.inset_axes([0.0, 1.04, 1.0, 0.12], sharex=ax)
        colors = subtype_colors(len(labels))
        strip.imshow(codes[None, :], aspect="auto", interpolation="nearest",
                     cmap=ListedColormap(colors), vmin=-0.5, vmax=len(labels) - 0.5)
        strip.set_yticks([0], ["true"])
        strip.tick_params(labelbottom=False, bottom=False)
        handles = [Patch(color=colors[k], label=lab) for k, lab in enumerate(labels)
                   if k in codes]
        strip.legend(handles=handles, title="true subtype", loc="lower left", bbox_to_anchor=(1.0, 0.0),
                     fontsize=8, frameon=False)
        strip.set_title("Subtype probabilities (strip: true subtype)")
        accuracy = float((np.array(names)[best] == true).mean())
        ax.set_xlabel(f"subject (sorted by MAP subtype, then its probability); accuracy {accuracy:.3f}")
    else:
        ax.set_title("Subtype probabilities")
    return fig


def parameters(posterior: xr.Dataset, ax: Axes | None = None) -> Figure:
    """Posterior means of D against r of each subject under its MAP subtype, coloured by that
    subtype, with 90% credible intervals as error bars (log axes). Subjects whose MAP subtype has
    no reaction rate (e.g. ``diffusion``) are drawn on a strip below, along D only.

    ``posterior``: ``subtype_prob``, ``diffusivity``, ``reaction`` and their ``_q05``/``_q95`` (subject, subtype)."""
    names = [str(s) for s in posterior["subtype"].values]
    probs = np.asarray(posterior["subtype_prob"].values, dtype=float)
    best = probs.argmax(axis=1)
    rows = np.arange(len(best))

    def pick(name: str) -> np.ndarray:
        return np.asarray(posterior[name].values, dtype=float)[rows, best]

    d, d_lo, d_hi = pick("diffusivity"), pick("diffusivity_q05"), pick("diffusivity_q95")
    r, r_lo, r_hi = pick("reaction"), pick("reaction_q05"), pick("reaction_q95")
    fig, ax = new_axes(ax, (6, 4.5))
    colors = subtype_colors(len(names))
    rated = np.isfinite(r)
    strip = ax.inset_axes([0.0, -0.36, 1.0, 0.1], sharex=ax) if (~rated).any() else None
    handles = []
    for k, name in enumerate(names):
        sel = best == k
        for target, on in ((ax, sel & rated), (strip, sel & ~rated)):
            if not on.any():
                continue
            y = r[on] if target is ax else np.zeros(on.sum())
            yerr = _spread(r[on], r_lo[on], r_hi[on]) if target is ax else None
            target.errorbar(d[on], y, xerr=_spread(d[on], d_lo[on], d_hi[on]), yerr=yerr, fmt="none",
                            ecolor=colors[k], elinewidth=0.6, alpha=0.5)
            target.scatter(d[on], y, color=colors[k], s=14, zorder=3)
            note = "" if target is ax else ", no reaction rate: strip below"
            handles.append(Line2D([], [], color=colors[k], marker="o", ls="",
                                                       label=f"{name} ({on.sum()}{note})"))
    ax.set_xscale("log")
    if rated.any():
        ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # 0.2, 0.3, ... rather than 2 x 10^-1 on short log ranges
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("diffusivity D (posterior mean, 90% interval)")
    ax.set_ylabel("reaction rate r (posterior mean, 90% interval)")
    ax.set_title("Parameters under each subject's MAP subtype")
    ax.legend(handles=handles, title="MAP subtype (subjects)", fontsize=8)
    if strip is not None:
        strip.set_yticks([])
        strip.set_xlabel("diffusivity D of subjects whose subtype has no reaction rate")
    return fig


def comparison_panel(ax: Axes, table: pd.DataFrame, value: str, se: str, title: str) -> None:
    """One panel of ``plot_comparison``: minus ``table[value]`` per model with 2-SE bars; models
    whose status is not ``ranked`` are drawn hollow and grey (symlog axis)."""
    names = [f"{m}{'' if s == 'ranked' else f' ({s})'}" for m, s in zip(table["model"], table["status"])]
    ranked = (table["status"] == "ranked").to_numpy()
    y = np.arange(len(names))[::-1]
    diff = -table[value].to_numpy(dtype=float)
    err = 2 * np.nan_to_num(table[se].to_numpy(dtype=float))
    for filled in (True, False):
        sel = ranked == filled
        if sel.any():
            ax.errorbar(diff[sel], y[sel], xerr=err[sel], fmt="o", capsize=4, mfc=None if filled else "white",
                        color="C0" if filled else "grey", label="ranked" if filled else "flagged (not ranked)")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("symlog", linthresh=10.0)  # close models and far-off baselines on one axis
    for xi, yi in zip(diff, y):
        ax.annotate(f"{xi + 0.0:.1f}", (xi, yi), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.set_xlabel("minus the best model's (nats, symlog; bars: 2 SE)")
    ax.set_title(title)
    ax.set_yticks(y)
    ax.set_yticklabels(names)
    ax.margins(x=0.12, y=0.15)


def comparison(table: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Log evidence of each model minus the best's, with 2-SE bars; flagged models (status not
    ``ranked``: not converged, unreliable, inconsistent) hollow, grey and named with their status.

    ``table``: ``Comparison.table`` or ``comparison.csv`` (``model``, ``status``, ``log_evidence_diff``,
    ``log_evidence_diff_se``)."""
    fig, ax = new_axes(ax, (6, 0.6 * len(table) + 1.8))
    comparison_panel(ax, table, "log_evidence_diff", "log_evidence_diff_se", "Model comparison: log evidence")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def ppc(result: PPCResult, axes: Axes | np.ndarray | None = None) -> Figure:
    """Posterior predictive check, one panel per statistic: histogram of the replicated cohorts'
    mean statistic over all later visits, the observed value as a line, its p-value in the title.

    ``result``: ``SubtypeModel.check`` (``observed`` (subject, visit), ``replicated`` (draw, subject, visit))."""
    from ..inference.ppc import LABELS, STATISTICS

    names = [s for s in STATISTICS if s in result.observed and (~np.isnan(result.observed[s][:, 1:])).any()]
    if axes is None:
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    axes = np.ravel(axes)
    if len(axes) != len(names):
        raise InputError(f"ppc draws {len(names)} panels; got {len(axes)} axes")
    for ax, name in zip(axes, names):
        obs, rep = result.observed[name][:, 1:], result.replicated[name][:, :, 1:]
        later = ~np.isnan(obs)
        t_rep = rep[:, later].mean(axis=1)
        row = result.table[(result.table["statistic"] == name) & (result.table["visit"] == "all")]
        ax.hist(t_rep, bins=min(30, max(5, len(t_rep) // 5)), color="C0", alpha=0.6, label="replicated")
        ax.axvline(obs[later].mean(), color="k", lw=2, label="observed")
        ax.set_xlabel(f"mean {LABELS[name]} per subject and later visit")
        ax.set_ylabel("replicated cohorts")
        ax.set_title(f"{LABELS[name]}: p = {float(row['p_value'].iloc[0]):.2f}" if len(row) else LABELS[name])
    axes[0].legend(fontsize=8)
    return axes[0].figure


def sbc_ranks(sbc: xr.Dataset, axes: Axes | np.ndarray | None = None) -> Figure:
    """Simulation-based calibration: the histogram of the true values' ranks among the posterior
    draws, one panel per (subtype, parameter) with ranks, the 99% band of each bin's count under
    uniform ranks (binomial quantiles) shaded, the chi-square p-value in the title. U-shaped:
    posteriors too narrow; humped: too wide; sloped: biased.

    ``sbc``: ``inference.sbc.simulation_based_calibration`` (``rank``, ``true_subtype``, ``p_value``,
    ``n_bins``, ``count``; attrs ``n_draws``)."""
    from scipy.stats import binom

    from ..inference.sbc import bin_ranks

    n_draws = int(sbc.attrs["n_draws"])
    panels = [(str(k), str(par)) for k in sbc["subtype"].values for par in sbc["parameter"].values
              if int(sbc["count"].sel(subtype=k, parameter=par)) > 0]
    if axes is None:
        n_cols = len(sbc["parameter"])
        n_rows = max(1, -(-len(panels) // n_cols))
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3 * n_rows), squeeze=False,
                                 layout="constrained")
        for ax in np.ravel(axes)[len(panels):]:
            ax.set_visible(False)
        axes = np.ravel(axes)[:max(1, len(panels))]
    axes = np.ravel(axes)
    if len(axes) != max(1, len(panels)):
        raise InputError(f"sbc_ranks draws {len(panels)} panels; got {len(axes)} axes")
    truth = sbc["true_subtype"].values.astype(str)
    for ax, (k, par) in zip(axes, panels):
        ranks = sbc["rank"].sel(parameter=par).values[truth == k]
        ranks = ranks[~np.isnan(ranks)]
        n_bins = int(sbc["n_bins"].sel(subtype=k, parameter=par)) or min(n_draws + 1, 10)
        counts, expected = bin_ranks(ranks, n_draws, n_bins)
        which = (np.arange(n_draws + 1) * n_bins) // (n_draws + 1)
        left = np.array([np.flatnonzero(which == b)[0] for b in range(n_bins)], dtype=float) - 0.5
        right = np.append(left[1:], n_draws + 0.5)
        width = right - left  # bins of unequal width (L + 1 not a multiple of the bins): counts per rank value
        share = expected / max(len(ranks), 1)
        lo, hi = binom.ppf(0.005, len(ranks), share) / width, binom.ppf(0.995, len(ranks), share) / width
        edges = np.stack([left, right], 1).ravel()
        ax.fill_between(edges, np.repeat(lo, 2), np.repeat(hi, 2), color="0.85", label="99% band (uniform)")
        ax.bar(left, counts / width, width=width, align="edge", color="C0", alpha=0.7, edgecolor="white",
               label="ranks")
        ax.axhline(len(ranks) / (n_draws + 1), color="0.4", lw=1)
        p = float(sbc["p_value"].sel(subtype=k, parameter=par))
        ax.set_title(f"{k}: {par} (p = {p:.3g})" if np.isfinite(p) else f"{k}: {par} (too few ranks)", fontsize=9)
        ax.set_xlim(-0.5, n_draws + 0.5)
        ax.set_xlabel(f"rank among {n_draws} posterior draws")
        ax.set_ylabel("simulations per rank value")
    if panels:
        axes[0].legend(fontsize=7)
    return axes[0].figure


# ------------------------------------------------------------------------------------- file writers
def plot_training(history: list[dict], path: str | os.PathLike) -> Path:
    """ELBO per subject against epoch, training and held-out (``elbo_trace``), written to ``path``."""
    return _save(elbo_trace(history), path)


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
    panels = (("log_evidence_diff", "log_evidence_diff_se", "log evidence"), ("elpd_loo_diff", "elpd_loo_diff_se",
              "elpd_loo (PSIS)"), ("elpd_cv_diff", "elpd_cv_diff_se", "elpd (K-fold CV)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.6 * len(table) + 1.8), sharey=True)
    for ax, (value, se, title) in zip(axes, panels):
        comparison_panel(ax, table, value, se, title)
    fig.suptitle("Model comparison (rank 1 = best log evidence among converged, consistent fits)")
    fig.tight_layout()
    return _save(fig, path)
