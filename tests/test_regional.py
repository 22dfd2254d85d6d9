"""The shipped hcp83 connectome, user connectome CSVs, the hcp83 simulator and ``import-regional``."""
from __future__ import annotations

import io
import re
from importlib import resources

import numpy as np
import pandas as pd
import pytest
from scipy.sparse.csgraph import connected_components

from pyrovae_pde.data import load_dataset, simulate
from pyrovae_pde.data.connectomes import available_connectomes, load_connectome
from pyrovae_pde.data.regional import cohort_to_regional_table, import_regional
from pyrovae_pde.errors import DomainError, PyrovaePDEError
from pyrovae_pde.interfaces.cli import main


@pytest.fixture(scope="module")
def hcp_ds():
    """A small noisy hcp83 cohort (5 subjects, 2-5 visits each)."""
    return simulate("hcp83", 5, seed=2, noise_sd=0.01)


@pytest.fixture(scope="module")
def table(hcp_ds):
    return cohort_to_regional_table(hcp_ds)


def _import(tmp_path, frame: pd.DataFrame, *extra: str) -> int:
    path = tmp_path / "table.csv"
    frame.to_csv(path, index=False)
    return main(["import-regional", str(path), "--connectome", "hcp83", "--out", str(tmp_path / "out.nc"), *extra])


# --- the shipped connectome -------------------------------------------------------------------------------


def test_hcp83_loads_as_a_connected_symmetric_graph_of_937_edges():
    connectome = load_connectome("hcp83")
    regions = pd.read_csv(io.StringIO(resources.files("pyrovae_pde").joinpath(
        "connectomes", "hcp83", "regions.csv").read_text()))
    adjacency = connectome.adjacency
    assert "hcp83" in available_connectomes()
    assert connectome.n_regions == 83 and adjacency.shape == (83, 83) and adjacency.dtype == np.float64
    assert connectome.regions == regions["region"].tolist()
    assert np.array_equal(adjacency, adjacency.T) and np.all(np.diag(adjacency) == 0) and np.all(adjacency >= 0)
    assert connected_components(adjacency > 0, directed=False)[0] == 1
    assert connectome.n_edges == 937  # SOURCE.md: W / max(W) >= 1e-2 keeps 937 of 3403 pairs
    assert adjacency.sum() == pytest.approx(83.0)  # mean weighted degree 1, as modular_connectome
    assert connectome.centroids.shape == (83, 3) and np.allclose(connectome.centroids, regions[["x", "y", "z"]])
    assert connectome.lobes == regions["lobe"].tolist() and connectome.hemispheres[-1] == "none"
    assert load_connectome("hcp83", threshold=0).n_edges == 83 * 82 // 2  # every pair has streamlines
    for package_file in ("SOURCE.md", "LICENSE-Connectomes.jl.txt", "connectome_lengths.csv"):
        assert resources.files("pyrovae_pde").joinpath("connectomes", "hcp83", package_file).is_file()


def _write_matrix(path, matrix, header=None, rows=None):
    header = NAMES if header is None else header
    rows = header if rows is None else rows
    lines = ["region," + ",".join(header)]
    lines += [f"{name}," + ",".join(str(v) for v in row) for name, row in zip(rows, matrix)]
    path.write_text("\n".join(lines) + "\n")
    return path


SQUARE = [[0, 2, 1, 0], [2, 0, 4, 0], [1, 4, 0, 0.5], [0, 0, 0.5, 0]]
NAMES = ["A", "B", "C", "D"]


def test_user_csv_connectome_is_max_normalised_thresholded_and_scaled(tmp_path):
    path = _write_matrix(tmp_path / "mine.csv", SQUARE)
    connectome = load_connectome(path)
    assert connectome.regions == NAMES and connectome.name == "mine"
    expected = np.asarray(SQUARE, dtype=float)
    assert np.allclose(connectome.adjacency, expected * 4 / expected.sum())
    assert np.array_equal(connectome.weights, expected)
    cut = r"after dropping weights below 0.2 of the largest is not connected .*'D' is cut off.*lower the threshold"
    with pytest.raises(DomainError, match=cut):
        load_connectome(path, threshold=0.2)  # 0.5 / 4 < 0.2 drops D's only edge


@pytest.mark.parametrize("change, message", [
    (lambda m, n: (m[:3], n, n[:3]), r"not square: the header names 4 regions but there are 3 rows"),
    (lambda m, n: ([row[:3] for row in m], n[:3], n), r"not square: the header names 3 regions but there are 4"),
    (lambda m, n: (m, n, ["A", "B", "D", "C"]), r"row 3 is named 'D' but column 3 of the header is 'C'"),
    (lambda m, n: (m, ["A", "B", "B", "D"], ["A", "B", "B", "D"]), r"repeated: 'B'"),
    (lambda m, n: ([[*m[0][:2], "x", m[0][3]], *m[1:]], n, n), r"row 'A', column 'C': 'x' is not a number"),
    (lambda m, n: ([[*m[0][:2], "nan", m[0][3]], *m[1:]], n, n), r"row 'A', column 'C': nan is not a finite"),
    (lambda m, n: ([[0, -2, 1, 0], [-2, 0, 4, 0], *m[2:]], n, n), r"row 'A', column 'B': negative weight -2"),
    (lambda m, n: ([[0, 3, 1, 0], *m[1:]], n, n), r"not symmetric: row 'A', column 'B' is 3 but the reverse is 2"),
    (lambda m, n: ([[0, 2, 1, 0], [2, 0, 4, 0], [1, 4, 0, 0], [0, 0, 0, 0]], n, n),
     r"the graph is not connected \(2 parts; 'D' is cut off from the rest\).*connect them$"),
])
def test_malformed_connectome_csv_gives_one_clear_error(tmp_path, change, message):
    matrix, header, rows = change([list(r) for r in SQUARE], list(NAMES))
    path = _write_matrix(tmp_path / "bad.csv", matrix, header, rows)
    with pytest.raises(DomainError, match=message) as caught:
        load_connectome(path)
    assert str(caught.value).startswith(f"connectome {path}: ")


def test_unknown_connectome_name_suggests_the_shipped_one(tmp_path):
    with pytest.raises(PyrovaePDEError, match="did you mean 'hcp83'"):
        load_connectome("hcp84")
    with pytest.raises(PyrovaePDEError, match="file not found"):
        load_connectome(tmp_path / "none.csv")


# --- the simulator ----------------------------------------------------------------------------------------


def test_hcp83_cohort_starts_in_the_entorhinal_cortex(hcp_ds, tmp_path):
    first = hcp_ds["signal"].values[:, 0].mean(axis=0)
    nodes = hcp_ds["node"].values.astype(str)
    top = set(nodes[np.argsort(first)[::-1][:2]])
    assert top == {"ctx-lh-entorhinal", "ctx-rh-entorhinal"}
    assert hcp_ds.attrs["benchmark"] == "hcp83" and hcp_ds.sizes["node"] == 83
    assert np.array_equal(hcp_ds["adjacency"].values, load_connectome("hcp83").adjacency)
    out = tmp_path / "sim.nc"
    assert main(["simulate", "--benchmark", "hcp83", "--subjects", "2", "--seed", "1", "--out", str(out)]) == 0
    assert load_dataset(out)["signal"].sizes["node"] == 83


# --- import-regional: round trips -------------------------------------------------------------------------


def _assert_same_cohort(imported, ds, atol=1e-12):
    n_visits = imported.sizes["visit"]
    assert list(imported["subject"].values) == list(ds["subject"].values)
    assert list(imported["node"].values) == list(ds["node"].values)
    assert np.allclose(imported["time"].values, ds["time"].values[:, :n_visits], atol=atol, equal_nan=True)
    assert np.allclose(imported["signal"].values, ds["signal"].values[:, :n_visits], atol=1e-12, equal_nan=True)
    assert np.all(np.isnan(ds["time"].values[:, n_visits:]))


def test_import_regional_round_trips_a_simulated_cohort(tmp_path, table, hcp_ds, capsys):
    assert _import(tmp_path, table, "--suvr-min", "0", "--suvr-max", "1") == 0
    assert "wrote" in capsys.readouterr().out
    imported = load_dataset(tmp_path / "out.nc")  # validates against the contract
    _assert_same_cohort(imported, hcp_ds)
    assert np.array_equal(imported["adjacency"].values, hcp_ds["adjacency"].values)
    assert imported.attrs["connectome"] == "hcp83"


def test_import_regional_with_dates_and_a_reference_region(tmp_path, table, hcp_ds):
    rng = np.random.default_rng(0)
    frame = table.copy()
    visits = frame[["subject", "time"]].drop_duplicates()
    reference = dict(zip(map(tuple, visits.to_numpy()), rng.uniform(0.8, 1.5, len(visits))))
    frame["value"] *= [reference[key] for key in zip(frame["subject"], frame["time"])]
    extra = visits.assign(region="cerebellum", value=[reference[tuple(k)] for k in visits.to_numpy()])
    frame = pd.concat([extra, frame]).sort_values(["subject", "time"], kind="stable")
    frame["date"] = [(pd.Timestamp("2020-03-01") + pd.Timedelta(days=round(t * 365.25))).date().isoformat()
                     for t in frame["time"]]
    frame = frame.drop(columns="time")[["subject", "date", "region", "value"]]
    assert _import(tmp_path, frame, "--reference-region", "cerebellum", "--suvr-min", "0", "--suvr-max", "1") == 0
    imported = load_dataset(tmp_path / "out.nc")
    _assert_same_cohort(imported, hcp_ds, atol=0.6 / 365.25)  # dates are whole days
    assert "cerebellum" not in imported["node"].values
    assert np.allclose(imported["reference_value"].values[:, 0], [reference[s, 0.0] for s in hcp_ds["subject"].values])


def test_import_regional_scales_to_the_unit_interval_and_drops_single_visits(tmp_path, table, capsys):
    frame = table[~((table["subject"] == "sub-0001") & (table["time"] > 0))]
    assert _import(tmp_path, frame) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "sub-0001" in err
    imported = load_dataset(tmp_path / "out.nc")
    assert "sub-0001" not in imported["subject"].values
    assert np.nanmin(imported["signal"].values) == 0.0 and np.nanmax(imported["signal"].values) == 1.0
    assert imported.attrs["suvr_min_rule"].startswith("cohort minimum")


# --- import-regional: malformed tables --------------------------------------------------------------------


def _unsorted(frame):
    first = frame[(frame["subject"] == "sub-0000") & (frame["time"] == 0)]
    return pd.concat([frame.drop(first.index), first])


def _set(frame, row, column, value):
    frame = frame.astype({column: object})
    frame.loc[frame.index[row], column] = value
    return frame


MALFORMED = {
    "unknown region": (lambda f: _set(f, 90, "region", "ctx-lh-entorhinall"),
                       r"line 92 \(subject 'sub-0000', time .*region 'ctx-lh-entorhinall'\): unknown region .*"
                       r"did you mean 'ctx-lh-entorhinal'\?"),
    "missing region": (lambda f: f.drop(f.index[100]),
                       r"subject 'sub-0000', visit 1 \(time .*\): no row for region\(s\) 'ctx-rh-superiorparietal'"),
    "duplicate row": (lambda f: pd.concat([f, f.iloc[[5]]]),
                      r"duplicate row: subject 'sub-0000', time 0.0, region 'ctx-rh-parsopercularis' is on lines 7 "
                      r"and 1745"),
    "text value": (lambda f: _set(f, 3, "value", "high"), r"line 5 .*: value 'high' is not a number"),
    "unsorted times": (_unsorted, r"line \d+: subject 'sub-0000': time 0.0 is listed after time [0-9.]+ \(line 2\)"
                                  r".*ascending time order"),
    "missing column": (lambda f: f.drop(columns="value"), r"lacks column\(s\) value"),
    "negative time": (lambda f: _set(f, 0, "time", -1.0), r"line 2 .*negative time -1"),
    "empty table": (lambda f: f.iloc[:0], r"the table has a header but no rows"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
@pytest.mark.parametrize("existing", [False, True])
def test_malformed_table_is_one_line_and_writes_nothing(tmp_path, table, capsys, kind, existing):
    change, message = MALFORMED[kind]
    out = tmp_path / "out.nc"
    if existing:
        out.write_bytes(b"previous cohort")
    assert _import(tmp_path, change(table.copy())) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pyrovae-pde import-regional: error: {tmp_path / 'table.csv'}")
    assert re.search(message, lines[0]), lines[0]
    assert (out.read_bytes() == b"previous cohort") if existing else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["table.csv"] + (["out.nc"] if existing else []))


def test_bad_connectome_for_import_is_one_line(tmp_path, table, capsys):
    bad = _write_matrix(tmp_path / "bad.csv", [[0, 3, 1, 0], *SQUARE[1:]])
    table.to_csv(tmp_path / "table.csv", index=False)
    assert main(["import-regional", str(tmp_path / "table.csv"), "--connectome", str(bad), "--out",
                 str(tmp_path / "out.nc")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not symmetric" in lines[0] and str(bad) in lines[0]
    assert not (tmp_path / "out.nc").exists()


def test_import_regional_on_a_user_connectome(tmp_path):
    path = _write_matrix(tmp_path / "mine.csv", SQUARE)
    frame = pd.DataFrame({"subject": ["s1"] * 8, "time": [0.0] * 4 + [1.5] * 4, "region": NAMES * 2,
                          "value": [1.0, 1.1, 1.2, 1.3, 1.5, 1.2, 1.2, 1.9]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    ds = import_regional(tmp_path / "t.csv", path, suvr_min=1.0, suvr_max=2.0)
    assert list(ds["node"].values) == NAMES and ds.attrs["connectome"] == "mine"
    assert np.allclose(ds["signal"].values[0], [[0.0, 0.1, 0.2, 0.3], [0.5, 0.2, 0.2, 0.9]])
