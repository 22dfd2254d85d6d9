"""Posterior summaries of a fitted mixture for any cohort on the same domain.

For subject i and component k the guide gives q_k(D, r | x_i), a LogNormal approximation of the
component-conditional posterior p(D, r | x_i, subtype = k). The subtype posterior is

    p(subtype = k | x_i) = w_k Z_ik / sum_j w_j Z_ij,   Z_ik = p(x_i | subtype = k)

with Z_ik estimated by importance sampling with q_k as proposal (the globals, weights w and noise,
at their posterior means). The same per-subject evidences give the pointwise marginal
likelihood log p(x_i) = logsumexp_k(log w_k + log Z_ik) used for LOO.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro.distributions as dist
import torch
import xarray as xr

from ..data.cohort import CohortTensors
from ..model.module import MixturePDE

Z90 = 1.6448536269514722  # standard-normal quantile of 0.95
LAPLACE_INFLATE = 2.0  # evidence.laplace_proposal's default covariance inflation


@dataclass
class GuideSummary:
    """LogNormal guide parameters in log space: (N, K) each; reaction columns of rate-free components are NaN."""

    d_loc: torch.Tensor
    d_scale: torch.Tensor
    r_loc: torch.Tensor
    r_scale: torch.Tensor


def encode_cohort(module: MixturePDE, data: CohortTensors, batch_size: int = 512) -> GuideSummary:
    """Run the encoder over a cohort in batches (no gradients)."""
    parts = []
    with torch.no_grad():
        for start in range(0, data.n_subjects, batch_size):
            sl = slice(start, start + batch_size)
            parts.append(module.encode(data.signal[sl], data.times[sl], data.observed[sl]))
    d_loc, d_scale, r_loc_rate, r_scale_rate = (torch.cat(p) for p in zip(*parts))
    r_loc = d_loc.new_full(d_loc.shape, math.nan)
    r_scale = d_loc.new_full(d_loc.shape, math.nan)
    r_loc[:, module.rate_index] = r_loc_rate
    r_scale[:, module.rate_index] = r_scale_rate
    return GuideSummary(d_loc, d_scale, r_loc, r_scale)


def global_means(module: MixturePDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means of the mixture weights (K,) and of the noise scale ()."""
    with torch.no_grad():
        conc = module.weights_concentration()
        weights = conc / conc.sum()
        noise_sd = torch.nn.functional.softplus(module.noise_scale_raw) + 1e-4
        noise = torch.exp(module.noise_loc + 0.5 * noise_sd ** 2)
    return weights, noise


def component_log_evidence(module: MixturePDE, data: CohortTensors, summary: GuideSummary,
                           n_particles: int = 8, batch_size: int = 128, seed: int = 0,
                           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Importance-sampling estimates of log p(x_i | subtype = k): (N, K).

    Each of ``n_particles`` draws of (D, r) from q_k is weighted by prior / proposal.
    """
    p = module.priors
    if noise is None:
        noise = global_means(module)[1]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    rate = module.rate_index
    prior_d = dist.LogNormal(p.diffusivity.loc, p.diffusivity.scale)
    prior_r = dist.LogNormal(p.reaction.loc, p.reaction.scale)
    with torch.no_grad():
        for start in range(0, data.n_subjects, batch_size):
            sl = slice(start, start + batch_size)
            b = data.signal[sl].shape[0]
            d_q = dist.LogNormal(summary.d_loc[sl], summary.d_scale[sl])  # (b, K)
            r_q = dist.LogNormal(summary.r_loc[sl][:, rate], summary.r_scale[sl][:, rate])  # (b, K_r)
            eps_d = torch.randn((n_particles, *d_q.batch_shape), generator=generator).to(data.signal)
            eps_r = torch.randn((n_particles, *r_q.batch_shape), generator=generator).to(data.signal)
            d = torch.exp(summary.d_loc[sl] + summary.d_scale[sl] * eps_d)  # (S, b, K)
            r = torch.exp(summary.r_loc[sl][:, rate] + summary.r_scale[sl][:, rate] * eps_r)  # (S, b, K_r)
            log_w = prior_d.log_prob(d) - d_q.log_prob(d)  # (S, b, K)
            log_w[..., rate] += prior_r.log_prob(r) - r_q.log_prob(r)
            rep = lambda x: x.repeat(n_particles, *([1] * (x.dim() - 1)))  # noqa: E731
            ll = module.log_likelihood_components(rep(data.signal[sl]), rep(data.times[sl]), rep(data.observed[sl]),
                                                  d.reshape(n_particles * b, -1),
                                                  r.reshape(n_particles * b, -1) if rate else None, noise)
            log_w = log_w + ll.reshape(n_particles, b, -1)
            out.append(torch.logsumexp(log_w, dim=0) - math.log(n_particles))
    return torch.cat(out)


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
                      batch_size: int = 128, refine: bool = True) -> xr.Dataset:
    """The posterior contract (see ``data_schemas/posterior-v1.schema.json``) for ``data``'s subjects.

    ``refine=True`` (default) refines each (subject, component) guide posterior into a Laplace
    approximation by Levenberg-Marquardt (``evidence.laplace_proposal``) and uses it, mixed with
    the guide, as importance proposal: slower, but it removes the encoder's amortization error
    from the subtype decision and the D, r summaries (which then come from the Laplace
    approximation). ``refine=False`` uses the amortized guide alone (fast).
    """
    weights, noise = global_means(module)
    if refine:
        from . import evidence  # evidence builds on this module's encode_cohort

        proposal = evidence.laplace_proposal(module, data)
        stats = evidence.particle_stats(module, data, n_particles=n_particles, seed=seed, proposal=proposal)
        log_evidence = evidence.component_log_evidence(stats, noise.double().reshape(1))[0]
        inflate = LAPLACE_INFLATE
        summary = GuideSummary(proposal.mean[..., 0], torch.sqrt(proposal.cov[..., 0, 0] / inflate),
                               torch.where(proposal.has_rate, proposal.mean[..., 1], torch.nan),
                               torch.where(proposal.has_rate, torch.sqrt(proposal.cov[..., 1, 1] / inflate), torch.nan))
    else:
        summary = encode_cohort(module, data)
        log_evidence = component_log_evidence(module, data, summary, n_particles, batch_size, seed, noise)
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
                                                      "n_particles": n_particles, "seed": seed,
                                                      "refined": int(refine)})
    ds["subtype_prob"].attrs["description"] = "posterior probability of each subtype (rows sum to 1)"
    ds["log_evidence_component"].attrs["description"] = "importance-sampled log p(subject's data | subtype)"
    ds["diffusivity"].attrs["description"] = "posterior mean of D given the subtype"
    ds["reaction"].attrs["description"] = "posterior mean of r given the subtype (NaN: component has no rate)"
    ds["weights"].attrs["description"] = "posterior mean of the mixture weights"
    return ds
