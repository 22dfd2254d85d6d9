"""Subcommands for model criticism: ``compare``, ``ppc``, ``forecast``, ``export-arviz`` and ``sbc``."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import ExistingPathError, UserError
from .cli import add_run_arguments, at_least, comma_list, warn_if_unconverged
from .cli_model import add_training_arguments, fit_model


def _run_and_data(args: argparse.Namespace):
    """The fitted run ``args.run_dir`` (warning if it did not converge) and the cohort ``args.data``."""
    from ..data import load_dataset
    from .api import SubtypeModel

    model = SubtypeModel.load(args.run_dir)
    warn_if_unconverged(model, args.run_dir)
    return model, load_dataset(args.data)


def _output_directory(path: str) -> Path:
    """``--out`` as a directory path; an existing file there is refused."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ExistingPathError(f"--out {out} is a file; give a directory")
    return out

def _run_name(components) -> str:
    return ",".join(components)


def _evaluation_arguments(p: argparse.ArgumentParser, draws: int = 200) -> None:
    p.add_argument("--particles", type=at_least(1), default=32,
                   help="importance samples per subject and component (default 32)")
    p.add_argument("--draws", type=at_least(1), default=draws, help=f"posterior draws of the globals (default {draws})")


def format_table(table, columns=None, digits: int = 1) -> str:
    cols = columns or ["rank", "model", "converged", "repeats", "log_evidence", "log_evidence_se", "log_evidence_diff",
                       "z", "elpd_loo", "elpd_loo_diff", "elpd_loo_diff_se", "max_pareto_k", "elpd_cv", "elpd_cv_diff",
                       "elpd_cv_diff_se", "elbo", "status"]
    cols = [c for c in cols if c in table.columns]
    return table[cols].to_string(index=False, float_format=lambda v: f"{v:.{digits}f}")


def _candidates(args) -> list[list[str]]:
    """Component lists of the models to fit: --models, and every subset of --mechanisms up to
    --max-components mechanisms."""
    import itertools

    out = []
    for text in args.models or []:
        components = comma_list(text)
        if not components:
            raise UserError(f"--models: {text!r} names no component")
        out.append(components)
    if args.mechanisms:
        mechanisms = comma_list(args.mechanisms)
        if len(set(mechanisms)) != len(mechanisms) or not mechanisms:
            raise UserError(f"--mechanisms {args.mechanisms!r}: give distinct mechanism names")
        top = args.max_components or len(mechanisms)
        if not 1 <= top <= len(mechanisms):
            raise UserError(f"--max-components must be between 1 and {len(mechanisms)}, got {top}")
        for size in range(1, top + 1):
            out += [list(c) for c in itertools.combinations(mechanisms, size)]
    names = [_run_name(c) for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--models/--mechanisms: {', '.join(twice)} given twice")
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..data.contract import atomic_write
    from .api import SubtypeModel, compare

    candidates = _candidates(args)
    if not candidates and not args.runs:
        raise UserError("give models to fit (--models fisher_kpp diffusion fisher_kpp,diffusion, or --mechanisms "
                        "diffusion,fisher_kpp,zeldovich --max-components 2) or fitted runs (--runs RUN_DIR ...)")
    ds = load_dataset(args.data)
    out = _output_directory(args.out)
    runs: dict[str, list[SubtypeModel]] = {}
    source = str(args.data)
    for run in args.runs or []:  # runs with the same mechanisms are repeats of one model
        model = SubtypeModel.load(run)
        warn_if_unconverged(model, run)
        model.tensors(ds, source)  # a run of another domain fails here, before any fitting
        runs.setdefault(_run_name(model.components), []).append(model)
    for components in candidates:
        name = _run_name(components)
        if name in runs:
            raise UserError(f"--models: {name} is given both to fit and as a --runs run")
        for r in range(args.repeats):
            seed = args.seed + r
            run_dir = out / "runs" / name.replace(",", "+") / f"seed-{seed}"
            start = time.perf_counter()
            print(f"fitting {name} (seed {seed}) -> {run_dir}", flush=True)
            args_r = argparse.Namespace(**{**vars(args), "seed": seed})
            model = fit_model(ds, components, args_r, run_dir, source)
            print(f"  done in {time.perf_counter() - start:.0f} s: "
                  f"{'converged' if model.converged_ else 'NOT converged'}", flush=True)
            warn_if_unconverged(model, str(run_dir))
            runs.setdefault(name, []).append(model)
    print(f"evaluating {len(runs)} model(s): quadrature of every subject's integrals, {args.draws} posterior draws of "
          f"the globals, {args.folds}-fold cross-validation", flush=True)
    start = time.perf_counter()
    result = compare(runs, ds, n_draws=args.draws, seed=args.seed, folds=args.folds, source=source,
                     population=args.evidence_population)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "comparison.csv", lambda tmp: result.table.to_csv(tmp, index=False))
    from .plots import plot_comparison

    plot_comparison(result.table, out / "comparison.png")
    print(format_table(result.table))
    for line in result.warnings:
        print(f"warning: {line}")
    for name, subsets in result.subsets.items():
        path = out / f"subset_evidence_{name.replace(',', '+')}.csv"
        atomic_write(path, lambda tmp, subsets=subsets: subsets.to_csv(tmp, index=False))
        print(f"subset evidence of {name} ({path.name}):")
        print(subsets.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    atomic_write(out / "verdict.txt", lambda tmp: Path(tmp).write_text(result.verdict + "\n"))
    print(f"evaluated in {time.perf_counter() - start:.0f} s; wrote {out / 'comparison.csv'}, comparison.png, "
          "verdict.txt")
    print(result.verdict)
    return 0


def cmd_ppc(args: argparse.Namespace) -> int:
    from ..data.contract import atomic_write
    from ..inference.ppc import plot_ppc_figures

    if not args.threshold > 0:
        raise UserError(f"--threshold must be > 0, got {args.threshold}")
    model, ds = _run_and_data(args)
    out = _output_directory(args.out)
    start = time.perf_counter()
    result = model.check(ds, n_draws=args.draws, n_particles=args.particles, seed=args.seed,
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
    from ..data.contract import atomic_write

    times = _parse_times(args.times)
    model, ds = _run_and_data(args)
    subjects = comma_list(args.subjects) if args.subjects else None
    start = time.perf_counter()
    fc = model.forecast(ds, times, n_draws=args.draws, n_particles=args.particles, seed=args.seed,
                        subjects=subjects, source=str(args.data))
    atomic_write(args.out, lambda tmp: fc.to_netcdf(tmp, engine="h5netcdf"))
    print(f"wrote {args.out}: forecasts of {fc.sizes['subject']} subjects at times "
          f"{', '.join(f'{t:g}' for t in times)} (90% predictive bands, mixed over the subtype posterior and "
          f"per subtype) in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..inference.arviz_export import save_inference_data

    model, ds = _run_and_data(args)
    start = time.perf_counter()
    idata = model.to_inference_data(ds, n_draws=args.draws, n_particles=args.particles, seed=args.seed,
                                    predictive=not args.no_predictive, source=str(args.data))
    save_inference_data(idata, args.out)
    attrs = idata["posterior"].attrs
    groups = idata.groups() if callable(idata.groups) else [g.strip("/") for g in idata.groups if g != "/"]
    print(f"wrote {args.out} (ArviZ groups: {', '.join(groups)}) in {time.perf_counter() - start:.1f} s; "
          f"log evidence {attrs['log_evidence']:.1f} +- {attrs['log_evidence_se']:.1f}")
    return 0


def cmd_sbc(args: argparse.Namespace) -> int:
    from ..data.contract import atomic_write
    from ..inference.sbc import format_pvalues, simulation_based_calibration
    from .plots import save_figure, sbc_ranks

    model, ds = _run_and_data(args)
    out = _output_directory(args.out)
    reference = model.tensors(ds, str(args.data))  # a run of another domain fails here
    start = time.perf_counter()
    result = simulation_based_calibration(model.module_, reference, n_simulations=args.simulations,
                                          n_draws=args.draws, seed=args.seed, n_particles=args.particles,
                                          posterior=args.posterior)
    result.attrs["model_components"] = ",".join(model.components)
    result.attrs["reference"] = str(args.data)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "sbc.nc", lambda tmp: result.to_netcdf(tmp, engine="h5netcdf"))
    save_figure(sbc_ranks(result), out / "sbc_ranks.png", close=True)
    print(f"simulation-based calibration of {','.join(model.components)}: {args.simulations} simulated subjects, "
          f"ranks among {args.draws} posterior draws ({result.attrs['posterior']}) in "
          f"{time.perf_counter() - start:.1f} s:")
    for line in format_pvalues(result):
        print("  " + line)
    print(f"wrote {out / 'sbc.nc'} and sbc_ranks.png")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="fit and compare models: log evidence, ELBO, PSIS-LOO")
    p.add_argument("data", help="contract NetCDF file")
    p.add_argument("--models", nargs="+", metavar="COMPONENTS",
                   help="models to fit, each a comma list of components (one name = single-PDE baseline)")
    p.add_argument("--mechanisms", metavar="A,B,C",
                   help="fit and rank every subset of these mechanisms (how many subtypes, and which)")
    p.add_argument("--max-components", type=at_least(1), metavar="K",
                   help="with --mechanisms: subsets of at most K mechanisms (default: all)")
    p.add_argument("--runs", nargs="+", metavar="RUN_DIR",
                   help="already fitted run directories to compare (runs with the same mechanisms are repeats)")
    p.add_argument("--repeats", type=at_least(1), default=2,
                   help="fits of each model with seeds SEED, SEED+1, ...: their spread enters the evidence's SE "
                        "(default 2)")
    p.add_argument("--folds", type=at_least(2), default=5, help="K of the K-fold cross-validation (default 5)")
    p.add_argument("--out", required=True, help="output directory (comparison.csv, comparison.png, verdict.txt, runs/)")
    add_training_arguments(p)
    p.set_defaults(amortize_steps=0)  # the evidence does not use an amortized encoder: not worth its time
    p.add_argument("--draws", type=at_least(1), default=200, help="posterior draws of the globals (default 200)")
    p.add_argument("--evidence-population", choices=("base", "learned"), default="base",
                   help="population priors the models are compared under: base (default: the --prior ranges, "
                        "shared by every mechanism, so no mixture wins by reshaping a population) or learned "
                        "(each fit's learned population priors)")
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

    p = subparsers.add_parser("sbc", help="simulation-based calibration of the per-subject posteriors of D and r")
    add_run_arguments(p, "contract NetCDF file (its subjects lend the simulations first scans and visit times)",
                      "output directory (sbc.nc, sbc_ranks.png)")
    p.add_argument("--simulations", type=at_least(1), default=200, help="simulated subjects (default 200)")
    p.add_argument("--draws", type=at_least(1), default=20,
                   help="posterior draws each true value is ranked among (default 20)")
    p.add_argument("--particles", type=at_least(0), default=None,
                   help="importance samples per subject and subtype (default: as the posterior: 128 on graphs "
                        "and small domains, else 0 = the Laplace approximation)")
    p.add_argument("--posterior", choices=("refined", "amortized"), default="refined",
                   help="refined (default): the refined posterior of every subject; amortized: the encoder's "
                        "guide alone, which predict keeps for the subjects it trusts")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_sbc)
