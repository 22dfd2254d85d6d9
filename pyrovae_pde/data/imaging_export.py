"""Export: fields of a dataset (signal, fits, forecasts) back to NIfTI images in the input space.

The geometry of an import (variable ``affine``, attrs ``input_shape`` and ``slice_axial``; for
graphs ``atlas`` and ``node_label``) says how to undo the RAS+ reorientation and (z, y, x) order.
"""
from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import xarray as xr
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from ..errors import ImagingError
from .contract import atomic_write
from .imaging_grid import Grid, canonical_index
from .imaging_suvr import invert_normalisation

__all__ = ["export_nifti"]


@dataclass(frozen=True)
class _Geometry:
    """The input space of an import and where a field's values go in it."""
    affine: np.ndarray
    ornt: np.ndarray  # input grid -> RAS+ orientation
    canonical_zyx_shape: tuple[int, ...]
    slice_axial: int  # -1: the whole 3-D grid
    graph: bool
    n_space: int  # number of trailing spatial dims of the field
    painted: np.ndarray | None = None  # graph: node index of each canonical voxel, -1 outside the regions
    inside: np.ndarray | None = None  # grid: the mask (None: every voxel)


@dataclass(frozen=True)
class _Export:
    """One export: the field, its geometry and scale, and the geometry dataset."""
    ds: xr.Dataset
    geo: xr.Dataset
    field: xr.DataArray
    variable: str
    scale: str
    geometry: _Geometry
    lead: tuple[str, ...]  # the field's leading (iterated) dims
    ref_subjects: dict[str, int] | None  # scale 'image': subject -> row of the geometry's reference_mean


def _open_any(data: str | os.PathLike | xr.Dataset, what: str) -> xr.Dataset:
    if isinstance(data, xr.Dataset):
        return data
    path = Path(data)
    if not path.is_file():
        raise ImagingError(f"{what} {path}: file not found")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as opened:
            return opened.load()
    except Exception as exc:
        raise ImagingError(f"{what} {path}: not a readable NetCDF/HDF5 file ({type(exc).__name__}: {exc})") from None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(text)).strip("_") or "x"


def export_nifti(data: str | os.PathLike | xr.Dataset, out_dir: str | os.PathLike, variable: str = "signal",
                 scale: str = "stored", geometry: str | os.PathLike | xr.Dataset | None = None,
                 fill: float = 0.0, progress: bool = False) -> list[Path]:
    """Write ``variable`` back to NIfTI in the input space of an imported cohort, one file per field.

    ``variable`` has dims (*lead, z, y, x), (*lead, y, x) (grid) or (*lead, node) (graph); any
    leading dims (subject, visit, time, subtype, ...) are iterated. Files are named from the leading
    coordinates: ``{subject}_visit-{j}.nii.gz`` for the contract's signal, ``{subject}_time-2.5...``
    for other dims, suffixed ``_{variable}`` unless the variable is ``signal``. Fields that are all
    NaN (missing visits) are skipped. Each file is written atomically, float32, with the input
    grid's affine and shape; voxels outside the mask (grid), the slice, or the atlas regions (graph)
    get ``fill``. After an import with ``resolution`` the input grid is the resampled grid (no
    resampling back to the scans' original grids).

    Args:
        data: dataset or NetCDF path holding ``variable``.
        geometry: dataset or path with the import geometry (``affine``, attrs ``input_shape``,
            ``slice_axial``; ``atlas``/``node_label`` for graphs; normalisation attrs and
            ``reference_mean``); default ``data`` itself.
        scale: ``"stored"`` (values as stored), ``"suvr"`` (invert the [0, 1] scaling), or
            ``"image"`` (also multiply by each scan's reference mean: needs dims subject and visit).

    Returns:
        The written paths.
    """
    ds = _open_any(data, "data file")
    geo = ds if geometry is None else _open_any(geometry, "geometry file")
    _check_request(ds, geo, variable, scale)
    field = ds[variable]
    space = _geometry(geo, field, variable)
    lead = field.dims[:-space.n_space]
    job = _Export(ds, geo, field, variable, scale, space, lead, _reference_subjects(geo, field, variable, scale, lead))
    if scale != "stored":
        invert_normalisation(geo, np.zeros(1))  # fails early with a clear message

    values = np.asarray(field.values)
    jobs = _file_jobs(job, values.shape[: len(lead)])
    if scale == "image":
        for dim_values in ds["subject"].values:
            if str(dim_values) not in job.ref_subjects:
                raise ImagingError(f"subject {str(dim_values)!r} is not in the geometry's 'reference_mean'")

    out_dir = Path(out_dir)
    written = []
    from tqdm.auto import tqdm

    for index, name in tqdm(jobs, desc="export", unit="file", disable=not progress, leave=False):
        item = np.asarray(values[index], dtype=np.float64)
        if np.isnan(item).all():
            continue
        payload = _nifti_bytes(job, index, item, fill)
        written.append(atomic_write(out_dir / name, lambda tmp, payload=payload: Path(tmp).write_bytes(payload)))
    return written


def _check_request(ds: xr.Dataset, geo: xr.Dataset, variable: str, scale: str) -> None:
    """The variable exists, the scale is known, and the geometry comes from an import."""
    if variable not in ds:
        raise ImagingError(f"the data has no variable {variable!r}; variables: {', '.join(map(str, ds.data_vars))}")
    if scale not in ("stored", "suvr", "image"):
        raise ImagingError(f"scale must be 'stored', 'suvr' or 'image', got {scale!r}")
    for key in ("input_shape", "slice_axial"):
        if key not in geo.attrs:
            raise ImagingError(f"no attribute {key!r}: the geometry comes from a file written by 'pyrovae-pde "
                               "import' (pass it with --like DATA.nc)")
    if "affine" not in geo:
        raise ImagingError("no variable 'affine': the geometry comes from a file written by 'pyrovae-pde import' "
                           "(pass it with --like DATA.nc)")


def _geometry(geo: xr.Dataset, field: xr.DataArray, variable: str) -> _Geometry:
    """The input space, checked against the field's trailing (spatial or node) dims."""
    affine = np.asarray(geo["affine"].values, dtype=float)
    input_shape = tuple(int(s) for s in np.atleast_1d(geo.attrs["input_shape"]))
    zyx, ornt, _ = canonical_index(Grid(input_shape, affine, "input grid"))
    canonical_zyx_shape = zyx.shape
    slice_axial = int(geo.attrs["slice_axial"])
    if geo.attrs.get("domain") == "graph":
        if field.dims[-1:] != ("node",) or "atlas" not in geo or "node_label" not in geo:
            raise ImagingError(f"variable {variable!r} has dims {field.dims}; a graph export needs a last dim "
                               "'node' and the geometry's 'atlas' and 'node_label'")
        if field.sizes["node"] != geo.sizes["node"]:
            raise ImagingError(f"variable {variable!r} has {field.sizes['node']} nodes but the atlas has "
                               f"{geo.sizes['node']} regions")
        atlas_vol = np.asarray(geo["atlas"].values)
        node_of = np.full(int(atlas_vol.max()) + 1, -1, dtype=np.int64)
        node_of[np.asarray(geo["node_label"].values, dtype=np.int64)] = np.arange(geo.sizes["node"])
        return _Geometry(affine, ornt, canonical_zyx_shape, slice_axial, True, 1, painted=node_of[atlas_vol])
    spatial = ("y", "x") if slice_axial >= 0 else ("z", "y", "x")
    n_space = len(spatial)
    expect = canonical_zyx_shape[1:] if slice_axial >= 0 else canonical_zyx_shape
    if field.dims[-n_space:] != spatial or tuple(field.shape[-n_space:]) != tuple(expect):
        raise ImagingError(f"variable {variable!r} has dims {dict(field.sizes)}; expected last dims {spatial} "
                           f"of shape {tuple(expect)} to match the geometry")
    inside = np.asarray(geo["mask"].values) != 0 if "mask" in geo else None
    return _Geometry(affine, ornt, canonical_zyx_shape, slice_axial, False, n_space, inside=inside)


def _reference_subjects(geo: xr.Dataset, field: xr.DataArray, variable: str, scale: str,
                        lead: tuple[str, ...]) -> dict[str, int] | None:
    """For scale 'image': subject -> row of the geometry's ``reference_mean`` (else None)."""
    if scale != "image":
        return None
    if not {"subject", "visit"} <= set(lead) or "reference_mean" not in geo:
        raise ImagingError(f"scale 'image' needs a variable with dims subject and visit and the geometry's "
                           f"'reference_mean'; {variable!r} has dims {field.dims} (use scale 'suvr')")
    return {str(s): k for k, s in enumerate(geo["subject"].values)}


def _file_jobs(job: _Export, lead_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], str]]:
    """(index into the leading dims, file name) per field; names must be distinct."""
    jobs = [(index, _file_name(job, index) + ".nii.gz") for index in np.ndindex(*lead_shape)]
    names = [n for _, n in jobs]
    if len(set(names)) != len(names):
        raise ImagingError(f"two fields would be written to the same file name (e.g. {names[0]}); subject IDs "
                           "differ only in characters that are unsafe in file names")
    return jobs


def _file_name(job: _Export, index: tuple[int, ...]) -> str:
    """File stem from the leading coordinates (subject ID, ``dim-value`` or ``dim-index``)."""
    field, variable = job.field, job.variable
    parts = []
    for dim, k in zip(job.lead, index):
        if dim == "subject":
            parts.append(_safe(job.ds["subject"].values[k]))
        elif dim in field.coords and dim != "visit":
            value = field.coords[dim].values[k]
            parts.append(f"{_safe(dim)}-{_safe(f'{value:g}' if isinstance(value, (float, np.floating)) else value)}")
        else:
            parts.append(f"{_safe(dim)}-{k}")
    name = "_".join(parts) if parts else _safe(variable)
    if variable != "signal" and parts:
        name += f"_{_safe(variable)}"
    return name


def _nifti_bytes(job: _Export, index: tuple[int, ...], item: np.ndarray, fill: float) -> bytes:
    """One field, rescaled as asked, painted into the input grid and encoded as gzipped NIfTI."""
    geometry, geo = job.geometry, job.geo
    if job.scale != "stored":
        ref = None
        if job.scale == "image":
            k = job.ref_subjects[str(job.ds["subject"].values[index[job.lead.index("subject")]])]
            ref = float(geo["reference_mean"].values[k, index[job.lead.index("visit")]])
        item = invert_normalisation(geo, item, ref)
    if geometry.graph:
        canon = np.where(geometry.painted >= 0, item[np.maximum(geometry.painted, 0)], fill)
    else:
        if geometry.inside is not None:
            item = np.where(geometry.inside, item, fill)
        if geometry.slice_axial >= 0:
            canon = np.full(geometry.canonical_zyx_shape, fill, dtype=np.float64)
            canon[geometry.slice_axial] = item
        else:
            canon = item
    volume = apply_orientation(canon.transpose(2, 1, 0), ornt_transform(axcodes2ornt("RAS"), geometry.ornt))
    img = nib.Nifti1Image(np.ascontiguousarray(volume, dtype=np.float32), geometry.affine)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=1)
