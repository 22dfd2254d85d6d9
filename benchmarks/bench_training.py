"""Training that converges (issue: training): `pyrovae-pde fit` with its defaults on 1000-subject cohorts.

For each seed: a training cohort and a cohort of NEW subjects (other simulator seeds) with unequal
subtype weights are simulated and written to NetCDF; `pyrovae-pde fit` runs with its defaults (no
--epochs, no --prior) in a fresh process, then `pyrovae-pde predict` scores the new subjects. Reported
per run: exit status, wall time of the fit, whether the run says it converged (model.json), epochs,
subtype accuracy on the new subjects, and the largest error of the fitted mixture weights against
the training cohort's true subtype frequencies.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_training.py --benchmark paper-grid --seeds 0 1 2 3 4
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_training.py --benchmark graph --seeds 0 1 2 3 4

``--baseline DIR`` also runs the same two commands from another checkout of the package (e.g. a
`git worktree` of the previous release) with ``--baseline-args`` (default ``--epochs 12``) on the
same cohorts, side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from pyrovae_pde.data import load_dataset, save_dataset, simulate
from pyrovae_pde.inference.evaluation import recovery_metrics

SETTINGS = {
    "paper-grid": dict(components=("fisher_kpp", "saturating", "zeldovich"), weights=(0.5, 0.3, 0.2), noise_sd=0.05),
    "graph": dict(components=("diffusion", "fisher_kpp"), weights=(0.65, 0.35), noise_sd=0.02),
}


def run(cmd: list[str], env: dict, cwd: Path) -> tuple[int, float, str]:
    start = time.perf_counter()
    # in the work directory: `python -m` puts the current directory first on sys.path, and the
    # baseline's PYTHONPATH must win over a checkout there
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, time.perf_counter() - start, "\n".join(tail[-6:])


def one(benchmark: str, seed: int, n: int, n_test: int, workdir: Path, python: str, pythonpath: str | None,
        extra: list[str], label: str) -> dict:
    s = SETTINGS[benchmark]
    train_path, test_path = workdir / f"train_{seed}.nc", workdir / f"test_{seed}.nc"
    if not train_path.exists():
        save_dataset(simulate(benchmark, n, seed=100 + seed, noise_sd=s["noise_sd"], components=s["components"],
                              weights=s["weights"]), train_path)
        save_dataset(simulate(benchmark, n_test, seed=200 + seed, noise_sd=s["noise_sd"],
                              components=s["components"], weights=s["weights"]), test_path)
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    run_dir, post = workdir / f"run_{label}_{seed}", workdir / f"post_{label}_{seed}.nc"
    rc, fit_s, fit_tail = run([python, "-m", "pyrovae_pde", "fit", str(train_path), "--components",
                               ",".join(s["components"]), "--out", str(run_dir), "--seed", str(seed), *extra], env,
                              workdir)
    out = {"benchmark": benchmark, "seed": seed, "label": label, "fit_rc": rc, "fit_seconds": round(fit_s, 1)}
    if rc != 0:
        out["fit_error"] = fit_tail
        return out
    config = json.loads((run_dir / "model.json").read_text())
    conv = config.get("convergence") or {}
    out.update(converged=conv.get("converged"), epochs=conv.get("epochs_run", len(config["history"]["history"])),
               stop_reason=conv.get("stop_reason"), rollbacks=conv.get("rollbacks"))
    rc, pred_s, pred_tail = run([python, "-m", "pyrovae_pde", "predict", str(run_dir), str(test_path), "--out",
                                 str(post)], env, workdir)
    out.update(predict_rc=rc, predict_seconds=round(pred_s, 1))
    if rc != 0:
        out["predict_error"] = pred_tail
        return out
    posterior = xr.load_dataset(post, engine="h5netcdf")
    test, train = load_dataset(test_path), load_dataset(train_path)
    metrics = recovery_metrics(posterior, test)
    names = [str(v) for v in posterior["subtype"].values]
    true_train = np.array([str(v) for v in train["true_subtype"].values])
    freq = np.array([(true_train == c).mean() for c in names])
    weights = posterior["weights"].values
    out.update(accuracy=round(metrics["accuracy"], 4), mean_top_prob=round(metrics["mean_top_prob"], 4),
               weights=[round(float(w), 4) for w in weights], train_frequencies=[round(float(f), 4) for f in freq],
               weights_max_error=round(float(np.abs(weights - freq).max()), 4))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--test-subjects", type=int, default=1000)
    parser.add_argument("--baseline", help="another checkout of the package to run side by side")
    parser.add_argument("--baseline-args", default="--epochs 12")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:ARGS",
                        help="also run the current code with extra fit arguments, "
                             "e.g. 'fixed:--population-prior fixed'")
    parser.add_argument("--workdir", help="keep cohorts and runs here (default: a temporary directory)")
    parser.add_argument("--json", help="append one JSON line per run here")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pyrovae_bench_training_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    done = {}
    if args.json and Path(args.json).exists():  # runs already recorded are not repeated
        for line in open(args.json):
            r = json.loads(line)
            done[(r["benchmark"], r["seed"], r["label"])] = r
    for seed in args.seeds:
        runs = [("current", None, [])]
        if args.baseline:
            runs.append(("baseline", str(Path(args.baseline).resolve()), args.baseline_args.split()))
        for variant in args.variant:
            label, _, extra = variant.partition(":")
            runs.append((label, None, extra.split()))
        for label, path, extra in runs:
            if (args.benchmark, seed, label) in done:
                results.append(done[(args.benchmark, seed, label)])
                continue
            res = one(args.benchmark, seed, args.subjects, args.test_subjects, workdir, sys.executable, path, extra,
                      label)
            results.append(res)
            print(json.dumps(res), flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(res) + "\n")
    current = [r for r in results if r["label"] == "current"]
    ok = [r for r in current if r.get("fit_rc") == 0 and r.get("predict_rc") == 0]
    print(f"{args.benchmark}: {len(ok)}/{len(current)} runs completed; "
          f"fit {min(r['fit_seconds'] for r in current):.0f}-"
          f"{max(r['fit_seconds'] for r in current):.0f} s; accuracy "
          f"{min((r['accuracy'] for r in ok), default=float('nan')):.3f}-"
          f"{max((r['accuracy'] for r in ok), default=float('nan')):.3f}; "
          f"weights error <= {max((r['weights_max_error'] for r in ok), default=float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
