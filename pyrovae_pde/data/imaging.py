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

No Pyro and no model code here: this module only turns images into the contract and back.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gzip
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jsonschema
import nibabel as nib
import numpy as np
import pandas as pd
import xarray as xr
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from .contract import SCHEMA_VERSION, ContractError, atomic_write, load_schema, validate_dataset

MNI_GM = "mni-gm"
DAYS_PER_YEAR = 365.25
_AFFINE_ATOL_MM = 1e-3  # NIfTI stores affines in float32; differences below this are rounding


class ImagingError(ValueError):
    """A manifest, image, mask, atlas or connectome is unusable; the message names the file and scan."""


class ImagingWarning(UserWarning):
    """Something was dropped or adjusted while importing (e.g. single-scan subjects)."""


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------

def _schema_row_message(error: jsonschema.ValidationError) -> str:
    field = error.absolute_path[1] if len(error.absolute_path) > 1 else None
    if error.validator == "oneOf":
        return "give exactly one of 'time' or 'date' (both or neither are filled)"
    if error.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        return f"the {missing[0] if missing else 'required'!r} cell is empty"
    if field == "time" and error.validator == "minimum":
        return (f"negative time {error.instance}; times must be >= 0 (years since the subject's "
                "first scan)")
    if field == "time" and error.validator == "type":
        return f"time {error.instance!r} is not a number (years since the subject's first scan)"
    if field == "date":
        return f"date {error.instance!r} is not an ISO date (YYYY-MM-DD)"
    if field is not None:
        return f"column {field!r}: {error.message}"
    return error.message


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a cohort manifest CSV (schema ``manifest-v1``) without reading any image.

    Returns one row per scan in file order with columns ``subject`` (str), ``visit`` (int, 0-based
    index within the subject), ``time`` (float, years), ``date`` (str, "" if times were given),
    ``image`` (path resolved against the manifest's folder), ``image_given`` (as written) and
    ``line`` (line number in the CSV). ``DataFrame.attrs["manifest"]`` holds the path.

    Raises :class:`ImagingError` naming the line and subject for: a missing column, an empty cell,
    time and date both or neither given, a negative or non-numeric time, a bad date, duplicate
    (subject, time), or a subject whose rows are not in ascending time order.
    """
    path = Path(path)
    if not path.is_file():
        raise ImagingError(f"{path}: manifest file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            raw_rows, lines = [], []
            for record in reader:
                if None in record:
                    raise ImagingError(f"{path}: line {reader.line_num} has more cells than the header "
                                       f"({len(header)} columns)")
                cells = {k: (v or "").strip() for k, v in record.items()}
                if not any(cells.values()):
                    continue
                raw_rows.append(cells)
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ImagingError(f"{path}: not a readable CSV manifest ({exc})") from None
    if not header:
        raise ImagingError(f"{path}: empty manifest; expected a header row with columns subject, "
                           "time (or date), image")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ImagingError(f"{path}: column(s) {', '.join(map(repr, dupes))} appear more than once in the header")
    missing = [c for c in ("subject", "image") if c not in header]
    if missing or not ({"time", "date"} & set(header)):
        need = missing + ([] if {"time", "date"} & set(header) else ["time (or date)"])
        raise ImagingError(f"{path}: the header lacks column(s) {', '.join(need)}; a manifest needs "
                           f"subject, time (or date) and image (found: {', '.join(header)})")
    if not raw_rows:
        raise ImagingError(f"{path}: the manifest has a header but no scans")

    rows = []
    for cells in raw_rows:
        row = {k: v for k, v in cells.items() if v != ""}
        if "time" in row:
            try:
                value = float(row["time"])
            except ValueError:
                value = None
            if value is not None and math.isfinite(value):
                row["time"] = value
        rows.append(row)

    validator = jsonschema.Draft202012Validator(load_schema("manifest-v1"))
    errors = list(validator.iter_errors(rows))
    if errors:
        def key(e):
            return (e.absolute_path[0] if e.absolute_path else -1, len(e.absolute_path))
        error = min(errors, key=key)
        if not error.absolute_path:
            raise ImagingError(f"{path}: {error.message}")
        i = error.absolute_path[0]
        raise ImagingError(f"{path}: line {lines[i]} (subject {rows[i].get('subject', '?')!r}): "
                           f"{_schema_row_message(error)}")

    dates: list[_dt.date | None] = []
    for row, line in zip(rows, lines):
        if "date" in row:
            try:
                dates.append(_dt.date.fromisoformat(row["date"]))
            except ValueError:
                raise ImagingError(f"{path}: line {line} (subject {row['subject']!r}): date {row['date']!r} "
                                   "is not a valid calendar date (YYYY-MM-DD)") from None
        else:
            dates.append(None)

    by_subject: dict[str, list[int]] = {}
    for k, row in enumerate(rows):
        by_subject.setdefault(row["subject"], []).append(k)
    times = np.zeros(len(rows))
    visits = np.zeros(len(rows), dtype=int)
    for subject, idx in by_subject.items():
        kinds = {"date" in rows[k] for k in idx}
        if len(kinds) > 1:
            raise ImagingError(f"{path}: subject {subject!r} mixes 'time' and 'date' rows (lines "
                               f"{', '.join(str(lines[k]) for k in idx)}); use one of them for all its scans")
        if "date" in rows[idx[0]]:
            first = dates[idx[0]]
            keys = [dates[k] for k in idx]
            values = [(d - first).days / DAYS_PER_YEAR for d in keys]
            shown = [rows[k]["date"] for k in idx]
            unit = "date"
        else:
            keys = values = [rows[k]["time"] for k in idx]
            shown = [f"{v:g}" for v in values]
            unit = "time"
        seen: dict = {}
        for k, key_, text in zip(idx, keys, shown):
            if key_ in seen:
                raise ImagingError(f"{path}: subject {subject!r} has two scans at {unit} {text} (lines "
                                   f"{lines[seen[key_]]} and {lines[k]}); (subject, {unit}) must be unique")
            seen[key_] = k
        for a in range(1, len(idx)):
            if keys[a] < keys[a - 1]:
                raise ImagingError(
                    f"{path}: subject {subject!r}, line {lines[idx[a]]}: {unit} {shown[a]} comes after "
                    f"{unit} {shown[a - 1]} (line {lines[idx[a - 1]]}); the times are unsorted: list each "
                    "subject's scans in ascending time order")
        times[idx] = values
        visits[idx] = np.arange(len(idx))

    base = path.parent
    images = [row["image"] for row in rows]
    frame = pd.DataFrame({
        "subject": [row["subject"] for row in rows],
        "visit": visits,
        "time": times,
        "date": [row.get("date", "") for row in rows],
        "image": [str(Path(p) if Path(p).is_absolute() else base / p) for p in images],
        "image_given": images,
        "line": lines,
    })
    frame.attrs["manifest"] = str(path)
    return frame


# --------------------------------------------------------------------------------------------
# Grids and images
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray
    source: str


def _fmt_vec(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _open_nifti(path: str | os.PathLike, where: str) -> nib.Nifti1Pair:
    """nibabel image of a 3-D NIfTI file (a trailing axis of length 1 is allowed)."""
    if not Path(path).is_file():
        raise ImagingError(f"{where}: file not found ({path})")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many kinds for unreadable files
        raise ImagingError(f"{where}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, nib.Nifti1Pair):
        raise ImagingError(f"{where}: a {type(img).__name__} image, not NIfTI; convert it to .nii or .nii.gz")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        return img
    if len(shape) != 3:
        extra = f" with {shape[3]} frames" if len(shape) == 4 else ""
        raise ImagingError(f"{where}: a {len(shape)}-D image of shape {tuple(shape)}{extra}; each scan must be "
                           "one 3-D volume (average or split the frames first, e.g. with fslmaths -Tmean)")
    return img


def _read_data(img: nib.Nifti1Pair, where: str) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise ImagingError(f"{where}: could not read the image data ({type(exc).__name__}: {exc})") from None
    return data.reshape(data.shape[:3]) if data.ndim == 4 else data


def _grid_of(img: nib.Nifti1Pair, source: str) -> _Grid:
    return _Grid(tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=float), source)


def _check_grid(img: nib.Nifti1Pair, grid: _Grid, where: str) -> None:
    shape = tuple(int(s) for s in img.shape[:3])
    affine = np.asarray(img.affine, dtype=float)
    if shape == grid.shape and np.allclose(affine, grid.affine, rtol=0, atol=_AFFINE_ATOL_MM):
        return
    if shape != grid.shape:
        what = f"shape {shape} differs from {grid.shape}"
    else:
        sizes, ref_sizes = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(grid.affine[:3, :3], axis=0)
        what = (f"affine differs (voxel size {_fmt_vec(sizes)} vs {_fmt_vec(ref_sizes)} mm, origin "
                f"{_fmt_vec(affine[:3, 3])} vs {_fmt_vec(grid.affine[:3, 3])} mm; max difference "
                f"{np.abs(affine - grid.affine).max():.4g})")
    raise ImagingError(f"{where}: grid mismatch with {grid.source}: {what}; every image must share the "
                       "shape and affine of the mask (or first scan), or pass --resolution MM to resample "
                       "all images onto one grid")


def _resample(data: np.ndarray, src_affine: np.ndarray, grid: _Grid, order: int, cval: float) -> np.ndarray:
    """Resample a volume onto ``grid`` with scipy.ndimage.affine_transform (order 1 trilinear, 0 nearest)."""
    from scipy.ndimage import affine_transform

    vox = np.linalg.inv(src_affine) @ grid.affine  # target voxel -> source voxel
    return affine_transform(np.asarray(data, dtype=np.float64), vox[:3, :3], offset=vox[:3, 3],
                            output_shape=grid.shape, order=order, mode="constant", cval=cval, prefilter=False)


def _volume_on_grid(path: str | os.PathLike, where: str, grid: _Grid, resample: bool, order: int,
                    cval: float = 0.0) -> np.ndarray:
    """The 3-D data of a NIfTI file on ``grid``: checked against it, or resampled onto it."""
    img = _open_nifti(path, where)
    data = _read_data(img, where)
    if resample:
        return _resample(data, np.asarray(img.affine, dtype=float), grid, order, cval)
    _check_grid(img, grid, where)
    return data


def _binary(data: np.ndarray) -> np.ndarray:
    """Mask volume -> bool (voxels > 0.5 are inside: binary masks and probability maps both work)."""
    return np.nan_to_num(np.asarray(data, dtype=float), nan=0.0) > 0.5


def _mni_gm_on(grid: _Grid) -> np.ndarray:
    try:
        from nilearn.datasets import load_mni152_gm_mask
    except ImportError:
        raise ImagingError("--mask mni-gm needs nilearn: pip install 'pyrovae_pde[mni]'") from None
    img = load_mni152_gm_mask()
    return _binary(_resample(np.asarray(img.dataobj), np.asarray(img.affine, float), grid, order=0, cval=0.0))


def _canonical_index(grid: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(zyx, ornt, canonical affine): zyx[z, y, x] is the flat (C-order) input voxel index."""
    ornt = io_orientation(grid.affine)
    index = np.arange(int(np.prod(grid.shape)), dtype=np.int64).reshape(grid.shape)
    canonical = apply_orientation(index, ornt)
    affine = grid.affine @ inv_ornt_aff(ornt, grid.shape)
    return np.ascontiguousarray(canonical.transpose(2, 1, 0)), ornt, affine


def _axis_coords(canonical_affine: np.ndarray, shape_ijk: Sequence[int]) -> tuple[dict[str, np.ndarray], bool]:
    """Coordinates (mm) of the canonical axes x, y, z; world mm when the affine is axis-aligned."""
    lin = canonical_affine[:3, :3]
    aligned = np.allclose(lin, np.diag(np.diag(lin)), atol=1e-6 * np.abs(lin).max())
    sizes = np.linalg.norm(lin, axis=0)
    coords = {}
    for axis, name in enumerate("xyz"):
        coords[name] = canonical_affine[axis, 3] + sizes[axis] * np.arange(shape_ijk[axis], dtype=float)
    return coords, aligned


# --------------------------------------------------------------------------------------------
# Atlas and connectome
# --------------------------------------------------------------------------------------------

def _read_label_names(path: str | os.PathLike | None, labels: np.ndarray) -> list[str]:
    if path is None:
        return [f"label_{int(k)}" for k in labels]
    path = Path(path)
    if not path.is_file():
        raise ImagingError(f"labels file {path}: file not found")
    try:
        table = pd.read_csv(path)
    except Exception as exc:
        raise ImagingError(f"labels file {path}: not a readable CSV ({exc})") from None
    if not {"label", "name"} <= set(table.columns):
        raise ImagingError(f"labels file {path}: needs columns 'label' and 'name' (found {', '.join(map(str, table.columns))})")
    try:
        mapping = {int(k): str(v).strip() for k, v in zip(table["label"], table["name"])}
    except (TypeError, ValueError):
        raise ImagingError(f"labels file {path}: column 'label' must hold integer atlas labels") from None
    names = [mapping.get(int(k), f"label_{int(k)}") for k in labels]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ImagingError(f"labels file {path}: region names must be unique; repeated: {', '.join(dupes[:5])}")
    return names


def _load_connectome(path: str | os.PathLike, labels: np.ndarray, names: list[str], atlas_name: str) -> np.ndarray:
    """Connectome (R, R) with rows/cols in ascending atlas-label order, diagonal set to 0."""
    path = Path(path)
    where = f"connectome {path}"
    if not path.is_file():
        raise ImagingError(f"{where}: file not found")
    keys = None
    try:
        if path.suffix.lower() == ".npy":
            matrix = np.load(path, allow_pickle=False)
        else:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            try:
                matrix = np.loadtxt(path, delimiter=delimiter, ndmin=2)
            except ValueError:  # a header row / index column of labels or region names
                table = pd.read_csv(path, sep=delimiter, index_col=0)
                keys = [str(c).strip() for c in table.columns]
                rows = [str(r).strip() for r in table.index]
                if rows != keys:
                    raise ImagingError(f"{where}: the row labels (first column) and the header must list the same "
                                       "regions in the same order") from None
                matrix = table.to_numpy(dtype=float)
    except ImagingError:
        raise
    except Exception as exc:
        raise ImagingError(f"{where}: not a readable connectome (CSV or NPY matrix): {type(exc).__name__}: {exc}") from None
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ImagingError(f"{where}: expected a square regions x regions matrix, got shape {matrix.shape}")
    label_list = [int(k) for k in labels]
    if keys is not None:
        name_to_label = dict(zip(names, label_list))
        keyed = []
        for key in keys:
            if key in name_to_label:
                keyed.append(name_to_label[key])
            else:
                try:
                    keyed.append(int(float(key)))
                except ValueError:
                    raise ImagingError(f"{where}: region {key!r} in the header is neither an atlas label "
                                       "number nor a region name from the labels file") from None
        absent = [k for k in label_list if k not in keyed]
        if absent:
            raise ImagingError(f"{where}: atlas labels missing from the connectome: {absent[:20]} (present in "
                               f"{atlas_name}); give one row and column per atlas label")
        extra = [k for k in keyed if k not in label_list]
        if extra:
            raise ImagingError(f"{where}: connectome regions {extra[:20]} are not labels of {atlas_name} (or have "
                               "no voxel inside the mask); remove them or fix the atlas")
        order = [keyed.index(k) for k in label_list]
        matrix = matrix[np.ix_(order, order)]
    elif matrix.shape[0] != len(label_list):
        if matrix.shape[0] < len(label_list):
            raise ImagingError(
                f"{where}: atlas labels missing from the connectome: {atlas_name} has {len(label_list)} labels "
                f"{_short(label_list)} but the connectome is {matrix.shape[0]} x {matrix.shape[0]}; rows are taken "
                f"in ascending label order, so labels {_short(label_list[matrix.shape[0]:])} would have no row. "
                "Give one row per atlas label (or a CSV with a header naming the labels)")
        raise ImagingError(f"{where}: the connectome is {matrix.shape[0]} x {matrix.shape[0]} but {atlas_name} has "
                           f"only {len(label_list)} labels {_short(label_list)} (inside the mask); give one row per "
                           "atlas label in ascending label order")
    if not np.isfinite(matrix).all():
        raise ImagingError(f"{where}: NaN or inf entries; use 0 for no connection")
    if (matrix < 0).any():
        i, j = np.argwhere(matrix < 0)[0]
        raise ImagingError(f"{where}: negative weight between labels {label_list[i]} and {label_list[j]}; "
                           "weights must be >= 0")
    if not np.allclose(matrix, matrix.T, rtol=1e-6, atol=1e-10):
        i, j = np.unravel_index(np.argmax(np.abs(matrix - matrix.T)), matrix.shape)
        raise ImagingError(f"{where}: not symmetric (labels {label_list[i]} -> {label_list[j]} differs from "
                           "the reverse); symmetrise it, e.g. (C + C.T) / 2")
    matrix = 0.5 * (matrix + matrix.T)
    np.fill_diagonal(matrix, 0.0)
    return matrix


def _short(values: Sequence[int], n: int = 12) -> str:
    values = list(values)
    text = ", ".join(str(v) for v in values[:n])
    return f"[{text}{', ...' if len(values) > n else ''}]"


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------

def _scan_where(source: str, row) -> str:
    return (f"{source} line {row.line}: subject {row.subject!r}, visit {row.visit} (time {row.time:g} y), "
            f"image {row.image_given!r}")


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
    from tqdm.auto import tqdm

    rows = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    source = rows.attrs.get("manifest", "manifest")
    graph = atlas is not None or connectome is not None
    if graph and (atlas is None or connectome is None):
        raise ImagingError("graph output needs both --atlas (label image) and --connectome (regions x regions)")
    if graph and slice_axial is not None:
        raise ImagingError("--slice applies to grid output only; drop it when using --atlas/--connectome")
    if not graph and mask is None:
        raise ImagingError("grid output needs a brain mask: --mask FILE or --mask mni-gm")
    if resolution is not None and not (math.isfinite(resolution) and resolution > 0):
        raise ImagingError(f"--resolution must be a positive number of mm, got {resolution}")
    if dtype not in ("float32", "float64"):
        raise ImagingError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    mni = isinstance(mask, str) and mask == MNI_GM

    # Subjects with one scan carry no dynamics: drop them before reading anything.
    counts = rows.groupby("subject", sort=False).size()
    single = [str(s) for s, c in counts.items() if c < 2]
    if single:
        warnings.warn(f"{source}: dropped {len(single)} subject(s) with a single scan (nothing to learn "
                      f"from): {', '.join(single)}", ImagingWarning, stacklevel=2)
        rows = rows[~rows["subject"].isin(single)]
    if rows.empty:
        raise ImagingError(f"{source}: no subject has two or more scans; a longitudinal cohort needs at least "
                           "one subject with repeated scans")
    for row in rows.itertuples():
        if not Path(row.image).is_file():
            raise ImagingError(f"{_scan_where(source, row)}: image file not found ({row.image})")
    for name, value in (("mask", None if mni else mask), ("reference region", reference), ("atlas", atlas)):
        if value is not None and not Path(value).is_file():
            raise ImagingError(f"{name} {value}: file not found")

    # The grid everything lives on.
    first = rows.iloc[0]
    resample = resolution is not None
    if not resample:
        if mask is not None and not mni:
            grid = _grid_of(_open_nifti(mask, f"mask {mask}"), f"the mask {mask}")
        elif graph:
            grid = _grid_of(_open_nifti(atlas, f"atlas {atlas}"), f"the atlas {atlas}")
        else:
            grid = _grid_of(_open_nifti(first["image"], _scan_where(source, next(rows.itertuples()))),
                            f"the first scan {first['image_given']!r}")
        resampled = "no (all images share one grid)"
    else:
        if mni:
            from .simulate import mni_gm_mask

            volume, spacing, origin = mni_gm_mask(resolution)
            affine = np.diag([spacing, spacing, spacing, 1.0])
            affine[:3, 3] = origin[::-1]
            grid = _Grid(tuple(int(s) for s in volume.shape[::-1]), affine, f"the {resolution:g} mm MNI grid")
        else:
            src_path, what = (mask, "mask") if mask is not None else (atlas, "atlas") if graph else (first["image"], "first scan")
            src = _open_nifti(src_path, f"{what} {src_path}")
            from nibabel.processing import vox2out_vox

            shape, affine = vox2out_vox((src.shape[:3], src.affine), voxel_sizes=(resolution,) * 3)
            grid = _Grid(tuple(int(s) for s in shape), np.asarray(affine, float),
                         f"the {resolution:g} mm grid covering the {what}")
        resampled = (f"scipy.ndimage.affine_transform onto a {resolution:g} mm RAS grid: order 1 (trilinear) "
                     "for images, order 0 (nearest) for mask, reference and atlas")

    # Masks on the grid (input voxel order i, j, k).
    if mask is None:
        brain = None
    elif mni:
        brain = _mni_gm_on(grid)
        if not brain.any():
            raise ImagingError(f"--mask mni-gm: the MNI152 grey-matter mask does not overlap {grid.source}; are the "
                               "scans in MNI space? Otherwise give --mask FILE")
    else:
        brain = _binary(_volume_on_grid(mask, f"mask {mask}", grid, resample, order=0))
        if not brain.any():
            raise ImagingError(f"mask {mask}: no voxel is inside (> 0.5) on {grid.source}")
    ref = _binary(_volume_on_grid(reference, f"reference region {reference}", grid, resample, order=0))
    if not ref.any():
        raise ImagingError(f"reference region {reference}: the reference region is empty (no voxel > 0.5"
                           f"{' after resampling' if resample else ''}); SUVR needs a nonempty reference region")
    ref_idx = np.nonzero(ref)

    zyx, ornt, canonical_affine = _canonical_index(grid)
    canonical_shape = zyx.shape[::-1]  # (i, j, k) after reorientation
    coords, aligned = _axis_coords(canonical_affine, canonical_shape)

    if graph:
        atlas_vol = np.rint(np.nan_to_num(np.asarray(
            _volume_on_grid(atlas, f"atlas {atlas}", grid, resample, order=0), dtype=float))).astype(np.int64)
        atlas_labels = np.unique(atlas_vol[atlas_vol > 0])
        if atlas_labels.size == 0:
            raise ImagingError(f"atlas {atlas}: no positive labels (0 is background)")
        region_vox = atlas_vol > 0
        if brain is not None:
            region_vox &= brain
            inside = np.unique(atlas_vol[region_vox])
            outside = np.setdiff1d(atlas_labels, inside)
            if outside.size:
                raise ImagingError(f"atlas {atlas}: labels {_short(outside.tolist())} have no voxel inside the mask "
                                   f"{mask}; remove them from the atlas and connectome or use a larger mask")
        src_idx = np.nonzero(region_vox)
        region_of = np.searchsorted(atlas_labels, atlas_vol[src_idx])
        voxels_per_region = np.bincount(region_of, minlength=atlas_labels.size).astype(float)
        names = _read_label_names(labels, atlas_labels)
        adjacency = _load_connectome(connectome, atlas_labels, names, f"atlas {atlas}")
        n_values = atlas_labels.size
        out_sel = None
    else:
        if slice_axial is not None:
            if not 0 <= slice_axial < zyx.shape[0]:
                raise ImagingError(f"--slice axial:{slice_axial} is outside 0..{zyx.shape[0] - 1} on {grid.source}")
            zyx = zyx[slice_axial]
        active = brain.reshape(-1)[zyx.reshape(-1)]
        if not active.any():
            raise ImagingError(f"--slice axial:{slice_axial}: the mask has no voxel in this slice")
        out_sel = np.flatnonzero(active)
        src_idx = np.unravel_index(zyx.reshape(-1)[out_sel], grid.shape)
        n_values = out_sel.size
    spatial_shape = zyx.shape if not graph else (n_values,)

    subjects = list(dict.fromkeys(rows["subject"]))
    subject_index = {s: i for i, s in enumerate(subjects)}
    n_sub, n_vis = len(subjects), int(rows["visit"].max()) + 1
    times = np.full((n_sub, n_vis), np.nan)
    reference_mean = np.full((n_sub, n_vis), np.nan)
    image_file = np.full((n_sub, n_vis), "", dtype=object)
    store = np.float64 if graph else np.dtype(dtype)
    signal = np.zeros((n_sub, n_vis, int(np.prod(spatial_shape))), dtype=store)
    lo, hi = np.inf, -np.inf

    with tqdm(total=len(rows), desc="import", unit="scan", disable=not progress, leave=False) as bar:
        for row in rows.itertuples():
            where = _scan_where(source, row)
            data = _volume_on_grid(row.image, where, grid, resample, order=1, cval=np.nan)
            ref_values = np.asarray(data[ref_idx], dtype=np.float64)
            if not np.isfinite(ref_values).all():
                raise ImagingError(f"{where}: {int((~np.isfinite(ref_values)).sum())} NaN/inf voxels inside the "
                                   f"reference region {reference}")
            ref_mean = float(ref_values.mean())
            if not ref_mean > 0:
                raise ImagingError(f"{where}: mean over the reference region {reference} is {ref_mean:g}; SUVR "
                                   "needs a positive reference uptake")
            values = np.asarray(data[src_idx], dtype=np.float64)
            bad = ~np.isfinite(values)
            if bad.any():
                k = int(np.argmax(bad))
                voxel = tuple(int(ax[k]) for ax in src_idx)
                region = "atlas regions" if graph else "mask"
                hint = " (after resampling: does the image cover the mask?)" if resample else ""
                raise ImagingError(f"{where}: {int(bad.sum())} NaN/inf voxels inside the {region}{hint}, first at "
                                   f"voxel (i, j, k) = {voxel}; fill or mask them before importing")
            suvr = values / ref_mean
            i, j = subject_index[row.subject], row.visit
            if graph:
                suvr = np.bincount(region_of, weights=suvr, minlength=n_values) / voxels_per_region
                signal[i, j] = suvr
            else:
                signal[i, j, out_sel] = suvr
            lo, hi = min(lo, float(suvr.min())), max(hi, float(suvr.max()))
            times[i, j], reference_mean[i, j], image_file[i, j] = row.time, ref_mean, str(row.image)
            bar.update()

    lo_rule = "given" if suvr_min is not None else ("cohort minimum of the regional mean SUVRs" if graph
                                                     else "cohort minimum SUVR inside the mask")
    hi_rule = "given" if suvr_max is not None else ("cohort maximum of the regional mean SUVRs" if graph
                                                     else "cohort maximum SUVR inside the mask")
    lo = float(suvr_min) if suvr_min is not None else lo
    hi = float(suvr_max) if suvr_max is not None else hi
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ImagingError(f"{source}: cannot scale SUVR to [0, 1]: suvr_max ({hi:g}, {hi_rule}) must be greater "
                           f"than suvr_min ({lo:g}, {lo_rule})")
    present = ~np.isnan(times)
    scale = hi - lo
    for i, j in np.argwhere(present):
        if graph:
            signal[i, j] = (signal[i, j] - lo) / scale
        else:
            signal[i, j, out_sel] = (signal[i, j, out_sel].astype(np.float64) - lo) / scale
    signal[~present] = np.nan
    if graph:
        signal = signal.astype(dtype)
    signal = signal.reshape(n_sub, n_vis, *spatial_shape)

    attrs = {
        "schema_version": SCHEMA_VERSION,
        "domain": "graph" if graph else "grid",
        "time_unit": "year",
        "source": "pyrovae-pde import (NIfTI cohort)",
        "manifest": str(source),
        "normalisation": "suvr",
        "normalisation_formula": "signal = (image / reference_mean - suvr_min) / (suvr_max - suvr_min)",
        "normalisation_inverse": "image = (signal * (suvr_max - suvr_min) + suvr_min) * reference_mean",
        "suvr_min": lo,
        "suvr_max": hi,
        "suvr_min_rule": lo_rule,
        "suvr_max_rule": hi_rule,
        "reference_region": str(reference),
        "mask": ("mni-gm: nilearn MNI152 grey-matter mask, nearest-neighbour onto the grid" if mni
                 else str(mask) if mask is not None else "none"),
        "resampled": resampled,
        "input_shape": np.asarray(grid.shape, dtype=np.int64),
        "input_axcodes": "".join(nib.aff2axcodes(grid.affine)),
        "axis_order": ("voxel axes reoriented to RAS+ (nibabel.as_closest_canonical: flips/permutations only) "
                       "and ordered (z, y, x) = canonical (k, j, i); variable 'affine' is the input grid's "
                       "voxel-to-world affine (mm) with shape attr 'input_shape'"),
        "grid_coordinates": ("world mm (RAS)" if aligned else
                             "mm along the voxel axes from the first voxel (oblique affine; see 'affine')"),
        "slice_axial": int(slice_axial) if slice_axial is not None else -1,
        "dropped_subjects": ", ".join(single),
    }
    variables = {
        "time": (("subject", "visit"), times),
        "reference_mean": (("subject", "visit"), reference_mean),
        "image_file": (("subject", "visit"), image_file),
        "affine": (("affine_row", "affine_col"), grid.affine.astype(np.float64)),
    }
    ds_coords = {"subject": np.array(subjects, dtype=object)}
    if graph:
        variables["signal"] = (("subject", "visit", "node"), signal)
        variables["adjacency"] = (("node", "neighbor"), adjacency)
        variables["node_label"] = (("node",), atlas_labels.astype(np.int64))
        atlas_out = np.where(region_vox, atlas_vol, 0).reshape(-1)[zyx.reshape(-1)].reshape(zyx.shape)
        variables["atlas"] = (("z", "y", "x"), atlas_out.astype(np.int32))
        ds_coords.update(node=np.array(names, dtype=object), neighbor=np.array(names, dtype=object))
        attrs["atlas"] = str(atlas)
        attrs["connectome"] = str(connectome)
        attrs["regional_value"] = "mean over the region's voxels (inside the mask, if any) of the SUVR"
    else:
        dims = ("z", "y", "x") if slice_axial is None else ("y", "x")
        variables["signal"] = (("subject", "visit", *dims), signal)
        mask_flat = np.zeros(int(np.prod(spatial_shape)), np.int8)
        mask_flat[out_sel] = 1
        variables["mask"] = (dims, mask_flat.reshape(spatial_shape))
        ds_coords.update({d: coords[d] for d in dims})
        if slice_axial is not None:
            attrs["slice_z_mm"] = float(coords["z"][slice_axial])
        sizes = np.linalg.norm(canonical_affine[:3, :3], axis=0)
        attrs["voxel_size_mm"] = sizes[::-1].astype(float)  # (z, y, x)
    ds = xr.Dataset(variables, coords=ds_coords, attrs=attrs)
    try:
        validate_dataset(ds, source=f"import of {source}")
    except ContractError as exc:
        raise ImagingError(str(exc)) from None
    return ds


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

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
    affine = np.asarray(geo["affine"].values, dtype=float)
    input_shape = tuple(int(s) for s in np.atleast_1d(geo.attrs["input_shape"]))
    grid = _Grid(input_shape, affine, "input grid")
    zyx, ornt, _ = _canonical_index(grid)
    canonical_zyx_shape = zyx.shape
    slice_axial = int(geo.attrs["slice_axial"])
    graph = geo.attrs.get("domain") == "graph"

    field = ds[variable]
    if graph:
        if field.dims[-1:] != ("node",) or "atlas" not in geo or "node_label" not in geo:
            raise ImagingError(f"variable {variable!r} has dims {field.dims}; a graph export needs a last dim "
                               "'node' and the geometry's 'atlas' and 'node_label'")
        if field.sizes["node"] != geo.sizes["node"]:
            raise ImagingError(f"variable {variable!r} has {field.sizes['node']} nodes but the atlas has "
                               f"{geo.sizes['node']} regions")
        n_space = 1
        atlas_vol = np.asarray(geo["atlas"].values)
        node_of = np.full(int(atlas_vol.max()) + 1, -1, dtype=np.int64)
        node_of[np.asarray(geo["node_label"].values, dtype=np.int64)] = np.arange(geo.sizes["node"])
        painted = node_of[atlas_vol]
    else:
        spatial = ("y", "x") if slice_axial >= 0 else ("z", "y", "x")
        n_space = len(spatial)
        expect = canonical_zyx_shape[1:] if slice_axial >= 0 else canonical_zyx_shape
        if field.dims[-n_space:] != spatial or tuple(field.shape[-n_space:]) != tuple(expect):
            raise ImagingError(f"variable {variable!r} has dims {dict(field.sizes)}; expected last dims {spatial} "
                               f"of shape {tuple(expect)} to match the geometry")
        inside = np.asarray(geo["mask"].values) != 0 if "mask" in geo else None
    lead = field.dims[:-n_space]
    if scale == "image":
        if not {"subject", "visit"} <= set(lead) or "reference_mean" not in geo:
            raise ImagingError(f"scale 'image' needs a variable with dims subject and visit and the geometry's "
                               f"'reference_mean'; {variable!r} has dims {field.dims} (use scale 'suvr')")
        ref_subjects = {str(s): k for k, s in enumerate(geo["subject"].values)}
    if scale != "stored":
        invert_normalisation(geo, np.zeros(1))  # fails early with a clear message

    values = np.asarray(field.values)
    jobs = []
    for index in np.ndindex(*values.shape[: len(lead)]):
        parts = []
        for dim, k in zip(lead, index):
            if dim == "subject":
                parts.append(_safe(ds["subject"].values[k]))
            elif dim in field.coords and dim != "visit":
                value = field.coords[dim].values[k]
                parts.append(f"{_safe(dim)}-{_safe(f'{value:g}' if isinstance(value, (float, np.floating)) else value)}")
            else:
                parts.append(f"{_safe(dim)}-{k}")
        name = "_".join(parts) if parts else _safe(variable)
        if variable != "signal" and parts:
            name += f"_{_safe(variable)}"
        jobs.append((index, name + ".nii.gz"))
    names = [n for _, n in jobs]
    if len(set(names)) != len(names):
        raise ImagingError(f"two fields would be written to the same file name (e.g. {names[0]}); subject IDs "
                           "differ only in characters that are unsafe in file names")
    if scale == "image":
        for dim_values in ds["subject"].values:
            if str(dim_values) not in ref_subjects:
                raise ImagingError(f"subject {str(dim_values)!r} is not in the geometry's 'reference_mean'")

    out_dir = Path(out_dir)
    written = []
    from tqdm.auto import tqdm

    for index, name in tqdm(jobs, desc="export", unit="file", disable=not progress, leave=False):
        item = np.asarray(values[index], dtype=np.float64)
        if np.isnan(item).all():
            continue
        if scale != "stored":
            ref = None
            if scale == "image":
                k = ref_subjects[str(ds["subject"].values[index[lead.index("subject")]])]
                ref = float(geo["reference_mean"].values[k, index[lead.index("visit")]])
            item = invert_normalisation(geo, item, ref)
        if graph:
            canon = np.where(painted >= 0, item[np.maximum(painted, 0)], fill)
        else:
            if inside is not None:
                item = np.where(inside, item, fill)
            if slice_axial >= 0:
                canon = np.full(canonical_zyx_shape, fill, dtype=np.float64)
                canon[slice_axial] = item
            else:
                canon = item
        volume = apply_orientation(canon.transpose(2, 1, 0), ornt_transform(axcodes2ornt("RAS"), ornt))
        img = nib.Nifti1Image(np.ascontiguousarray(volume, dtype=np.float32), affine)
        img.header.set_xyzt_units("mm")
        payload = gzip.compress(img.to_bytes(), compresslevel=1)
        written.append(atomic_write(out_dir / name, lambda tmp, payload=payload: Path(tmp).write_bytes(payload)))
    return written
