"""Subcommands for model criticism: ``compare``, ``ppc``, ``forecast`` and ``export-arviz``."""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from .cli import UserError
from .cli_model import _components, add_run_arguments, add_training_arguments, fit_model, warn_if_unconverged


def _run_name(components) -> str:
    return ",".join(components)


def _evaluation_arguments(p: argparse.ArgumentParser, draws: int = 200) -> None:
    p.add_argument("--particles", type=int, default=32,
                   help="importance samples per subject and component (default 32)")
    p.add_argument("--draws", type=int, default=draws, help=f"posterior draws of the globals (default {draws})")


def _check_counts(args) -> None:
    for name in ("particles", "draws"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")


def plot_comparison(table, path) -> Path:
    """Differences from the rank-1 model in elpd_loo and log evidence, with 2-SE bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..data.contract import atomic_write

    names = list(table["model"])
    y = np.arange(len(names))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.6 * len(names) + 1.8), sharey=True)
    for ax, (value, se, title) in zip(axes, (("elpd_diff", "elpd_diff_se", "elpd_loo"),
                                            ("log_evidence_diff", "log_evidence_diff_se", "log evidence"))):
        diff = -table[value].to_numpy(dtype=float)
        err = 2 * table[se].to_numpy(dtype=float)
        ax.errorbar(diff, y, xerr=err, fmt="o", capsize=4)
        ax.axvline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=10.0)  # close models and far-off baselines on one axis
        for xi, yi in zip(diff, y):
            ax.annotate(f"{xi:.1f}", (xi, yi), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        ax.set_xlabel(f"{title} minus the best model's (nats, symlog; bars: 2 SE)")
        ax.set_title(title)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names)
    fig.suptitle("Model comparison (rank 1 = best elpd_loo)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return Path(path)


def format_table(table, columns=None, digits: int = 1) -> str:
    cols = columns or ["rank", "model", "n_components", "elpd_loo", "elpd_loo_se", "elpd_diff", "elpd_diff_se",
                       "log_evidence", "log_evidence_se", "log_evidence_diff", "elbo", "p_loo", "max_pareto_k"]
    cols = [c for c in cols if c in table.columns]
    return table[cols].to_string(index=False, float_format=lambda v: f"{v:.{digits}f}")


def cmd_compare(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..data.contract import atomic_write
    from ..inference.arviz_export import PARETO_K_MAX, compare_models
    from ..inference.marginal import subset_evidence
    from .api import SubtypeModel

    _check_counts(args)
    if not args.models and not args.runs:
        raise UserError("give models to fit (--models fisher_kpp diffusion fisher_kpp,diffusion) or fitted "
                        "runs (--runs RUN_DIR ...)")
    ds = load_dataset(args.data)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a directory")
    models = {}
    for run in args.runs or []:
        model = SubtypeModel.load(run)
        warn_if_unconverged(model, run)
        name = _run_name(model.components)
        if name in models:
            name = f"{name} ({Path(run).name})"
        models[name] = model
    for text in args.models or []:
        components = _components(text)
        if not components:
            raise UserError(f"--models: {text!r} names no component")
        name = _run_name(components)
        if name in models:
            raise UserError(f"--models: {name} is given twice (or also as a --runs run)")
        run_dir = out / "runs" / name.replace(",", "+")
        start = time.perf_counter()
        print(f"fitting {name} -> {run_dir}", flush=True)
        models[name] = fit_model(ds, components, args, run_dir, str(args.data))
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"evaluating {len(models)} model(s): {args.particles} particles per subject and component, "
          f"{args.draws} posterior draws of the globals", flush=True)
    with warnings.catch_warnings():  # high Pareto k is reported below, once per model
        warnings.simplefilter("ignore", UserWarning)
        table, evidences = compare_models(models, ds, n_particles=args.particles, n_draws=args.draws,
                                          seed=args.seed, source=str(args.data))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "comparison.csv", lambda tmp: table.to_csv(tmp, index=False))
    plot_comparison(table, out / "comparison.png")
    print(format_table(table))
    for _, row in table.iterrows():
        if row["max_pareto_k"] > PARETO_K_MAX:
            print(f"warning: {row['model']}: Pareto k > {PARETO_K_MAX} for "
                  f"{100 * (1 - row['pareto_k_ok_fraction']):.1f}% of subjects (max {row['max_pareto_k']:.2f})")
    for name, model in models.items():
        if len(model.components) > 1:
            subsets = subset_evidence(evidences[name].stats, model.module_, n_draws=args.draws, seed=args.seed)
            path = out / f"subset_evidence_{name.replace(',', '+')}.csv"
            atomic_write(path, lambda tmp: subsets.to_csv(tmp, index=False))
            print(f"subset evidence of {name} ({path.name}):")
            print(subsets.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print(f"wrote {out / 'comparison.csv'} and {out / 'comparison.png'}")
    return 0


def cmd_ppc(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..data.contract import atomic_write
    from ..inference.ppc import plot_ppc_figures, posterior_predictive_check
    from .api import SubtypeModel

    _check_counts(args)
    if not args.threshold > 0:
        raise UserError(f"--threshold must be > 0, got {args.threshold}")
    model = SubtypeModel.load(args.run_dir)
    warn_if_unconverged(model, args.run_dir)
    ds = load_dataset(args.data)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a directory")
    start = time.perf_counter()
    result = posterior_predictive_check(model, ds, n_draws=args.draws, n_particles=args.particles, seed=args.seed,
                                        threshold=args.threshold, source=str(args.data))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "ppc_pvalues.csv", lambda tmp: result.table.to_csv(tmp, index=False))
    paths = plot_ppc_figures(result, out)
    print(f"posterior predictive check of {','.join(model.components)} on {len(result.subjects)} subjects "
          f"({args.draws} replicated cohorts, spread threshold {args.threshold:g}) in "
          f"{time.perf_counter() - start:.1f} s:")
    for line in result.verdicts():
        print("  " + line)
    print(f"wrote {out / 'ppc_pvalues.csv'} and {', '.join(p.name for p in paths)}")
    return 0


def _parse_times(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--times {text!r}: expected a comma list of numbers, e.g. 30,36") from None
    if not values:
        raise UserError("--times: give at least one time")
    return values


def cmd_forecast(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..data.contract import atomic_write
    from ..inference.forecast import forecast
    from .api import SubtypeModel

    _check_counts(args)
    times = _parse_times(args.times)
    model = SubtypeModel.load(args.run_dir)
    warn_if_unconverged(model, args.run_dir)
    ds = load_dataset(args.data)
    subjects = _components(args.subjects) if args.subjects else None
    start = time.perf_counter()
    fc = forecast(model, ds, times, n_draws=args.draws, n_particles=args.particles, seed=args.seed,
                  subjects=subjects, source=str(args.data))
    atomic_write(args.out, lambda tmp: fc.to_netcdf(tmp, engine="h5netcdf"))
    print(f"wrote {args.out}: forecasts of {fc.sizes['subject']} subjects at times "
          f"{', '.join(f'{t:g}' for t in times)} (90% predictive bands, mixed over the subtype posterior and "
          f"per subtype) in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..inference.arviz_export import save_inference_data, to_inference_data
    from .api import SubtypeModel

    _check_counts(args)
    model = SubtypeModel.load(args.run_dir)
    warn_if_unconverged(model, args.run_dir)
    ds = load_dataset(args.data)
    start = time.perf_counter()
    idata = to_inference_data(model, ds, n_draws=args.draws, n_particles=args.particles, seed=args.seed,
                              predictive=not args.no_predictive, source=str(args.data))
    save_inference_data(idata, args.out)
    attrs = idata["posterior"].attrs
    groups = idata.groups() if callable(idata.groups) else [g.strip("/") for g in idata.groups if g != "/"]
    print(f"wrote {args.out} (ArviZ groups: {', '.join(groups)}) in {time.perf_counter() - start:.1f} s; "
          f"log evidence {attrs['log_evidence']:.1f} +- {attrs['log_evidence_se']:.1f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="fit and compare models: log evidence, ELBO, PSIS-LOO")
    p.add_argument("data", help="contract NetCDF file")
    p.add_argument("--models", nargs="+", metavar="COMPONENTS",
                   help="models to fit, each a comma list of components (one name = single-PDE baseline)")
    p.add_argument("--runs", nargs="+", metavar="RUN_DIR", help="already fitted run directories to compare")
    p.add_argument("--out", required=True, help="output directory (comparison.csv, comparison.png, runs/)")
    add_training_arguments(p)
    _evaluation_arguments(p)
    p.set_defaults(handler=cmd_compare)

    p = subparsers.add_parser("ppc", help="posterior predictive checks of a fitted model")
    add_run_arguments(p, "contract NetCDF file", "output directory (ppc_pvalues.csv, ppc_*.png)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="signal level counted by the spread statistic (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    _evaluation_arguments(p)
    p.set_defaults(handler=cmd_ppc)

    p = subparsers.add_parser("forecast", help="forecast subjects' fields at future times with credible bands")
    add_run_arguments(p, "contract NetCDF file (the subjects to forecast)", "forecast NetCDF file")
    p.add_argument("--times", required=True,
                   help="comma list of absolute times (unit and origin of the file's time), e.g. 30,36")
    p.add_argument("--subjects", help="comma list of subject IDs (default: all)")
    p.add_argument("--seed", type=int, default=0)
    _evaluation_arguments(p)
    p.set_defaults(handler=cmd_forecast)

    p = subparsers.add_parser("export-arviz", help="write the posterior as ArviZ InferenceData (NetCDF)")
    add_run_arguments(p, "contract NetCDF file", "NetCDF file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-predictive", action="store_true", help="leave out the posterior_predictive group")
    _evaluation_arguments(p, draws=100)
    p.set_defaults(handler=cmd_export)
