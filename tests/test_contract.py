"""Data contract v1: every rule rejects a bad file with a message naming the file and the variable
(and the subject/visit where one is at fault); good files round-trip; writes are atomic."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pyrovae_pde.data import ContractError, load_dataset, save_dataset, simulate, validate_dataset


def _write(ds: xr.Dataset, path: Path) -> Path:
    ds.to_netcdf(path, engine="h5netcdf")
    return path


def _expect_error(ds: xr.Dataset, tmp_path: Path, *fragments: str) -> str:
    """Write ``ds`` unvalidated, load it, and check the ContractError names the file and ``fragments``."""
    path = _write(ds, tmp_path / "bad.nc")
    with pytest.raises(ContractError) as info:
        load_dataset(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- grid datasets
def _set(ds, name, index, value):
    values = ds[name].values.copy()
    values[index] = value
    ds[name] = (ds[name].dims, values)
    return ds


def _del_attr(ds, name):
    del ds.attrs[name]
    return ds


GRID_CASES = {
    # name: (mutation, fragments the message must contain)
    "missing signal": (lambda ds: ds.drop_vars("signal"), ["'signal'", "missing variable"]),
    "missing time": (lambda ds: ds.drop_vars("time"), ["'time'", "missing variable"]),
    "missing mask": (lambda ds: ds.drop_vars("mask"), ["'mask'", "missing variable"]),
    "time dims transposed": (lambda ds: ds.assign(time=ds["time"].transpose("visit", "subject")),
                             ["'time'", "wrong dims"]),
    "signal spatial dims swapped": (lambda ds: ds.assign(signal=ds["signal"].transpose("subject", "visit", "x", "y")),
                                    ["'signal'", "wrong dims"]),
    "signal integer dtype": (lambda ds: ds.assign(signal=ds["signal"].fillna(0).astype(np.int64)),
                             ["'signal'", "wrong dtype"]),
    "mask float dtype": (lambda ds: ds.assign(mask=ds["mask"].astype(np.float64)), ["'mask'", "wrong dtype"]),
    "wrong schema_version": (lambda ds: ds.assign_attrs(schema_version="2"), ["'schema_version'", "'2'"]),
    "missing schema_version": (lambda ds: _del_attr(ds, "schema_version"), ["'schema_version'", "attribute"]),
    "missing domain": (lambda ds: _del_attr(ds, "domain"), ["'domain'", "attribute"]),
    "invalid domain": (lambda ds: ds.assign_attrs(domain="mesh"), ["'domain'", "'mesh'"]),
    "NaN in signal": (lambda ds: _set(ds, "signal", (1, 2, 16, 16), np.nan),
                      ["'signal'", "'sub-0001'", "visit 2", "NaN"]),
    "inf in signal": (lambda ds: _set(ds, "signal", (2, 0, 10, 12), np.inf),
                      ["'signal'", "'sub-0002'", "visit 0", "inf"]),
    "first visit missing": (lambda ds: _set(_set(ds, "time", (1, 0), np.nan), "signal", (1, 0), np.nan),
                            ["'time'", "'sub-0001'", "visit 0"]),
    "unsorted times": (lambda ds: _set(ds, "time", 2, [0.0, 24.0, 6.0]),
                       ["'time'", "'sub-0002'", "visit 2", "ascending"]),
    "negative first time": (lambda ds: _set(ds, "time", (0, 0), -1.0),
                            ["'time'", "'sub-0000'", "visit 0", "negative"]),
    "negative later time": (lambda ds: _set(ds, "time", (0, 1), -3.0), ["'time'", "'sub-0000'", "visit 1"]),
    "inf time": (lambda ds: _set(ds, "time", (1, 2), np.inf), ["'time'", "'sub-0001'", "visit 2", "inf"]),
    "present time, all-NaN signal": (lambda ds: _set(ds, "signal", (0, 1), np.nan),
                                     ["'signal'", "'sub-0000'", "visit 1", "all NaN"]),
    "missing time, signal present": (lambda ds: _set(ds, "time", (2, 2), np.nan),
                                     ["'signal'", "'sub-0002'", "visit 2", "NaN"]),
    "mask/signal mismatch": (lambda ds: ds.assign(mask=(("z", "y", "x"), np.stack([ds["mask"].values] * 2))),
                             ["'mask'", "'signal'"]),
    "mask not 0/1": (lambda ds: _set(ds, "mask", (16, 16), 2), ["'mask'", "0", "1"]),
    "mask all zero": (lambda ds: ds.assign(mask=ds["mask"] * 0), ["'mask'", "no cell"]),
    "uneven coordinate": (lambda ds: ds.assign_coords(x=ds["x"].values + (np.arange(32) == 5) * 0.3),
                          ["'x'", "evenly spaced"]),
    "decreasing coordinate": (lambda ds: ds.assign_coords(y=-ds["y"].values), ["'y'", "increasing"]),
    "duplicate subject IDs": (lambda ds: ds.assign_coords(subject=["sub-0000", "sub-0000", "sub-0002"]),
                              ["'subject'", "sub-0000", "duplicate"]),
    "unknown true_subtype": (lambda ds: _set(ds, "true_subtype", 1, "prion_like"),
                             ["'true_subtype'", "'sub-0001'", "'prion_like'", "fisher_kpp"]),
    "NaN true_diffusivity": (lambda ds: _set(ds, "true_diffusivity", 2, np.nan),
                             ["'true_diffusivity'", "'sub-0002'"]),
}


@pytest.mark.parametrize("case", list(GRID_CASES))
def test_grid_contract_rule_rejects_bad_file(paper_ds, tmp_path, case):
    mutate, fragments = GRID_CASES[case]
    bad = mutate(paper_ds.copy(deep=True))
    _expect_error(bad, tmp_path, *fragments)
    # The same rule applies to in-memory datasets (no file named).
    with pytest.raises(ContractError):
        validate_dataset(bad)


# --------------------------------------------------------------------------- graph datasets
def _adjacency(ds, change):
    a = ds["adjacency"].values.copy()
    change(a)
    return ds.assign(adjacency=(("node", "neighbor"), a))


def _sym_set(a, i, j, v):
    a[i, j] = a[j, i] = v


def _narrow_adjacency(ds):
    a = ds["adjacency"].values[:, :-1]
    ds = ds.drop_vars(["adjacency", "neighbor"])
    return ds.assign(adjacency=(("node", "neighbor"), a))


GRAPH_CASES = {
    "missing adjacency": (lambda ds: ds.drop_vars("adjacency"), ["'adjacency'", "missing variable"]),
    "missing signal": (lambda ds: ds.drop_vars("signal"), ["'signal'", "missing variable"]),
    "missing time": (lambda ds: ds.drop_vars("time"), ["'time'", "missing variable"]),
    "missing domain": (lambda ds: _del_attr(ds, "domain"), ["'domain'", "attribute"]),
    "wrong signal dims": (lambda ds: ds.assign(signal=(("subject", "visit", "region"), ds["signal"].values)),
                          ["'signal'", "wrong dims"]),
    "non-symmetric adjacency": (lambda ds: _adjacency(ds, lambda a: a.__setitem__((0, 1), a[0, 1] + 0.5)),
                                ["'adjacency'", "symmetric"]),
    "negative adjacency": (lambda ds: _adjacency(ds, lambda a: _sym_set(a, 3, 7, -0.1)),
                           ["'adjacency'", "negative"]),
    "nonzero diagonal": (lambda ds: _adjacency(ds, lambda a: a.__setitem__((2, 2), 0.3)),
                         ["'adjacency'", "diagonal"]),
    "NaN adjacency": (lambda ds: _adjacency(ds, lambda a: _sym_set(a, 1, 4, np.nan)), ["'adjacency'", "NaN"]),
    "adjacency not square": (_narrow_adjacency, ["'adjacency'", "shape"]),
}


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_graph_contract_rule_rejects_bad_file(graph_ds, tmp_path, case):
    mutate, fragments = GRAPH_CASES[case]
    _expect_error(mutate(graph_ds.copy(deep=True)), tmp_path, *fragments)


def test_graph_fixture_has_missing_visits(graph_ds):
    # The graph round-trip below is only meaningful if NaN padding is present.
    assert np.isnan(graph_ds["time"].values).any()


# --------------------------------------------------------------------------- 3-D grids
def _grid3d() -> xr.Dataset:
    mask = np.zeros((4, 5, 6), np.int8)
    mask[1:3, 1:4, 1:5] = 1
    rng = np.random.default_rng(0)
    signal = rng.uniform(0, 1, (2, 2, 4, 5, 6)) * mask
    return xr.Dataset(
        {"signal": (("subject", "visit", "z", "y", "x"), signal),
         "time": (("subject", "visit"), np.array([[0.0, 1.0], [0.5, 2.0]])),
         "mask": (("z", "y", "x"), mask)},
        coords={"subject": np.array(["s1", "s2"], dtype=object), "z": 2.0 * np.arange(4),
                "y": 2.0 * np.arange(5), "x": 2.0 * np.arange(6)},
        attrs={"schema_version": "1", "domain": "grid", "time_unit": "year"})


def test_grid3d_round_trips_with_its_spacing(tmp_path):
    from pyrovae_pde.data import domain_from_dataset

    ds = _grid3d()
    loaded = load_dataset(save_dataset(ds, tmp_path / "g3.nc"))
    xr.testing.assert_identical(loaded, ds)
    # 2 mm on every axis: each neighbour link has weight 1/4.
    assert np.isclose(domain_from_dataset(loaded).laplacian.toarray().min(), -0.25)


def test_grid3d_missing_z_coordinate_is_rejected(tmp_path):
    # Without the check, xarray's default 0, 1, 2, ... would give z a silent 1 mm spacing.
    _expect_error(_grid3d().drop_vars("z"), tmp_path, "'z'", "missing")


# --------------------------------------------------------------------------- unreadable files
def test_missing_file_is_a_contract_error(tmp_path):
    path = tmp_path / "nope.nc"
    with pytest.raises(ContractError, match="file not found") as info:
        load_dataset(path)
    assert str(path) in str(info.value)


def test_non_netcdf_file_is_a_contract_error(tmp_path):
    path = tmp_path / "notes.nc"
    path.write_text("subject,visit,signal\nsub-0,0,0.1\n")
    with pytest.raises(ContractError, match="not a readable NetCDF") as info:
        load_dataset(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- good files
@pytest.mark.parametrize("which", ["paper_ds", "graph_ds"])
def test_good_files_round_trip(request, tmp_path, which):
    ds = request.getfixturevalue(which)
    path = save_dataset(ds, tmp_path / "cohort.nc")
    loaded = load_dataset(path)
    xr.testing.assert_identical(loaded, ds)
    assert np.array_equal(loaded["signal"].values, ds["signal"].values, equal_nan=True)


def test_mni_grid_2d_slice_is_valid(tmp_path):
    pytest.importorskip("nilearn")
    ds = simulate("mni-grid", 3, seed=0, resolution=8, slice_axial=10)
    path = save_dataset(ds, tmp_path / "mni.nc")
    loaded = load_dataset(path)
    assert loaded["signal"].dims == ("subject", "visit", "y", "x")
    assert int(loaded["mask"].sum()) > 50
    assert np.allclose(np.diff(loaded["x"].values), 8.0) and np.allclose(np.diff(loaded["y"].values), 8.0)
    # Nothing outside the grey-matter mask at present visits.
    outside = loaded["mask"].values == 0
    assert np.all(loaded["signal"].values[..., outside] == 0)


# --------------------------------------------------------------------------- atomic writes
def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_save_rejects_invalid_dataset_and_leaves_existing_file(paper_ds, tmp_path):
    path = save_dataset(paper_ds, tmp_path / "cohort.nc")
    before = _snapshot(tmp_path)
    bad = paper_ds.copy(deep=True)
    bad["time"].values[0, 1] = 30.0  # not ascending any more
    with pytest.raises(ContractError, match="'time'") as info:
        save_dataset(bad, path)
    assert str(path) in str(info.value)
    assert _snapshot(tmp_path) == before


def test_failed_write_leaves_existing_file_and_no_temp_file(paper_ds, graph_ds, tmp_path):
    path = save_dataset(graph_ds, tmp_path / "cohort.nc")
    before = _snapshot(tmp_path)
    unwritable = paper_ds.copy(deep=True).assign_attrs(extra={"a": 1})  # valid, but NetCDF cannot store a dict
    with pytest.raises(TypeError):
        save_dataset(unwritable, path)
    assert _snapshot(tmp_path) == before
    xr.testing.assert_identical(load_dataset(path), graph_ds)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_existing_file_and_no_temp_file(paper_ds, tmp_path, monkeypatch, exc):
    path = save_dataset(paper_ds, tmp_path / "cohort.nc")
    before = _snapshot(tmp_path)
    real_to_netcdf = xr.Dataset.to_netcdf

    def write_then_fail(self, target, *args, **kwargs):
        real_to_netcdf(self, target, *args, **kwargs)  # the temporary file is complete...
        raise exc  # ...but the process fails before the rename

    monkeypatch.setattr(xr.Dataset, "to_netcdf", write_then_fail)
    with pytest.raises(type(exc)):
        save_dataset(paper_ds.isel(subject=[0]), path)
    assert _snapshot(tmp_path) == before


def test_successful_save_replaces_file_and_leaves_only_it(paper_ds, graph_ds, tmp_path):
    path = save_dataset(paper_ds, tmp_path / "sub" / "cohort.nc")
    save_dataset(graph_ds, path)
    assert sorted(os.listdir(path.parent)) == ["cohort.nc"]
    xr.testing.assert_identical(load_dataset(path), graph_ds)


def test_atomic_write_gives_the_file_the_mode_of_a_plain_open(tmp_path):
    """Files the package writes (cohorts, reports, figures) are readable like any other file the
    user creates: 0666 less the umask, not the 0600 of the temporary file they are written through."""
    from pyrovae_pde.data.contract import atomic_write

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "out.txt", lambda tmp: open(tmp, "w").write("x"))
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644


def test_a_lazily_read_cohort_checks_each_subjects_signal_when_it_reads_it(graph_ds, tmp_path):
    """``load_dataset(path, lazy=True)`` leaves the signal on disk and unchecked; ``LazyCohort`` reads
    and checks only the subjects asked for (the good ones pass, in the order asked), and a subject
    whose signal breaks the contract raises the message the eager load gives."""
    from pyrovae_pde.data import LazyCohort, cohort_tensors, domain_from_dataset

    bad = _set(graph_ds.copy(deep=True), "signal", (3, 0, 5), np.nan)
    path = _write(bad, tmp_path / "bad.nc")
    with pytest.raises(ContractError) as eager:
        load_dataset(path)
    domain = domain_from_dataset(graph_ds)
    cohort = LazyCohort(load_dataset(path, lazy=True), domain, source=str(path))
    assert cohort.n_subjects == 5 and cohort.read_subjects == 0 and cohort.times.shape == (5, 5)
    part = cohort.subset([4, 0, 4])
    whole = cohort_tensors(graph_ds, domain)
    assert part.subjects == [whole.subjects[i] for i in (4, 0, 4)] and cohort.read_subjects == 2
    assert np.array_equal(part.signal.numpy(), whole.signal[[4, 0, 4]].numpy())
    with pytest.raises(ContractError) as lazy:
        cohort.subset([1, 3])
    assert str(lazy.value) == str(eager.value) and "subject 'sub-0003'" in str(lazy.value)
