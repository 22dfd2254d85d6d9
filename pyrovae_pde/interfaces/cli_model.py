"""Subcommands for the model: ``fit``, ``predict`` and ``demo``."""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from ..errors import UserError
from .cli import add_run_arguments, at_least, comma_list, device_name, show_progress, warn_if_unconverged


def _priors(options: list[str] | None) -> dict:
    """``--prior NAME=LO,HI`` options as overrides; what is not given is derived from the cohort."""
    from ..model.priors import parse_prior_option

    chosen = {}
    for text in options or []:
        try:
            name, prior = parse_prior_option(text)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        chosen[name] = prior
    return chosen


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    from ..inference.train import TrainConfig

    p.add_argument("--epochs", type=at_least(1), default=TrainConfig.epochs,
                   help=f"most epochs (default {TrainConfig.epochs}); a run stops earlier once its validation "
                        "ELBO reaches a plateau")
    p.add_argument("--batch-size", type=at_least(1), default=None,
                   help=f"subjects per SVI step, at most the cohort's (default {TrainConfig.batch_size}, or the "
                        "whole cohort if smaller)")
    p.add_argument("--lr", type=float, default=TrainConfig.learning_rate,
                   help=f"learning rate of the mixture weights and noise (default {TrainConfig.learning_rate})")
    p.add_argument("--restarts", type=at_least(1), default=TrainConfig.restarts,
                   help="fit this many times from different seeds and keep the best validation ELBO "
                        f"(default {TrainConfig.restarts})")
    p.add_argument("--population-prior", choices=("tied", "learned", "fixed"),
                   default=("tied" if TrainConfig.tie_population else "learned") if TrainConfig.learn_population
                   else "fixed",
                   help="tied (default): one population of D (and one of r) learned from the cohort under the base "
                        "priors and shared by every mechanism, so subtypes differ in mechanism only; learned: each "
                        "mechanism's own population of D and r; fixed: the base priors themselves")
    p.add_argument("--population-terms", type=at_least(1), default=TrainConfig.population_terms,
                   help="Gaussians in each tied population of log D and log r (default "
                        f"{TrainConfig.population_terms}: a mixture that can follow a skewed or bounded distribution "
                        "of parameters; 1: a single Gaussian, needed by compare --evidence-population learned; "
                        "per-mechanism populations, --population-prior learned, are single Gaussians)")
    p.add_argument("--amortize-steps", type=at_least(0), default=None,
                   help="after the fit, steps of training the encoder on subjects simulated by the fitted model, "
                        "so that predict can skip the per-subject refinement where the encoder passes its check "
                        "(fit: 4000, demo: 1000, compare: 0 (the evidence does not use it); 0: none, predict then "
                        "refines every subject)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--prior", action="append", metavar="NAME=LO,HI",
                   help="central 95%% interval of a LogNormal prior: diffusivity=LO,HI or reaction=LO,HI")


def fit_model(ds, components, args, out: Path | None, source: str):
    from ..data.locking import locked_run_directory
    from ..inference.train import TrainConfig
    from .api import SubtypeModel

    n_subjects = ds.sizes["subject"]
    if args.batch_size is not None and args.batch_size > n_subjects:
        raise UserError(f"--batch-size {args.batch_size} is larger than the cohort ({n_subjects} subjects); "
                        f"give at most {n_subjects}")
    batch_size = TrainConfig.batch_size if args.batch_size is None else args.batch_size
    model = SubtypeModel(components, priors=_priors(args.prior))
    distributed = getattr(args, "distributed", False)
    lead = _rank_zero(distributed)  # distributed: rank 0 alone locks and writes the run directory
    with locked_run_directory(out) if out is not None and lead else contextlib.nullcontext():
        model.fit(ds, epochs=args.epochs, batch_size=batch_size, learning_rate=args.lr, seed=args.seed,
                  device=args.device, checkpoint_dir=out, resume=getattr(args, "resume", False), source=source,
                  restarts=args.restarts, progress=show_progress() and lead,
                  learn_population=getattr(args, "population_prior", "tied") in ("learned", "tied"),
                  tie_population=getattr(args, "population_prior", "tied") == "tied",
                  population_terms=getattr(args, "population_terms", TrainConfig.population_terms),
                  **({"distributed": True} if distributed else {}),
                  **({} if getattr(args, "amortize_steps", None) is None else {"amortize_steps": args.amortize_steps}))
        if out is not None and lead:
            model.save(out)
    return model


def _rank_zero(distributed: bool) -> bool:
    """Whether this process writes (not distributed, or torchrun's rank 0)."""
    import os

    return not distributed or os.environ.get("RANK", "0") == "0"


def _rank_device(args: argparse.Namespace) -> None:
    """Distributed on ``--device cuda``: one GPU per rank, torchrun's local rank."""
    import os

    if args.distributed and args.device == "cuda":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"


def cmd_fit(args: argparse.Namespace) -> int:
    from ..data import load_dataset

    ds = load_dataset(args.data, lazy=args.distributed)  # distributed: each rank reads its own subjects
    out = Path(args.out)
    start = time.perf_counter()
    _rank_device(args)
    model = fit_model(ds, comma_list(args.components), args, out, str(args.data))
    if not _rank_zero(args.distributed):
        return 0
    hist = model.history_
    print(f"fitted {','.join(model.components)} on {ds.sizes['subject']} subjects in "
          f"{time.perf_counter() - start:.0f} s: {hist.epoch} epochs, best held-out epoch {hist.best_epoch}, "
          f"validation ELBO {-hist.best_val:.2f} per subject; {convergence_line(hist.diagnostics())}; "
          f"run directory {out}")
    warn_if_unconverged(model, str(out))
    warn_prior_conflicts(hist.prior_check, str(out))
    return 0


def convergence_line(diag: dict) -> str:
    """'converged (plateau at epoch 7)' or 'NOT converged (...)'."""
    if diag.get("converged"):
        text = f"converged (validation ELBO plateau after {diag['epochs_run']} epochs"
    else:
        text = f"NOT converged ({diag.get('stop_reason', 'unknown')} after {diag.get('epochs_run')} epochs"
    if diag.get("rollbacks"):
        text += f", {diag['rollbacks']} roll-back(s)"
    if diag.get("restarts", 1) > 1 and diag.get("restart_spread") == diag.get("restart_spread"):
        text += f", spread over {diag['restarts']} restarts {diag['restart_spread']:.2f} nats per subject"
    return text + ")"


def warn_prior_conflicts(checks: list[dict], where: str) -> None:
    """One warning line per prior that conflicts with the data (see inference.prior_check)."""
    import sys

    from ..inference.prior_check import PriorCheck

    for c in checks:
        check = PriorCheck(c["parameter"], c["share_outside"], c["n_subjects"], tuple(c["prior"]),
                           tuple(c["suggested"]))
        if check.conflict:
            print(f"warning: {where}: {check.message()}", file=sys.stderr)


UNTRUSTED_RESIDUALS_SHARE = 0.05  # above this share of subjects, predict says the cohort is noisier than the fit


def warn_untrusted(reasons: dict, n_subjects: int, where: str) -> None:
    """A warning when many subjects' residuals at the encoder's posterior are larger than the
    model's noise (``TrustFlags.reasons``): the cohort differs from the one the model was fitted to."""
    import sys

    count = int(reasons.get("residuals", 0))
    if n_subjects and count > UNTRUSTED_RESIDUALS_SHARE * n_subjects:
        print(f"warning: {where}: {count} of {n_subjects} subjects' scans are noisier than the fitted model's noise "
              "(residual chi-square p < the trust rule's min_fit_p at the encoder's posterior), so they were "
              "refined. Is this cohort from another scanner or preprocessing than the fit's? Check the model on it "
              "with `pyrovae-pde ppc`, or fit a model to it.", file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..data.contract import atomic_write
    from .api import SubtypeModel

    distributed = getattr(args, "distributed", False)
    lead = _rank_zero(distributed)
    model = SubtypeModel.load(args.run_dir)
    if lead:
        warn_if_unconverged(model, args.run_dir)
    ds = load_dataset(args.data, lazy=distributed)  # distributed: each rank reads its own subjects
    trust = None
    if args.trust_probability is not None:
        from ..inference.amortize import TrustRule

        if not 0.0 <= args.trust_probability <= 1.0:
            raise UserError(f"--trust-probability {args.trust_probability}: give a probability in [0, 1]")
        trust = TrustRule(min_top_probability=args.trust_probability)
    start = time.perf_counter()
    _rank_device(args)
    post = model.posterior(ds, n_particles=args.particles, seed=args.seed, device=args.device, source=str(args.data),
                           refine={"auto": "auto", "all": True, "none": False}[args.refine], n_iter=args.iterations,
                           distributed=distributed, trust=trust)
    if post is None:  # distributed: rank 0 gathered this rank's subjects and writes
        return 0
    atomic_write(args.out, lambda tmp: post.to_netcdf(tmp, engine="h5netcdf"))
    print(f"wrote {args.out}: posterior of {post.sizes['subject']} subjects over subtypes "
          f"{', '.join(model.components)} in {time.perf_counter() - start:.1f} s "
          f"({post.attrs['n_refined']} refined, {post.sizes['subject'] - post.attrs['n_refined']} by the encoder "
          "alone)")
    import json

    if "refine_reasons" in post.attrs:
        warn_untrusted(json.loads(post.attrs["refine_reasons"]), post.sizes["subject"], str(args.data))
    if "prior_conflict" in post.attrs:
        warn_prior_conflicts(json.loads(post.attrs["prior_conflict"]), str(args.data))
    if "true_subtype" in ds:
        from ..inference.evaluation import format_metrics, recovery_metrics

        print("against the file's ground truth:\n" + format_metrics(recovery_metrics(post, ds)))
    return 0


def _demo_weights(text: str) -> tuple[float, ...]:
    """``--weights`` of the demo: three nonnegative shares, one per mechanism (normalised)."""
    try:
        weights = tuple(float(v) for v in comma_list(text))
    except ValueError:
        raise UserError(f"--weights {text!r}: give three comma-separated numbers, e.g. 0.5,0.3,0.2") from None
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise UserError(f"--weights {text!r}: give three nonnegative numbers, one per mechanism, not all zero")
    return tuple(w / sum(weights) for w in weights)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..data import save_dataset, simulate
    from ..data.contract import atomic_write
    from ..inference.evaluation import format_metrics, recovery_metrics
    from .cli_report import cmd_report
    from .plots import plot_recovery, plot_training

    out = Path(args.out)
    components = ("fisher_kpp", "saturating", "zeldovich")
    weights = _demo_weights(args.weights)
    shares = ", ".join(f"{c} {w:.0%}" for c, w in zip(components, weights))
    print(f"1/5 simulating paper-grid cohorts: {args.subjects} training subjects (seed {args.seed}) and "
          f"{args.test_subjects} new subjects (seed {args.seed + 1}); subtypes {shares}; observation noise "
          f"sd {args.noise_sd}")
    cohort = dict(noise_sd=args.noise_sd, weights=weights)
    train_ds = simulate("paper-grid", args.subjects, seed=args.seed, **cohort)
    test_ds = simulate("paper-grid", args.test_subjects, seed=args.seed + 1, **cohort)
    save_dataset(train_ds, out / "train.nc")
    save_dataset(test_ds, out / "test.nc")
    print(f"2/5 fitting a {len(components)}-component mixture ({', '.join(components)})")
    start = time.perf_counter()
    model = fit_model(train_ds, components, args, out / "run", "train.nc")
    print(f"    done in {time.perf_counter() - start:.0f} s ({model.history_.epoch} epochs)")
    print("3/5 predicting subtypes and parameters of the new subjects")
    post = model.posterior(test_ds, device=args.device)
    atomic_write(out / "posterior_test.nc", lambda tmp: post.to_netcdf(tmp, engine="h5netcdf"))
    metrics = recovery_metrics(post, test_ds)
    n_refined = int(post.attrs["n_refined"])
    print(f"    {post.sizes['subject'] - n_refined} subjects by the amortized encoder alone, {n_refined} refined")
    print("    new subjects, scored against the simulation's truth:\n" + format_metrics(metrics))
    print("4/5 writing plots")
    for path in (plot_training(model.history_.history, out / "training.png"),
                 plot_recovery(post, test_ds, out / "recovery.png")):
        print(f"    {path}")
    print("5/5 writing the report of the new subjects (as 'pyrovae-pde report')")
    cmd_report(argparse.Namespace(run_dir=str(out / "run"), data=str(out / "test.nc"), out=str(out / "report"),
                                  comparison=None, subjects=None, draws=args.report_draws, particles=16,
                                  seed=args.seed))
    print(f"subtype accuracy on new subjects: {metrics['accuracy']:.3f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit", help="fit a mixture of PDE subtypes to a contract file")
    p.add_argument("data", help="contract NetCDF file")
    p.add_argument("--components", required=True,
                   help="comma list of reaction terms, e.g. fisher_kpp,saturating,zeldovich (one = single PDE)")
    p.add_argument("--out", required=True, help="run directory (model, checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the ranks of 'torchrun --nproc_per_node=P -m pyrovae_pde fit ... "
                        "--distributed' (gloo on CPU, nccl on CUDA: one GPU per rank): each rank reads only its own "
                        "subjects from the file; --batch-size is the global batch, split over the ranks; rank 0 "
                        "writes the run directory")
    add_training_arguments(p)
    p.set_defaults(handler=cmd_fit)

    p = subparsers.add_parser("predict", help="posterior subtypes and parameters for a cohort")
    add_run_arguments(p, "contract NetCDF file (new or training subjects)", "posterior NetCDF file")
    p.add_argument("--iterations", type=at_least(0), default=3,
                   help="Levenberg-Marquardt iterations of the per-subject Laplace refinement")
    p.add_argument("--refine", dest="refine", choices=("auto", "all", "none"), default="auto",
                   help="auto (default): the amortized encoder alone for the subjects it can be trusted with, "
                        "the Laplace refinement for the others (models fitted before amortization: all); "
                        "all: refine every subject; none: the encoder alone")
    p.add_argument("--no-refine", dest="refine", action="store_const", const="none",
                   help="the same as --refine none")
    p.add_argument("--trust-probability", type=float, default=None, metavar="P",
                   help="--refine auto keeps the encoder's answer only for subjects whose top subtype probability "
                        "is at least P (default 0.9; lower: faster, fewer subjects refined)")
    p.add_argument("--particles", type=at_least(0), default=None,
                   help="importance samples per subject and subtype: from the Laplace approximation "
                        "(default 128 on domains of at most 256 nodes, else 0: Laplace alone), or from "
                        "the guide with --no-refine (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--distributed", action="store_true",
                   help="split the subjects over the ranks of 'torchrun --nproc_per_node=P -m pyrovae_pde predict ... "
                        "--distributed' (gloo on CPU, nccl on CUDA: one GPU per rank): each rank reads and predicts "
                        "its own, rank 0 gathers them and writes --out (one process's file up to float32 rounding)")
    p.set_defaults(handler=cmd_predict)

    p = subparsers.add_parser("demo", help="simulate, fit, predict on new subjects, report and plot")
    p.add_argument("--out", default="demo_output", help="output directory")
    p.add_argument("--subjects", type=at_least(1), default=300, help="training subjects")
    p.add_argument("--test-subjects", type=at_least(1), default=200, help="new subjects to score")
    p.add_argument("--noise-sd", type=float, default=0.05,
                   help="sd of the Gaussian observation noise added to every scan (default 0.05; signal in [0, 1])")
    p.add_argument("--weights", default="0.5,0.3,0.2",
                   help="shares of the subtypes fisher_kpp,saturating,zeldovich in both cohorts (default 0.5,0.3,0.2)")
    p.add_argument("--report-draws", type=at_least(0), default=20,
                   help="posterior draws of the report's fitted fields (default 20; 0: observed fields only)")
    add_training_arguments(p)
    p.set_defaults(handler=cmd_demo, amortize_steps=1000)  # a shorter amortization: the demo takes minutes
