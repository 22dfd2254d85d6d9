"""SUVR normalisation: read each scan as SUVR, scale the cohort to [0, 1], and invert the scaling.

Normalisation (written into the output attrs so it inverts exactly)::

    SUVR   = image / reference_mean                    (per scan; mean over the reference region)
    signal = (SUVR - suvr_min) / (suvr_max - suvr_min)  (cohort constants; no clipping)
    image  = (signal * (suvr_max - suvr_min) + suvr_min) * reference_mean
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from ..errors import ImagingError
from .imaging_grid import volume_on_grid
from .imaging_manifest import scan_where
from .imaging_space import ImportPlan

__all__ = ["CohortValues", "Scaling", "read_scans", "scale_to_unit", "invert_normalisation"]


@dataclass
class CohortValues:
    """The scans read into (subject, visit, ...) arrays; ``signal`` is SUVR, flat over space."""
    subjects: list[str]
    times: np.ndarray
    reference_mean: np.ndarray
    image_file: np.ndarray
    signal: np.ndarray
    lo: float  # smallest and largest SUVR that go into the output
    hi: float


@dataclass(frozen=True)
class Scaling:
    """The constants of ``signal = (SUVR - lo) / (hi - lo)`` and how each was chosen."""
    lo: float
    hi: float
    lo_rule: str
    hi_rule: str


def read_scans(rows: pd.DataFrame, plan: ImportPlan) -> CohortValues:
    """Read every scan of ``rows`` onto the plan's grid as SUVR: voxel values (grid) or regional means (graph)."""
    from tqdm.auto import tqdm

    options, layout = plan.options, plan.layout
    subjects = list(dict.fromkeys(rows["subject"]))
    subject_index = {s: i for i, s in enumerate(subjects)}
    n_sub, n_vis = len(subjects), int(rows["visit"].max()) + 1
    store = np.float64 if options.graph else np.dtype(options.dtype)
    values = CohortValues(subjects, np.full((n_sub, n_vis), np.nan), np.full((n_sub, n_vis), np.nan),
                          np.full((n_sub, n_vis), "", dtype=object),
                          np.zeros((n_sub, n_vis, int(np.prod(layout.spatial_shape))), dtype=store), np.inf, -np.inf)

    with tqdm(total=len(rows), desc="import", unit="scan", disable=not options.progress, leave=False) as bar:
        for row in rows.itertuples():
            ref_mean, suvr = _scan_suvr(row, plan)
            i, j = subject_index[row.subject], row.visit
            if options.graph:
                suvr = np.bincount(layout.region_of, weights=suvr, minlength=layout.n_values) / layout.voxels_per_region
                values.signal[i, j] = suvr
            else:
                values.signal[i, j, layout.out_sel] = suvr
            values.lo, values.hi = min(values.lo, float(suvr.min())), max(values.hi, float(suvr.max()))
            values.times[i, j], values.reference_mean[i, j] = row.time, ref_mean
            values.image_file[i, j] = str(row.image)
            bar.update()
    return values


def _scan_suvr(row, plan: ImportPlan) -> tuple[float, np.ndarray]:
    """(reference mean, SUVR of the layout's voxels) of one scan; NaN/inf where they are used is an error."""
    options, reference = plan.options, plan.options.reference
    where = scan_where(plan.source, row)
    data = volume_on_grid(row.image, where, plan.space.grid, options.resample, order=1, cval=np.nan)
    ref_values = np.asarray(data[plan.ref_idx], dtype=np.float64)
    if not np.isfinite(ref_values).all():
        raise ImagingError(f"{where}: {int((~np.isfinite(ref_values)).sum())} NaN/inf voxels inside the "
                           f"reference region {reference}")
    ref_mean = float(ref_values.mean())
    if not ref_mean > 0:
        raise ImagingError(f"{where}: mean over the reference region {reference} is {ref_mean:g}; SUVR "
                           "needs a positive reference uptake")
    src_idx = plan.layout.src_idx
    values = np.asarray(data[src_idx], dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        k = int(np.argmax(bad))
        voxel = tuple(int(ax[k]) for ax in src_idx)
        region = "atlas regions" if options.graph else "mask"
        hint = " (after resampling: does the image cover the mask?)" if options.resample else ""
        raise ImagingError(f"{where}: {int(bad.sum())} NaN/inf voxels inside the {region}{hint}, first at "
                           f"voxel (i, j, k) = {voxel}; fill or mask them before importing")
    return ref_mean, values / ref_mean


def _scaling(values: CohortValues, plan: ImportPlan) -> Scaling:
    """The scaling constants: given, or the cohort's minimum and maximum SUVR."""
    options, graph = plan.options, plan.options.graph
    suvr_min, suvr_max = options.suvr_min, options.suvr_max
    lo_rule = "given" if suvr_min is not None else ("cohort minimum of the regional mean SUVRs" if graph
                                                     else "cohort minimum SUVR inside the mask")
    hi_rule = "given" if suvr_max is not None else ("cohort maximum of the regional mean SUVRs" if graph
                                                     else "cohort maximum SUVR inside the mask")
    lo = float(suvr_min) if suvr_min is not None else values.lo
    hi = float(suvr_max) if suvr_max is not None else values.hi
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ImagingError(f"{plan.source}: cannot scale SUVR to [0, 1]: suvr_max ({hi:g}, {hi_rule}) must be greater "
                           f"than suvr_min ({lo:g}, {lo_rule})")
    return Scaling(lo, hi, lo_rule, hi_rule)


def scale_to_unit(values: CohortValues, plan: ImportPlan) -> tuple[np.ndarray, Scaling]:
    """(signal scaled to [0, 1] with shape (subject, visit, *spatial), scaling); missing visits are NaN."""
    scaling = _scaling(values, plan)
    graph, out_sel = plan.options.graph, plan.layout.out_sel
    signal, lo = values.signal, scaling.lo
    present = ~np.isnan(values.times)
    scale = scaling.hi - lo
    for i, j in np.argwhere(present):
        if graph:
            signal[i, j] = (signal[i, j] - lo) / scale
        else:
            signal[i, j, out_sel] = (signal[i, j, out_sel].astype(np.float64) - lo) / scale
    signal[~present] = np.nan
    if graph:
        signal = signal.astype(plan.options.dtype)
    n_sub, n_vis = values.times.shape
    return signal.reshape(n_sub, n_vis, *plan.layout.spatial_shape), scaling


def invert_normalisation(ds: xr.Dataset, values: np.ndarray, reference_mean: float | np.ndarray | None = None
                         ) -> np.ndarray:
    """Normalised signal -> SUVR, or -> image units when ``reference_mean`` (per scan) is given."""
    for key in ("suvr_min", "suvr_max"):
        if key not in ds.attrs:
            raise ImagingError(f"the dataset has no attribute {key!r}; it was not made by 'pyrovae-pde import', so "
                               "its normalisation cannot be inverted (use scale 'stored')")
    lo, hi = float(ds.attrs["suvr_min"]), float(ds.attrs["suvr_max"])
    suvr = np.asarray(values, dtype=np.float64) * (hi - lo) + lo
    return suvr if reference_mean is None else suvr * reference_mean
