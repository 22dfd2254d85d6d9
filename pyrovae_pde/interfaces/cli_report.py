"""Subcommand ``report``: the figures of a fitted run on a cohort, and a short ``report.md``."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import xarray as xr

from ..errors import ExistingPathError, InputError, MissingFileError, UserError
from .cli import add_run_arguments, at_least, comma_list, show_progress, warn_if_unconverged

REPORT_FILE = "report.md"


def read_comparison(path: str) -> tuple:
    """(table, verdict line or None) from ``compare``'s output directory or its ``comparison.csv``."""
    import pandas as pd

    path = Path(path)
    csv = path / "comparison.csv" if path.is_dir() else path
    if not csv.is_file():
        raise MissingFileError(f"--comparison {path}: no {csv.name} there; give the --out directory of "
                               "'pyrovae-pde compare' or its comparison.csv")
    try:
        table = pd.read_csv(csv)
    except Exception as exc:  # pandas raises many kinds; one line is what users need
        raise InputError(f"--comparison {csv}: not a readable CSV table ({type(exc).__name__}: {exc})") from None
    missing = [c for c in ("model", "status", "log_evidence_diff", "log_evidence_diff_se") if c not in table]
    if missing:
        raise InputError(f"--comparison {csv}: no column {missing[0]!r}; is it the comparison.csv 'pyrovae-pde "
                         "compare' writes?")
    verdict_file = csv.parent / "verdict.txt"
    verdict = verdict_file.read_text().strip() if verdict_file.is_file() else None
    return table, verdict


def _field_subjects(post: xr.Dataset, requested: str | None) -> list[str]:
    """The subjects whose fields are drawn: ``--subjects``, else the most probable one of each MAP subtype."""
    known = [str(s) for s in post["subject"].values]
    if requested:
        names = comma_list(requested)
        unknown = [s for s in names if s not in known]
        if unknown:
            raise UserError(f"--subjects: no subject {unknown[0]!r} in the data file")
        return names
    probs = np.asarray(post["subtype_prob"].values, dtype=float)
    best = probs.argmax(axis=1)
    out = []
    for k in range(probs.shape[1]):
        members = np.flatnonzero(best == k)
        if members.size:
            out.append(known[int(members[np.argmax(probs[members, k])])])
    return out


def _interval(values: np.ndarray) -> str:
    values = values[np.isfinite(values)]
    if not values.size:
        return "| - | - "
    lo, mid, hi = np.quantile(values, [0.05, 0.5, 0.95])
    return f"| {mid:.3g} | [{lo:.3g}, {hi:.3g}] "


def _fit_lines(model, run_dir: str) -> list[str]:
    diag = model.convergence_ or {}
    warning = model.convergence_warning()
    lines = ["## Fit and convergence", "",
             f"Convergence: {('WARNING: ' + warning) if warning else 'the fit converged (validation ELBO plateau)'}",
             ""]
    labels = (("converged", "converged"), ("stop_reason", "stop reason"), ("epochs_run", "epochs run"),
              ("best_epoch", "best epoch"), ("best_validation_elbo", "best validation ELBO per subject"),
              ("elbo_slope_per_epoch", "ELBO slope (nats per subject and epoch)"), ("rollbacks", "roll-backs"),
              ("skipped_steps", "skipped steps"), ("restarts", "restarts"), ("restart_spread", "restart spread"))
    for key, label in labels:
        value = diag.get(key)
        if isinstance(value, bool):
            lines.append(f"- {label}: {'yes' if value else 'no'}")
        elif isinstance(value, float) and value == value:
            lines.append(f"- {label}: {value:.4g}")
        elif value is not None and not isinstance(value, float):
            lines.append(f"- {label}: {value}")
    return lines + [f"- run: `{run_dir}`, seed {model.seed_}", ""]


def _subtype_lines(post: xr.Dataset, ds: xr.Dataset) -> list[str]:
    names = [str(s) for s in post["subtype"].values]
    probs = np.asarray(post["subtype_prob"].values, dtype=float)
    best = probs.argmax(axis=1)
    weights = np.asarray(post["weights"].values, dtype=float)
    lines = ["## Subtypes", "", "| subtype | weight | subjects (MAP) | mean P(MAP subtype) |",
             "| --- | --- | --- | --- |"]
    for k, name in enumerate(names):
        sel = best == k
        mean_p = f"{probs[sel, k].mean():.3f}" if sel.any() else "-"
        lines.append(f"| {name} | {weights[k]:.3f} | {int(sel.sum())} | {mean_p} |")
    lines += ["", "## Parameters per subtype", "",
              "Median and 5-95% range, over the subjects of each MAP subtype, of their posterior means.", "",
              "| subtype | subjects | D median | D 90% | r median | r 90% |", "| --- | --- | --- | --- | --- | --- |"]
    for k, name in enumerate(names):
        sel = best == k
        d = np.asarray(post["diffusivity"].values, dtype=float)[sel, k]
        r = np.asarray(post["reaction"].values, dtype=float)[sel, k]
        lines.append(f"| {name} | {int(sel.sum())} {_interval(d)}{_interval(r)}|")
    confident = probs.max(axis=1)
    lines += ["", "## Diagnostics", "",
              f"- observation noise sd: {float(post['noise_scale']):.4g}",
              f"- subjects with P(MAP subtype) < 0.9: {int((confident < 0.9).sum())} of {len(confident)}",
              f"- posterior: {_posterior_kind(post)}, "
              f"{post.attrs.get('n_particles', 0)} importance draws per refined subject and subtype"]
    if "true_subtype" in ds:
        true = np.array([str(s) for s in ds["true_subtype"].sel(subject=post["subject"].values).values])
        lines.append(f"- accuracy against the file's true_subtype: {(np.array(names)[best] == true).mean():.3f}")
    return lines + [""]


def _posterior_kind(post: xr.Dataset) -> str:
    if "refined" not in post:  # written before amortized predicts
        return "Laplace, refined" if int(post.attrs.get("refined", 1)) else "amortized guide"
    n_refined, n = int(post["refined"].sum()), post.sizes["subject"]
    return f"{n_refined} of {n} subjects refined (Laplace), {n - n_refined} by the amortized encoder alone"


def _prior_lines(post: xr.Dataset) -> list[str]:
    checks = json.loads(post.attrs.get("prior_conflict", "[]"))
    lines = ["## Prior-data conflict", ""]
    if not checks:
        return lines + ["Not checked (the posterior was not refined).", ""]
    lines += ["| parameter | subjects outside the prior's 95% | prior 95% | interval covering the data | conflict |",
              "| --- | --- | --- | --- | --- |"]
    for c in checks:
        lo, hi = c["prior"]
        slo, shi = c["suggested"]
        lines.append(f"| {c['parameter']} | {100 * c['share_outside']:.0f}% of {c['n_subjects']} "
                     f"| [{lo:.3g}, {hi:.3g}] | [{slo:.3g}, {shi:.3g}] "
                     f"| {'YES: refit with --prior' if c['conflict'] else 'no'} |")
    return lines + [""]


def _comparison_lines(table, verdict: str | None, source: str) -> list[str]:
    lines = ["## Model comparison", "", f"From `{source}`.", ""]
    if verdict:
        lines += [verdict, ""]
    cols = [c for c in ("rank", "model", "log_evidence", "log_evidence_se", "log_evidence_diff", "elpd_loo_diff",
                        "status") if c in table]
    lines += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for _, row in table.iterrows():
        cells = [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        lines.append("| " + " | ".join(cells).replace("nan", "-") + " |")
    return lines + [""]


def _figures(model, post, ds, subjects, fitted, table) -> dict:
    """File name -> a function drawing the figure (drawn one at a time, while writing)."""
    from . import plots, plots_fields

    figures = {"subtypes.png": lambda: plots.subtype_probabilities(post, truth=ds if "true_subtype" in ds else None),
               "parameters.png": lambda: plots.parameters(post)}
    if model.history_ is not None and model.history_.history:
        figures["training.png"] = lambda: plots.elbo_trace(model.history_.history)
    for s in subjects:
        name = "fields_" + re.sub(r"[^A-Za-z0-9_.-]", "_", s) + ".png"
        figures[name] = lambda s=s: plots_fields.fields(ds, s, fitted=fitted.get(s))
    if table is not None:
        figures["comparison.png"] = lambda: plots.comparison(table)
    return figures


def cmd_report(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..data import load_dataset
    from ..data.contract import atomic_write
    from ..data.locking import locked_run_directory
    from .api import SubtypeModel
    from .plots import save_figure

    model = SubtypeModel.load(args.run_dir)
    ds = load_dataset(args.data)
    table, verdict = read_comparison(args.comparison) if args.comparison else (None, None)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ExistingPathError(f"--out {out} is a file; give a directory")
    warn_if_unconverged(model, args.run_dir)
    source = str(args.data)
    with tqdm(total=2, desc="report: posterior", disable=not show_progress(), leave=False) as bar:
        post = model.posterior(ds, seed=args.seed, source=source)
        bar.update()
        subjects = _field_subjects(post, args.subjects)
        fitted = {}
        if args.draws:
            bar.set_description("report: fitted fields")
            for s in subjects:
                times = np.asarray(ds["time"].sel(subject=s).values, dtype=float)
                fitted[s] = model.forecast(ds, times[np.isfinite(times)], n_draws=args.draws,
                                           n_particles=args.particles, seed=args.seed, subjects=[s], source=source)
        bar.update()
    figures = _figures(model, post, ds, subjects, fitted, table)
    lines = [f"# Report: {','.join(model.components)} on {Path(args.data).name}", "",
             f"{ds.sizes['subject']} subjects on a {ds.attrs['domain']} domain, model `{args.run_dir}` "
             f"({len(model.components)} components: {', '.join(model.components)}).", ""]
    lines += _fit_lines(model, args.run_dir) + _subtype_lines(post, ds) + _prior_lines(post)
    if table is not None:
        lines += _comparison_lines(table, verdict, args.comparison)
    lines += ["## Figures", ""] + [f"![{name[:-4]}]({name})\n" for name in figures]
    with locked_run_directory(out):
        for name, draw in tqdm(figures.items(), desc="report: figures", disable=not show_progress(), leave=False):
            save_figure(draw(), out / name, close=True)
        atomic_write(out / REPORT_FILE, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    print(f"wrote {out / REPORT_FILE} and {len(figures)} figures ({', '.join(figures)})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="figures of a fitted run on a cohort and a short report.md")
    add_run_arguments(p, "contract NetCDF file", "output directory (report.md and PNG figures)")
    p.add_argument("--comparison", metavar="CMP_DIR_OR_CSV",
                   help="the --out directory of 'pyrovae-pde compare' (or its comparison.csv): adds its verdict")
    p.add_argument("--subjects", help="comma list of subjects whose fields to draw (default: the most probable "
                                      "subject of each MAP subtype)")
    p.add_argument("--draws", type=at_least(0), default=50,
                   help="posterior draws for the fitted fields (default 50; 0: observed fields only)")
    p.add_argument("--particles", type=at_least(1), default=16,
                   help="importance samples per subject and component for the fitted fields (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_report)
