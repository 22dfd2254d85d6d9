"""Posterior summaries of a fitted mixture for any cohort on the same domain.

For subject i and component k, p(D, r | x_i, subtype = k) is approximated by the Laplace
approximation at its mode (``laplace.laplace_fit``, started from the amortized guide; the
default) or by the guide q_k(D, r | x_i) alone (``refine=False``). The subtype posterior is

    p(subtype = k | x_i) = w_k Z_ik / sum_j w_j Z_ij,   Z_ik = p(x_i | subtype = k)

with Z_ik the Laplace estimate, or the importance-sampling estimate with q_k as proposal, and the
globals (weights w and noise) at their posterior means.
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ..data.cohort import CohortTensors
from ..model.module import MixturePDE
from . import evidence
from .encoding import GuideSummary, encode_cohort, global_means  # noqa: F401 (re-exported)
from .laplace import laplace_fit

Z90 = 1.6448536269514722  # standard-normal quantile of 0.95


def subtype_log_probs(log_evidence: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log p(subtype = k | x_i) from per-component log evidences (N, K) and weights (K,)."""
    joint = log_evidence.double() + torch.log(weights.double())
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


def lognormal_summary(loc: np.ndarray, scale: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, sd and 90% central interval of LogNormal(loc, scale)."""
    mean = np.exp(loc + 0.5 * scale ** 2)
    return {"": mean, "_sd": mean * np.sqrt(np.expm1(scale ** 2)),
            "_q05": np.exp(loc - Z90 * scale), "_q95": np.exp(loc + Z90 * scale)}


def posterior_dataset(module: MixturePDE, data: CohortTensors, n_particles: int = 8, seed: int = 0,
                      refine: bool = True, n_iter: int = 3) -> xr.Dataset:
    """The posterior contract (see ``data_schemas/posterior-v1.schema.json``) for ``data``'s subjects.

    ``refine=True`` (default): each (subject, component) posterior is the Laplace approximation
    at the mode found by ``n_iter`` Levenberg-Marquardt iterations from the guide's means
    (``laplace.laplace_fit``, float32 coarse solves corrected by one solve with the model's own
    solver: ``two_level``), and Z_ik its Laplace evidence, both at the pooled
    least-squares noise sd of the cohort's modes (the SVI noise also absorbs the encoder's error);
    this removes the encoder's amortization error from the subtype decision and the D, r summaries.
    ``refine=False``: the amortized guide alone, Z_ik by importance sampling with ``n_particles``
    draws from it (``seed``); faster per subject, but as good only as the encoder.
    """
    weights, noise = (t.cpu() for t in global_means(module))  # the per-subject work may run on CUDA
    if refine:
        fit = laplace_fit(module, data, float(evidence.observation_sd(noise)), n_iter=n_iter,
                          hessian_noise_sd="least_squares", two_level=True)
        log_evidence = fit.log_evidence.cpu()
        summary = GuideSummary(fit.mean[..., 0], torch.sqrt(fit.cov[..., 0, 0]),
                               torch.where(fit.has_rate, fit.mean[..., 1], torch.nan),
                               torch.where(fit.has_rate, torch.sqrt(fit.cov[..., 1, 1]), torch.nan))
    else:
        stats = evidence.particle_stats(module, data, n_particles=n_particles, seed=seed, proposal="guide")
        log_evidence = evidence.component_log_evidence(stats, noise.double().reshape(1))[0]
        summary = encode_cohort(module, data)
    probs = subtype_log_probs(log_evidence, weights).exp()
    coords = {"subject": np.array(data.subjects, dtype=object), "subtype": np.array(module.components, dtype=object)}
    dims = ("subject", "subtype")
    variables: dict = {"subtype_prob": (dims, probs.cpu().numpy().astype(float)),
                       "log_evidence_component": (dims, log_evidence.cpu().numpy().astype(float))}
    for name, loc, scale in (("diffusivity", summary.d_loc, summary.d_scale),
                             ("reaction", summary.r_loc, summary.r_scale)):
        for suffix, values in lognormal_summary(loc.cpu().numpy().astype(float),
                                                scale.cpu().numpy().astype(float)).items():
            variables[name + suffix] = (dims, values)
    variables["weights"] = (("subtype",), weights.cpu().numpy().astype(float))
    variables["noise_scale"] = ((), float(noise))
    ds = xr.Dataset(variables, coords=coords, attrs={"schema_version": "1", "kind": "posterior",
                                                      "n_particles": 0 if refine else n_particles,
                                                      "seed": seed, "refined": int(refine)})
    ds["subtype_prob"].attrs["description"] = "posterior probability of each subtype (rows sum to 1)"
    ds["log_evidence_component"].attrs["description"] = (
        "log p(subject's data | subtype): Laplace estimate (refined) or importance-sampled (guide)")
    ds["diffusivity"].attrs["description"] = "posterior mean of D given the subtype"
    ds["reaction"].attrs["description"] = "posterior mean of r given the subtype (NaN: component has no rate)"
    ds["weights"].attrs["description"] = "posterior mean of the mixture weights"
    return ds
