"""Property tests of the two readers: the data contract (``validate_dataset``, ``save_dataset``,
``load_dataset``) and the NIfTI cohort manifest (``read_manifest``, ``import_cohort``).

Random valid inputs are accepted and round-trip; one random mutation of a valid input is rejected with
one ``PyrovaePDEError`` whose one-line message names what is at fault (variable, subject, visit, line).
Inputs are tiny; every test is derandomized and uses no example database, so runs are reproducible.
Examples per run (max_examples x parametrized cases): contract 40 + 6 + 52 x 4 + 27 x 2 = 308;
manifest 30 + 12 + 13 x 5 + 4 x 3 + 40 = 159; 467 in total (about 25 s on one core).
"""
from __future__ import annotations

import csv
import datetime as dt
import string
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrovae_pde.data import ContractError, load_dataset, save_dataset, simulate, validate_dataset
from pyrovae_pde.data.imaging import ImagingWarning, import_cohort, read_manifest
from pyrovae_pde.errors import ImagingError, PyrovaePDEError
from pyrovae_pde.physics import registered_reactions

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
IDS = st.text(string.ascii_letters + string.digits + "-_.é ',\"\n", min_size=1, max_size=8)
MANIFEST_IDS = st.text(string.ascii_letters + string.digits + "-_.é ',\"", min_size=1, max_size=8).filter(
    lambda s: s == s.strip())  # the reader strips cells


# --------------------------------------------------------------------------- valid cohorts
def _times(draw, rng, n, v, dtype):
    times = np.full((n, v), np.nan)
    for i in range(n):
        present = [0] + [j for j in range(1, v) if draw(st.booleans())]
        start = draw(st.floats(0.0, 10.0))
        times[i, present] = start + np.concatenate([[0.0], np.cumsum(rng.uniform(0.05, 3.0, len(present) - 1))])
    return times.astype(dtype)


def _graph_vars(draw, rng):
    k = draw(st.integers(1, 5))
    names = np.array(draw(st.lists(IDS, min_size=k, max_size=k, unique=True)), dtype=object)
    upper = np.triu(rng.uniform(0.0, 2.0, (k, k)) * (rng.random((k, k)) < draw(st.floats(0.0, 1.0))), 1)
    adjacency = (upper + upper.T).astype(draw(st.sampled_from([np.float32, np.float64])))
    coords = {"node": names, **({"neighbor": names} if draw(st.booleans()) else {})}
    return ("node",), (k,), {"adjacency": (("node", "neighbor"), adjacency)}, coords


def _grid_vars(draw, rng):
    dims = ("z", "y", "x")[-draw(st.integers(2, 3)):]
    shape = tuple(draw(st.integers(2, 4)) for _ in dims)
    mask = (rng.random(shape) < draw(st.floats(0.0, 1.0))).astype(np.int8)
    mask.flat[rng.integers(mask.size)] = 1
    coord_dtype = draw(st.sampled_from([np.float64, np.float32, np.int16, np.int64]))
    coords = {}
    for dim, size in zip(dims, shape):
        if coord_dtype in (np.int16, np.int64):
            origin, spacing = draw(st.integers(-200, 200)), draw(st.integers(1, 8))
        else:
            origin, spacing = round(rng.uniform(-200.0, 200.0), 2), round(rng.uniform(0.1, 10.0), 2)  # mm
        coords[dim] = (origin + spacing * np.arange(size)).astype(coord_dtype)
    return dims, shape, {"mask": (dims, mask)}, coords


@st.composite
def cohorts(draw, domain=None):
    """A small valid contract dataset: graph or 2-D/3-D grid, irregular visits, optional variables and attrs."""
    domain = domain or draw(st.sampled_from(["graph", "grid"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    n, v = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    subjects = np.array(draw(st.lists(IDS, min_size=n, max_size=n, unique=True)), dtype=object)
    times = _times(draw, rng, n, v, draw(st.sampled_from([np.float32, np.float64])))
    dims, shape, variables, coords = (_graph_vars if domain == "graph" else _grid_vars)(draw, rng)
    low, scale = draw(st.sampled_from([-1.0, 0.0, 1e-3, 1e3])), draw(st.sampled_from([1e-3, 1.0, 1e3]))
    signal = (low + scale * rng.random((n, v, *shape))).astype(draw(st.sampled_from([np.float32, np.float64])))
    signal[np.isnan(times)] = np.nan
    variables.update(signal=(("subject", "visit", *dims), signal), time=(("subject", "visit"), times))
    if draw(st.booleans()):
        variables["true_subtype"] = ("subject", np.array(
            draw(st.lists(st.sampled_from(registered_reactions()), min_size=n, max_size=n)), dtype=object))
    for name in ("true_diffusivity", "true_reaction"):
        if draw(st.booleans()):
            variables[name] = ("subject", rng.uniform(0.0, 1.0, n))
    attrs = {"schema_version": "1", "domain": domain}
    attrs.update(draw(st.dictionaries(st.sampled_from(["time_unit", "benchmark", "note"]), IDS, max_size=2)))
    attrs.update(draw(st.dictionaries(st.sampled_from(["seed", "noise_sd"]),
                                      st.integers(0, 10 ** 6) | st.floats(0.0, 1.0), max_size=2)))
    return xr.Dataset(variables, coords={"subject": subjects, **coords}, attrs=attrs)


@settings(max_examples=40, **SETTINGS)
@given(ds=cohorts())
def test_valid_cohort_is_accepted_and_round_trips(ds):
    assert validate_dataset(ds) is ds
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_dataset(save_dataset(ds, Path(tmp) / "cohort.nc"))
    xr.testing.assert_identical(loaded, ds)
    assert list(loaded["subject"].values) == list(ds["subject"].values)
    for name in ("signal", "time"):
        assert loaded[name].dtype == ds[name].dtype
        np.testing.assert_array_equal(loaded[name].values, ds[name].values)  # NaN where NaN


@settings(max_examples=6, **SETTINGS)
@given(benchmark=st.sampled_from(["graph", "paper-grid"]), n=st.integers(1, 3), seed=st.integers(0, 10 ** 6),
       noise_sd=st.sampled_from([0.0, 0.01, 0.05]))
def test_simulated_cohort_is_valid_and_round_trips(benchmark, n, seed, noise_sd):
    ds = simulate(benchmark, n, seed=seed, noise_sd=noise_sd)
    validate_dataset(ds)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_dataset(save_dataset(ds, Path(tmp) / "sim.nc"))
    xr.testing.assert_identical(loaded, ds)


# --------------------------------------------------------------------------- single mutations
def _subjects(ds):
    return [str(s) for s in ds["subject"].values]


def _present(ds):
    return np.argwhere(~np.isnan(ds["time"].values))


def _set(ds, name, index, value):
    values = ds[name].values.copy()
    values[index] = value
    return ds.assign({name: (ds[name].dims, values)})


def _spatial_index(draw, ds):
    return tuple(draw(st.integers(0, size - 1)) for size in ds["signal"].shape[2:])


def _drop_variable(draw, ds):
    required = ["signal", "time", "subject"] + (["adjacency", "node"] if ds.attrs["domain"] == "graph"
                                                else ["mask", *ds["mask"].dims])
    name = draw(st.sampled_from(required))
    return ds.drop_vars(name), [f"'{name}'", "missing"]


def _drop_attribute(draw, ds):
    name = draw(st.sampled_from(["schema_version", "domain"]))
    bad = ds.copy()
    bad.attrs = {k: v for k, v in ds.attrs.items() if k != name}
    return bad, [f"'{name}'", "attribute"]


def _unknown_domain(draw, ds):
    value = draw(st.text(string.ascii_letters, max_size=8).filter(lambda s: s not in ("grid", "graph")))
    return ds.assign_attrs(domain=value), ["'domain'", repr(value)]


def _other_domain(draw, ds):
    return ds.assign_attrs(domain="grid" if ds.attrs["domain"] == "graph" else "graph"), ["missing variable"]


def _schema_version(draw, ds):
    value = draw(st.sampled_from(["2", "0", "1.0", "v1", 2]))
    return ds.assign_attrs(schema_version=value), ["'schema_version'", repr(value)]


def _time_unit_type(draw, ds):
    return ds.assign_attrs(time_unit=draw(st.integers(0, 9))), ["'time_unit'"]


def _wrong_dtype(draw, ds):
    choices = [("signal", np.int64), ("signal", np.float16), ("signal", np.complex128), ("time", np.int64),
               ("time", np.float16), ("subject", np.int64)]
    if ds.attrs["domain"] == "graph":
        choices += [("adjacency", np.int64), ("adjacency", np.float16), ("node", np.int64)]
    else:
        choices += [("mask", np.float64), ("mask", np.int16), ("mask", bool), (ds["mask"].dims[-1], np.uint8)]
    choices += [(name, np.int64) for name in ("true_diffusivity", "true_reaction") if name in ds]
    name, dtype = draw(st.sampled_from(choices))
    if name in ("subject", "node"):
        bad = ds.assign_coords({name: np.arange(ds.sizes[name], dtype=dtype)})
    else:
        bad = ds.assign({name: ds[name].copy(data=np.nan_to_num(ds[name].values).astype(dtype))})
    return bad, [f"'{name}'", "wrong dtype"]


def _non_string_id(draw, ds):
    name = draw(st.sampled_from(["subject", "node"] if ds.attrs["domain"] == "graph" else ["subject"]))
    ids = ds[name].values.copy()
    ids[draw(st.integers(0, ids.size - 1))] = draw(st.sampled_from([None, np.nan, 7, 2.5]))
    return ds.assign_coords({name: ids}), [f"'{name}'", "wrong dtype"]


def _wrong_dims(draw, ds):
    spatial = ds["signal"].dims[2:]
    choice = draw(st.sampled_from(["time transposed", "extra dim", "renamed dim", "lost dim",
                                   "mask transposed" if ds.attrs["domain"] == "grid" else "narrow adjacency"]))
    if choice == "time transposed":
        return ds.assign(time=ds["time"].transpose()), ["'time'", "wrong dims"]
    if choice == "extra dim":
        return ds.assign(signal=ds["signal"].expand_dims(channel=2, axis=-1)), ["'signal'", "wrong dims"]
    if choice == "renamed dim":
        dims = (*ds["signal"].dims[:-1], "region")
        return ds.assign(signal=(dims, ds["signal"].values)), ["'signal'", "wrong dims"]
    if choice == "lost dim":  # a 3-D grid's signal becomes 2-D and then disagrees with the mask
        return ds.assign(signal=ds["signal"].isel({spatial[0]: 0})), ["'signal'"]
    if choice == "mask transposed":
        return ds.assign(mask=ds["mask"].transpose()), ["'mask'", "wrong dims"]
    narrow = ds["adjacency"].values[:, :-1]
    return ds.drop_vars(["adjacency", "neighbor"], errors="ignore").assign(
        adjacency=(("node", "neighbor"), narrow)), ["'adjacency'", "shape"]


def _nonfinite_signal(draw, ds):
    i, j = draw(st.sampled_from(_present(ds).tolist()))
    value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    bad = _set(ds, "signal", (i, j, *_spatial_index(draw, ds)), value)
    return bad, ["'signal'", repr(_subjects(ds)[i]), f"visit {j}", "NaN" if np.isnan(value) else "inf"]


def _all_nan_visit(draw, ds):
    i, j = draw(st.sampled_from(_present(ds).tolist()))
    return _set(ds, "signal", (i, j), np.nan), ["'signal'", repr(_subjects(ds)[i]), f"visit {j}", "all NaN"]


def _signal_at_missing_visit(draw, ds):
    i, j = draw(st.sampled_from(np.argwhere(np.isnan(ds["time"].values)).tolist()))
    return _set(ds, "signal", (i, j), 0.5), ["'signal'", repr(_subjects(ds)[i]), f"visit {j}", "NaN"]


def _nan_time_at_present_visit(draw, ds):
    i, j = draw(st.sampled_from([p for p in _present(ds).tolist() if p[1] > 0]))
    return _set(ds, "time", (i, j), np.nan), ["'signal'", repr(_subjects(ds)[i]), f"visit {j}"]


def _missing_first_visit(draw, ds):
    i = draw(st.integers(0, ds.sizes["subject"] - 1))
    bad = _set(ds, "time", (i, 0), np.nan)
    if draw(st.booleans()):
        bad = _set(bad, "signal", (i, 0), np.nan)
    return bad, ["'time'", repr(_subjects(ds)[i]), "visit 0", "missing"]


def _inf_time(draw, ds):
    i, j = draw(st.integers(0, ds.sizes["subject"] - 1)), draw(st.integers(0, ds.sizes["visit"] - 1))
    value = draw(st.sampled_from([np.inf, -np.inf]))
    return _set(ds, "time", (i, j), value), ["'time'", repr(_subjects(ds)[i]), f"visit {j}", "inf"]


def _negative_first_time(draw, ds):
    i = draw(st.integers(0, ds.sizes["subject"] - 1))
    bad = _set(ds, "time", (i, 0), -draw(st.floats(1e-3, 100.0)))
    return bad, ["'time'", repr(_subjects(ds)[i]), "visit 0", "negative"]


def _unsorted_time(draw, ds):
    time = ds["time"].values
    rows = [i for i in range(time.shape[0]) if (~np.isnan(time[i])).sum() >= 2]
    i = draw(st.sampled_from(rows))
    present = np.flatnonzero(~np.isnan(time[i]))
    k = draw(st.integers(1, len(present) - 1))
    back = draw(st.sampled_from([0.0, 0.5, 5.0]))  # 0: a duplicated visit time
    bad = _set(ds, "time", (i, present[k]), time[i, present[k - 1]] - back)
    return bad, ["'time'", repr(_subjects(ds)[i]), f"visit {present[k]}", "ascending"]


def _duplicate_subject(draw, ds):
    a, b = draw(st.lists(st.integers(0, ds.sizes["subject"] - 1), min_size=2, max_size=2, unique=True))
    ids = ds["subject"].values.copy()
    ids[b] = ids[a]
    return ds.assign_coords(subject=ids), ["'subject'", "duplicate", repr(ids[a])]


def _empty(dim):
    return lambda draw, ds: (ds.isel({dim: []}), ["'signal'", "empty"])


def _bad_truth(draw, ds):
    names = [n for n in ("true_subtype", "true_diffusivity", "true_reaction") if n in ds]
    name, i = draw(st.sampled_from(names)), draw(st.integers(0, ds.sizes["subject"] - 1))
    if name == "true_subtype":
        value = draw(st.sampled_from(["prion_like", "Fisher_KPP", ""]))
        return _set(ds, name, i, value), [f"'{name}'", repr(_subjects(ds)[i]), repr(value)]
    return _set(ds, name, i, draw(st.sampled_from([np.nan, np.inf]))), [f"'{name}'", repr(_subjects(ds)[i])]


def _not_a_dataset(draw, ds):
    bad = draw(st.sampled_from([ds["signal"], ds.to_dict(), None]))
    return bad, ["expected an xarray.Dataset"]


def _adjacency(kind):
    def mutate(draw, ds):
        a = ds["adjacency"].values.copy()
        k = a.shape[0]
        i, j = draw(st.lists(st.integers(0, k - 1), min_size=2, max_size=2, unique=True)) if k >= 2 else (0, 0)
        if kind == "diagonal":
            a[i, i] = draw(st.floats(0.01, 10.0))
        elif kind == "NaN or inf":
            a[i, j] = a[j, i] = draw(st.sampled_from([np.nan, np.inf]))
        elif kind == "symmetric":
            a[i, j] += draw(st.floats(0.01, 10.0))
        else:
            a[i, j] = a[j, i] = -draw(st.floats(0.01, 10.0))
        return ds.assign(adjacency=(("node", "neighbor"), a)), ["'adjacency'", kind]
    return mutate


def _empty_mask(draw, ds):
    return ds.assign(mask=ds["mask"] * 0), ["'mask'", "no cell"]


def _mask_not_binary(draw, ds):
    value = draw(st.sampled_from([2, 3, -1, 127, -128]))
    return _set(ds, "mask", _spatial_index(draw, ds), value), ["'mask'", "only 0 (outside) and 1"]


def _nonfinite_coordinate(draw, ds):
    dim = draw(st.sampled_from(ds["mask"].dims))
    coord = ds[dim].values.astype(np.float64)
    coord[draw(st.integers(0, coord.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return ds.assign_coords({dim: coord}), [f"'{dim}'", "evenly spaced and increasing"]


def _uneven_coordinate(draw, ds):
    dim = draw(st.sampled_from(ds["mask"].dims))
    coord = ds[dim].values.astype(np.float64)
    kind = draw(st.sampled_from(["reversed", "constant", "uneven"]))
    if kind == "reversed":
        coord = coord[::-1].copy()
    elif kind == "constant":
        coord[:] = coord[0]
    elif coord.size >= 3:
        coord[draw(st.integers(1, coord.size - 2))] += (coord[1] - coord[0]) * draw(st.floats(0.1, 0.4))
    else:
        coord[1] = coord[0] - (coord[1] - coord[0])
    return ds.assign_coords({dim: coord}), [f"'{dim}'", "evenly spaced and increasing"]


def _has_missing_visit(ds):
    return bool(np.isnan(ds["time"].values).any())


def _has_later_visit(ds):
    return bool((_present(ds)[:, 1] > 0).any())


def _has_two_visits(ds):
    return bool(((~np.isnan(ds["time"].values)).sum(axis=1) >= 2).any())


def _has_truth(ds):
    return any(n in ds for n in ("true_subtype", "true_diffusivity", "true_reaction"))


BOTH, GRAPH, GRID = ("graph", "grid"), ("graph",), ("grid",)
MUTATIONS = {  # name: (domains, applies to the dataset?, mutation, survives writing to NetCDF)
    "drop-variable": (BOTH, None, _drop_variable, True),
    "drop-attribute": (BOTH, None, _drop_attribute, True),
    "unknown-domain": (BOTH, None, _unknown_domain, True),
    "other-domain": (BOTH, None, _other_domain, True),
    "schema-version": (BOTH, None, _schema_version, True),
    "time-unit-type": (BOTH, None, _time_unit_type, True),
    "wrong-dtype": (BOTH, None, _wrong_dtype, True),
    "non-string-id": (BOTH, None, _non_string_id, False),  # NetCDF would store None/NaN as ""
    "wrong-dims": (BOTH, None, _wrong_dims, True),
    "nonfinite-signal": (BOTH, None, _nonfinite_signal, True),
    "all-nan-present-visit": (BOTH, None, _all_nan_visit, True),
    "signal-at-missing-visit": (BOTH, _has_missing_visit, _signal_at_missing_visit, True),
    "nan-time-at-present-visit": (BOTH, _has_later_visit, _nan_time_at_present_visit, True),
    "missing-first-visit": (BOTH, None, _missing_first_visit, True),
    "inf-time": (BOTH, None, _inf_time, True),
    "negative-first-time": (BOTH, None, _negative_first_time, True),
    "unsorted-or-repeated-time": (BOTH, _has_two_visits, _unsorted_time, True),
    "duplicate-subject": (BOTH, lambda ds: ds.sizes["subject"] >= 2, _duplicate_subject, True),
    "no-subjects": (BOTH, None, _empty("subject"), False),  # NetCDF reads an empty subject coord as float64
    "no-visits": (BOTH, None, _empty("visit"), True),
    "bad-truth": (BOTH, _has_truth, _bad_truth, True),
    "not-a-dataset": (BOTH, None, _not_a_dataset, False),
    "adjacency-asymmetric": (GRAPH, lambda ds: ds.sizes["node"] >= 2, _adjacency("symmetric"), True),
    "adjacency-negative": (GRAPH, lambda ds: ds.sizes["node"] >= 2, _adjacency("negative"), True),
    "adjacency-diagonal": (GRAPH, None, _adjacency("diagonal"), True),
    "adjacency-nonfinite": (GRAPH, None, _adjacency("NaN or inf"), True),
    "mask-empty": (GRID, None, _empty_mask, True),
    "mask-not-binary": (GRID, None, _mask_not_binary, True),
    "coordinate-nonfinite": (GRID, None, _nonfinite_coordinate, True),
    "coordinate-uneven": (GRID, None, _uneven_coordinate, True),
}
CASES = [(domain, name) for name, (domains, *_) in MUTATIONS.items() for domain in domains]
STORED = [name for name, (*_, stored) in MUTATIONS.items() if stored]


def _broken(data, name, domain=None):
    """A valid cohort to which mutation ``name`` applies, mutated; and the fragments its error must name."""
    _, applies, mutate, _ = MUTATIONS[name]
    ds = data.draw(cohorts(domain).filter(applies) if applies else cohorts(domain))
    return mutate(data.draw, ds.copy(deep=True))


def _assert_one_clear_error(info, fragments, source=None):
    message = str(info.value)
    assert "\n" not in message, message
    if source is not None:
        assert message.startswith(f"{source}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("domain, name", CASES)
@settings(max_examples=4, **SETTINGS)
@given(data=st.data())
def test_mutated_cohort_is_rejected_with_one_clear_error(domain, name, data):
    bad, fragments = _broken(data, name, domain)
    with pytest.raises(PyrovaePDEError) as info:
        validate_dataset(bad)
    assert isinstance(info.value, ContractError)
    _assert_one_clear_error(info, fragments)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.nc"
        with pytest.raises(ContractError) as info:
            save_dataset(bad, path)
        _assert_one_clear_error(info, fragments, source=path)
        assert list(Path(tmp).iterdir()) == []


@pytest.mark.parametrize("name", STORED)
@settings(max_examples=2, **SETTINGS)
@given(data=st.data())
def test_mutated_cohort_file_is_rejected_by_load_dataset(name, data):
    domain = data.draw(st.sampled_from(MUTATIONS[name][0]))
    bad, fragments = _broken(data, name, domain)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.nc"
        bad.to_netcdf(path, engine="h5netcdf")
        with pytest.raises(ContractError) as info:
            load_dataset(path)
    _assert_one_clear_error(info, fragments, source=path)


# --------------------------------------------------------------------------- manifests
COLUMNS_EXTRA = ["age", "tracer"]


@st.composite
def manifests(draw, min_scans=1):
    """Rows of a valid manifest (dicts of cells), its columns, and the expected (subject, time) per row.

    Subjects use times or dates, rows of different subjects interleave; with ``min_scans`` 2 the first
    subject has two scans or more (an import then keeps at least one subject).
    """
    n = draw(st.integers(1, 4))
    subjects = draw(st.lists(MANIFEST_IDS, min_size=n, max_size=n, unique=True))
    scans, expected = {}, {}
    for s, subject in enumerate(subjects):
        k = draw(st.integers(min_scans if s == 0 else 1, 4))
        if draw(st.booleans()):
            start = draw(st.dates(dt.date(1990, 1, 1), dt.date(2030, 1, 1)))
            dates = [start + dt.timedelta(days=int(d)) for d in np.cumsum([0] + draw(
                st.lists(st.integers(1, 800), min_size=k - 1, max_size=k - 1)))]
            scans[subject] = [{"date": d.isoformat()} for d in dates]
            expected[subject] = [(d - start).days / 365.25 for d in dates]
        else:
            start = draw(st.floats(0.0, 10.0))
            gaps = draw(st.lists(st.floats(0.01, 5.0), min_size=k - 1, max_size=k - 1))
            times = [float(t) for t in start + np.cumsum([0.0] + gaps)]
            scans[subject] = [{"time": repr(t)} for t in times]
            expected[subject] = times
    order = draw(st.permutations([s for s in subjects for _ in scans[s]]))
    rows, want, seen = [], [], {s: 0 for s in subjects}
    for subject in order:
        v = seen[subject]
        seen[subject] += 1
        row = {"subject": subject, "image": f"scans/{len(rows)}.nii", **scans[subject][v]}
        row.update({c: draw(st.sampled_from(["", "71", "FBP"])) for c in COLUMNS_EXTRA})
        rows.append(row)
        want.append((subject, v, expected[subject][v]))
    used = {c for row in rows for c in ("time", "date") if c in row}
    columns = draw(st.permutations(["subject", "image", *sorted(used), *COLUMNS_EXTRA]))
    return rows, columns, want


def _write_csv(path, rows, columns):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns] + row.get("_extra", []))
    return path


@settings(max_examples=30, **SETTINGS)
@given(manifest=manifests())
def test_valid_manifest_is_read_with_its_subjects_visits_and_times(manifest):
    rows, columns, want = manifest
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_csv(Path(tmp) / "manifest.csv", rows, columns)
        frame = read_manifest(path)
        assert frame.attrs["manifest"] == str(path)
        assert frame["image"].tolist() == [str(Path(tmp) / row["image"]) for row in rows]
    assert frame["subject"].tolist() == [s for s, _, _ in want]
    assert frame["visit"].tolist() == [v for _, v, _ in want]
    np.testing.assert_allclose(frame["time"].to_numpy(), [t for _, _, t in want], rtol=0, atol=1e-12)
    assert frame["line"].tolist() == list(range(2, len(rows) + 2))
    assert frame["image_given"].tolist() == [row["image"] for row in rows]


SHAPE = (3, 3, 2)


def _write_cohort(root, rows, columns):
    """The manifest, a mask (top slab) and reference (bottom slab), and one tiny NIfTI per row."""
    rng = np.random.default_rng(0)
    (root / "scans").mkdir()
    mask, reference = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)
    mask[..., 1], reference[..., 0] = 1, 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(root / "mask.nii"))
    nib.save(nib.Nifti1Image(reference, np.eye(4)), str(root / "ref.nii"))
    for row in rows:
        nib.save(nib.Nifti1Image(rng.uniform(1.0, 2.0, SHAPE).astype(np.float32), np.eye(4)), str(root / row["image"]))
    return _write_csv(root / "manifest.csv", rows, columns)


def _import(root, manifest):
    return import_cohort(manifest, mask=root / "mask.nii", reference=root / "ref.nii", progress=False)


@settings(max_examples=12, **SETTINGS)
@given(manifest=manifests(min_scans=2))
def test_valid_manifest_imports_its_subjects_and_visits(manifest):
    rows, columns, want = manifest
    counts = {s: sum(1 for w in want if w[0] == s) for s, _, _ in want}
    kept = [s for s in counts if counts[s] >= 2]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest_path = _write_cohort(root, rows, columns)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = _import(root, manifest_path)
    assert list(ds["subject"].values) == kept
    assert ds.sizes["visit"] == max(counts[s] for s in kept)
    expected = np.full((len(kept), ds.sizes["visit"]), np.nan)
    for subject, v, t in want:
        if subject in kept:
            expected[kept.index(subject), v] = t
    np.testing.assert_allclose(ds["time"].values, expected, rtol=0, atol=1e-12)
    dropped = [s for s in counts if counts[s] < 2]
    assert ds.attrs["dropped_subjects"] == ", ".join(dropped)
    messages = [str(w.message) for w in caught if issubclass(w.category, ImagingWarning)]
    assert len(messages) == (1 if dropped else 0)
    assert all(s in messages[0] for s in dropped)


def _at(rows, r):
    return f"line {r + 2} (subject {rows[r]['subject']!r})"


def _rows_of_subject_with(rows, n_scans):
    counts = {}
    for row in rows:
        counts[row["subject"]] = counts.get(row["subject"], 0) + 1
    return [s for s, c in counts.items() if c >= n_scans]


def _m_duplicate_row(draw, rows, columns):
    r = draw(st.integers(0, len(rows) - 1))
    at = draw(st.integers(r + 1, len(rows)))
    rows.insert(at, dict(rows[r]))
    return rows, columns, [f"subject {rows[r]['subject']!r} has two scans at", f"(lines {r + 2} and {at + 2})",
                           "must be unique"]


def _m_duplicate_time(draw, rows, columns):
    subject = draw(st.sampled_from(_rows_of_subject_with(rows, 2)))
    idx = [r for r, row in enumerate(rows) if row["subject"] == subject]
    a, b = sorted(draw(st.lists(st.sampled_from(idx), min_size=2, max_size=2, unique=True)))
    key = "time" if "time" in rows[a] else "date"
    rows[b][key] = rows[a][key]
    return rows, columns, [f"subject {subject!r} has two scans at {key}", f"(lines {a + 2} and {b + 2})"]


def _m_bad_time(draw, rows, columns):
    idx = [r for r, row in enumerate(rows) if "time" in row]
    r = draw(st.sampled_from(idx))
    value = draw(st.sampled_from(["abc", "nan", "inf", "-inf", "1e400", "1,5", "2y", "-0.5", "-3", ""]))
    rows[r]["time"] = value
    what = ("exactly one of 'time' or 'date'" if value == "" else
            f"negative time {float(value)}" if value.startswith("-") and value != "-inf" else
            f"time {value!r} is not a number")
    return rows, columns, [_at(rows, r), what]


def _m_bad_date(draw, rows, columns):
    idx = [r for r, row in enumerate(rows) if "date" in row]
    r = draw(st.sampled_from(idx))
    value = draw(st.sampled_from(["2020-02-30", "2021-13-01", "0000-01-01", "2020-1-1", "20200101", "2020/01/01",
                                  "yesterday"]))
    rows[r]["date"] = value
    return rows, columns, [_at(rows, r), f"date {value!r}"]


def _m_empty_cell(draw, rows, columns):
    r, column = draw(st.integers(0, len(rows) - 1)), draw(st.sampled_from(["subject", "image"]))
    where = f"line {r + 2} (subject '?')" if column == "subject" else _at(rows, r)
    rows[r][column] = ""
    return rows, columns, [where, f"the '{column}' cell is empty"]


def _m_unsorted(draw, rows, columns):
    subject = draw(st.sampled_from(_rows_of_subject_with(rows, 2)))
    idx = [r for r, row in enumerate(rows) if row["subject"] == subject]
    k = draw(st.integers(1, len(idx) - 1))
    a, b = idx[k - 1], idx[k]
    key = "time" if "time" in rows[a] else "date"
    rows[a][key], rows[b][key] = rows[b][key], rows[a][key]
    return rows, columns, [f"subject {subject!r}, line {b + 2}: {key}", "unsorted"]


def _m_time_and_date(draw, rows, columns):
    r = draw(st.integers(0, len(rows) - 1))
    rows[r].update(time="1.0", date="2020-01-01")
    columns = columns + [c for c in ("time", "date") if c not in columns]
    return rows, columns, [_at(rows, r), "exactly one of 'time' or 'date'"]


def _m_mixed_subject(draw, rows, columns):
    subject = draw(st.sampled_from(_rows_of_subject_with(rows, 2)))
    r = draw(st.sampled_from([r for r, row in enumerate(rows) if row["subject"] == subject]))
    if "time" in rows[r]:
        rows[r]["date"] = "2020-01-01"
        del rows[r]["time"]
    else:
        rows[r]["time"] = "1.0"
        del rows[r]["date"]
    columns = columns + [c for c in ("time", "date") if c not in columns]
    return rows, columns, [f"subject {subject!r}", "mixes 'time' and 'date'"]


def _m_missing_column(draw, rows, columns):
    name = draw(st.sampled_from(["subject", "image", "time (or date)"]))
    drop = {"time", "date"} if name == "time (or date)" else {name}
    return rows, [c for c in columns if c not in drop], ["lacks column(s)", name]


def _m_duplicate_column(draw, rows, columns):
    name = draw(st.sampled_from(columns))
    return rows, columns + [name], [f"'{name}'", "more than once"]


def _m_extra_cell(draw, rows, columns):
    r = draw(st.integers(0, len(rows) - 1))
    rows[r]["_extra"] = ["surplus"]
    return rows, columns, [f"line {r + 2} has more cells than the header"]


def _m_no_rows(draw, rows, columns):
    return [], columns, ["header but no scans"]


def _m_no_file(draw, rows, columns):
    return None, columns, ["manifest file not found"]


def _has_repeated_subject(manifest):
    return bool(_rows_of_subject_with(manifest[0], 2))


MANIFEST_MUTATIONS = {  # name: (applies to the manifest?, mutation)
    "duplicate-row": (None, _m_duplicate_row),
    "duplicate-time": (_has_repeated_subject, _m_duplicate_time),
    "bad-time": (lambda m: any("time" in row for row in m[0]), _m_bad_time),
    "bad-date": (lambda m: any("date" in row for row in m[0]), _m_bad_date),
    "empty-cell": (None, _m_empty_cell),
    "unsorted": (_has_repeated_subject, _m_unsorted),
    "time-and-date": (None, _m_time_and_date),
    "mixed-subject": (_has_repeated_subject, _m_mixed_subject),
    "missing-column": (None, _m_missing_column),
    "duplicate-column": (None, _m_duplicate_column),
    "extra-cell": (None, _m_extra_cell),
    "no-rows": (None, _m_no_rows),
    "no-file": (None, _m_no_file),
}


@pytest.mark.parametrize("name", list(MANIFEST_MUTATIONS))
@settings(max_examples=5, **SETTINGS)
@given(data=st.data())
def test_mutated_manifest_is_rejected_with_one_clear_error(name, data):
    applies, mutate = MANIFEST_MUTATIONS[name]
    rows, columns, _ = data.draw(manifests().filter(applies) if applies else manifests())
    rows, columns, fragments = mutate(data.draw, [dict(row) for row in rows], list(columns))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.csv"
        if rows is not None:
            _write_csv(path, rows, columns)
        with pytest.raises(PyrovaePDEError) as info:
            read_manifest(path)
    assert isinstance(info.value, ImagingError)
    _assert_one_clear_error(info, fragments, source=path)


IMPORT_FAULTS = {"missing": "image file not found", "directory": "image file not found",
                 "not-nifti": "not a readable NIfTI", "nan-in-mask": "NaN/inf voxels inside the mask"}


@pytest.mark.parametrize("fault", list(IMPORT_FAULTS))
@settings(max_examples=3, **SETTINGS)
@given(manifest=manifests(min_scans=2), data=st.data())
def test_import_names_the_scan_that_is_missing_or_unreadable(fault, manifest, data):
    rows, columns, _ = manifest
    repeated = _rows_of_subject_with(rows, 2)  # single-scan subjects are dropped before any file is read
    r = data.draw(st.sampled_from([r for r, row in enumerate(rows) if row["subject"] in repeated]))
    visit = sum(1 for row in rows[:r] if row["subject"] == rows[r]["subject"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest_path = _write_cohort(root, rows, columns)
        image = root / rows[r]["image"]
        image.unlink()
        if fault == "directory":
            image.mkdir()
        elif fault == "not-nifti":
            image.write_text("subject,time\nnot an image\n")
        elif fault == "nan-in-mask":
            volume = np.ones(SHAPE, np.float32)
            volume[1, 1, 1] = np.nan
            nib.save(nib.Nifti1Image(volume, np.eye(4)), str(image))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImagingWarning)
            with pytest.raises(PyrovaePDEError) as info:
                _import(root, manifest_path)
    assert isinstance(info.value, ImagingError)
    _assert_one_clear_error(info, [f"{manifest_path} line {r + 2}: subject {rows[r]['subject']!r}, visit {visit}",
                                   f"image {rows[r]['image']!r}", IMPORT_FAULTS[fault]])


@settings(max_examples=40, **SETTINGS)
@given(header=st.sampled_from(["", "subject,time,image\n", "subject,date,image\n", "image,time,date,subject\n"]),
       text=st.text(st.sampled_from(list(",\n\"' -.:/0123456789aeimnstubjcgd") + ["\r", "\t", "é", "\x00"]),
                    max_size=80))
def test_any_csv_text_is_read_or_rejected_with_an_imaging_error(header, text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.csv"
        path.write_text(header + text, encoding="utf-8")
        try:
            frame = read_manifest(path)
        except ImagingError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(f"{path}"), str(exc)
        else:
            assert {"subject", "visit", "time", "image"} <= set(frame.columns) and len(frame) >= 1


@pytest.mark.parametrize("bad", ["sub\x00-1", "sub-\ud800"])
def test_a_subject_id_netcdf_cannot_store_is_refused_before_writing(tmp_path, bad):
    ds = simulate("graph", 2, seed=0)
    ds = ds.assign_coords(subject=[bad, "sub-2"])
    with pytest.raises(ContractError, match="NetCDF cannot store"):
        save_dataset(ds, tmp_path / "c.nc")
    assert not (tmp_path / "c.nc").exists()


def test_a_graph_without_nodes_is_refused():
    ds = simulate("graph", 2, seed=0).isel(node=slice(0, 0))
    with pytest.raises(ContractError, match="no nodes"):
        validate_dataset(ds)
