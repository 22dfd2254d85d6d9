"""Benchmark: training on a CUDA GPU, seconds per epoch and GPU memory (issues: multi-process, 3-D physics).

    python benchmarks/bench_training_gpu.py --json training_gpu.json                  # on a CUDA machine
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_training_gpu.py --device cpu --quick   # smoke check

Settings (``--settings``; each simulated on the device, then fitted by ``SubtypeModel.fit`` with the
package defaults except ``--epochs``, ``min_epochs`` equal to it so that every epoch runs, one restart):

* ``paper-grid``: 1,000 subjects, fisher_kpp / saturating / zeldovich, weights 0.5/0.3/0.2, noise sd 0.05
  (2-D disc, 697 nodes: the spectral solver);
* ``mni-2mm``: 256 subjects on the MNI152 grey-matter mask at 2 mm (190,468 voxels, the Chebyshev
  solver), K = 3, noise sd 0.05, visits at 0, 2, 4 yr.

Reported per setting: nodes, simulation seconds, fit seconds (warm-up on simulated subjects,
least-squares pass and epochs), the seconds of each epoch (``history[i]["seconds"]``, validation
included), the peak GPU memory of the fit (``torch.cuda.max_memory_allocated``) and the process's
peak RSS. ``--quick``: 64 subjects, the 6 mm grid instead of 2 mm, 2 epochs (to check the script
on a CPU).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from pyrovae_pde.data import simulate
from pyrovae_pde.interfaces.api import SubtypeModel

COMPONENTS = ("fisher_kpp", "saturating", "zeldovich")
SETTINGS = {
    "paper-grid": dict(benchmark="paper-grid", subjects=1000, kwargs={}),
    "mni-2mm": dict(benchmark="mni-grid", subjects=256, kwargs={"resolution": 2.0}),
}


def run_setting(name: str, device: str, epochs: int, quick: bool, seed: int) -> dict:
    setting = SETTINGS[name]
    subjects = 64 if quick else setting["subjects"]
    kwargs = dict(setting["kwargs"])
    if setting["benchmark"] == "mni-grid":
        kwargs["device"] = device
        if quick:
            kwargs["resolution"] = 6.0
    start = time.perf_counter()
    ds = simulate(setting["benchmark"], subjects, seed=seed, components=COMPONENTS, weights=(0.5, 0.3, 0.2),
                  noise_sd=0.05, **kwargs)
    simulated = time.perf_counter() - start
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = SubtypeModel(COMPONENTS).fit(ds, epochs=epochs, min_epochs=epochs, seed=seed, device=device,
                                         progress=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    fitted = time.perf_counter() - start
    history = model.history_.history
    return {
        "setting": name, "device": device, "subjects": subjects, "nodes": int(model.domain_.n_nodes),
        "resolution_mm": kwargs.get("resolution"), "simulate_s": round(simulated, 2), "fit_s": round(fitted, 2),
        "epoch_s": [round(r["seconds"], 3) for r in history], "epochs": len(history),
        "gpu_peak_gb": (round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if device.startswith("cuda")
                        else None),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
        "converged": model.convergence_.get("converged") if model.convergence_ else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["paper-grid", "mni-2mm"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="64 subjects, 6 mm instead of 2 mm, 2 epochs")
    parser.add_argument("--json", help="write the rows here (one JSON object per line, appended)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available on this machine (use --device cpu --quick to check the script)")
    epochs = 2 if args.quick else args.epochs
    print("| setting | device | subjects | nodes | simulate (s) | fit (s) | s per epoch | GPU peak (GB) "
          "| RSS peak (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.settings:
        row = run_setting(name, args.device, epochs, args.quick, args.seed)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        print(f"| {name} | {row['device']} | {row['subjects']} | {row['nodes']:,} | {row['simulate_s']} | "
              f"{row['fit_s']} | {', '.join(f'{s:.2f}' for s in row['epoch_s'])} | {row['gpu_peak_gb']} | "
              f"{row['peak_rss_gb']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
