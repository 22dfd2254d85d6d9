"""The training objective: the TraceEnum_ELBO (subtype enumerated) under the semi-amortized guide,
whose per-subject factors are Laplace approximations refined from cached modes (``refine``), and
its evaluation with common random numbers (``evaluate_elbo``)."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pyro
import torch
from pyro.infer import TraceEnum_ELBO

from ..data.cohort import CohortTensors
from ..model.likelihood import observation_sd
from ..model.module import MAX_PLATE_NESTING, MixturePDE, RefinedPosterior
from . import distributed as ddp
from .encoding import GuideSummary, encode_cohort
from .laplace import LaplaceFit, laplace_fit
from .population import under_mixture_population


def trace_elbo() -> TraceEnum_ELBO:
    """The ELBO of training and evaluation: the subtype enumerated exactly."""
    return TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)


def noise_sd(module: MixturePDE) -> float:
    """The model's observation sd at the guide's median noise scale (noise floor included)."""
    return float(observation_sd(torch.exp(module.noise_loc.detach())))


def modes_as_start(modes: torch.Tensor) -> GuideSummary:
    """Modes (N, K, 2) as the start of a Levenberg-Marquardt search."""
    return GuideSummary(modes[..., 0], torch.ones_like(modes[..., 0]), modes[..., 1], torch.ones_like(modes[..., 1]))


def refine(module: MixturePDE, data: CohortTensors, start: torch.Tensor | None = None,
           n_iter: int = 2) -> tuple[RefinedPosterior, LaplaceFit]:
    """The semi-amortized guide of ``data``'s subjects: the Laplace approximation at each
    (subject, component) mode, found by ``n_iter`` Levenberg-Marquardt iterations from ``start``
    (N, K, 2) (default: the encoder's guess) at the module's current noise and population prior.
    Returns the refined posterior (in the data's dtype) and the Laplace fit. Rows whose search
    produced non-finite values fall back to the encoder's guide."""
    summary = modes_as_start(start) if start is not None else None
    fit = laplace_fit(module, data, noise_sd(module), n_iter=n_iter, two_level=True, start=summary)
    # under a mixture population the guide is the mixture posterior's mean and covariance (the fit,
    # for the EM, stays the Laplace approximation under the population's Gaussian)
    guide_fit = under_mixture_population(module, fit)
    loc, cov = guide_fit.mean.to(data.signal.dtype), guide_fit.cov.to(data.signal.dtype)
    bad = ~(torch.isfinite(loc).all(-1) & torch.isfinite(cov).flatten(-2).all(-1) & (cov[..., 0, 0] > 0)
            & (cov[..., 0, 0] * cov[..., 1, 1] - cov[..., 0, 1] ** 2 > 0))
    if bad.any():
        with torch.no_grad():
            guide = encode_cohort(module, data)
        enc_loc = torch.stack([guide.d_loc, torch.nan_to_num(guide.r_loc)], -1)
        enc_var = torch.stack([guide.d_scale, torch.nan_to_num(guide.r_scale, nan=1.0)], -1) ** 2
        loc = torch.where(bad[..., None], enc_loc, loc)
        cov = torch.where(bad[..., None, None], torch.diag_embed(enc_var), cov)
    return RefinedPosterior(loc, cov), fit


def evaluate_elbo(module: MixturePDE, data: CohortTensors, refined: RefinedPosterior | None = None,
                  n_draws: int = 4, seed: int = 0, batch_size: int = 256,
                  share: ddp.Share | None = None) -> tuple[float, float]:
    """ELBO per subject of ``data`` (mean and MC standard error over ``n_draws`` guide draws).

    ``refined``: the semi-amortized guide's local factors (default: the encoder's guide). The
    draws use their own seeded RNG (common random numbers), so two calls on the same data
    differ only by the parameters. ``share`` (distributed): ``data`` and ``refined`` hold this
    rank's subjects only, at ``share.rows`` of a set of ``share.n_total``; each rank evaluates its
    own with the random numbers of the whole set's batches (``distributed.SharedDraws``) and the
    sums are added over the ranks: one process's value up to the order of the sums.
    """
    elbo = trace_elbo()
    n = data.n_subjects if share is None else share.n_total
    device = data.signal.device
    values = []
    with torch.no_grad(), torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        pyro.set_rng_seed(seed)
        for _ in range(n_draws):
            total = 0.0
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                draws = contextlib.nullcontext()
                if share is None:
                    idx = local = torch.arange(start, stop, device=device)
                else:  # this rank's subjects of the batch, with the batch's draws
                    mine = share.within(start, stop)
                    local = torch.arange(mine.start, mine.stop, device=device)
                    idx = share.rows[mine].to(device)
                    if not len(idx):
                        ddp.skip_draws(module, stop - start, data.signal.dtype)
                        continue
                    draws = ddp.SharedDraws(idx - start, stop - start)
                part = None if refined is None else RefinedPosterior(refined.loc[local], refined.cov[local])
                try:
                    with draws:
                        total += elbo.loss(module.model, module.guide, data.signal[local], data.times[local],
                                           data.observed[local], idx, n, refined=part) * len(idx) / n
                except ValueError:  # a distribution validated non-finite parameters
                    total = math.nan
            values.append(-total / n)
    if share is not None:
        values = ddp.sum_over_ranks(torch.tensor(values, dtype=torch.float64)).tolist()
    values = np.asarray(values)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), se


def evaluate_loss(module: MixturePDE, data: CohortTensors, batch_size: int = 256) -> float:
    """Negative ELBO per subject under the encoder's guide (one draw), no parameter update."""
    return -evaluate_elbo(module, data, None, n_draws=1, seed=int(torch.randint(2 ** 31, ())),
                          batch_size=batch_size)[0]


def finite_grads(params) -> bool:
    """Whether every gradient of ``params`` is finite (parameters without one count as finite)."""
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
