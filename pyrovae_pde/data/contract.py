"""Data contract v1: validation, reading and atomic writing of cohort files.

A cohort is an ``xarray.Dataset`` (NetCDF on disk, engine h5netcdf). Its structure is described
by ``pyrovae_pde/schemas/dataset-v1.schema.json`` (also under ``data_schemas/``); value rules are
checked here. Every reader calls :func:`validate_dataset`, which raises one :class:`ContractError`
naming the file, variable (and subject/visit) and the fix.
"""
from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import jsonschema
import numpy as np
import xarray as xr

from ..errors import ContractError, ExistingPathError
from ..physics.domains import adjacency_problem

SCHEMA_VERSION = "1"
IN_MEMORY = "<in-memory dataset>"


@lru_cache(maxsize=None)
def load_schema(name: str = "dataset-v1") -> dict:
    """The JSON Schema ``name`` shipped with the package (``dataset-v1``, ``posterior-v1``, ...)."""
    text = resources.files("pyrovae_pde").joinpath("schemas", f"{name}.schema.json").read_text()
    return json.loads(text)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dtype_name(var: xr.Variable) -> str:
    """The schema's dtype name of ``var``; only object arrays are read (a lazily opened signal stays on disk)."""
    if var.dtype.kind in "US":
        return "string"
    if var.dtype.kind == "O":
        # An object array may hold None, NaN or numbers: NetCDF would write them as "" or fail to load.
        return "string" if all(isinstance(v, str) for v in np.asarray(var.values).flat) else "object"
    return str(var.dtype)


def describe(ds: xr.Dataset) -> dict[str, Any]:
    """The JSON-able structure the schema validates: attrs and each variable's dims and dtype."""
    variables = {name: {"dims": list(var.dims), "dtype": _dtype_name(var)}
                 for name, var in ds.variables.items()}
    attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in ds.attrs.items()}
    attrs = {k: (str(v) if not isinstance(v, (str, int, float, bool)) else v) for k, v in attrs.items()}
    return {"attrs": attrs, "variables": variables}


def _schema_message(error: jsonschema.ValidationError) -> str:
    path = list(error.absolute_path)
    if path[:1] == ["variables"] and len(path) >= 2:
        where = f"variable {path[1]!r}"
        if path[2:3] == ["dims"]:
            return f"{where} has the wrong dims: {error.message}"
        if path[2:3] == ["dtype"]:
            return f"{where} has the wrong dtype: {error.message}"
        return f"{where}: {error.message}"
    if path[:1] == ["variables"] and error.validator == "required":
        return f"missing variable: {error.message}"
    if path[:1] == ["attrs"]:
        if error.validator == "required":
            return f"missing global attribute: {error.message}"
        return f"attribute {path[1]!r}: {error.message}" if len(path) > 1 else error.message
    return error.message


def validate_dataset(ds: xr.Dataset, source: str = IN_MEMORY, signal_values: bool = True) -> xr.Dataset:
    """Check ``ds`` against the contract; return it unchanged or raise one ``ContractError``.

    ``source`` (a file name) prefixes every message. ``signal_values=False`` leaves out the rules on
    the signal's values, the one check that reads the whole signal: a lazily read cohort
    (``cohort.LazyCohort``) checks each subject's with ``check_signal`` when it reads it.
    """
    def fail(message: str) -> ContractError:
        return ContractError(f"{source}: {message}")

    if not isinstance(ds, xr.Dataset):
        raise fail(f"expected an xarray.Dataset, got {type(ds).__name__}")
    # Checks that the schema cannot express clearly are done first for better messages.
    if "schema_version" in ds.attrs and str(ds.attrs["schema_version"]) != SCHEMA_VERSION:
        raise fail(f"attribute 'schema_version' is {ds.attrs['schema_version']!r}; this version of "
                   f"pyrovae_pde reads schema_version {SCHEMA_VERSION!r}")
    validator = jsonschema.Draft202012Validator(load_schema("dataset-v1"))
    errors = sorted(validator.iter_errors(describe(ds)), key=lambda e: (len(e.absolute_path), e.message))
    if errors:
        raise fail(_schema_message(errors[0]) + " (see data_schemas/README.md)")

    subjects = [str(s) for s in ds["subject"].values]
    if len(set(subjects)) != len(subjects):
        dupes = sorted({s for s in subjects if subjects.count(s) > 1})
        raise fail(f"coordinate 'subject' has duplicate IDs: {', '.join(map(repr, dupes[:5]))}; subject IDs must "
                   "be unique")
    unstorable = [s for s in subjects if "\x00" in s or not _encodable(s)]
    if unstorable:
        raise fail(f"coordinate 'subject' has ID {unstorable[0]!r} with a NUL or unpaired surrogate character, which "
                   "NetCDF cannot store; rename the subject")
    if ds.sizes.get("visit", 0) < 1 or len(subjects) < 1:
        raise fail("variable 'signal' is empty: a cohort needs at least one subject and one visit")
    time = np.asarray(ds["time"].values, dtype=float)
    signal = ds["signal"]
    if signal.sizes["subject"] != time.shape[0] or signal.sizes["visit"] != time.shape[1]:
        raise fail(f"variables 'signal' and 'time' disagree on (subject, visit) sizes: "
                   f"{(signal.sizes['subject'], signal.sizes['visit'])} vs {time.shape}")
    _check_times(time, subjects, fail)
    if signal_values:
        _check_signal(np.asarray(signal.values), time, subjects, fail)
    if ds.attrs["domain"] == "grid":
        _check_grid(ds, fail)
    else:
        _check_graph(ds, fail)
    _check_truth(ds, subjects, fail)
    return ds


def _check_times(time: np.ndarray, subjects: list[str], fail: Callable[[str], ContractError]) -> None:
    if np.isinf(time).any():
        i, j = np.argwhere(np.isinf(time))[0]
        raise fail(f"variable 'time', subject {subjects[i]!r}, visit {j}: time is inf; use a finite time "
                   "or NaN for a missing visit")
    missing_first = np.isnan(time[:, 0])
    if missing_first.any():
        i = int(np.argmax(missing_first))
        raise fail(f"variable 'time', subject {subjects[i]!r}: the first visit (visit 0) is missing; "
                   "the first visit is the initial condition and must be present (drop the subject or "
                   "move its first scan to visit 0)")
    if (time[:, 0] < 0).any():
        i = int(np.argmax(time[:, 0] < 0))
        raise fail(f"variable 'time', subject {subjects[i]!r}, visit 0: negative time {time[i, 0]}; "
                   "times must be >= 0 (e.g. years since the first scan)")
    for i, row in enumerate(time):
        present = np.flatnonzero(~np.isnan(row))
        steps = np.diff(row[present])
        if (steps <= 0).any():
            k = int(np.argmax(steps <= 0))
            raise fail(f"variable 'time', subject {subjects[i]!r}, visit {present[k + 1]}: time "
                       f"{row[present[k + 1]]} is not after the previous visit's {row[present[k]]}; "
                       "visit times must be strictly ascending (sort the visits)")


def check_signal(values: np.ndarray, time: np.ndarray, subjects: list[str], source: str = IN_MEMORY) -> None:
    """The contract's rules on the signal values of some subjects, as ``validate_dataset`` applies
    them to all: values (n, T, *space), time (n, T), their ``subjects`` (n,); one ``ContractError``."""
    _check_signal(np.asarray(values), np.asarray(time, dtype=float), subjects,
                  lambda message: ContractError(f"{source}: {message}"))


def _check_signal(values: np.ndarray, time: np.ndarray, subjects: list[str],
                  fail: Callable[[str], ContractError]) -> None:
    flat = values.reshape(values.shape[0], values.shape[1], -1)
    finite = np.isfinite(flat)
    all_nan = np.isnan(flat).all(axis=-1)
    present = ~np.isnan(time)
    for i, j in np.argwhere(present & ~finite.all(axis=-1)):
        kind = "inf" if np.isinf(flat[i, j]).any() else "NaN"
        if kind == "NaN" and all_nan[i, j]:
            raise fail(f"variable 'signal', subject {subjects[i]!r}, visit {j}: the visit has a time "
                       f"({time[i, j]}) but no signal (all NaN); set its time to NaN to mark it missing")
        raise fail(f"variable 'signal', subject {subjects[i]!r}, visit {j}: {kind} values inside the data "
                   f"({int((~finite[i, j]).sum())} of {flat.shape[-1]}); signal must be finite at present "
                   "visits (NaN marks a whole missing visit)")
    for i, j in np.argwhere(~present & ~all_nan):
        raise fail(f"variable 'signal', subject {subjects[i]!r}, visit {j}: the visit's time is NaN "
                   "(missing) but it has signal values; give it a time or set its signal to NaN")


def _check_grid(ds: xr.Dataset, fail: Callable[[str], ContractError]) -> None:
    mask = np.asarray(ds["mask"].values)
    spatial = ds["signal"].dims[2:]
    if tuple(ds["mask"].dims) != tuple(spatial):
        raise fail(f"variable 'mask' has dims {ds['mask'].dims} but 'signal' has spatial dims {spatial}; "
                   "they must match")
    if mask.shape != ds["signal"].shape[2:]:
        raise fail(f"variable 'mask' has shape {mask.shape} but 'signal' has spatial shape "
                   f"{ds['signal'].shape[2:]}; mask and signal must be on the same grid")
    if not np.isin(mask, (0, 1)).all():
        raise fail("variable 'mask' must hold only 0 (outside) and 1 (inside the brain)")
    if not mask.any():
        raise fail("variable 'mask' has no cell inside the brain (all zeros)")
    grid_spacing(ds, fail)


def grid_spacing(ds: xr.Dataset, fail: Callable[[str], ContractError] | None = None) -> tuple[float, ...]:
    """Grid spacing in mm per spatial axis, from the evenly spaced coordinates."""
    fail = fail or (lambda m: ContractError(f"{IN_MEMORY}: {m}"))
    spacings = []
    for dim in ds["signal"].dims[2:]:
        if dim not in ds.variables:
            # Without this, xarray supplies 0, 1, 2, ... and the axis would silently get 1 mm spacing.
            raise fail(f"coordinate {dim!r} is missing; give the cell positions along {dim!r} in mm "
                       "(their step is the grid spacing)")
        stored = np.asarray(ds[dim].values)
        coord = stored.astype(float)
        if coord.size < 2:
            raise fail(f"coordinate {dim!r} needs at least 2 points to define the grid spacing")
        steps = np.diff(coord)
        # Positions stored in float32 are rounded by ~eps * |position|, far more than rtol 1e-6 of a step.
        atol = max(1e-8, 4 * np.finfo(stored.dtype).eps * np.abs(coord).max()) if stored.dtype.kind == "f" else 1e-8
        if (not np.all(np.isfinite(steps)) or steps[0] <= 0
                or not np.allclose(steps, steps[0], rtol=1e-6, atol=atol)):
            raise fail(f"coordinate {dim!r} must be evenly spaced and increasing (mm); its step is the "
                       "grid spacing")
        spacings.append(float(steps[0]))
    return tuple(spacings)


def _check_graph(ds: xr.Dataset, fail: Callable[[str], ContractError]) -> None:
    adjacency = np.asarray(ds["adjacency"].values, dtype=float)
    n_nodes = ds["signal"].sizes["node"]
    if n_nodes < 1:
        raise fail("variable 'signal' has no nodes (dim 'node' is empty): a graph cohort needs at least one region")
    if adjacency.shape != (n_nodes, n_nodes):
        raise fail(f"variable 'adjacency' has shape {adjacency.shape}; expected ({n_nodes}, {n_nodes}) to "
                   "match the signal's node dim")
    problem = adjacency_problem(adjacency)
    if problem is None:
        return
    kind, index = problem
    i, j = index if len(index) == 2 else (index[0], index[0])
    raise fail({
        "nonfinite": "variable 'adjacency' has NaN or inf entries; use 0 for no connection",
        "negative": f"variable 'adjacency' has a negative weight at ({i}, {j}); weights must be >= 0",
        "asymmetric": f"variable 'adjacency' is not symmetric (entry ({i}, {j}) differs from ({j}, {i})); "
                      "symmetrise it, e.g. (A + A.T) / 2",
        "diagonal": "variable 'adjacency' has a nonzero diagonal; set self-connections to 0",
    }[kind])


def _check_truth(ds: xr.Dataset, subjects: list[str], fail: Callable[[str], ContractError]) -> None:
    if "true_subtype" in ds:
        from ..physics.reactions import registered_reactions

        known = set(registered_reactions())
        for subject, name in zip(subjects, ds["true_subtype"].values):
            if str(name) not in known:
                raise fail(f"variable 'true_subtype', subject {subject!r}: unknown reaction name {str(name)!r}; "
                           f"registered names are {', '.join(sorted(known))}")
    for name in ("true_diffusivity", "true_reaction"):
        if name in ds:
            bad = ~np.isfinite(np.asarray(ds[name].values, dtype=float))
            if bad.any():
                raise fail(f"variable {name!r}, subject {subjects[int(np.argmax(bad))]!r}: NaN or inf")


def load_dataset(path: str | os.PathLike, lazy: bool = False) -> xr.Dataset:
    """Read and validate a contract file (NetCDF, engine h5netcdf) fully into memory.

    ``lazy=True``: open it instead, the variables read from the file when indexed (nothing cached),
    and validate all but the signal's values, which ``cohort.LazyCohort`` checks per subject as it
    reads them: what each rank of a distributed fit or predict does.
    """
    path = Path(path)
    if not path.exists():
        raise ContractError(f"{path}: file not found")
    try:
        if lazy:
            ds = xr.open_dataset(path, engine="h5netcdf", cache=False)
        else:
            with xr.open_dataset(path, engine="h5netcdf") as opened:
                ds = opened.load()
    except Exception as exc:  # h5py/xarray raise many kinds; one clear line is what users need
        raise ContractError(f"{path}: not a readable NetCDF/HDF5 file ({type(exc).__name__}: {exc})") from None
    return validate_dataset(ds, source=str(path), signal_values=not lazy)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A failure leaves any existing ``path`` untouched and no temporary file behind; the file gets
    the permissions of a plain ``open()`` (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    if path.is_dir():
        # os.replace would fail only after the whole write, with an OSError the CLI does not expect.
        raise ExistingPathError(f"{path} is a directory; give the path of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600; give the result the mode a plain open() would (0666 less umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_dataset(ds: xr.Dataset, path: str | os.PathLike, validate: bool = True) -> Path:
    """Validate ``ds`` and write it atomically as NetCDF (h5netcdf)."""
    if validate:
        validate_dataset(ds, source=str(path))
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf"))


def read_json_file(path: str | os.PathLike, fix: str) -> dict:
    """A JSON object from ``path``; a missing, unreadable or damaged file raises one ``ContractError``
    naming the file, what is wrong and ``fix`` (what the user should do)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ContractError(f"{path}: no such file; {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(f"{path}: not valid JSON ({exc}); the file is damaged: {fix}") from None
    if not isinstance(value, dict):
        raise ContractError(f"{path}: expected a JSON object, found {type(value).__name__}; {fix}")
    return value


def read_torch_file(path: str | os.PathLike, fix: str, map_location="cpu") -> dict:
    """A dict saved by ``torch.save`` at ``path``; a missing, truncated or foreign file raises one
    ``ContractError`` naming the file and ``fix`` instead of torch's zip-reader traceback."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: no such file; {fix}")
    try:
        value = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ContractError(f"{path}: cannot be read as a PyTorch file ({reason}); it is truncated or "
                            f"damaged: {fix}") from None
    if not isinstance(value, dict):
        raise ContractError(f"{path}: expected a saved dict, found {type(value).__name__}; {fix}")
    return value
