"""How much does the population prior's family cost? (issue: training)

For a fitted run and a cohort of new subjects simulated with D ~ U(d_lo, d_hi) and r ~ U(r_lo, r_hi)
(the paper-grid simulator: uniform on a linear scale), predict's importance particles (Laplace
proposals, 128 solves per subject and mechanism) are re-weighted to other population priors at no
extra solve: the run's own, a Gaussian whose central 95% is the simulator's box, and the simulator's
own distribution (the oracle). Prints the subtype accuracy and mean top probability under each,
the fitted weights held fixed.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_population_family.py RUN_DIR test.nc \\
        --box diffusivity=0.01,1 --box reaction=0.01,0.1
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from pyrovae_pde.data import load_dataset
from pyrovae_pde.inference.posterior import SMALL_DOMAIN_PARTICLES, global_means, refined_fit
from pyrovae_pde.interfaces.api import SubtypeModel
from pyrovae_pde.model.likelihood import normal_log_density


def _box(text: str) -> tuple[str, float, float]:
    name, _, bounds = text.partition("=")
    lo, hi = (float(v) for v in bounds.split(","))
    return name, lo, hi


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("cohort", help="new subjects with true_subtype (simulated)")
    parser.add_argument("--box", type=_box, action="append", required=True,
                        help="NAME=LO,HI: the simulator's uniform range of diffusivity and of reaction")
    parser.add_argument("--particles", type=int, default=SMALL_DOMAIN_PARTICLES)
    args = parser.parse_args(argv)
    boxes = {name: (lo, hi) for name, lo, hi in args.box}
    model = SubtypeModel.load(args.run_dir)
    module = model.module_
    ds = load_dataset(args.cohort)
    truth = np.asarray(ds["true_subtype"].values).astype(str)
    data = model.tensors(ds, args.cohort)
    weights, noise = global_means(module)
    refined = refined_fit(module, data, noise, args.particles, seed=0)
    log_w, stats = refined.log_w.double(), refined.stats
    a, b = (t.double() for t in stats.theta)  # (P, N, K) log D, log r
    has_rate = stats.has_rate
    reference = stats.log_prior_ref.double()  # the run's population density at the particles

    def uniform(x, lo, hi):  # log density of log X for X ~ U(lo, hi)
        inside = (x >= math.log(lo)) & (x <= math.log(hi))
        return torch.where(inside, x - math.log(hi - lo), torch.full_like(x, -1e30))

    def box_gaussian(x, lo, hi):
        loc = (math.log(lo) + math.log(hi)) / 2
        scale = torch.tensor((math.log(hi) - math.log(lo)) / 3.919927969080108, dtype=x.dtype)
        return normal_log_density(x, loc, scale)

    def family(density):
        rate = density(b, *boxes["reaction"])
        return density(a, *boxes["diffusivity"]) + torch.where(has_rate, rate, torch.zeros_like(rate))

    priors = {"the run's population": reference, "Gaussian on the box's central 95%": family(box_gaussian),
              "the simulator's uniform (oracle)": family(uniform)}
    components = np.array(module.components)
    print(f"{args.run_dir}: {data.n_subjects} new subjects, {module.population_terms} population term(s)")
    for label, log_prior in priors.items():
        log_z = torch.logsumexp(log_w - reference + log_prior, dim=0) - math.log(log_w.shape[0])
        post = torch.softmax(torch.log(weights.double()) + log_z, dim=1)
        accuracy = float((components[post.argmax(1).numpy()] == truth).mean())
        print(f"  {label:36s} accuracy {accuracy:.3f}  mean top prob {float(post.max(1).values.mean()):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
