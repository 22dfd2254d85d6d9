"""A short fit, for timing one checkout against another with ``farm-bench`` (whole process).

    farm-bench -n 3 --timeout 900 \
        --vs "env PYTHONPATH=/path/to/old/worktree .venv/bin/python benchmarks/bench_fit_cost.py grid" \
        -- env PYTHONPATH=. .venv/bin/python benchmarks/bench_fit_cost.py grid

``grid``: 64 paper-grid subjects (noise sd 0.05), the paper's three mechanisms, 2 epochs.
``graph``: 100 graph subjects (noise sd 0.02), diffusion + Fisher-KPP with matched priors, 4 epochs.
One thread, no plateau stop, no amortization stage: the cost is the SVI fit's solves.
"""
from __future__ import annotations

import sys

import torch

from pyrovae_pde.data import simulate
from pyrovae_pde.interfaces.api import SubtypeModel

SETTINGS = {
    "grid": (("paper-grid", 64, 0.05), ("fisher_kpp", "saturating", "zeldovich"), None, 2),
    "graph": (("graph", 100, 0.02), ("diffusion", "fisher_kpp"),
              {"diffusivity": (0.05, 1.0), "reaction": (0.1, 1.0)}, 4),
}


def main(which: str) -> None:
    torch.set_num_threads(1)
    (benchmark, n_subjects, noise), components, priors, epochs = SETTINGS[which]
    cohort = simulate(benchmark, n_subjects, seed=11, noise_sd=noise)
    SubtypeModel(components, priors=priors).fit(cohort, epochs=epochs, seed=0, warmup_sleep_steps=100,
                                                progress=False, amortize_steps=0, min_epochs=epochs)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "grid")
