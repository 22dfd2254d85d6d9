"""Prior-data conflict: do the subjects' posteriors sit where the priors said they would?

For every subject, the posterior median of D and r under its most probable subtype (the Laplace
mode in log space, which is the median of its LogNormal approximation) is compared with the base
prior's central 95% interval (the user's ``--prior`` or the cohort default). Under a prior that
agrees with the data about 5% of well-identified subjects fall outside it; far more means the
prior is in the wrong place or too narrow, and then it, not the data, drives the subtype
probabilities and the model evidence. ``prior_conflict`` reports the share outside per parameter
and suggests an interval that covers the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..model.priors import LogNormalPrior, Priors

CONFLICT_SHARE = 0.15  # share of subjects outside the central 95% interval that counts as a conflict
MIN_SUBJECTS = 10


@dataclass
class PriorCheck:
    """Per parameter: the share of subjects whose posterior median lies outside the prior's
    central 95% interval, the interval, and a suggested interval (the 2.5-97.5% range of the
    medians, widened by a factor 2 at each end)."""

    parameter: str
    share_outside: float
    n_subjects: int
    prior: tuple[float, float]
    suggested: tuple[float, float]

    @property
    def conflict(self) -> bool:
        return self.n_subjects >= MIN_SUBJECTS and self.share_outside > CONFLICT_SHARE

    def message(self) -> str:
        lo, hi = self.prior
        slo, shi = self.suggested
        return (f"the {self.parameter} prior [{lo:.3g}, {hi:.3g}] (central 95%) conflicts with the data: "
                f"{100 * self.share_outside:.0f}% of subjects' posterior medians lie outside it "
                "(about 5% expected), so "
                f"the prior, not the data, shapes the results; refit with --prior {self.parameter}=LO,HI covering the "
                f"data, e.g. --prior {self.parameter}={slo:.3g},{shi:.3g}")

    def as_dict(self) -> dict:
        return {"parameter": self.parameter, "share_outside": self.share_outside, "n_subjects": self.n_subjects,
                "prior": list(self.prior), "suggested": list(self.suggested), "conflict": self.conflict}


def prior_conflict(priors: Priors, modes: torch.Tensor, log_evidence: torch.Tensor, weights: torch.Tensor,
                   has_rate: torch.Tensor, n_obs: torch.Tensor | None = None) -> list[PriorCheck]:
    """Checks of the diffusivity and (if any component has one) reaction priors.

    modes (N, K, 2): posterior modes of (log D, log r) per subject and component; log_evidence
    (N, K) and weights (K,) give each subject's most probable subtype; subjects without later
    observed visits (``n_obs`` == 0) carry no information and are left out.
    """
    modes, log_evidence = modes.detach().double().cpu(), log_evidence.detach().double().cpu()
    best = (log_evidence + torch.log(weights.double().cpu())).argmax(dim=1)  # (N,)
    keep = torch.ones(modes.shape[0], dtype=torch.bool) if n_obs is None else n_obs.cpu() > 0
    rows = torch.arange(modes.shape[0])
    checks = []
    for c, (name, prior) in enumerate((("diffusivity", priors.diffusivity), ("reaction", priors.reaction))):
        usable = keep & (has_rate.cpu()[best] if c == 1 else torch.ones_like(keep))
        values = modes[rows, best, c][usable].numpy()
        if values.size == 0:
            continue
        checks.append(_check(name, prior, values))
    return checks


def _check(name: str, prior: LogNormalPrior, log_values: np.ndarray) -> PriorCheck:
    lo, hi = math.log(prior.low), math.log(prior.high)
    outside = float(((log_values < lo) | (log_values > hi)).mean())
    q_lo, q_hi = np.quantile(log_values, [0.025, 0.975])
    suggested = (math.exp(q_lo) / 2, math.exp(q_hi) * 2)
    return PriorCheck(name, outside, int(log_values.size), (prior.low, prior.high), suggested)
