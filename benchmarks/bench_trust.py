"""When can the amortized encoder be trusted? (issue: amortized guide)

Scores, on a saved paper-grid model (``bench_model.py --save-model DIR``), cohorts simulated inside
and outside the fitted model: the encoder alone (``refine=False``) against every subject refined
(``refine=True``), and which subjects each trust diagnostic flags:

* the Newton check of ``TrustRule`` (``amortize.check_amortized``: three solves per subject, the
  package's default; its gain, sd ratio and residual chi-square), at probability threshold 0 so
  that only the check decides; and what the default predict (``refine="auto"``) then gives;
* a solve-free alternative tried and not adopted: the Mahalanobis distance of the encoder's
  features in their top principal components, plus the residual outside them, against the 0.995
  quantiles of the same on simulations from the model (``--components`` principal components).

Off-model cohorts (1000 subjects each, the model's three mechanisms): noise sd 0.15 (the fit's is
0.05), reaction rates in [0.2, 0.5] (the simulator's range is [0.01, 0.1]), D in [1, 5] ([0.01, 1]),
visits at 0, 12, 48 (0, 6, 24).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_model.py --scenario paper-noisy --subjects 1000 \\
        --test-subjects 1000 --epochs 12 --seed 1 --save-model pn1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_trust.py --model pn1 [--recalibrate]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pyrovae_pde.data import cohort_tensors, simulate
from pyrovae_pde.data.simulate import simulate_paper_grid
from pyrovae_pde.inference.amortize import TrustRule, simulate_like
from pyrovae_pde.inference.encoding import encode_amortized_cohort, global_means
from pyrovae_pde.inference.evaluation import recovery_metrics
from pyrovae_pde.interfaces.api import SubtypeModel
from pyrovae_pde.model.likelihood import observation_sd

COMPONENTS = ("fisher_kpp", "saturating", "zeldovich")
KEYS = ("accuracy", "mean_top_prob", "coverage90_diffusivity", "coverage90_reaction")


def cohorts(noise: float, seed: int) -> dict:
    kw = dict(components=COMPONENTS, noise_sd=noise)
    return {"in model (new subjects)": simulate("paper-grid", 1000, seed=seed + 200, **kw),
            "noise sd 0.15": simulate("paper-grid", 1000, seed=seed + 301, components=COMPONENTS, noise_sd=0.15),
            "rates in [0.2, 0.5]": simulate_paper_grid(1000, seed=seed + 302, reaction_range=(0.2, 0.5), **kw),
            "D in [1, 5]": simulate_paper_grid(1000, seed=seed + 304, diffusivity_range=(1.0, 5.0), **kw),
            "visits 0, 12, 48": simulate_paper_grid(1000, seed=seed + 303, times=(0.0, 12.0, 48.0), **kw)}


class FeatureTypicality:
    """Principal-component Mahalanobis distance and residual of encoder features, with flags at
    the ``level`` quantiles of both on the reference features (n, F)."""

    def __init__(self, reference: torch.Tensor, components: int, level: float = 0.995):
        self.mean = reference.mean(0)
        _, s, vt = torch.linalg.svd(reference - self.mean, full_matrices=False)
        self.basis, self.sd = vt[:components].T, s[:components] / (len(reference) - 1) ** 0.5
        distance, residual = self.scores(reference)
        self.limits = torch.quantile(distance, level), torch.quantile(residual, level)

    def scores(self, features: torch.Tensor):
        centred = features - self.mean
        projected = centred @ self.basis
        return ((projected / self.sd) ** 2).sum(-1), (centred - projected @ self.basis.T).pow(2).sum(-1)

    def flags(self, features: torch.Tensor) -> torch.Tensor:
        distance, residual = self.scores(features)
        return (distance > self.limits[0]) | (residual > self.limits[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved paper-grid model (bench_model.py --save-model)")
    parser.add_argument("--noise", type=float, default=0.05, help="the model's data noise (for its cohorts)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--components", type=int, default=16, help="principal components of the features")
    parser.add_argument("--recalibrate", action="store_true", help="redo the amortized posterior's recalibration "
                        "with this code first (as bench_model.py --recalibrate)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model = SubtypeModel.load(args.model)
    module = model.module_
    if args.recalibrate:
        from bench_model import recalibrate

        recalibrate(model, simulate("paper-grid", 1000, seed=args.seed + 100, noise_sd=args.noise,
                                    components=COMPONENTS), args.seed)
    training = cohort_tensors(simulate("paper-grid", 1000, seed=args.seed + 100, noise_sd=args.noise,
                                       components=COMPONENTS), module.domain)
    noise_sd = float(observation_sd(global_means(module)[1]))

    def features(signal, times, observed):
        with torch.no_grad():
            return module.encoder.features(signal, times, observed).double()

    reference = simulate_like(module, training, 1024, noise_sd, torch.Generator().manual_seed(9))
    typicality = FeatureTypicality(features(*module.flatten_simulated(*reference[:3])), args.components)
    fresh = simulate_like(module, training, 1024, noise_sd, torch.Generator().manual_seed(10))
    false_alarm = float(typicality.flags(features(*module.flatten_simulated(*fresh[:3]))).double().mean())
    rows = []
    for name, ds in cohorts(args.noise, args.seed).items():
        data = cohort_tensors(ds, module.domain)
        log_probs, guide = encode_amortized_cohort(module, data)
        start = time.perf_counter()
        check = TrustRule(min_top_probability=0.0).flags(module, data, log_probs, guide, noise_sd)
        check_seconds = time.perf_counter() - start
        typical = typicality.flags(features(data.signal, data.times, data.observed))
        alone = recovery_metrics(model.posterior(ds, refine=False), ds)
        refined = recovery_metrics(model.posterior(ds, refine=True), ds)
        start = time.perf_counter()
        default = model.posterior(ds)  # refine="auto" with the default TrustRule
        default_seconds = time.perf_counter() - start
        row = {"cohort": name, "newton_flagged": int(check.refine.sum()),
               "newton_median_gain": round(float(check.check.gain.median()), 2),
               "newton_seconds": round(check_seconds, 2), "typicality_flagged": int(typical.sum()),
               "flagged_by_both": int((typical & check.refine).sum()),
               "newton_flagged_by_fit_p": int((check.check.fit_p < TrustRule().min_fit_p).sum()),
               "default_refined": int(default.attrs["n_refined"]), "default_seconds": round(default_seconds, 2),
               "default": {k: round(v, 3) for k, v in recovery_metrics(default, ds).items() if k in KEYS},
               "encoder_alone": {k: round(alone[k], 3) for k in KEYS},
               "refined": {k: round(refined[k], 3) for k in KEYS}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": args.model, "typicality_components": args.components,
              "typicality_false_alarm_on_model_simulations": round(false_alarm, 4), "cohorts": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
