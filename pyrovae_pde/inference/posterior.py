"""Posterior summaries of a fitted mixture for any cohort on the same domain.

For subject i and component k, p(D, r | x_i, subtype = k) is approximated by the Laplace
approximation at its mode (``laplace.laplace_fit``, started from the amortized guide; the
default) or by the guide q_k(D, r | x_i) alone (``refine=False``). The subtype posterior is

    p(subtype = k | x_i) = w_k Z_ik / sum_j w_j Z_ij,   Z_ik = p(x_i | subtype = k)

with Z_ik the Laplace estimate, or the importance-sampling estimate with q_k as proposal, and the
globals (weights w and noise) at their posterior means.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch
import xarray as xr

from ..data.cohort import CohortTensors
from ..errors import InputError
from ..model.likelihood import observation_sd
from ..model.module import SHAPE_SCORES, MixturePDE
from . import distributed as ddp
from . import particles
from .amortize import TrustRule
from .encoding import GuideSummary, encode_amortized_cohort, encode_cohort, global_means  # noqa: F401
from .laplace import laplace_fit, pooled_residual_variance
from .marginal import component_log_evidence
from .population import under_mixture_population
from .prior_check import prior_conflict

Z90 = 1.6448536269514722  # standard-normal quantile of 0.95
# Refined posteriors on domains this small (region graphs, coarse atlases) are importance-sampled
# by default: 128 solves per subject and subtype cost seconds per 1000 subjects there, and the
# Laplace approximation alone under-covers skewed posteriors of D (benchmarks/RESULTS.md).
SMALL_DOMAIN_NODES = 256
SMALL_DOMAIN_PARTICLES = 128


def subtype_log_probs(log_evidence: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log p(subtype = k | x_i) from per-component log evidences (N, K) and weights (K,)."""
    joint = log_evidence.double() + torch.log(weights.double())
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


def lognormal_summary(loc: np.ndarray, scale: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, sd and 90% central interval of LogNormal(loc, scale)."""
    mean = np.exp(loc + 0.5 * scale ** 2)
    return {"": mean, "_sd": mean * np.sqrt(np.expm1(scale ** 2)),
            "_q05": np.exp(loc - Z90 * scale), "_q95": np.exp(loc + Z90 * scale)}


def weighted_summary(values: torch.Tensor, log_weights: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean, sd and 90% central interval of particles ``values`` (P, N, K) under the normalised
    ``log_weights`` (P, N, K), per (subject, component). The quantiles interpolate the weighted
    empirical distribution in log space, each particle at the midpoint of its weight (the plain
    step function puts the 5% and 95% points inside the interval when particles are few)."""
    w = torch.softmax(log_weights, dim=0)
    mean = (w * values).sum(0)
    sd = ((w * (values - mean) ** 2).sum(0)).clamp_min(0).sqrt()
    logs = torch.log(values)
    order = torch.argsort(logs, dim=0)
    sorted_logs, sorted_w = torch.gather(logs, 0, order), torch.gather(w, 0, order)
    mid = torch.cumsum(sorted_w, dim=0) - 0.5 * sorted_w  # (P, N, K) ascending
    last = values.shape[0] - 1

    def quantile(q: float) -> torch.Tensor:
        upper = (mid < q).sum(0, keepdim=True).clamp(1, last) if last else torch.zeros_like(mid[:1], dtype=torch.long)
        lower = (upper - 1).clamp_min(0)
        m0, m1 = torch.gather(mid, 0, lower), torch.gather(mid, 0, upper)
        v0, v1 = torch.gather(sorted_logs, 0, lower), torch.gather(sorted_logs, 0, upper)
        frac = ((q - m0) / (m1 - m0).clamp_min(1e-300)).clamp(0.0, 1.0)
        return torch.exp(v0 + frac * (v1 - v0))[0]

    return {key: t.cpu().numpy().astype(float) for key, t in
            (("", mean), ("_sd", sd), ("_q05", quantile(0.05)), ("_q95", quantile(0.95)))}


def shaped_lognormal_summary(module: MixturePDE, loc: np.ndarray, scale: np.ndarray,
                             coordinate: int) -> dict[str, np.ndarray]:
    """As ``lognormal_summary`` for the amortized q of ``coordinate`` (0: log D, 1: log r), whose
    log is loc + scale * ``module.shape``(eps) with eps standard normal: loc, scale (N, K).

    The shape is linear in eps between its scores (and beyond them), so the mean and sd are sums
    of closed-form Gaussian integrals, one per segment; the interval is the shape's values at
    -+1.645. All exact; for the identity shape they are the LogNormal's."""
    from scipy.special import log_ndtr

    k = loc.shape[-1]
    scores = SHAPE_SCORES.double()
    values = module.shape(scores[:, None].expand(-1, k), coordinate).numpy()  # (M, K)
    scores = scores.numpy()
    slope = np.diff(values, axis=0) / np.diff(scores)[:, None]  # (M - 1, K) inside; unit slope outside
    slope = np.concatenate([np.ones((1, k)), slope, np.ones((1, k))])
    left = np.concatenate([[-np.inf], scores])[:, None]  # (M + 1, 1) segment ends
    right = np.concatenate([scores, [np.inf]])[:, None]
    start = np.concatenate([values[:1], values])  # the deviate at each segment's left score (finite one)
    anchor = np.concatenate([scores[:1], scores])[:, None]
    intercept = start - slope * anchor  # deviate = intercept + slope * eps on each segment

    def moment(power: int) -> np.ndarray:
        """E[exp(power * theta)] (N, K), summed over segments (log-space Gaussian integrals)."""
        b = power * scale[None] * slope[:, None, :]  # (S, N, K)
        a = power * (loc[None] + scale[None] * intercept[:, None, :]) + 0.5 * b ** 2
        upper, lower = log_ndtr(right[:, None] - b), log_ndtr(left[:, None] - b)
        with np.errstate(divide="ignore"):
            mass = upper + np.log1p(-np.exp(np.minimum(lower - upper, 0.0)))
        return np.exp(a + mass).sum(0)

    mean, second = moment(1), moment(2)
    ends = module.shape(torch.tensor([[-Z90], [Z90]], dtype=torch.float64).expand(-1, k), coordinate).numpy()
    return {"": mean, "_sd": np.sqrt(np.clip(second - mean ** 2, 0.0, None)),
            "_q05": np.exp(loc + scale * ends[0]), "_q95": np.exp(loc + scale * ends[1])}


@dataclasses.dataclass
class RefinedFit:
    """The refined path's per-(subject, component) posteriors: the Laplace ``fit`` at the pooled
    least-squares noise, started from the encoder's ``guide``; with importance sampling, the
    particles ``stats`` and their log weights ``log_w`` (P, N, K); ``log_evidence`` (N, K) from
    whichever of the two was used."""

    fit: object
    guide: object
    log_evidence: torch.Tensor
    stats: object | None = None
    log_w: torch.Tensor | None = None


def refined_fit(module: MixturePDE, data: CohortTensors, noise: torch.Tensor, n_particles: int, seed: int = 0,
                n_iter: int = 3, share: ddp.Share | None = None) -> RefinedFit:
    """Laplace approximations of every (subject, component) posterior refined from the encoder's
    guess (``n_iter`` Levenberg-Marquardt steps, two-level solves) and, with ``n_particles`` > 0,
    importance sampling from them (covariance inflated 2x); see ``posterior_dataset``. ``share``
    (distributed): ``data`` is this rank's subjects (see ``laplace_fit`` and ``particle_stats``)."""
    guide = encode_cohort(module, data.to(data.signal.device, next(module.parameters()).dtype))
    fit = laplace_fit(module, data, float(particles.observation_sd(noise)), n_iter=n_iter,
                      hessian_noise_sd="least_squares", two_level=True, start=guide, share=share)
    fit = under_mixture_population(module, fit)
    if not n_particles:
        return RefinedFit(fit, guide, fit.log_evidence.cpu())
    proposal = dataclasses.replace(particles.guide_proposal(module, data, guide),
                                   mean=fit.mean.to(particles.DTYPE), cov=fit.cov.to(particles.DTYPE) * 2.0)
    stats = particles.particle_stats(module, data, n_particles=n_particles, seed=seed, proposal=proposal, share=share)
    # at the noise scale of the Laplace step: log_weights adds the model's noise floor itself
    variance = pooled_residual_variance(fit.sse, fit.n_obs, share)
    log_w = stats.log_weights(0.0 if variance is None else variance ** 0.5).cpu()  # (P, N, K)
    return RefinedFit(fit, guide, torch.logsumexp(log_w, dim=0) - np.log(n_particles), stats, log_w)


def _join_ranks(share: ddp.Share, subjects: list[str], variables: dict[str, np.ndarray], conflict: tuple | None):
    """On rank 0, every rank's ``subjects``, per-subject ``variables`` (n, ...) and prior-check
    inputs ``conflict`` (tensors (n, ...) or None) in cohort order; None on the other ranks."""
    parts = ddp.gather_objects((share.rows, subjects, variables, conflict))
    if parts is None:
        return None
    order = torch.cat([p[0] for p in parts]).argsort()
    every = [s for p in parts for s in p[1]]
    variables = {name: np.concatenate([p[2][name] for p in parts])[order.numpy()] for name in variables}
    if conflict is not None:
        conflict = tuple(torch.cat([p[3][j] for p in parts])[order] for j in range(len(conflict)))
    return [every[i] for i in order.tolist()], variables, conflict


def _summary_variables(probs: torch.Tensor, log_evidence: torch.Tensor, summary: GuideSummary,
                       summaries: dict | None) -> dict[str, np.ndarray]:
    variables: dict = {"subtype_prob": probs.cpu().numpy().astype(float),  # (subject, subtype) arrays
                       "log_evidence_component": log_evidence.cpu().numpy().astype(float)}
    for name, loc, scale in (("diffusivity", summary.d_loc, summary.d_scale),
                             ("reaction", summary.r_loc, summary.r_scale)):
        values = summaries[name] if summaries else lognormal_summary(loc.cpu().numpy().astype(float),
                                                                     scale.cpu().numpy().astype(float))
        for suffix, value in values.items():
            variables[name + suffix] = value
    return variables


def _refined_variables(module: MixturePDE, data: CohortTensors, noise: torch.Tensor, weights: torch.Tensor,
                       n_particles: int, seed: int, n_iter: int, share: ddp.Share | None):
    """The refined path's per-subject variables and prior-check inputs (modes, log evidence, n_obs)."""
    refined = refined_fit(module, data, noise, n_particles, seed=seed, n_iter=n_iter, share=share)
    fit, log_evidence = refined.fit, refined.log_evidence
    summary = GuideSummary(fit.mean[..., 0], torch.sqrt(fit.cov[..., 0, 0]),
                           torch.where(fit.has_rate, fit.mean[..., 1], torch.nan),
                           torch.where(fit.has_rate, torch.sqrt(fit.cov[..., 1, 1]), torch.nan))
    summaries = None
    if refined.stats is not None:
        summaries = {"diffusivity": weighted_summary(refined.stats.diffusivity, refined.log_w),
                     "reaction": weighted_summary(refined.stats.reaction, refined.log_w)}
    probs = subtype_log_probs(log_evidence, weights).exp()
    return (_summary_variables(probs, log_evidence, summary, summaries),
            (fit.mean.double().cpu(), log_evidence.double().cpu(), fit.n_obs.double().cpu()))


def _guide_variables(module: MixturePDE, data: CohortTensors, noise: torch.Tensor, weights: torch.Tensor,
                     n_particles: int, seed: int, share: ddp.Share | None):
    """The guide alone of a model without a subtype head: Z_ik importance-sampled from q."""
    guide = encode_cohort(module, data.to(data.signal.device, next(module.parameters()).dtype))
    stats = particles.particle_stats(module, data, n_particles=n_particles, seed=seed,
                                     proposal=particles.guide_proposal(module, data, guide), share=share)
    log_evidence = component_log_evidence(stats, noise.double().reshape(1))[0]
    probs = subtype_log_probs(log_evidence, weights).exp()
    return _summary_variables(probs, log_evidence, guide, None), None


def _amortized_variables(module: MixturePDE, log_probs: torch.Tensor, guide: GuideSummary) -> dict[str, np.ndarray]:
    """The amortized guide alone: the subtype head's probabilities, q's summaries (its shape included)."""
    summaries = {name: shaped_lognormal_summary(module, loc.cpu().numpy().astype(float),
                                                scale.cpu().numpy().astype(float), coordinate)
                 for name, loc, scale, coordinate in (("diffusivity", guide.d_loc, guide.d_scale, 0),
                                                      ("reaction", guide.r_loc, guide.r_scale, 1))}
    return _summary_variables(log_probs.exp(), torch.full_like(log_probs, torch.nan), guide, summaries)


def posterior_dataset(module: MixturePDE, data: CohortTensors, n_particles: int | None = None, seed: int = 0,
                      refine: bool | str = True, n_iter: int = 3, share: ddp.Share | None = None,
                      trust: "TrustRule | None" = None) -> xr.Dataset | None:
    """The posterior contract (see ``data_schemas/posterior-v1.schema.json``) for ``data``'s subjects.

    ``refine=True``: each (subject, component) posterior is the Laplace approximation
    at the mode found by ``n_iter`` Levenberg-Marquardt iterations from the guide's means
    (``laplace.laplace_fit``, float32 coarse solves corrected by one solve with the model's own
    solver: ``two_level``), and Z_ik its Laplace evidence, both at the pooled
    least-squares noise sd of the cohort's modes (the SVI noise also absorbs the encoder's error);
    this removes the encoder's amortization error from the subtype decision and the D, r summaries.
    With ``n_particles`` > 0 (refined), the Laplace approximations become importance-sampling
    proposals (covariance inflated 2x, mixed with the guide): Z_ik and the D, r summaries are
    then estimated from ``n_particles`` weighted draws solved with the model's solver, which
    corrects a skewed or flat posterior (for instance D on a small graph, where large D
    equilibrates the field) at the cost of ``n_particles`` solves per subject and component.
    By default (``n_particles=None``) that is done on domains of at most ``SMALL_DOMAIN_NODES``
    nodes, with ``SMALL_DOMAIN_PARTICLES`` draws; larger domains get the Laplace approximation alone.

    ``refine=False``: the amortized guide alone. For a model trained by ``inference.amortize``
    (``module.amortized``): one encoder pass, the subtype head's p(subtype | x) and q's LogNormal
    summaries, no solve (``log_evidence_component`` is then NaN). Older models: Z_ik by importance
    sampling with ``n_particles`` draws from the guide (default 8, ``seed``).

    ``refine="auto"``: for an amortized model, the guide alone for the subjects that pass
    ``trust`` (a ``TrustRule``; default ``TrustRule()``) and the refined posterior (as with True)
    for the others; the variable ``refined`` says which. Models that are not amortized, and
    distributed predicts, refine every subject.

    ``share`` (distributed predict): ``data`` is this rank's subjects, ``share.rows`` of the cohort;
    each rank does theirs (with one process's batches, random numbers and pooled noise) and rank 0
    returns the whole cohort's posterior, the other ranks None.
    """
    if refine not in (True, False, "auto"):
        raise InputError(f"refine must be True, False or 'auto', got {refine!r}")
    amortized = bool(module.amortized)
    if refine == "auto" and (not amortized or share is not None):
        refine = True
    if n_particles is None:
        small = module.domain.n_nodes <= SMALL_DOMAIN_NODES
        n_particles = (SMALL_DOMAIN_PARTICLES if small else 0) if refine else 8
    if n_particles < (0 if refine else 1):
        raise InputError(f"n_particles must be >= {0 if refine else 1}, got {n_particles}")
    weights, noise = (t.cpu() for t in global_means(module))  # the per-subject work may run on CUDA
    n = data.n_subjects
    flags = None
    if refine is True:
        refined_rows = torch.arange(n)
        variables, conflict = _refined_variables(module, data, noise, weights, n_particles, seed, n_iter, share)
    elif refine is False and not amortized:
        variables, conflict = _guide_variables(module, data, noise, weights, n_particles, seed, share)
        refined_rows = torch.zeros(0, dtype=torch.long)
    else:
        log_probs, guide = encode_amortized_cohort(module, data.to(data.signal.device,
                                                                   next(module.parameters()).dtype))
        variables = _amortized_variables(module, log_probs, guide)
        conflict = (torch.stack([guide.d_loc, torch.nan_to_num(guide.r_loc)], -1).double().cpu(),
                    (log_probs - torch.log(weights.double())).cpu(), data.observed[:, 1:].double().sum(1).cpu())
        refined_rows = torch.zeros(0, dtype=torch.long)
        if refine == "auto":
            flags = (trust or TrustRule()).flags(module, data, log_probs, guide, float(observation_sd(noise)))
            refined_rows = torch.nonzero(flags.refine).flatten()
            if len(refined_rows):
                part, part_conflict = _refined_variables(module, data.subset(refined_rows), noise, weights,
                                                         n_particles, seed, n_iter, None)
                rows = refined_rows.numpy()
                for name, value in part.items():
                    variables[name][rows] = value
                for whole, piece in zip(conflict, part_conflict):
                    whole[refined_rows] = piece.to(whole)
    was_refined = np.zeros(n, dtype=np.int8)
    was_refined[refined_rows.numpy()] = 1
    variables["refined"] = was_refined
    subjects = list(data.subjects)
    if share is not None:  # rank 0 joins every rank's subjects, in cohort order
        if (joined := _join_ranks(share, subjects, variables, conflict)) is None:
            return None
        subjects, variables, conflict = joined
    coords = {"subject": np.array(subjects, dtype=object), "subtype": np.array(module.components, dtype=object)}
    dims = ("subject", "subtype")
    variables = {name: (dims if value.ndim == 2 else ("subject",), value) for name, value in variables.items()}
    variables["weights"] = (("subtype",), weights.cpu().numpy().astype(float))
    variables["noise_scale"] = ((), float(noise))
    attrs = {"schema_version": "1", "kind": "posterior", "n_particles": n_particles, "seed": seed,
             "refined": int(refine is True), "refine_mode": str(refine),
             "n_refined": int(variables["refined"][1].sum()), "amortized": int(amortized)}
    if flags is not None:
        attrs["trust_rule"] = json.dumps(flags.rule)
        attrs["refine_reasons"] = json.dumps(flags.reasons)
    if conflict is not None:  # prior-data conflict on this cohort (see prior_check): modes, log evidence, n_obs
        checks = prior_conflict(module.priors, conflict[0], conflict[1], weights, module.rate_mask(), conflict[2])
        attrs["prior_conflict"] = json.dumps([c.as_dict() for c in checks])
    ds = xr.Dataset(variables, coords=coords, attrs=attrs)
    ds["subtype_prob"].attrs["description"] = "posterior probability of each subtype (rows sum to 1)"
    ds["log_evidence_component"].attrs["description"] = (
        "log p(subject's data | subtype): Laplace estimate (refined), or importance-sampled from the "
        "Laplace approximation (refined, n_particles > 0) or from the guide (not refined, older models); "
        "NaN where the amortized subtype head gave the probabilities")
    ds["refined"].attrs["description"] = "1: refined from the encoder's guess; 0: the amortized guide alone"
    ds["diffusivity"].attrs["description"] = "posterior mean of D given the subtype"
    ds["reaction"].attrs["description"] = "posterior mean of r given the subtype (NaN: component has no rate)"
    ds["weights"].attrs["description"] = "posterior mean of the mixture weights"
    return ds
