"""The fitted guide's per-subject and global summaries, shared by posterior, evidence and Laplace code."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.cohort import CohortTensors
from ..model.module import MixturePDE


@dataclass
class GuideSummary:
    """LogNormal guide parameters in log space: (N, K) each; reaction columns of rate-free components are NaN."""

    d_loc: torch.Tensor
    d_scale: torch.Tensor
    r_loc: torch.Tensor
    r_scale: torch.Tensor


def _summary(module: MixturePDE, d_loc, d_scale, r_loc_rate, r_scale_rate) -> GuideSummary:
    """A ``GuideSummary`` from the encoder's outputs: log r columns (N, K_r) spread to (N, K), NaN elsewhere."""
    r_loc = d_loc.new_full(d_loc.shape, math.nan)
    r_scale = d_loc.new_full(d_loc.shape, math.nan)
    r_loc[:, module.rate_index] = r_loc_rate
    r_scale[:, module.rate_index] = r_scale_rate
    return GuideSummary(d_loc, d_scale, r_loc, r_scale)


def encode_cohort(module: MixturePDE, data: CohortTensors, batch_size: int = 512) -> GuideSummary:
    """Run the encoder over a cohort in batches (no gradients)."""
    parts = []
    with torch.no_grad():
        for start in range(0, data.n_subjects, batch_size):
            sl = slice(start, start + batch_size)
            parts.append(module.encode(data.signal[sl], data.times[sl], data.observed[sl]))
    return _summary(module, *(torch.cat(p) for p in zip(*parts)))


def global_means(module: MixturePDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means of the mixture weights (K,) and of the noise scale ()."""
    with torch.no_grad():
        conc = module.weights_concentration()
        weights = conc / conc.sum()
        noise_sd = torch.nn.functional.softplus(module.noise_scale_raw) + 1e-4
        noise = torch.exp(module.noise_loc + 0.5 * noise_sd ** 2)
    return weights, noise


def encode_amortized_cohort(module: MixturePDE, data: CohortTensors,
                            batch_size: int = 512) -> tuple[torch.Tensor, GuideSummary]:
    """The amortized posterior of a cohort in one encoder pass (no gradients): log p(subtype | x)
    (N, K) under the weights' posterior mean, and the guide's LogNormal parameters (``GuideSummary``)."""
    logits, parts = [], []
    with torch.no_grad():
        for start in range(0, data.n_subjects, batch_size):
            sl = slice(start, start + batch_size)
            out = module.encode_amortized(data.signal[sl], data.times[sl], data.observed[sl])
            logits.append(out[0])
            parts.append(out[1:])
        weights, _ = global_means(module)
        joint = torch.cat(logits).double() + torch.log(weights.double()).to(logits[0].device)
    return torch.log_softmax(joint, dim=-1), _summary(module, *(torch.cat(p) for p in zip(*parts)))
