"""Forecasts: each subject's field at future times, per subtype and mixed over the subtype posterior.

For posterior draw g of the globals and subject i (``evidence.sample_posterior``): every
component's (D, r) is resampled from the subject's importance-weighted particles, the PDE is
solved from the subject's first visit to the requested times, and noise of sd sigma_g is added:
the bands are posterior *predictive* intervals of a new observation (parameter, subtype and
noise uncertainty), while ``mean`` is the mean of the field (also the predictive mean). The mixed
forecast draws the subtype of draw g from p(subtype | x_i, g).

Times are absolute, in the unit and origin of the cohort's ``time`` variable, and must not be
before a subject's first visit (the initial condition). Long horizons are solved without the
fitting solver's step cap (``MAX_STEPS_PER_INTERVAL``), so their accuracy does not degrade.
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ..data.cohort import CohortTensors
from ..errors import ModelError
from ..model.likelihood import observation_sd
from ..model.module import MixturePDE
from ..physics import solve_active
from .evidence import model_evidence
from .particles import DTYPE

QUANTILES = (0.05, 0.5, 0.95)


def _times_matrix(times, data, error) -> np.ndarray:
    arr = np.asarray(times, dtype=float)
    if arr.ndim == 0:
        arr = arr[None]
    n = data.n_subjects
    if arr.ndim == 1:
        arr = np.tile(arr, (n, 1))
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] == 0:
        raise error(f"times must be a list of times shared by all subjects or an array (subjects, times) "
                    f"with {n} rows; got shape {np.shape(times)}")
    if not np.isfinite(arr).all():
        raise error("forecast times must be finite numbers")
    first = data.times[:, 0].numpy().astype(float)
    past = arr < first[:, None] - 1e-9
    if past.any():
        i, j = np.argwhere(past)[0]
        raise error(f"subject {data.subjects[i]!r}: forecast time {arr[i, j]:g} is before its first visit "
                    f"({first[i]:g}); times are absolute, in the unit and origin of the file's 'time'")
    return arr


def forecast(module: MixturePDE, data: CohortTensors, times, n_draws: int = 200, n_particles: int = 32, seed: int = 0,
             evidence=None, space_coords: dict[str, np.ndarray] | None = None, time_unit: str = "") -> xr.Dataset:
    """Forecast the subjects of the cohort ``data`` at ``times`` with a fitted module.

    ``times``: absolute times shared by all subjects (1-D), or one row per subject (2-D).
    ``evidence``: a precomputed importance ``model_evidence`` on ``data`` (otherwise computed here
    with ``n_particles`` particles and ``n_draws`` draws of the globals).
    ``space_coords``: the cohort file's spatial dims and coordinates in order (``{"node": names}``
    on a graph, ``{"y": ..., "x": ...}`` or with ``"z"`` first on a grid; default: ``node`` without
    coordinates, or (z,) y, x with none); ``time_unit`` is recorded in the attributes.
    Returns a Dataset with dims (subject, time, [subtype], space) where space is ``node`` on a
    graph or the grid's (z,) y, x (zeros outside the mask): ``mean``, ``q05``, ``q50``, ``q95``
    (mixed over the subtype posterior), ``mean_by_subtype``, ``q05_by_subtype``, ``q95_by_subtype``,
    ``subtype_prob`` (subject, subtype) and ``forecast_time`` (subject, time).
    """
    tmat = _times_matrix(times, data, ModelError)
    if evidence is None:
        evidence = model_evidence(module, data, method="importance", n_particles=n_particles, n_draws=n_draws,
                                  seed=seed, elbo_repeats=0)
    stats, draws = evidence.stats, evidence.draws
    post = evidence.posterior_draws(seed)
    g, n = post.subtype.shape
    k = module.n_components
    m = tmat.shape[1]
    nodes = data.signal.shape[-1]
    idx_s = torch.arange(n)[None, :, None]
    idx_k = torch.arange(k)[None, None, :]
    diffusivity = stats.diffusivity[post.particle, idx_s, idx_k]  # (G, N, K)
    reaction = torch.nan_to_num(stats.reaction[post.particle, idx_s, idx_k], nan=0.0)
    generator = torch.Generator().manual_seed(seed + 49979687)
    noise = observation_sd(draws.noise)[:, None, None, None, None]  # (G, 1, 1, 1, 1)
    out = {name: np.zeros((n, m, nodes)) for name in ("mean", "q05", "q50", "q95")}
    out.update({name: np.zeros((n, m, k, nodes)) for name in ("mean_by_subtype", "q05_by_subtype", "q95_by_subtype")})
    batch = max(1, int(2e7 // (g * k * (m + 1) * nodes)))
    for start in range(0, n, batch):
        sl = slice(start, min(start + batch, n))
        b = sl.stop - sl.start
        order = np.argsort(tmat[sl], axis=1, kind="stable")
        inverse = np.argsort(order, axis=1)
        sorted_t = np.take_along_axis(tmat[sl], order, axis=1)
        solve_t = torch.as_tensor(np.concatenate([data.times[sl, :1].numpy().astype(float), sorted_t], axis=1),
                                  dtype=DTYPE)
        u0 = data.signal[sl, 0].to(DTYPE)
        rep = lambda x: x.repeat(g, *([1] * (x.dim() - 1)))  # noqa: E731
        d = diffusivity[:, sl].reshape(g * b, k)
        r = module.full_reaction(reaction[:, sl][..., module.rate_index].reshape(g * b, -1), d) \
            if module.rate_index else torch.zeros_like(d)
        with torch.no_grad():
            fields = solve_active(module.domain, rep(u0), rep(solve_t), d, r, module.terms, module.solver_settings())
        fields = fields.reshape(g, b, k, m + 1, nodes)[:, :, :, 1:]
        unsort = torch.as_tensor(inverse)[None, :, None, :, None].expand_as(fields)
        fields = torch.gather(fields, 3, unsort)  # back to the requested order
        pred = fields + noise * torch.randn(fields.shape, generator=generator, dtype=DTYPE)
        subtype = post.subtype[:, sl]  # (G, b)
        pick = subtype[:, :, None, None, None].expand(g, b, 1, m, nodes)
        mixed_field = torch.gather(fields, 2, pick)[:, :, 0]  # (G, b, M, n)
        mixed_pred = torch.gather(pred, 2, pick)[:, :, 0]
        q = np.quantile(mixed_pred.numpy(), QUANTILES, axis=0)
        out["mean"][sl] = mixed_field.mean(0).numpy()
        out["q05"][sl], out["q50"][sl], out["q95"][sl] = q
        qk = np.quantile(pred.numpy(), (QUANTILES[0], QUANTILES[2]), axis=0)  # (2, b, K, M, n)
        out["mean_by_subtype"][sl] = fields.mean(0).permute(0, 2, 1, 3).numpy()
        out["q05_by_subtype"][sl] = qk[0].transpose(0, 2, 1, 3)
        out["q95_by_subtype"][sl] = qk[1].transpose(0, 2, 1, 3)
    return _to_dataset(module, data, tmat, out, post.subtype_log_prob.exp().mean(0).numpy(), evidence,
                       space_coords or {}, time_unit)


def _to_dataset(module, data, tmat, out, subtype_prob, evidence, space_coords, time_unit) -> xr.Dataset:
    domain = module.domain
    shared = bool(np.all(tmat == tmat[:1]))
    coords = {"subject": np.array(data.subjects, dtype=object),
              "time": tmat[0] if shared else np.arange(tmat.shape[1]),
              "subtype": np.array(module.components, dtype=object)}
    if domain.kind == "grid":
        space_dims = tuple(space_coords) or ("z", "y", "x")[3 - len(domain.spatial_shape):]
        for dim in space_dims:
            if dim in space_coords:
                coords[dim] = space_coords[dim]

        def spatial(values: np.ndarray) -> np.ndarray:
            return domain.scatter(torch.as_tensor(values)).numpy()
    else:
        space_dims = ("node",)
        if "node" in space_coords:
            coords["node"] = space_coords["node"]

        def spatial(values: np.ndarray) -> np.ndarray:
            return values
    variables = {}
    for name in ("mean", "q05", "q50", "q95"):
        variables[name] = (("subject", "time", *space_dims), spatial(out[name]))
    for name in ("mean_by_subtype", "q05_by_subtype", "q95_by_subtype"):
        variables[name] = (("subject", "time", "subtype", *space_dims), spatial(out[name]))
    variables["subtype_prob"] = (("subject", "subtype"), subtype_prob)
    variables["forecast_time"] = (("subject", "time"), tmat)
    result = xr.Dataset(variables, coords=coords, attrs={
        "kind": "forecast", "model_components": ",".join(module.components),
        "n_draws": evidence.draws.n_draws, "n_particles": evidence.stats.n_particles,
        "time_unit": str(time_unit), "domain": domain.kind,
        "description": "posterior predictive forecasts: q05/q50/q95 include observation noise; mean is the "
                       "mean field; *_by_subtype are conditional on each subtype"})
    result["mean"].attrs["description"] = "predictive mean, mixed over the subtype posterior"
    result["q05"].attrs["description"] = "5% quantile of a new observation (90% band with q95)"
    result["forecast_time"].attrs["description"] = "absolute forecast time of each subject"
    return result


def hold_out_last_visit(ds: xr.Dataset) -> tuple[xr.Dataset, np.ndarray, np.ndarray]:
    """Drop each subject's last present visit (if it has at least two).

    Returns (the cohort without those visits, held-out times (N,) — NaN for subjects with one
    visit — and held-out signal (N, *space)).
    """
    time = np.asarray(ds["time"].values, dtype=float)
    signal = np.asarray(ds["signal"].values, dtype=float)
    n_present = (~np.isnan(time)).sum(axis=1)
    last = n_present - 1
    rows = np.arange(time.shape[0])
    held_t = np.where(n_present >= 2, time[rows, last], np.nan)
    held_x = signal[rows, last].copy()
    held_x[n_present < 2] = np.nan
    time = time.copy()
    signal = signal.copy()
    drop = rows[n_present >= 2]
    time[drop, last[drop]] = np.nan
    signal[drop, last[drop]] = np.nan
    train = ds.copy()
    train["time"] = (ds["time"].dims, time)
    train["signal"] = (ds["signal"].dims, signal)
    return train, held_t, held_x


def band_coverage(fc: xr.Dataset, held_x: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of held-out values inside [q05, q95] (first forecast time; grid cells inside ``mask``)."""
    lo = fc["q05"].isel(time=0).values
    hi = fc["q95"].isel(time=0).values
    inside = (held_x >= lo) & (held_x <= hi)
    valid = ~np.isnan(held_x)
    if mask is not None:
        valid &= mask.astype(bool)
    return float(inside[valid].mean())
