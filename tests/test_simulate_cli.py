"""Simulators (ground truth, noise, weights, seeds) and the ``simulate`` / ``validate`` CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pyrovae_pde.data import load_dataset, simulate
from pyrovae_pde.interfaces.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper_pair():
    """The same paper-grid cohort (seed 5) without and with noise."""
    clean = simulate("paper-grid", 6, seed=5)
    noisy = simulate("paper-grid", 6, seed=5, noise_sd=0.05)
    return clean, noisy


def test_paper_grid_mask_is_the_disc_of_radius_15(paper_pair):
    clean, _ = paper_pair
    expected = np.zeros((32, 32), dtype=np.int8)
    for i in range(32):
        for j in range(32):
            expected[i, j] = ((i - 16) ** 2 + (j - 16) ** 2) ** 0.5 < 15
    assert np.array_equal(clean["mask"].values, expected)
    assert clean["mask"].dtype == np.int8
    assert np.array_equal(clean["x"].values, np.arange(32.0)) and np.array_equal(clean["y"].values, np.arange(32.0))


def test_paper_grid_visits_and_parameter_ranges(paper_pair):
    clean, _ = paper_pair
    assert np.array_equal(clean["time"].values, np.tile([0.0, 6.0, 24.0], (6, 1)))
    d, r = clean["true_diffusivity"].values, clean["true_reaction"].values
    assert np.all((d >= 0.01) & (d <= 1.0)) and np.all((r >= 0.01) & (r <= 0.1))
    assert set(clean["true_subtype"].values.astype(str)) <= {"fisher_kpp", "saturating", "zeldovich"}
    # The spread actually happened: later visits differ from the first.
    signal = clean["signal"].values
    assert np.all(np.abs(signal[:, 2] - signal[:, 0]).max(axis=(1, 2)) > 1e-3)


def test_noise_only_after_the_first_visit(paper_pair):
    clean, noisy = paper_pair
    mask = clean["mask"].values.astype(bool)
    yy, xx = np.mgrid[0:32, 0:32]
    dist = np.hypot(yy - 16.0, xx - 16.0)
    radius = 31.0 / 4.0
    bump = np.where(dist < radius, np.exp(-dist ** 2 / (2 * radius ** 2)), 0.0) * mask
    # Visit 0 is the noise-free initial field, exactly, with or without noise.
    for ds in (clean, noisy):
        assert np.array_equal(ds["signal"].values[:, 0], np.broadcast_to(bump, (6, 32, 32)))
    # Same seed: same truth; later visits differ by N(0, 0.05) noise inside the mask.
    for name in ("true_subtype", "true_diffusivity", "true_reaction"):
        assert np.array_equal(clean[name].values, noisy[name].values)
    residual = (noisy["signal"].values - clean["signal"].values)[:, 1:][..., mask]
    n = residual.size
    assert abs(residual.mean()) < 4 * 0.05 / np.sqrt(n)
    assert abs(residual.std() / 0.05 - 1) < 0.1  # sd's standard error here is ~1.1%
    assert np.all(noisy["signal"].values[..., ~mask] == 0)


def test_graph_noise_only_after_first_visit_and_nan_padding():
    clean = simulate("graph", 40, seed=9)
    noisy = simulate("graph", 40, seed=9, noise_sd=0.03)
    time = clean["time"].values
    assert np.array_equal(time, noisy["time"].values, equal_nan=True)
    assert np.array_equal(clean["signal"].values[:, 0], noisy["signal"].values[:, 0])
    present = ~np.isnan(time)
    present[:, 0] = False
    residual = (noisy["signal"].values - clean["signal"].values)[present]
    assert abs(residual.std() / 0.03 - 1) < 0.1
    assert np.all(np.isnan(noisy["signal"].values[np.isnan(time)]))
    n_visits = (~np.isnan(time)).sum(axis=1)
    assert n_visits.min() >= 2 and n_visits.max() <= 5 and len(set(n_visits)) > 1
    # Each subject's visits start at 0 and are strictly ascending.
    assert np.all(time[:, 0] == 0)
    for row in time:
        assert np.all(np.diff(row[~np.isnan(row)]) > 0)


def test_subtype_frequencies_follow_weights():
    components = ["diffusion", "fisher_kpp", "zeldovich"]
    weights = np.array([6.0, 3.0, 1.0])  # unnormalised on purpose
    n = 600
    ds = simulate("graph", n, seed=5, components=components, weights=list(weights))
    names = ds["true_subtype"].values.astype(str)
    observed = np.array([(names == c).sum() for c in components])
    expected = n * weights / weights.sum()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (observed, expected)  # df = 2, p = 0.001
    # Uniform assignment (weights ignored) would be far off: chi2 = 400 for these expectations.
    # Parameters stay in the graph benchmark's ranges; diffusion subjects have no rate.
    d, r = ds["true_diffusivity"].values, ds["true_reaction"].values
    assert np.all((d >= 0.05) & (d <= 1.0))
    assert np.all(r[names == "diffusion"] == 0.0)
    assert np.all((r[names != "diffusion"] >= 0.1) & (r[names != "diffusion"] <= 1.0))


# --------------------------------------------------------------------------- CLI
def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_simulate_writes_valid_file_and_validate_accepts_it(tmp_path, capsys):
    out = tmp_path / "paper.nc"
    code, stdout, err = _run(capsys, "simulate", "--benchmark", "paper-grid", "--subjects", "4", "--seed", "2",
                             "--noise-sd", "0.01", "--out", str(out))
    assert code == 0, err
    assert f"wrote {out}" in stdout and "4 subjects" in stdout
    ds = load_dataset(out)
    assert ds.sizes["subject"] == 4 and ds.attrs["noise_sd"] == 0.01 and ds.attrs["seed"] == 2
    code, stdout, err = _run(capsys, "validate", str(out))
    assert code == 0 and "valid" in stdout and err == ""


def test_cli_same_seed_same_file_different_seed_different(tmp_path, capsys):
    paths = [tmp_path / f"g{i}.nc" for i in range(3)]
    for path, seed in zip(paths, ("7", "7", "8")):
        code, _, err = _run(capsys, "simulate", "--benchmark", "graph", "--subjects", "5", "--seed", seed,
                            "--noise-sd", "0.02", "--out", str(path))
        assert code == 0, err
    assert paths[0].read_bytes() == paths[1].read_bytes()
    a, c = load_dataset(paths[0]), load_dataset(paths[2])
    assert not np.array_equal(a["true_diffusivity"].values, c["true_diffusivity"].values)
    assert not np.array_equal(a["signal"].values, c["signal"].values, equal_nan=True)


def _bad_contract_file(tmp_path: Path) -> Path:
    ds = simulate("graph", 2, seed=0)
    ds["signal"].values[1, 0, 3] = np.nan
    path = tmp_path / "bad.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    return path


BAD_INVOCATIONS = {
    "unknown component": (["simulate", "--benchmark", "graph", "--subjects", "2", "--components",
                           "diffusion,prion", "--out", "{tmp}/x.nc"], ["'prion'", "fisher_kpp"]),
    "weights count": (["simulate", "--benchmark", "graph", "--subjects", "2", "--weights", "1,2,3",
                       "--out", "{tmp}/x.nc"], ["weights"]),
    "negative weight": (["simulate", "--benchmark", "graph", "--subjects", "2", "--weights", "1,-1",
                         "--out", "{tmp}/x.nc"], ["weights"]),
    "zero subjects": (["simulate", "--benchmark", "graph", "--subjects", "0", "--out", "{tmp}/x.nc"],
                      ["--subjects"]),
    "negative noise": (["simulate", "--benchmark", "graph", "--subjects", "2", "--noise-sd", "-1",
                        "--out", "{tmp}/x.nc"], ["noise"]),
    "out is a directory": (["simulate", "--benchmark", "graph", "--subjects", "2", "--out", "{tmp}"],
                           ["directory"]),
    "validate missing file": (["validate", "{tmp}/missing.nc"], ["missing.nc", "not found"]),
    "validate non-NetCDF": (["validate", "{tmp}/notes.txt"], ["notes.txt", "NetCDF"]),
    "validate bad contract": (["validate", "{tmp}/bad.nc"], ["bad.nc", "'signal'", "'sub-0001'", "visit 0"]),
}


@pytest.mark.parametrize("case", list(BAD_INVOCATIONS))
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    (tmp_path / "notes.txt").write_text("not a cohort\n")
    _bad_contract_file(tmp_path)
    argv, fragments = BAD_INVOCATIONS[case]
    code, stdout, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pyrovae-pde {argv[0]}: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "x.nc").exists()


@pytest.mark.parametrize("argv", [
    ["simulate", "--benchmark", "cube", "--subjects", "2", "--out", "x.nc"],
    ["simulate", "--benchmark", "graph", "--subjects", "two", "--out", "x.nc"],
    ["simulate", "--benchmark", "mni-grid", "--subjects", "2", "--slice", "coronal:3", "--out", "x.nc"],
    ["simulate", "--benchmark", "graph", "--subjects", "2"],
])
def test_cli_argument_errors_exit_2(capsys, argv):
    """Arguments the parser refuses: one line (the error and where to find the usage), status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pyrovae-pde {argv[0]}: error:") and err[0].endswith("--help)")


def test_cli_mni_slice_out_of_range_is_one_line(tmp_path, capsys):
    pytest.importorskip("nilearn")
    code, _, err = _run(capsys, "simulate", "--benchmark", "mni-grid", "--subjects", "2", "--resolution", "8",
                        "--slice", "axial:999", "--out", str(tmp_path / "m.nc"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "axial:999" in err


def test_python_m_entry_point_subprocess(tmp_path):
    out = tmp_path / "graph.nc"
    ok = subprocess.run([sys.executable, "-m", "pyrovae_pde", "simulate", "--benchmark", "graph", "--subjects", "3",
                         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    xr.testing.assert_identical(load_dataset(out), simulate("graph", 3, seed=0))
    bad = subprocess.run([sys.executable, "-m", "pyrovae_pde", "validate", str(tmp_path / "nope.nc")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
