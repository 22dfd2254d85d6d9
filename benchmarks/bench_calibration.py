"""The amortized posterior's calibration on simulations from the fitted model, at several sizes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_calibration.py --model bm_graph --scenario graph --seed 1

Loads a fit saved by ``bench_model.py --save-model`` (same ``--scenario`` and ``--seed``), redoes
``amortize.calibrate`` on ``--sizes`` new simulations per component (two calibration seeds each)
and scores ``amortize.simulated_check`` on ``--validation`` other simulations like the training
cohort: subtype accuracy, top probability, 90% coverage of log D and log r by the simulating
component's q. Separates a miscalibrated q (coverage off on the model's own simulations) from a
cohort whose truths are not drawn from the model's prior (coverage off on the data only).
"""
from __future__ import annotations

import argparse
import json

import torch
from bench_model import SCENARIOS

from pyrovae_pde.data import cohort_tensors, simulate
from pyrovae_pde.inference.amortize import calibrate, simulate_like, simulated_check
from pyrovae_pde.inference.encoding import global_means
from pyrovae_pde.interfaces.api import SubtypeModel
from pyrovae_pde.model.likelihood import observation_sd


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a directory written by bench_model.py --save-model")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--seed", type=int, default=0, help="bench_model's --seed (the training cohort)")
    parser.add_argument("--subjects", type=int, default=1000, help="bench_model's --subjects")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--validation", type=int, default=2048)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scenario = SCENARIOS[args.scenario]
    module = SubtypeModel.load(args.model).module_
    train = simulate(scenario["benchmark"], args.subjects, seed=args.seed + 100, noise_sd=scenario["noise_sd"],
                     components=scenario["components"])
    data = cohort_tensors(train, module.domain)
    noise_sd = float(observation_sd(global_means(module)[1]))
    validation = simulate_like(module, data, args.validation, noise_sd, torch.Generator().manual_seed(77))
    for size in args.sizes:
        for calibration_seed in (2, 3):
            calibrate(module, data, size, noise_sd, torch.Generator().manual_seed(calibration_seed))
            row = {"calibration_size": size, "calibration_seed": calibration_seed,
                   **{k: round(v, 3) for k, v in simulated_check(module, *validation).items()}}
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
