"""Cohort manifests: read a manifest CSV (schema ``manifest-v1``) and check it before any image is read.

A manifest has one row per scan with columns ``subject``, ``time`` (years) or ``date`` (ISO), and
``image`` (a NIfTI path, relative to the manifest's folder). The schema checks each row; the code
checks what a row-wise schema cannot: unique, ascending, nonnegative times per subject.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd

from ..errors import ImagingError
from .contract import load_schema

__all__ = ["DAYS_PER_YEAR", "read_csv_rows", "read_manifest", "scan_where"]

DAYS_PER_YEAR = 365.25


@dataclass(frozen=True)
class _Rows:
    """The manifest's nonempty rows (cells typed for the schema) and their line numbers in the CSV."""
    path: Path
    rows: list[dict]
    lines: list[int]


@dataclass(frozen=True)
class _SubjectTimes:
    """One subject's scans as written: comparison keys, times in years, text shown in messages."""
    keys: list
    values: list[float]
    shown: list[str]
    unit: str


def scan_where(source: str, row) -> str:
    """Where a scan is described, for messages: manifest line, subject, visit, time and image."""
    return (f"{source} line {row.line}: subject {row.subject!r}, visit {row.visit} (time {row.time:g} y), "
            f"image {row.image_given!r}")


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
    header, raw_rows, lines = read_csv_rows(path)
    _check_header(path, header, raw_rows)
    manifest = _Rows(path, [_typed_row(cells) for cells in raw_rows], lines)
    _check_schema(manifest)
    dates = _parse_dates(manifest)
    times, visits = _times_and_visits(manifest, dates)
    return _manifest_frame(manifest, times, visits)


def read_csv_rows(path: Path, kind: str = "manifest") -> tuple[list[str], list[dict[str, str]], list[int]]:
    """(header, nonempty rows of stripped cells, their line numbers) of a CSV; blank rows are skipped.

    A column named twice in the header is an error; ``kind`` names the file in messages
    ("not a readable CSV manifest").
    """
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
        raise ImagingError(f"{path}: not a readable CSV {kind} ({exc})") from None
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ImagingError(f"{path}: column(s) {', '.join(map(repr, dupes))} appear more than once in the header")
    return header, raw_rows, lines


def _check_header(path: Path, header: list[str], raw_rows: list[dict[str, str]]) -> None:
    """The header has subject, image and time or date; some scans follow."""
    if not header:
        raise ImagingError(f"{path}: empty manifest; expected a header row with columns subject, "
                           "time (or date), image")
    missing = [c for c in ("subject", "image") if c not in header]
    if missing or not ({"time", "date"} & set(header)):
        need = missing + ([] if {"time", "date"} & set(header) else ["time (or date)"])
        raise ImagingError(f"{path}: the header lacks column(s) {', '.join(need)}; a manifest needs "
                           f"subject, time (or date) and image (found: {', '.join(map(repr, header))})")
    if not raw_rows:
        raise ImagingError(f"{path}: the manifest has a header but no scans")


def _typed_row(cells: dict[str, str]) -> dict:
    """A row for the schema: empty cells left out, a finite numeric time as a float."""
    row = {k: v for k, v in cells.items() if v != ""}
    if "time" in row:
        try:
            value = float(row["time"])
        except ValueError:
            value = None
        if value is not None and math.isfinite(value):
            row["time"] = value
    return row


def _check_schema(manifest: _Rows) -> None:
    """Check the rows against ``manifest-v1``; report the first failing row (by line) only."""
    validator = jsonschema.Draft202012Validator(load_schema("manifest-v1"))
    errors = list(validator.iter_errors(manifest.rows))
    if not errors:
        return

    def key(e):
        return (e.absolute_path[0] if e.absolute_path else -1, len(e.absolute_path))
    error = min(errors, key=key)
    if not error.absolute_path:
        raise ImagingError(f"{manifest.path}: {error.message}")
    i = error.absolute_path[0]
    raise ImagingError(f"{manifest.path}: line {manifest.lines[i]} (subject {manifest.rows[i].get('subject', '?')!r}): "
                       f"{_schema_row_message(error)}")


def _parse_dates(manifest: _Rows) -> list[_dt.date | None]:
    """Each row's calendar date, or None for rows that give a time."""
    dates: list[_dt.date | None] = []
    for row, line in zip(manifest.rows, manifest.lines):
        if "date" in row:
            try:
                dates.append(_dt.date.fromisoformat(row["date"]))
            except ValueError:
                raise ImagingError(f"{manifest.path}: line {line} (subject {row['subject']!r}): date {row['date']!r} "
                                   "is not a valid calendar date (YYYY-MM-DD)") from None
        else:
            dates.append(None)
    return dates


def _times_and_visits(manifest: _Rows, dates: list[_dt.date | None]) -> tuple[np.ndarray, np.ndarray]:
    """Times (years since each subject's first scan for dates) and 0-based visit indices, per row."""
    rows, lines = manifest.rows, manifest.lines
    by_subject: dict[str, list[int]] = {}
    for k, row in enumerate(rows):
        by_subject.setdefault(row["subject"], []).append(k)
    times = np.zeros(len(rows))
    visits = np.zeros(len(rows), dtype=int)
    for subject, idx in by_subject.items():
        kinds = {"date" in rows[k] for k in idx}
        if len(kinds) > 1:
            raise ImagingError(f"{manifest.path}: subject {subject!r} mixes 'time' and 'date' rows (lines "
                               f"{', '.join(str(lines[k]) for k in idx)}); use one of them for all its scans")
        found = _subject_times(rows, idx, dates)
        _check_subject_order(manifest, subject, idx, found)
        times[idx] = found.values
        visits[idx] = np.arange(len(idx))
    return times, visits


def _subject_times(rows: list[dict], idx: list[int], dates: list[_dt.date | None]) -> _SubjectTimes:
    """The times of one subject's rows ``idx``, from its dates or its times."""
    if "date" in rows[idx[0]]:
        first = dates[idx[0]]
        keys = [dates[k] for k in idx]
        values = [(d - first).days / DAYS_PER_YEAR for d in keys]
        return _SubjectTimes(keys, values, [rows[k]["date"] for k in idx], "date")
    values = [rows[k]["time"] for k in idx]
    return _SubjectTimes(values, values, [f"{v:g}" for v in values], "time")


def _check_subject_order(manifest: _Rows, subject: str, idx: list[int], found: _SubjectTimes) -> None:
    """One subject's times are unique and listed in ascending order."""
    path, lines, keys, shown, unit = manifest.path, manifest.lines, found.keys, found.shown, found.unit
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


def _manifest_frame(manifest: _Rows, times: np.ndarray, visits: np.ndarray) -> pd.DataFrame:
    """The checked manifest as a DataFrame, image paths resolved against the manifest's folder."""
    rows, path = manifest.rows, manifest.path
    base = path.parent
    images = [row["image"] for row in rows]
    frame = pd.DataFrame({
        "subject": [row["subject"] for row in rows],
        "visit": visits,
        "time": times,
        "date": [row.get("date", "") for row in rows],
        "image": [str(Path(p) if Path(p).is_absolute() else base / p) for p in images],
        "image_given": images,
        "line": manifest.lines,
    })
    frame.attrs["manifest"] = str(path)
    return frame
