"""Figures of fields: one subject's observed (and reconstructed) signal per visit, and forecast bands.

Each function draws on the given axes (or a new figure) and returns the Figure; none chooses a
backend or writes a file (``plots.save_figure``). Public face: ``pyrovae_pde.plots``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from ..errors import InputError, UnknownNameError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLANES = (("axial", 0), ("coronal", 1), ("sagittal", 2))  # (name, axis of (z, y, x) held fixed)
CMAP = "magma"


def _subject_field(ds: xr.Dataset, subject: str) -> xr.DataArray:
    known = [str(s) for s in ds["subject"].values]
    if str(subject) not in known:
        raise UnknownNameError(f"no subject {subject!r} in the dataset (it has {', '.join(known[:5])}"
                               f"{', ...' if len(known) > 5 else ''})")
    return ds["signal"].sel(subject=subject)


def _frames(ds: xr.Dataset, subject: str, fitted, unit: str) -> list[list[tuple[str, np.ndarray]]]:
    """Rows of (title, values (*space)): the observed visits, then the ``fitted`` times if given."""
    signal = _subject_field(ds, subject)
    times = np.asarray(ds["time"].sel(subject=subject).values, dtype=float)
    rows = [[(f"observed, t = {times[j]:.3g}{unit}", np.asarray(signal.values[j], dtype=float))
             for j in np.flatnonzero(np.isfinite(times))]]
    if fitted is None:
        return rows
    values = fitted
    if isinstance(fitted, xr.Dataset):
        if "mean" not in fitted:
            raise InputError("fitted: give a DataArray (time, *space) or a forecast Dataset with a 'mean' variable")
        values = fitted["mean"]
    if "subject" in values.dims:
        values = values.sel(subject=subject)
    time_dim = values.dims[0]
    fit_times = values[time_dim].values if time_dim in values.coords else None
    if isinstance(fitted, xr.Dataset) and "forecast_time" in fitted and "subject" in fitted["forecast_time"].dims:
        fit_times = fitted["forecast_time"].sel(subject=subject).values  # per-subject times of a forecast
    arr = np.asarray(values.values, dtype=float)
    if arr.shape[1:] != signal.shape[1:]:
        raise InputError(f"fitted: spatial shape {arr.shape[1:]} differs from the signal's {signal.shape[1:]}")
    rows.append([(f"fitted, t = {float(fit_times[j]):.3g}{unit}" if fit_times is not None else f"fitted {j}", arr[j])
                 for j in range(arr.shape[0])])
    return rows


def _panel_grid(axes, nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """``axes`` reshaped (nrows, ncols), or a new figure of that many panels of ``size`` inches each."""
    if axes is None:
        fig, grid = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                                 layout="constrained")
        return fig, grid
    flat = np.ravel(np.asarray(axes, dtype=object))
    if flat.size != nrows * ncols:
        raise InputError(f"this figure needs {nrows} x {ncols} = {nrows * ncols} axes; got {flat.size}")
    return flat[0].figure, flat.reshape(nrows, ncols)


def _limits(rows) -> tuple[float, float]:
    values = np.concatenate([v[np.isfinite(v)].ravel() for row in rows for _, v in row])
    return (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)


def centroids_of(ds: xr.Dataset, centroids: np.ndarray | None = None) -> np.ndarray | None:
    """Region centres (n, 2 or 3) of a graph cohort: ``centroids``, else a ``centroids`` (node, axis)
    variable or ``x``, ``y`` (and ``z``) variables on ``node``, else those of the shipped connectome
    its ``connectome`` attribute names when the region names match; None when there are none."""
    n = ds.sizes["node"]
    if centroids is not None:
        arr = np.asarray(centroids, dtype=float)
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] not in (2, 3):
            raise InputError(f"centroids: expected an array ({n}, 3) of region centres, got shape {arr.shape}")
        return arr
    if "centroids" in ds and ds["centroids"].dims[0] == "node":
        return np.asarray(ds["centroids"].values, dtype=float)
    if all(a in ds.variables and ds[a].dims == ("node",) for a in ("x", "y")):
        return np.stack([np.asarray(ds[a].values, dtype=float) for a in ("x", "y", "z") if a in ds.variables], 1)
    name = ds.attrs.get("connectome")
    if name and "node" in ds.coords:
        from ..data.connectomes import available_connectomes, load_connectome

        if str(name) in available_connectomes():
            graph = load_connectome(str(name))
            if graph.centroids is not None and list(graph.regions) == [str(s) for s in ds["node"].values]:
                return np.asarray(graph.centroids, dtype=float)
    return None


def _panels(grid, rows):
    """(column, Axes, title, values) of each frame of ``rows`` on ``grid``; panels left over are hidden."""
    for r, row in enumerate(rows):
        for c, ax in enumerate(grid[r]):
            if c >= len(row):
                ax.set_axis_off()
                continue
            yield c, ax, row[c][0], row[c][1]


def _images(fig, grid, rows, mask: np.ndarray, extent, limits) -> None:
    """2-D grid: each frame an image inside the mask (NaN outside), one colour scale."""
    image = None
    for c, ax, title, values in _panels(grid, rows):
        image = ax.imshow(np.where(mask, values, np.nan), origin="lower", extent=extent, cmap=CMAP,
                          vmin=limits[0], vmax=limits[1], interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("y (mm)" if c == 0 else "")
    fig.colorbar(image, ax=list(grid.ravel()), label="signal", shrink=0.8)


def _slices(fig, grid, frames, mask: np.ndarray, limits) -> None:
    """3-D grid: a row per frame, the axial, coronal and sagittal slices through the mask's centre."""
    centre = [int(round(c.mean())) for c in np.nonzero(mask)]
    image = None
    for (title, values), axes in zip(frames, grid):
        for ax, (plane, axis) in zip(axes, PLANES):
            index = [slice(None)] * 3
            index[axis] = centre[axis]
            image = ax.imshow(np.where(mask, values, np.nan)[tuple(index)], origin="lower", cmap=CMAP,
                              vmin=limits[0], vmax=limits[1], interpolation="nearest")
            ax.set_title(f"{title}: {plane} {'zyx'[axis]} = {centre[axis]}", fontsize=8)
            ax.set_axis_off()
    fig.colorbar(image, ax=list(grid.ravel()), label="signal", shrink=0.8)


def _glass(fig, grid, rows, points: np.ndarray, limits) -> None:
    """Graph with region centres: each frame a scatter of the centres' x-y projection coloured by value."""
    order = np.argsort(points[:, 2]) if points.shape[1] > 2 else np.arange(len(points))  # top regions drawn last
    dots = None
    for c, ax, title, values in _panels(grid, rows):
        dots = ax.scatter(points[order, 0], points[order, 1], c=values[order], cmap=CMAP, vmin=limits[0],
                          vmax=limits[1], s=30, edgecolors="k", linewidths=0.3)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("y (mm)" if c == 0 else "")
    fig.colorbar(dots, ax=list(grid.ravel()), label="signal", shrink=0.8)


def _lines(ax, rows, names: Sequence[str]) -> None:
    """Graph without region centres: the value of each region, a line per visit (fitted: dashed)."""
    for r, row in enumerate(rows):
        for c, (title, values) in enumerate(row):
            ax.plot(np.arange(len(values)), values, color=f"C{c % 10}", ls="-" if r == 0 else "--",
                    marker="." if r == 0 else None, lw=1.0, label=title)
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_xlabel("region")
    ax.set_ylabel("signal")
    ax.legend(fontsize=7, ncols=2 if len(rows) > 1 else 1)


def fields(ds: xr.Dataset, subject: str, fitted: xr.DataArray | xr.Dataset | None = None, axes=None,
           centroids: np.ndarray | None = None) -> Figure:
    """One subject's observed field at each present visit, and the ``fitted`` (reconstructed) one if given.

    ``ds``: a cohort (``signal`` (subject, visit, *space), ``time``; grids: ``mask``). ``fitted``:
    (time, *space) or (subject, time, *space), or a ``SubtypeModel.forecast`` Dataset (its ``mean``).
    2-D grid: a row of images per kind (observed, fitted), a column per visit, NaN outside the
    mask. 3-D grid: a row per visit and kind, the three orthogonal slices through the mask's
    centre. Graph: with region centres (``centroids`` (n, 3), or found by ``centroids_of``) a
    glass-brain x-y scatter coloured by value per visit; without, one Axes with the value per region,
    a line per visit. ``axes``: the Axes to draw on, as many as panels (one for the line plot).
    """
    unit = f" {ds.attrs['time_unit']}" if ds.attrs.get("time_unit") else ""
    rows = _frames(ds, subject, fitted, unit)
    limits = _limits(rows)
    ncols = max(len(row) for row in rows)
    if ds.attrs.get("domain") == "grid":
        mask = np.asarray(ds["mask"].values).astype(bool)
        if mask.ndim == 3:
            frames = [frame for row in rows for frame in row]
            fig, grid = _panel_grid(axes, len(frames), 3, (2.6, 2.6))
            _slices(fig, grid, frames, mask, limits)
        else:
            ydim, xdim = ds["mask"].dims
            ys, xs = np.asarray(ds[ydim].values, float), np.asarray(ds[xdim].values, float)
            half = [(xs[1] - xs[0]) / 2 if len(xs) > 1 else 0.5, (ys[1] - ys[0]) / 2 if len(ys) > 1 else 0.5]
            fig, grid = _panel_grid(axes, len(rows), ncols, (2.8, 2.6))
            _images(fig, grid, rows, mask, (xs[0] - half[0], xs[-1] + half[0], ys[0] - half[1], ys[-1] + half[1]),
                    limits)
    else:
        points = centroids_of(ds, centroids)
        if points is None:
            fig, grid = _panel_grid(axes, 1, 1, (max(6.0, 0.12 * ds.sizes["node"]), 3.8))
            names = [str(s) for s in ds["node"].values] if "node" in ds.coords else []
            _lines(grid[0, 0], rows, names)
        else:
            fig, grid = _panel_grid(axes, len(rows), ncols, (3.0, 3.0))
            _glass(fig, grid, rows, points, limits)
    fig.suptitle(f"Subject {subject}")
    return fig


def forecast_bands(forecast: xr.Dataset, subject: str | None = None, nodes: Sequence | None = None,
                   observed: xr.Dataset | None = None, ax: Axes | None = None, n_nodes: int = 4) -> Figure:
    """Forecast mean and 90% predictive band against time for a few nodes (voxels) of one subject.

    ``forecast``: ``SubtypeModel.forecast`` (``mean``, ``q05``, ``q95`` (subject, time, *space),
    ``forecast_time`` (subject, time)). ``subject``: default the first. ``nodes``: region names
    (graph) or flat indices into the spatial dims; default the ``n_nodes`` with the largest last mean.
    ``observed``: the cohort, whose visits of the subject at those nodes are drawn as points."""
    subject = str(forecast["subject"].values[0]) if subject is None else str(subject)
    if subject not in [str(s) for s in forecast["subject"].values]:
        raise UnknownNameError(f"no subject {subject!r} in the forecast")
    mean, lo, hi = (np.asarray(forecast[v].sel(subject=subject).values, dtype=float) for v in ("mean", "q05", "q95"))
    mean, lo, hi = (a.reshape(a.shape[0], -1) for a in (mean, lo, hi))
    times = (np.asarray(forecast["forecast_time"].sel(subject=subject).values, dtype=float)
             if "forecast_time" in forecast else np.asarray(forecast["time"].values, dtype=float))
    names = [str(s) for s in forecast["node"].values] if "node" in forecast.coords else None
    if nodes is None:
        index = list(np.argsort(-mean[-1])[:n_nodes])
    else:
        index = [names.index(str(n)) if names and str(n) in names else int(n) for n in nodes]
    fig, ax = (plt.subplots(figsize=(6, 4)) if ax is None else (ax.figure, ax))
    for c, p in enumerate(index):
        label = names[p] if names else str(np.unravel_index(p, forecast["mean"].shape[2:]))
        ax.plot(times, mean[:, p], color=f"C{c % 10}", label=label)
        ax.fill_between(times, lo[:, p], hi[:, p], color=f"C{c % 10}", alpha=0.2)
        if observed is not None:
            obs = np.asarray(_subject_field(observed, subject).values, dtype=float)
            obs = obs.reshape(obs.shape[0], -1)[:, p]
            ax.scatter(np.asarray(observed["time"].sel(subject=subject).values, dtype=float), obs,
                       color=f"C{c % 10}", edgecolors="k", zorder=3)
    unit = forecast.attrs.get("time_unit") or "time unit"
    ax.set_xlabel(f"time ({unit})")
    ax.set_ylabel("signal (mean, 90% predictive band)")
    ax.set_title(f"Forecast of {subject}")
    ax.legend(fontsize=8, title="node")
    return fig
