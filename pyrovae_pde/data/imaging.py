"""Neuroimaging input and output: longitudinal PET NIfTI cohorts <-> the data contract.

* :func:`read_manifest` reads a cohort manifest (CSV: ``subject``, ``time`` or ``date``, ``image``),
  checks it against ``schemas/manifest-v1.schema.json`` and the rules in code (unique, ascending,
  nonnegative times per subject) before any image is read.
* :func:`import_cohort` loads the scans with nibabel, normalises them to SUVR by a reference
  region, scales the cohort to [0, 1] and returns a contract-v1 dataset: a grid (3-D, or one axial
  slice) or, with an atlas and a connectome, regional means on a graph.
* :func:`export_nifti` writes fields of a dataset (signal, fits, forecasts) back to NIfTI images in
  the input space, with the input grid's affine.

Normalisation (written into the output attrs so it inverts exactly)::

    SUVR   = image / reference_mean                    (per scan; mean over the reference region)
    signal = (SUVR - suvr_min) / (suvr_max - suvr_min)  (cohort constants; no clipping)
    image  = (signal * (suvr_max - suvr_min) + suvr_min) * reference_mean

By default ``suvr_min`` and ``suvr_max`` are the cohort's smallest and largest SUVR over the values
that go into the output (voxels inside the mask for grids, regional means for graphs), so the signal
spans [0, 1]; either can be fixed instead (e.g. ``suvr_min=1.0``, reference-level uptake).

Axes: the dataset's voxel axes are the input grid's voxel axes reoriented to the closest RAS+
orientation (flips and permutations only, no interpolation; ``nibabel.as_closest_canonical``) and
ordered (z, y, x), i.e. the transpose of nibabel's (i, j, k). The input grid's affine (variable
``affine``) and shape (attr ``input_shape``) are stored so :func:`export_nifti` can undo this.

This module is the public entry; the work is split by job:

* :mod:`.imaging_manifest`: reading and checking the manifest;
* :mod:`.imaging_grid`: opening NIfTI volumes, one common grid (checked or resampled), RAS+ axes;
* :mod:`.imaging_atlas`: region names and the connectome for graph output;
* :mod:`.imaging_space`: the import's options, grid, masks and output layout;
* :mod:`.imaging_suvr`: SUVR normalisation, cohort scaling and its inverse;
* :mod:`.imaging_dataset`: assembling the contract dataset;
* :mod:`.imaging_export`: :func:`export_nifti`.

No Pyro and no model code here: these modules only turn images into the contract and back.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd
import xarray as xr

from ..errors import ContractError, ImagingError
from .contract import validate_dataset
from .imaging_dataset import contract_dataset
from .imaging_export import export_nifti
from .imaging_manifest import DAYS_PER_YEAR, read_manifest, scan_where
from .imaging_space import (
    MNI_GM,
    ImportOptions,
    ImportPlan,
    brain_mask,
    canonical_space,
    choose_grid,
    layout_for,
    reference_voxels,
)
from .imaging_suvr import invert_normalisation, read_scans, scale_to_unit

__all__ = ["MNI_GM", "DAYS_PER_YEAR", "ImagingError", "ImagingWarning", "read_manifest", "import_cohort",
           "export_nifti", "invert_normalisation"]


class ImagingWarning(UserWarning):
    """Something was dropped or adjusted while importing (e.g. single-scan subjects)."""


def import_cohort(manifest: str | os.PathLike | pd.DataFrame, *, reference: str | os.PathLike,
                  mask: str | os.PathLike | None = None, resolution: float | None = None,
                  slice_axial: int | None = None, atlas: str | os.PathLike | None = None,
                  connectome: str | os.PathLike | None = None, labels: str | os.PathLike | None = None,
                  suvr_min: float | None = None, suvr_max: float | None = None, dtype: str = "float32",
                  progress: bool = True) -> xr.Dataset:
    """Import a longitudinal NIfTI cohort into a contract-v1 dataset (in memory; nothing is written).

    Args:
        manifest: manifest CSV path (see :func:`read_manifest`) or its DataFrame.
        reference: reference-region mask NIfTI (voxels > 0.5); each scan's SUVR is the image divided
            by its mean over this region.
        mask: brain mask NIfTI (voxels > 0.5 inside) or ``"mni-gm"`` (nilearn's MNI152 grey-matter
            mask, nearest-neighbour resampled onto the scans' grid: the scans must be in MNI space).
            Required for grid output; for graph output it restricts the regional means.
        resolution: voxel size (mm) of a grid every image (and mask, reference, atlas) is resampled
            onto with scipy.ndimage.affine_transform (trilinear for images, nearest for masks). Without
            it every image must share the grid (shape and affine) of the mask, atlas or first scan.
            With ``mask="mni-gm"`` the grid is exactly that of ``simulate mni-grid --resolution``.
        slice_axial: keep one axial slice (index along z of the RAS+ reoriented grid): 2-D output.
        atlas, connectome: label image (integers, 0 = background) and a regions x regions matrix
            (NPY, or CSV: plain numbers, or with a header row and index column of labels / names),
            rows in ascending label order. Output is then regional means on a graph.
        labels: optional CSV with columns label,name giving region names (default ``label_<n>``).
        suvr_min, suvr_max: fix the scaling constants (default: the cohort's minimum / maximum).
        dtype: ``"float32"`` (default; halves memory for large cohorts) or ``"float64"`` signal.
        progress: show a tqdm progress bar over scans (stderr).

    Returns:
        A validated contract dataset: grid signal (subject, visit, z, y, x) or (subject, visit, y, x),
        or graph signal (subject, visit, node); times in years; extra variables ``reference_mean``
        (subject, visit), ``image_file`` (subject, visit), ``affine`` (4 x 4, input grid), and for
        graphs ``atlas`` (z, y, x) and ``node_label``. Subjects with a single scan are dropped with an
        :class:`ImagingWarning`.
    """
    rows = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    source = rows.attrs.get("manifest", "manifest")
    options = ImportOptions(reference=reference, mask=mask, resolution=resolution, slice_axial=slice_axial,
                            atlas=atlas, connectome=connectome, labels=labels, suvr_min=suvr_min,
                            suvr_max=suvr_max, dtype=dtype, progress=progress)
    rows, single = _drop_single_scans(rows, source)
    _check_files_exist(rows, source, options)
    grid, resampled = choose_grid(rows, source, options)
    brain = brain_mask(options, grid)  # masks on the grid (input voxel order i, j, k)
    ref_idx = reference_voxels(options, grid)
    space = canonical_space(grid, resampled)
    plan = ImportPlan(source, options, space, ref_idx, layout_for(options, space, brain))
    values = read_scans(rows, plan)
    signal, scaling = scale_to_unit(values, plan)
    ds = contract_dataset(plan, values, signal, scaling, single)
    try:
        validate_dataset(ds, source=f"import of {source}")
    except ContractError as exc:
        raise ImagingError(str(exc)) from None
    return ds


def _drop_single_scans(rows: pd.DataFrame, source: str) -> tuple[pd.DataFrame, list[str]]:
    """Drop subjects with one scan (no dynamics), with a warning, before reading anything."""
    counts = rows.groupby("subject", sort=False).size()
    single = [str(s) for s, c in counts.items() if c < 2]
    if single:
        warnings.warn(f"{source}: dropped {len(single)} subject(s) with a single scan (nothing to learn "
                      f"from): {', '.join(single)}", ImagingWarning, stacklevel=3)
        rows = rows[~rows["subject"].isin(single)]
    if rows.empty:
        raise ImagingError(f"{source}: no subject has two or more scans; a longitudinal cohort needs at least "
                           "one subject with repeated scans")
    return rows, single


def _check_files_exist(rows: pd.DataFrame, source: str, options: ImportOptions) -> None:
    """Every scan, the mask, the reference region and the atlas exist (before any is read)."""
    for row in rows.itertuples():
        if not Path(row.image).is_file():
            raise ImagingError(f"{scan_where(source, row)}: image file not found ({row.image})")
    mask = None if options.mni else options.mask
    for name, value in (("mask", mask), ("reference region", options.reference), ("atlas", options.atlas)):
        if value is not None and not Path(value).is_file():
            raise ImagingError(f"{name} {value}: file not found")
