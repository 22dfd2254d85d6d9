"""Full-scale recovery, calibration, speed and memory of the mixture model (issue: the model).

Scenarios (each trains on one seed and scores NEW subjects simulated with another seed):

* ``paper-clean``: paper-grid, noise-free, 3 components.
* ``paper-noisy``: paper-grid, noise sd 0.05 on visits after the first.
* ``graph``: graph benchmark, 2-5 irregular visits, noise sd 0.02, diffusion + fisher_kpp.

Also times ``predict`` on the new subjects (default ``refine="auto"``: the amortized encoder
alone where its check passes, refined elsewhere; ``refine=True``: every subject refined;
``refine=False``: the encoder alone), runs the simulation-based calibration of the amortized
guide (``--sbc`` subjects, 19 draws each), and compares predict per subject with the classic
per-subject least-squares fit of each PDE (scipy ``least_squares`` on a sample of subjects).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_model.py --scenario paper-clean --subjects 1000

``--device cuda`` fits and predicts on the GPU; the default predict is then also timed on CPU in
the same run (``predict_cpu_seconds``), so the two can be compared on one machine.

Peak memory is the process's maximum resident set size (``ru_maxrss``) at the end of the run.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch
from scipy.optimize import least_squares

from pyrovae_pde.data import cohort_tensors, domain_from_dataset, simulate
from pyrovae_pde.inference.evaluation import recovery_metrics
from pyrovae_pde.interfaces.api import SubtypeModel
from pyrovae_pde.physics import solve_active

SCENARIOS = {
    "paper-clean": dict(benchmark="paper-grid", noise_sd=0.0, components=("fisher_kpp", "saturating", "zeldovich"),
                        priors=None),
    "paper-noisy": dict(benchmark="paper-grid", noise_sd=0.05, components=("fisher_kpp", "saturating", "zeldovich"),
                        priors=None),
    "graph": dict(benchmark="graph", noise_sd=0.02, components=("diffusion", "fisher_kpp"),
                  priors={"diffusivity": (0.05, 1.0), "reaction": (0.1, 1.0)}),
}


def classic_fit_seconds_per_subject(ds, components, n_subjects: int = 5) -> float:
    """Per-subject least squares of every component's (log D, log r) from the prior centre."""
    domain = domain_from_dataset(ds)
    data = cohort_tensors(ds, domain, dtype=torch.float64)
    start = time.perf_counter()
    for i in range(n_subjects):
        sl = slice(i, i + 1)
        for name in components:
            def residual(theta, sl=sl, name=name):
                d = torch.tensor([[np.exp(theta[0])]], dtype=torch.float64)
                r = torch.tensor([[np.exp(theta[1])]], dtype=torch.float64)
                field = solve_active(domain, data.signal[sl, 0], data.times[sl], d, r, (name,))
                mask = data.observed[sl, 1:, None]
                return ((field[0, 0, 1:] - data.signal[sl, 1:][0]) * mask[0]).reshape(-1).numpy()

            least_squares(residual, x0=np.log([0.1, 0.03]), method="trf", xtol=1e-6)
    return (time.perf_counter() - start) / n_subjects


def recalibrate(model: SubtypeModel, train_ds, seed: int) -> dict:
    """``amortize.calibrate`` of a loaded model on 1024 new simulations per component like its
    training cohort (what the amortization stage ends with; the training itself is kept)."""
    from pyrovae_pde.inference.amortize import calibrate
    from pyrovae_pde.inference.encoding import global_means
    from pyrovae_pde.model.likelihood import observation_sd

    module = model.module_
    data = cohort_tensors(train_ds, module.domain)
    noise_sd = float(observation_sd(global_means(module)[1]))
    return calibrate(module, data, 1024, noise_sd, torch.Generator().manual_seed(seed + 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--subjects", type=int, default=1000, help="training subjects")
    parser.add_argument("--test-subjects", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classic-subjects", type=int, default=3, help="subjects timed for the classic fit")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--save-model", metavar="DIR", help="save the fitted model here (SubtypeModel.save), to score "
                        "later predicts on the same fit (--load-model)")
    parser.add_argument("--load-model", metavar="DIR", help="score this saved model (of the same scenario, "
                        "--subjects and --seed) instead of fitting one")
    parser.add_argument("--recalibrate", action="store_true", help="with --load-model: redo the amortized "
                        "posterior's recalibration (amortize.calibrate) with this code, on simulations like the "
                        "training cohort")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where fit and predict run")
    parser.add_argument("--batch-size", type=int, default=16, help="SVI minibatch (subjects per step)")
    parser.add_argument("--amortize-steps", type=int, default=None, help="amortization steps after the fit "
                        "(default: the package's)")
    parser.add_argument("--sbc", type=int, default=1000,
                        help="simulated subjects of the simulation-based calibration of the amortized guide (0: none)")
    parser.add_argument("--particles", type=int, default=None,
                        help="also time and score predict with this many Laplace-proposal importance draws "
                             "(0: the Laplace approximation alone)")
    args = parser.parse_args(argv)
    sc = SCENARIOS[args.scenario]

    train_ds = simulate(sc["benchmark"], args.subjects, seed=args.seed + 100, noise_sd=sc["noise_sd"],
                        components=sc["components"])
    test_ds = simulate(sc["benchmark"], args.test_subjects, seed=args.seed + 200, noise_sd=sc["noise_sd"],
                       components=sc["components"])
    start = time.perf_counter()
    if args.load_model:
        model = SubtypeModel.load(args.load_model)
        if args.recalibrate:
            recalibrated = recalibrate(model, train_ds, args.seed)
            model.history_.amortization = {**(model.history_.amortization or {}), **recalibrated,
                                           "recalibrated_by": "bench_model --recalibrate"}
        fit_s = float("nan")
    else:
        model = SubtypeModel(sc["components"], priors=sc["priors"])
        model.fit(train_ds, epochs=args.epochs, seed=args.seed, progress=sys.stderr.isatty(), device=args.device,
                  batch_size=args.batch_size,
                  **({} if args.amortize_steps is None else {"amortize_steps": args.amortize_steps}))
        fit_s = time.perf_counter() - start
    if args.save_model:
        model.save(args.save_model)
    rss_after_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    start = time.perf_counter()
    fast = model.posterior(test_ds, refine=False, device=args.device)
    fast_s = time.perf_counter() - start
    fast_metrics = recovery_metrics(fast, test_ds)
    start = time.perf_counter()
    post = model.posterior(test_ds, device=args.device)  # the default: refine="auto"
    predict_s = time.perf_counter() - start
    metrics = recovery_metrics(post, test_ds)
    start = time.perf_counter()
    every = model.posterior(test_ds, device=args.device, refine=True)
    refine_all_s = time.perf_counter() - start
    every_metrics = recovery_metrics(every, test_ds)
    sbc = {}
    if args.sbc and model.module_.amortized:
        from pyrovae_pde.inference.sbc import simulation_based_calibration

        result = simulation_based_calibration(model, test_ds, n_simulations=args.sbc, n_draws=19, seed=args.seed,
                                              posterior="amortized")
        sbc = {"sbc_amortized_p_values": {f"{k}/{par}": round(float(result["p_value"].sel(subtype=k, parameter=par)), 4)
                                          for k in result["subtype"].values for par in result["parameter"].values
                                          if int(result["count"].sel(subtype=k, parameter=par)) > 0}}
    sampled = {}
    if args.particles is not None:
        start = time.perf_counter()
        is_post = model.posterior(test_ds, device=args.device, n_particles=args.particles)
        sampled = {"particles": args.particles, "predict_particles_seconds": round(time.perf_counter() - start, 2),
                   "particles_metrics": {k: round(v, 4) for k, v in recovery_metrics(is_post, test_ds).items()}}
    on_cpu = {}
    if args.device != "cpu":
        start = time.perf_counter()
        cpu_post = model.posterior(test_ds)
        on_cpu["predict_cpu_seconds"] = round(time.perf_counter() - start, 2)
        on_cpu["cpu_vs_device_max_prob_diff"] = float(abs(cpu_post["subtype_prob"] - post["subtype_prob"]).max())
    classic_s = classic_fit_seconds_per_subject(test_ds, sc["components"], args.classic_subjects)
    result = {
        "scenario": args.scenario, "train_subjects": args.subjects, "test_subjects": args.test_subjects,
        "epochs_run": model.history_.epoch, "best_epoch": model.history_.best_epoch,
        "fit_seconds": round(fit_s, 1), "predict_seconds": round(predict_s, 2),
        "predict_ms_per_subject": round(1000 * predict_s / args.test_subjects, 3),
        "classic_fit_s_per_subject": round(classic_s, 2),
        "speedup_per_subject_vs_classic": round(classic_s / (predict_s / args.test_subjects), 1),
        "amortization": model.history_.amortization,
        "n_refined_by_default": int(post.attrs["n_refined"]),
        "predict_refine_all_seconds": round(refine_all_s, 2),
        "refine_all_metrics": {k: round(v, 4) for k, v in every_metrics.items()}, **sbc,
        "predict_no_refine_seconds": round(fast_s, 2),
        "speedup_no_refine_vs_classic": round(classic_s / (fast_s / args.test_subjects), 1),
        "no_refine_metrics": {k: round(v, 4) for k, v in fast_metrics.items()}, **sampled,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "peak_rss_after_fit_gb": round(rss_after_fit, 2),
        "torch_threads": torch.get_num_threads(), "device": args.device, "batch_size": args.batch_size,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", **on_cpu,
        **({"peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}
           if args.device.startswith("cuda") else {}),
        **{k: round(v, 4) for k, v in metrics.items()},
        "weights": {str(k): round(float(v), 3) for k, v in zip(post["subtype"].values, post["weights"].values)},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
