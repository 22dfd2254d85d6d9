"""Figures (``pyrovae_pde.plots``) are tested for what they show (labels, panels, the data drawn),
and ``pyrovae-pde report`` for the files it writes and the errors it refuses with."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402

from pyrovae_pde import SubtypeModel, plots, save_dataset, simulate  # noqa: E402
from pyrovae_pde.errors import InputError  # noqa: E402
from pyrovae_pde.interfaces.cli import main  # noqa: E402

COMPONENTS = ["diffusion", "fisher_kpp"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A quick (unconverged) fit of diffusion + fisher_kpp on 30 graph subjects, saved with its data."""
    root = tmp_path_factory.mktemp("plots")
    ds = simulate("graph", 30, seed=11, noise_sd=0.02, components=tuple(COMPONENTS))
    model = SubtypeModel(COMPONENTS).fit(ds, epochs=2, progress=False, warmup_sleep_steps=50, distill_steps=50,
                                         seed=0)
    model.save(root / "run")
    save_dataset(ds, root / "data.nc")
    return {"ds": ds, "model": model, "post": model.posterior(ds), "run": root / "run", "data": root / "data.nc"}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _scatters(ax) -> list[PathCollection]:
    return [c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets())]


# ------------------------------------------------------------------------------------------- figures
def test_subtype_probabilities_is_the_sorted_matrix_with_a_truth_strip(fitted):
    post, ds = fitted["post"], fitted["ds"]
    fig = plots.subtype_probabilities(post, truth=ds)
    probs = post["subtype_prob"].values
    best = probs.argmax(1)
    main_ax = fig.axes[0]
    image = main_ax.get_images()[0].get_array()
    order = np.lexsort((-probs.max(1), best))
    np.testing.assert_allclose(image, probs[order].T)
    assert np.all(np.diff(best[order]) >= 0)  # grouped by MAP subtype
    assert [t.get_text() for t in main_ax.get_yticklabels()] == COMPONENTS
    assert "sorted by MAP subtype" in main_ax.get_xlabel() and "accuracy" in main_ax.get_xlabel()
    (strip,) = main_ax.child_axes  # an inset above the matrix
    true = np.array([str(s) for s in ds["true_subtype"].values])
    np.testing.assert_array_equal(strip.get_images()[0].get_array()[0], [COMPONENTS.index(t) for t in true[order]])
    assert sorted(t.get_text() for t in strip.get_legend().get_texts()) == sorted(set(true))
    assert len(fig.axes) == 2  # matrix and colour bar (the strip is the matrix's inset)
    fig2, ax = plt.subplots()
    assert plots.subtype_probabilities(post, ax=ax) is fig2 and not ax.child_axes  # no strip without truth


def test_parameters_draws_the_posterior_means_under_the_map_subtype(fitted):
    post = fitted["post"]
    fig, ax = plt.subplots()
    assert plots.parameters(post, ax=ax) is fig
    best = post["subtype_prob"].values.argmax(1)
    d, r = post["diffusivity"].values, post["reaction"].values
    fkpp = np.flatnonzero(best == 1)
    points = np.concatenate([c.get_offsets() for c in _scatters(ax)])
    np.testing.assert_allclose(points, np.stack([d[fkpp, 1], r[fkpp, 1]], 1))
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "diffusivity" in ax.get_xlabel() and "reaction" in ax.get_ylabel()
    (strip,) = ax.child_axes  # diffusion has no rate: its subjects on a strip below, along D
    diff = np.flatnonzero(best == 0)
    np.testing.assert_allclose(np.concatenate([c.get_offsets() for c in _scatters(strip)]),
                               np.stack([d[diff, 0], np.zeros(len(diff))], 1))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"diffusion ({len(diff)}, no reaction rate: strip below)", f"fisher_kpp ({len(fkpp)})"]


def test_fields_of_a_graph_are_lines_per_visit_or_a_glass_brain(fitted):
    ds = fitted["ds"]
    subject = str(ds["subject"].values[0])
    times = ds["time"].sel(subject=subject).values
    present = np.flatnonzero(np.isfinite(times))
    signal = ds["signal"].sel(subject=subject).values[present]
    fig = plots.fields(ds, subject)
    (ax,) = fig.axes
    assert len(ax.get_lines()) == len(present) and ax.get_xlabel() == "region"
    np.testing.assert_allclose(ax.get_lines()[-1].get_ydata(), signal[-1])
    fit = xr.DataArray(signal + 0.01, dims=("time", "node"), coords={"time": times[present]})
    ax = plots.fields(ds, subject, fitted=fit).axes[0]
    assert len(ax.get_lines()) == 2 * len(present) and ax.get_lines()[-1].get_linestyle() == "--"
    centroids = np.random.default_rng(0).normal(size=(ds.sizes["node"], 3))
    fig = plots.fields(ds, subject, centroids=centroids)
    panels = [a for a in fig.axes if _scatters(a)]
    assert len(panels) == len(present)
    order = np.argsort(centroids[:, 2])
    (dots,) = _scatters(panels[-1])
    np.testing.assert_allclose(dots.get_offsets(), centroids[order, :2])
    np.testing.assert_allclose(dots.get_array(), signal[-1][order])
    with pytest.raises(InputError, match="centroids"):
        plots.fields(ds, subject, centroids=centroids[:5])


def test_fields_on_the_shipped_connectome_use_its_centroids():
    hcp = simulate("hcp83", 2, seed=1, noise_sd=0.02)
    n_visits = int(np.isfinite(hcp["time"].values[0]).sum())
    fig = plots.fields(hcp, str(hcp["subject"].values[0]))
    panels = [a for a in fig.axes if _scatters(a)]
    assert len(panels) == n_visits and panels[0].get_xlabel() == "x (mm)"
    assert len(_scatters(panels[0])[0].get_offsets()) == 83


def test_fields_of_a_2d_grid_are_images_in_the_mask():
    g = simulate("paper-grid", 2, seed=0, noise_sd=0.02)
    subject = str(g["subject"].values[1])
    fig = plots.fields(g, subject)
    images = [im for a in fig.axes for im in a.get_images()]
    assert len(images) == g.sizes["visit"]
    mask = g["mask"].values.astype(bool)
    last = np.asarray(images[-1].get_array())
    np.testing.assert_allclose(last[mask], g["signal"].sel(subject=subject).values[-1][mask])
    assert np.isnan(last[~mask]).all()
    fitted = g["signal"].sel(subject=subject).rename(visit="time")
    fig = plots.fields(g, subject, fitted=fitted)
    assert sum(len(a.get_images()) for a in fig.axes) == 2 * g.sizes["visit"]
    assert any(a.get_title().startswith("fitted") for a in fig.axes)


def test_fields_of_a_3d_grid_are_three_slices_through_the_mask_centre():
    zz, yy, xx = np.meshgrid(np.arange(6), np.arange(7), np.arange(8), indexing="ij")
    mask = (((zz - 2.5) / 2.5) ** 2 + ((yy - 3) / 3) ** 2 + ((xx - 3.5) / 3.5) ** 2 <= 1).astype(np.int8)
    signal = np.random.default_rng(1).uniform(size=(1, 2, 6, 7, 8)) * mask
    ds = xr.Dataset({"signal": (("subject", "visit", "z", "y", "x"), signal),
                     "time": (("subject", "visit"), [[0.0, 1.0]]), "mask": (("z", "y", "x"), mask)},
                    coords={"subject": ["s0"], "z": np.arange(6.0), "y": np.arange(7.0), "x": np.arange(8.0)},
                    attrs={"domain": "grid"})
    fig = plots.fields(ds, "s0")
    panels = [a for a in fig.axes if a.get_images()]
    assert len(panels) == 6  # 2 visits x (axial, coronal, sagittal)
    centre = [int(round(c.mean())) for c in np.nonzero(mask)]
    axial = np.asarray(panels[3].get_images()[0].get_array())
    expected = np.where(mask[centre[0]], signal[0, 1, centre[0]], np.nan)
    np.testing.assert_allclose(axial, expected)
    assert "axial" in panels[3].get_title() and "sagittal" in panels[5].get_title()


def test_elbo_trace_comparison_and_ppc_show_their_data():
    from pyrovae_pde.inference.ppc import PPCResult, p_value_table

    history = [{"epoch": e, "train_elbo": -10.0 + e, "val_elbo": -11.0 + e, "val_elbo_se": 0.5} for e in range(4)]
    fig, ax = plt.subplots()
    assert plots.elbo_trace(history, ax=ax) is fig
    assert len(ax.get_lines()) == 2 and ax.get_xlabel() == "epoch"
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), [-11, -10, -9, -8])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training", "held-out", "held-out, 2 SE"]

    table = pd.DataFrame({"model": ["a", "b", "c"], "status": ["ranked", "ranked", "not converged"],
                          "log_evidence_diff": [0.0, 3.0, 40.0], "log_evidence_diff_se": [0.0, 1.0, 2.0]})
    ax = plots.comparison(table).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c (not converged)"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ranked", "flagged (not ranked)"]
    xs = np.concatenate([c.lines[0].get_xdata() for c in ax.containers])
    np.testing.assert_allclose(np.sort(xs), [-40.0, -3.0, 0.0])

    rng = np.random.default_rng(0)
    observed = {s: rng.uniform(size=(5, 3)) for s in ("total_burden", "spread", "max")}
    replicated = {s: rng.uniform(size=(40, 5, 3)) for s in observed}
    result = PPCResult(p_value_table(observed, replicated), observed, replicated, [f"s{i}" for i in range(5)])
    fig = plots.ppc(result)
    assert len(fig.axes) == 3
    p = result.table.query("statistic == 'spread' and visit == 'all'")["p_value"].iloc[0]
    assert fig.axes[1].get_title() == f"spread: p = {p:.2f}"
    np.testing.assert_allclose(fig.axes[1].get_lines()[0].get_xdata()[0], observed["spread"][:, 1:].mean())


def test_forecast_bands_draw_the_nodes_with_the_largest_mean():
    times = np.array([[1.0, 2.0, 3.0]])
    mean = np.linspace(0, 1, 3 * 6).reshape(1, 3, 6)
    fc = xr.Dataset({"mean": (("subject", "time", "node"), mean), "q05": (("subject", "time", "node"), mean - 0.1),
                     "q95": (("subject", "time", "node"), mean + 0.1),
                     "forecast_time": (("subject", "time"), times)},
                    coords={"subject": ["s0"], "time": times[0], "node": [f"r{i}" for i in range(6)]},
                    attrs={"time_unit": "year"})
    ax = plots.forecast_bands(fc, n_nodes=2).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["r5", "r4"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), mean[0, :, 5])
    assert len(ax.collections) == 2 and ax.get_xlabel() == "time (year)"
    ax = plots.forecast_bands(fc, nodes=["r1"]).axes[0]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), mean[0, :, 1])


def test_save_figure_writes_a_png_and_keeps_the_figure(tmp_path):
    fig = plots.elbo_trace([{"epoch": 0, "train_elbo": 1.0}, {"epoch": 1, "train_elbo": 2.0}])
    path = plots.save_figure(fig, tmp_path / "trace.png")
    assert mpimg.imread(path).ndim == 3 and plt.fignum_exists(fig.number)
    assert [p.name for p in tmp_path.iterdir()] == ["trace.png"]  # no temporary file left behind
    assert plots.plot_comparison is not None and plots.plot_training is not None  # the file writers stay public


# -------------------------------------------------------------------------------------------- report
def test_report_writes_the_figures_and_a_summary(fitted, tmp_path):
    cmp_dir = tmp_path / "cmp"
    cmp_dir.mkdir()
    pd.DataFrame({"rank": [1.0, np.nan], "model": ["diffusion,fisher_kpp", "fisher_kpp"],
                  "log_evidence": [100.0, 80.0], "log_evidence_se": [1.0, 1.5], "log_evidence_diff": [0.0, 20.0],
                  "log_evidence_diff_se": [0.0, 1.8], "status": ["ranked", "not converged"]}
                 ).to_csv(cmp_dir / "comparison.csv", index=False)
    (cmp_dir / "verdict.txt").write_text("verdict: diffusion,fisher_kpp (the only model ranked)\n")
    out = tmp_path / "report"
    assert main(["report", str(fitted["run"]), str(fitted["data"]), "--out", str(out), "--comparison",
                 str(cmp_dir), "--draws", "10", "--particles", "4"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"subtypes.png", "parameters.png", "training.png", "comparison.png"} <= set(pngs)
    assert len([p for p in pngs if p.startswith("fields_")]) == 2  # one subject per MAP subtype
    for name in pngs:
        assert mpimg.imread(out / name).shape[2] in (3, 4)
    text = (out / "report.md").read_text()
    model = fitted["model"]
    assert f"Convergence: WARNING: {model.convergence_warning()}" in text
    for name, w in zip(COMPONENTS, fitted["post"]["weights"].values):
        assert f"| {name} | {w:.3f} |" in text
    assert "verdict: diffusion,fisher_kpp" in text and "## Prior-data conflict" in text
    assert "| fisher_kpp | " in text.split("## Parameters per subtype")[1]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_report_refuses_a_bad_run_dir_in_one_line_and_writes_nothing(fitted, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "no_run"), str(fitted["data"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyrovae-pde report: error:") and "no_run" in err[0]
    assert not out.exists()
    assert main(["report", str(fitted["run"]), str(fitted["data"]), "--out", str(out), "--comparison",
                 str(tmp_path / "no_cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pyrovae-pde report: error: --comparison") and not out.exists()
