"""Atlas side files for graph import: region names (labels CSV) and the connectome matrix.

Regions are the atlas's positive labels in ascending order; the connectome's rows and columns are
put in that order (by a header of labels or names, or taken as given) and checked.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import ImagingError
from ..physics.domains import adjacency_problem

__all__ = ["read_label_names", "load_connectome", "short_list"]


def short_list(values: Sequence[int], n: int = 12) -> str:
    """``[a, b, ...]`` showing at most ``n`` values, for messages."""
    values = list(values)
    text = ", ".join(str(v) for v in values[:n])
    return f"[{text}{', ...' if len(values) > n else ''}]"


def read_label_names(path: str | os.PathLike | None, labels: np.ndarray) -> list[str]:
    """Region names for ``labels`` from a CSV with columns label,name (default ``label_<n>``)."""
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
        raise ImagingError(f"labels file {path}: needs columns 'label' and 'name' "
                           f"(found {', '.join(map(str, table.columns))})")
    try:
        mapping = {int(k): str(v).strip() for k, v in zip(table["label"], table["name"])}
    except (TypeError, ValueError):
        raise ImagingError(f"labels file {path}: column 'label' must hold integer atlas labels") from None
    names = [mapping.get(int(k), f"label_{int(k)}") for k in labels]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ImagingError(f"labels file {path}: region names must be unique; repeated: {', '.join(dupes[:5])}")
    return names


def load_connectome(path: str | os.PathLike, labels: np.ndarray, names: list[str], atlas_name: str) -> np.ndarray:
    """Connectome (R, R) with rows/cols in ascending atlas-label order, diagonal set to 0."""
    path = Path(path)
    where = f"connectome {path}"
    if not path.is_file():
        raise ImagingError(f"{where}: file not found")
    matrix, keys = _read_matrix(path, where)
    label_list = [int(k) for k in labels]
    if keys is not None:
        matrix = _order_by_header(where, matrix, keys, label_list, names, atlas_name)
    elif matrix.shape[0] != len(label_list):
        _raise_size_mismatch(where, matrix, label_list, atlas_name)
    _check_weights(where, matrix, label_list)
    matrix = 0.5 * (matrix + matrix.T)
    np.fill_diagonal(matrix, 0.0)
    return matrix


def _read_matrix(path: Path, where: str) -> tuple[np.ndarray, list[str] | None]:
    """(square float matrix, header keys or None): NPY, or CSV/TSV plain or with header and index column."""
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
        raise ImagingError(f"{where}: not a readable connectome (CSV or NPY matrix): "
                           f"{type(exc).__name__}: {exc}") from None
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ImagingError(f"{where}: expected a square regions x regions matrix, got shape {matrix.shape}")
    return matrix, keys


def _order_by_header(where: str, matrix: np.ndarray, keys: list[str], label_list: list[int], names: list[str],
                     atlas_name: str) -> np.ndarray:
    """Rows/cols reordered to ascending label order, matching header keys to label numbers or names."""
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
    return matrix[np.ix_(order, order)]


def _raise_size_mismatch(where: str, matrix: np.ndarray, label_list: list[int], atlas_name: str) -> None:
    """A header-less matrix with fewer or more rows than the atlas has labels."""
    if matrix.shape[0] < len(label_list):
        raise ImagingError(
            f"{where}: atlas labels missing from the connectome: {atlas_name} has {len(label_list)} labels "
            f"{short_list(label_list)} but the connectome is {matrix.shape[0]} x {matrix.shape[0]}; rows are taken "
            f"in ascending label order, so labels {short_list(label_list[matrix.shape[0]:])} would have no row. "
            "Give one row per atlas label (or a CSV with a header naming the labels)")
    raise ImagingError(f"{where}: the connectome is {matrix.shape[0]} x {matrix.shape[0]} but {atlas_name} has "
                       f"only {len(label_list)} labels {short_list(label_list)} (inside the mask); give one row per "
                       "atlas label in ascending label order")


def _check_weights(where: str, matrix: np.ndarray, label_list: list[int]) -> None:
    """Finite, nonnegative and symmetric weights."""
    problem = adjacency_problem(matrix)
    if problem is None or problem[0] == "diagonal":  # self-connections are dropped later
        return
    kind, (i, j) = problem
    if kind == "nonfinite":
        raise ImagingError(f"{where}: NaN or inf entries; use 0 for no connection")
    if kind == "negative":
        raise ImagingError(f"{where}: negative weight between labels {label_list[i]} and {label_list[j]}; "
                           "weights must be >= 0")
    raise ImagingError(f"{where}: not symmetric (labels {label_list[i]} -> {label_list[j]} differs from "
                       "the reverse); symmetrise it, e.g. (C + C.T) / 2")
