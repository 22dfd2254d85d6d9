"""Regional PET tables (long format) <-> graph cohorts on a connectome.

A regional table is a CSV with a header row and one row per subject, visit and region:

    subject   subject ID (kept as text)
    time      years since the subject's first visit (number >= 0); or instead
    date      the visit's ISO date YYYY-MM-DD: time = (date - the subject's first date) in days / 365.25
    region    a region of the connectome (``connectomes.load_connectome``), or the reference region
    value     the regional value (SUVR, or uptake to be divided by the reference region's)

Other columns are ignored. Every visit has one row per connectome region; each subject's visits
are listed in ascending time (rows of different subjects and regions may interleave). Normalisation
(written into the output attrs, as by ``pyrovae-pde import``; ``imaging.invert_normalisation`` undoes it)::

    SUVR   = value / reference value   (same subject and visit; SUVR = value without a reference region)
    signal = (SUVR - suvr_min) / (suvr_max - suvr_min)   (default: the cohort's minimum and maximum)
"""
from __future__ import annotations

import datetime as _dt
import difflib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from ..errors import ContractError, ImagingError
from .connectomes import DEFAULT_THRESHOLD, Connectome, load_connectome
from .contract import SCHEMA_VERSION, validate_dataset
from .imaging_manifest import DAYS_PER_YEAR, read_csv_rows

__all__ = ["RegionalTable", "cohort_to_regional_table", "import_regional", "read_regional_table"]


@dataclass
class RegionalTable:
    """A checked regional table: ``values`` (subject, visit, region) as in the table, ``times``
    (subject, visit) in years, ``reference`` (subject, visit) the reference region's values or None;
    NaN pads visits a subject does not have; ``dropped``: subjects left out (single visit)."""
    source: str
    subjects: list[str]
    regions: list[str]
    times: np.ndarray
    values: np.ndarray
    reference: np.ndarray | None
    dropped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Row:
    line: int
    subject: str
    key: float | _dt.date
    shown: str
    node: int | None
    is_reference: bool
    value: float


def read_regional_table(path: str | os.PathLike, regions: Sequence[str],
                        reference_region: str | None = None) -> RegionalTable:
    """Read and check a regional table (module docstring) against the connectome's ``regions``.

    Raises one :class:`ImagingError` naming the file, line, subject, visit and region for: a
    missing column, an empty table or cell, an unknown region (with the closest name), a value or
    time that is not a number, a bad date, a duplicate row, visits out of time order, a region
    missing at a visit.
    """
    path = Path(path)
    if not path.is_file():
        raise ImagingError(f"{path}: regional table not found")
    header, cells, lines = read_csv_rows(path, "regional table")
    time_column = _check_columns(path, header, cells)
    index = {name: k for k, name in enumerate(regions)}
    rows = [_parse_row(path, row, line, time_column, index, reference_region) for row, line in zip(cells, lines)]
    visits = _subject_visits(path, rows, time_column)
    subjects = list(visits)
    n_visits = max(len(v) for v in visits.values())
    times = np.full((len(subjects), n_visits), np.nan)
    for i, keys in enumerate(visits.values()):
        first = next(iter(keys))
        times[i, : len(keys)] = [(k - first).days / DAYS_PER_YEAR if time_column == "date" else k for k in keys]
    seen = np.zeros((len(subjects), n_visits, len(regions) + 1), dtype=np.int64)  # line of each cell; last: reference
    values = np.full((len(subjects), n_visits, len(regions) + 1), np.nan)
    row_of = {s: i for i, s in enumerate(subjects)}
    for row in rows:
        i, j = row_of[row.subject], visits[row.subject][row.key]
        for k in ([row.node] if row.node is not None else []) + ([len(regions)] if row.is_reference else []):
            if seen[i, j, k]:
                raise ImagingError(f"{path}: duplicate row: subject {row.subject!r}, {time_column} {row.shown}, "
                                   f"region {_region_name(regions, k, reference_region)!r} is on lines "
                                   f"{seen[i, j, k]} and {row.line}; give one value per subject, visit and region")
            seen[i, j, k], values[i, j, k] = row.line, row.value
    table = RegionalTable(str(path), subjects, list(regions), times, values[..., :-1],
                          values[..., -1] if reference_region is not None else None)
    _check_complete(table, seen, visits, time_column, reference_region)
    return table


def _region_name(regions: Sequence[str], k: int, reference_region: str | None) -> str:
    return regions[k] if k < len(regions) else str(reference_region)


def _check_columns(path: Path, header: list[str], cells: list[dict[str, str]]) -> str:
    """The table's time column ("time" or "date"), after checking the header and that rows follow."""
    if not header:
        raise ImagingError(f"{path}: empty table; expected a header row with columns subject, time (or date), "
                           "region, value")
    missing = [c for c in ("subject", "region", "value") if c not in header]
    times = [c for c in ("time", "date") if c in header]
    if missing or len(times) != 1:
        need = missing + ([] if times else ["time (or date)"])
        problem = f"lacks column(s) {', '.join(need)}" if need else "has both 'time' and 'date' columns; keep one"
        raise ImagingError(f"{path}: the header {problem}; a regional table needs subject, time (or date), region "
                           f"and value (found: {', '.join(map(repr, header))})")
    if not cells:
        raise ImagingError(f"{path}: the table has a header but no rows")
    return times[0]


def _parse_row(path: Path, cells: dict[str, str], line: int, time_column: str, index: dict[str, int],
               reference_region: str | None) -> _Row:
    """One row checked: cells present, known region, numeric finite value, valid time."""
    for column in ("subject", time_column, "region", "value"):
        if not cells[column]:
            raise ImagingError(f"{path} line {line}: the {column!r} cell is empty")
    subject, region, shown = cells["subject"], cells["region"], cells[time_column]
    where = f"{path} line {line} (subject {subject!r}, {time_column} {shown}, region {region!r})"
    if region not in index and region != reference_region:
        raise ImagingError(f"{where}: {_unknown_region(region, list(index), reference_region)}")
    key: float | _dt.date
    if time_column == "date":
        try:
            key = _dt.date.fromisoformat(shown)
        except ValueError:
            raise ImagingError(f"{where}: date {shown!r} is not an ISO date (YYYY-MM-DD)") from None
    else:
        key = _number(where, shown, "time", "years since the subject's first visit")
        if key < 0:
            raise ImagingError(f"{where}: negative time {shown}; times must be >= 0 (years since the subject's "
                               "first visit)")
    value = _number(where, cells["value"], "value", "the region's uptake or SUVR")
    return _Row(line, subject, key, shown, index.get(region), region == reference_region, value)


def _number(where: str, text: str, column: str, meaning: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ImagingError(f"{where}: {column} {text!r} is not a number ({meaning})") from None
    if not math.isfinite(value):
        raise ImagingError(f"{where}: {column} {text!r} is not finite; give a number ({meaning})")
    return value


def _unknown_region(region: str, regions: list[str], reference_region: str | None) -> str:
    """The message for a region that is neither a connectome region nor the reference region."""
    candidates = regions + ([reference_region] if reference_region is not None else [])
    close = difflib.get_close_matches(region, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (they are named like {regions[0]!r})"
    reference = f" nor the reference region {reference_region!r}" if reference_region is not None else ""
    return f"unknown region {region!r}: not one of the connectome's {len(regions)} regions{reference}{hint}"


def _subject_visits(path: Path, rows: list[_Row], time_column: str) -> dict[str, dict]:
    """Per subject (first-appearance order), its visits' time keys -> visit index, checked ascending."""
    visits: dict[str, dict] = {}
    first_row: dict[tuple, _Row] = {}
    for row in rows:
        keys = visits.setdefault(row.subject, {})
        if row.key in keys:
            continue
        if keys:
            last = first_row[row.subject, next(reversed(keys))]
            if row.key < last.key:
                raise ImagingError(
                    f"{path} line {row.line}: subject {row.subject!r}: {time_column} {row.shown} is listed after "
                    f"{time_column} {last.shown} (line {last.line}); the visits are unsorted: list each subject's "
                    "visits in ascending time order")
        keys[row.key] = len(keys)
        first_row[row.subject, row.key] = row
    return visits


def _check_complete(table: RegionalTable, seen: np.ndarray, visits: dict[str, dict], time_column: str,
                    reference_region: str | None) -> None:
    """Every visit has a row for each connectome region (and the reference region, if given)."""
    need = seen if reference_region is not None else seen[..., :-1]
    for i, subject in enumerate(table.subjects):
        for key, j in visits[subject].items():
            absent = np.flatnonzero(need[i, j] == 0)
            if absent.size == 0:
                continue
            names = [_region_name(table.regions, int(k), reference_region) for k in absent]
            listed = ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            shown = key.isoformat() if time_column == "date" else f"{key:g}"
            first = int(need[i, j][need[i, j] > 0].min()) if (need[i, j] > 0).any() else int(seen[i, j].max())
            raise ImagingError(f"{table.source}: subject {subject!r}, visit {j} ({time_column} {shown}, first row "
                               f"on line {first}): no row for region(s) {listed}; every visit needs a "
                               f"value for each of the {len(table.regions)} connectome regions"
                               + (" and the reference region" if reference_region is not None else ""))


def import_regional(table: str | os.PathLike, connectome: str | os.PathLike | Connectome = "hcp83", *,
                    reference_region: str | None = None, suvr_min: float | None = None,
                    suvr_max: float | None = None, threshold: float = DEFAULT_THRESHOLD) -> xr.Dataset:
    """A regional table (module docstring) as a validated graph cohort on ``connectome`` (nothing is written).

    ``connectome``: a shipped name, a CSV path (``load_connectome``, with ``threshold``) or a
    ``Connectome``. Returns signal (subject, visit, node) normalised as in the module docstring,
    time (subject, visit) in years, the connectome's adjacency (node, neighbor) and, with
    ``reference_region``, ``reference_value`` (subject, visit). Subjects with one visit are dropped
    with an ``ImagingWarning``; any problem raises one :class:`ImagingError`.
    """
    graph = connectome if isinstance(connectome, Connectome) else load_connectome(connectome, threshold)
    data = _longitudinal(read_regional_table(table, graph.regions, reference_region))
    suvr = data.values
    if data.reference is not None:
        bad = np.argwhere(data.reference <= 0)
        if bad.size:
            i, j = bad[0]
            raise ImagingError(f"{data.source}: subject {data.subjects[i]!r}, visit {j} (time {data.times[i, j]:g} "
                               f"y): the reference region {reference_region!r} has value {data.reference[i, j]:g}; "
                               "SUVR needs a positive reference uptake")
        suvr = data.values / data.reference[..., None]
    lo = float(np.nanmin(suvr)) if suvr_min is None else float(suvr_min)
    hi = float(np.nanmax(suvr)) if suvr_max is None else float(suvr_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ImagingError(f"{data.source}: cannot scale to [0, 1]: suvr_max ({hi:g}) must be greater than suvr_min "
                           f"({lo:g})")
    attrs = _attrs(data, graph, reference_region, (lo, hi), (suvr_min is None, suvr_max is None))
    names = np.array(graph.regions, dtype=object)
    variables = {"signal": (("subject", "visit", "node"), (suvr - lo) / (hi - lo)),
                 "time": (("subject", "visit"), data.times),
                 "adjacency": (("node", "neighbor"), graph.adjacency)}
    if data.reference is not None:
        variables["reference_value"] = (("subject", "visit"), data.reference)
    ds = xr.Dataset(variables, coords={"subject": np.array(data.subjects, dtype=object), "node": names,
                                       "neighbor": names}, attrs=attrs)
    try:
        return validate_dataset(ds, source=f"import of {data.source}")
    except ContractError as exc:
        raise ImagingError(str(exc)) from None


def _longitudinal(data: RegionalTable) -> RegionalTable:
    """``data`` without its single-visit subjects (dropped with an ``ImagingWarning``, listed in ``dropped``)."""
    from .imaging import ImagingWarning

    keep = (~np.isnan(data.times)).sum(axis=1) >= 2
    data.dropped = [s for s, k in zip(data.subjects, keep) if not k]
    if data.dropped:
        warnings.warn(f"{data.source}: dropped {len(data.dropped)} subject(s) with a single visit (nothing to learn "
                      f"from): {', '.join(data.dropped)}", ImagingWarning, stacklevel=3)
    if not keep.any():
        raise ImagingError(f"{data.source}: no subject has two or more visits; a longitudinal cohort needs at least "
                           "one subject with repeated visits")
    n_visits = int((~np.isnan(data.times[keep])).sum(axis=1).max())
    return RegionalTable(data.source, [s for s, k in zip(data.subjects, keep) if k], data.regions,
                         data.times[keep, :n_visits], data.values[keep, :n_visits],
                         None if data.reference is None else data.reference[keep, :n_visits], data.dropped)


def _attrs(data: RegionalTable, graph: Connectome, reference_region: str | None, scale: tuple[float, float],
           from_cohort: tuple[bool, bool]) -> dict:
    """The attrs of an imported regional cohort: provenance, connectome and normalisation."""
    value = "value / reference_value" if reference_region is not None else "value"
    return {
        "schema_version": SCHEMA_VERSION,
        "domain": "graph",
        "time_unit": "year",
        "source": "pyrovae-pde import-regional (regional table)",
        "table": data.source,
        "connectome": graph.name,
        "connectome_source": graph.source,
        "connectome_threshold": graph.threshold,
        "normalisation": "suvr",
        "normalisation_formula": f"signal = ({value} - suvr_min) / (suvr_max - suvr_min)",
        "suvr_min": scale[0],
        "suvr_max": scale[1],
        "suvr_min_rule": "cohort minimum of the regional SUVRs" if from_cohort[0] else "given",
        "suvr_max_rule": "cohort maximum of the regional SUVRs" if from_cohort[1] else "given",
        "reference_region": reference_region if reference_region is not None else "none (the values are SUVRs)",
        "dropped_subjects": ", ".join(data.dropped),
    }


def cohort_to_regional_table(ds: xr.Dataset) -> pd.DataFrame:
    """A graph cohort as a long regional table: columns subject, time (years), region, value (its signal).

    One row per present visit and node, ordered by subject, visit, node; ``import_regional`` of the
    table (with ``suvr_min=0, suvr_max=1``) gives the cohort's signal and times back.
    """
    if ds.attrs.get("domain") != "graph" or "node" not in ds.dims:
        raise ContractError("cohort_to_regional_table needs a graph cohort (signal over 'node'); this one is "
                            f"domain {ds.attrs.get('domain')!r}")
    time = np.asarray(ds["time"].values, dtype=float)
    signal = np.asarray(ds["signal"].transpose("subject", "visit", "node").values, dtype=float)
    subject_index, visit_index = np.nonzero(~np.isnan(time))
    n_nodes = signal.shape[2]
    subjects = np.asarray([str(s) for s in ds["subject"].values], dtype=object)
    return pd.DataFrame({
        "subject": np.repeat(subjects[subject_index], n_nodes),
        "time": np.repeat(time[subject_index, visit_index], n_nodes),
        "region": np.tile(np.asarray([str(n) for n in ds["node"].values], dtype=object), subject_index.size),
        "value": signal[subject_index, visit_index].reshape(-1),
    })
