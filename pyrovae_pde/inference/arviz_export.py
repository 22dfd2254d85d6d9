"""Export a fitted mixture's posterior to ArviZ (InferenceData on arviz 0.2x, DataTree on 1.x).

Groups (one chain; ``draw`` indexes posterior draws of the globals):

* ``posterior``: ``weights`` (subtype), ``noise_scale``, ``diffusivity`` (subject, subtype),
  ``reaction`` (subject, rate_subtype: the subtypes whose mechanism has a rate), ``subtype_prob``
  (subject, subtype). Per-subject parameters are conditional on the subtype: draw g holds a
  draw of (D, r) from p(D, r | x_i, subtype = k, globals_g) for every component k.
* ``posterior_predictive``: ``signal`` (subject, visit, node): replicated visits, the subtype
  drawn from its posterior (not the prior), observation noise added to the later visits; visit
  0 is the conditioning initial field; missing visits are NaN.
* ``log_likelihood``: ``signal`` (subject): log p(x_i | globals_g) with the subject's latents
  and subtype integrated out (see ``evidence``), the input of ``az.loo``/``az.compare``.
* ``observed_data``: ``signal`` (subject, visit, node), NaN at missing visits; ``constant_data``:
  ``time`` (subject, visit).

On grids, ``node`` runs over the active voxels; its coordinate is the flat index into the grid
(``attrs["spatial_shape"]`` holds the grid's shape). The posterior's attributes record the
log evidence, its SE, the ELBO and the number of particles.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..data.cohort import CohortTensors
from ..errors import InputError
from ..model.likelihood import observation_sd
from ..model.module import MixturePDE
from .evidence import ModelEvidence, model_evidence


def arviz_major() -> int:
    import arviz as az

    return int(str(az.__version__).split(".")[0])


def from_dict(groups: dict[str, dict], coords: dict, dims: dict, attrs: dict[str, dict] | None = None):
    """``az.from_dict`` across ArviZ versions: keyword groups on 0.x, one dict of groups on 1.x."""
    import arviz as az

    attrs = attrs or {}
    if arviz_major() >= 1:
        return az.from_dict(groups, coords=coords, dims=dims, attrs={g: a for g, a in attrs.items() if g in groups})
    idata = az.from_dict(**groups, coords=coords, dims=dims)
    for group, values in attrs.items():
        if group in groups:
            getattr(idata, group).attrs.update(values)
    return idata


def save_inference_data(idata, path: str | os.PathLike) -> Path:
    """Write an InferenceData/DataTree to NetCDF (h5netcdf) atomically."""
    from ..data.contract import atomic_write

    return atomic_write(path, lambda tmp: idata.to_netcdf(tmp, engine="h5netcdf"))  # both versions


def replicate_signal(evidence: ModelEvidence, data, posterior, seed: int = 0) -> np.ndarray:
    """Posterior predictive replicates (G, N, T, n) on active nodes from kept particle fields."""
    stats = evidence.stats
    if stats.fields is None:
        raise InputError("the particle fields were not kept: compute the evidence with keep_fields=True")
    g, n = posterior.subtype.shape
    subj = torch.arange(n)[None, :].expand(g, n)
    k = posterior.subtype
    p = torch.gather(posterior.particle, 2, k[..., None])[..., 0]  # particle of the drawn subtype
    fields = stats.fields[p, subj, k]  # (G, N, T, n)
    generator = torch.Generator().manual_seed(seed + 32452843)
    noise = observation_sd(evidence.draws.noise).to(torch.float32)[:, None, None, None]
    rep = fields.clone()
    rep[:, :, 1:] += noise * torch.randn(rep[:, :, 1:].shape, generator=generator)
    observed = data.observed[None, :, :, None].expand_as(rep)
    rep = torch.where(observed, rep, torch.full_like(rep, float("nan")))
    rep[:, :, 0] = data.signal[None, :, 0].to(rep.dtype)
    return rep.numpy()


def to_inference_data(module: MixturePDE, data: CohortTensors, n_draws: int = 100, n_particles: int = 32,
                      seed: int = 0, evidence: ModelEvidence | None = None, predictive: bool = True,
                      elbo_repeats: int = 4, space_coords: dict[str, np.ndarray] | None = None):
    """An InferenceData (arviz 0.x) / DataTree (arviz 1.x) of a fitted module on the cohort ``data``.

    ``evidence``: a precomputed ``model_evidence`` on ``data`` (with ``keep_fields=True`` when
    ``predictive``); otherwise computed here with ``n_particles`` particles and ``n_draws`` draws.
    ``space_coords``: the cohort file's spatial coordinates (``{"node": names}`` on a graph, whose
    names label ``node``; default 0..n-1); on grids ``node`` is the flat index of the active voxels.
    """
    if evidence is None:
        evidence = model_evidence(module, data, method="importance", n_particles=n_particles, n_draws=n_draws,
                                  seed=seed, keep_fields=predictive, elbo_repeats=elbo_repeats)
    stats, draws = evidence.stats, evidence.draws
    post = evidence.posterior_draws(seed)
    g, n = post.subtype.shape
    components = list(module.components)
    rate = module.rate_index
    idx_s = torch.arange(n)[None, :, None]
    idx_k = torch.arange(len(components))[None, None, :]
    diffusivity = stats.diffusivity[post.particle, idx_s, idx_k]  # (G, N, K)
    reaction = stats.reaction[post.particle, idx_s, idx_k][..., rate]  # (G, N, K_r)

    subjects = np.array(data.subjects, dtype=object)
    domain = module.domain
    names = (space_coords or {}).get("node")
    if domain.kind == "grid":
        nodes = np.asarray(domain.active_index, dtype=np.int64)
    else:
        nodes = np.array([str(v) for v in names], dtype=object) if names is not None else np.arange(domain.n_nodes)
    n_visits = data.signal.shape[1]
    coords = {"subject": subjects, "subtype": np.array(components, dtype=object),
              "rate_subtype": np.array([components[k] for k in rate], dtype=object),
              "visit": np.arange(n_visits), "node": nodes}
    dims = {"weights": ["subtype"], "noise_scale": [], "diffusivity": ["subject", "subtype"],
            "reaction": ["subject", "rate_subtype"], "subtype_prob": ["subject", "subtype"],
            "signal": ["subject", "visit", "node"], "time": ["subject", "visit"]}
    posterior = {"weights": draws.weights.numpy()[None], "noise_scale": draws.noise.numpy()[None],
                 "diffusivity": diffusivity.numpy()[None], "subtype_prob": post.subtype_log_prob.exp().numpy()[None]}
    if rate:
        posterior["reaction"] = reaction.numpy()[None]
    observed = data.signal.numpy().astype(np.float64).copy()
    observed[~data.observed.numpy()] = np.nan
    groups = {"posterior": posterior,
              "log_likelihood": {"signal": evidence.pointwise.numpy()[None]},
              "observed_data": {"signal": observed},
              "constant_data": {"time": data.times.numpy().astype(np.float64)}}
    if predictive:
        groups["posterior_predictive"] = {"signal": replicate_signal(evidence, data, post, seed)[None]}
    attrs = {"posterior": {"model_components": ",".join(components), "log_evidence": evidence.log_evidence,
                           "log_evidence_se": evidence.log_evidence_se, "elbo": evidence.elbo,
                           "elbo_se": evidence.elbo_se, "n_particles": stats.n_particles,
                           "proposal": stats.proposal, "ess_globals": evidence.ess_globals,
                           "globals": "Laplace approximation of p(weights, noise | data), latents integrated out",
                           "domain": domain.kind, "spatial_shape": list(domain.spatial_shape)},
             "log_likelihood": {"description": "log p(subject's data | globals), subject latents and subtype "
                                               "integrated out by importance sampling"}}
    return from_dict(groups, coords, dims, attrs)


# --------------------------------------------------------------------------- LOO input
def loo_inference_data(evidence: ModelEvidence):
    """The small InferenceData ``az.loo``/``az.compare`` need: globals and the pointwise marginals."""
    draws = evidence.draws
    coords = {"subject": np.array(evidence.subjects, dtype=object),
              "subtype": np.array(evidence.components, dtype=object)}
    dims = {"weights": ["subtype"], "signal": ["subject"]}
    return from_dict({"posterior": {"weights": draws.weights.numpy()[None], "noise_scale": draws.noise.numpy()[None]},
                      "log_likelihood": {"signal": evidence.pointwise.numpy()[None]}}, coords, dims)
