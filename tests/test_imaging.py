"""NIfTI cohorts -> data contract (import) and back (export-nifti).

Cohorts are written on the fly with nibabel (no downloads): a small synthetic volume with an FSL-like
LAS affine for most tests, and nilearn's packaged MNI152 grey-matter mask at 8 mm for the
must-show test (fields simulated with the physics solver at known D, r).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import xarray as xr

from pyrovae_pde.data.contract import load_dataset, validate_dataset
from pyrovae_pde.data.imaging import (
    ImagingError,
    ImagingWarning,
    export_nifti,
    import_cohort,
    invert_normalisation,
    read_manifest,
)
from pyrovae_pde.interfaces.cli import main
from pyrovae_pde.physics import GridDomain, solve

# FSL-style 2 mm MNI affine: x runs right-to-left (LAS), so import must reorient to RAS.
AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
SHAPE = (10, 12, 9)  # (i, j, k)
UPTAKE = 1.5  # image = ref_level * (1 + UPTAKE * field) inside the mask


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def _write_manifest(path: Path, rows: list[dict], columns=("subject", "time", "image")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def _small_masks(shape=SHAPE):
    i, j, k = np.indices(shape)
    c = (np.array(shape) - 1) / 2
    mask = ((i - c[0]) / 4.0) ** 2 + ((j - c[1]) / 5.0) ** 2 + ((k - c[2]) / 3.2) ** 2 <= 1.0
    mask[:, :, :2] = False
    reference = np.zeros(shape, bool)
    reference[3:7, 4:8, 0:2] = True  # an inferior block below the mask (cerebellum-like)
    return mask, reference


def make_cohort(root: Path, n_subjects: int = 3, times=(0.0, 1.0, 2.5), seed: int = 0) -> dict:
    """Images = ref_level * (1 + UPTAKE * field) in the mask, ref_level in the reference, NaN far outside."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    mask, reference = _small_masks()
    _write_nifti(root / "mask.nii.gz", mask)
    _write_nifti(root / "ref.nii.gz", reference)
    fields, levels, rows = {}, {}, []
    for s in range(n_subjects):
        subject = f"sub-{s:02d}"
        for v, t in enumerate(times):
            field = rng.uniform(0.0, 1.0, SHAPE) * mask
            level = rng.uniform(800.0, 1200.0)
            image = np.full(SHAPE, 0.3 * level)
            image[mask] = level * (1 + UPTAKE * field[mask])
            image[reference] = level
            image[0, 0, :] = np.nan  # NaN outside the mask is fine (SPM-style background)
            name = f"{subject}_ses-{v}.nii.gz"
            _write_nifti(root / name, image)
            fields[subject, v], levels[subject, v] = field, level
            rows.append({"subject": subject, "time": t, "image": name})
    manifest = _write_manifest(root / "manifest.csv", rows)
    return {"root": root, "manifest": manifest, "mask": root / "mask.nii.gz", "reference": root / "ref.nii.gz",
            "fields": fields, "levels": levels, "rows": rows, "mask_array": mask}


def to_zyx(volume_ijk: np.ndarray) -> np.ndarray:
    """LAS input (i, j, k) -> RAS (z, y, x), written out independently of the module."""
    return volume_ijk[::-1].transpose(2, 1, 0)


@pytest.fixture
def cohort(tmp_path):
    return make_cohort(tmp_path / "cohort")


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Must show: MNI fields at known parameters survive import to 1e-5
# ---------------------------------------------------------------------------------------------

def test_mni_simulated_fields_survive_import(tmp_path):
    from nilearn.datasets import load_mni152_gm_mask
    from nilearn.image import resample_img

    affine = np.array([[-8.0, 0, 0, 90], [0, 8.0, 0, -126], [0, 0, 8.0, -72], [0, 0, 0, 1]])
    shape = (23, 28, 23)
    gm = resample_img(load_mni152_gm_mask(), target_affine=affine, target_shape=shape, interpolation="nearest",
                      force_resample=True, copy_header=True).get_fdata() > 0.5
    mask_zyx = to_zyx(gm)
    domain = GridDomain(mask_zyx.astype(np.int8), 8.0)
    z, y, x = np.indices(mask_zyx.shape)
    times = np.array([[0.0, 1.0, 3.0], [0.0, 2.0, 4.0]])
    u0 = np.zeros((2,) + mask_zyx.shape)
    for n, centre in enumerate(np.argwhere(mask_zyx)[[domain.n_nodes // 3, 2 * domain.n_nodes // 3]]):
        d2 = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) * 64.0
        u0[n] = 0.8 * np.exp(-d2 / (2 * 20.0 ** 2)) * mask_zyx
    D, r = torch.tensor([[30.0], [10.0]]), torch.tensor([[0.5], [0.8]])  # mm^2/yr, 1/yr
    fields = solve(domain, torch.tensor(u0), torch.tensor(times), D, r, reactions=("fisher_kpp",),
                   method="dopri5")[:, 0].numpy()  # (N, T, z, y, x)
    assert fields.max() > 0.5 and fields[:, -1].sum() > fields[:, 0].sum()  # it spread and grew

    root = tmp_path / "mni"
    root.mkdir()
    reference = np.zeros(shape, bool)
    reference[8:15, 5:10, 1:3] = True  # inferior, posterior block (cerebellum-like), outside the GM mask
    reference &= ~gm
    _write_nifti(root / "cerebellum.nii.gz", reference, affine)
    rows, levels = [], {}
    for n in range(2):
        for v, t in enumerate(times[n]):
            level = 1000.0 + 100 * n + 10 * v
            image_zyx = np.full(mask_zyx.shape, 0.2 * level)
            image_zyx[mask_zyx] = level * (1.0 + UPTAKE * fields[n, v][mask_zyx])
            image = image_zyx.transpose(2, 1, 0)[::-1]  # back to LAS (i, j, k)
            image[reference] = level
            _write_nifti(root / f"s{n}_v{v}.nii.gz", image, affine)
            levels[n, v] = level
            rows.append({"subject": f"s{n}", "time": t, "image": f"s{n}_v{v}.nii.gz"})
    manifest = _write_manifest(root / "manifest.csv", rows)

    ds = import_cohort(manifest, mask="mni-gm", reference=root / "cerebellum.nii.gz", progress=False)
    validate_dataset(ds)
    assert ds["signal"].dims == ("subject", "visit", "z", "y", "x")
    np.testing.assert_array_equal(ds["mask"].values, mask_zyx.astype(np.int8))
    np.testing.assert_allclose(ds["x"].values, -86.0 + 8.0 * np.arange(23))  # RAS, world mm
    np.testing.assert_allclose(ds["z"].values, -72.0 + 8.0 * np.arange(23))
    np.testing.assert_allclose(ds["time"].values, times)
    assert float(ds["signal"].where(ds["mask"] == 1).min()) == pytest.approx(0.0, abs=1e-6)
    assert float(ds["signal"].where(ds["mask"] == 1).max()) == pytest.approx(1.0, abs=1e-6)
    for n in range(2):
        for v in range(3):
            assert float(ds["reference_mean"][n, v]) == pytest.approx(levels[n, v], rel=1e-6)
            suvr = invert_normalisation(ds, ds["signal"].values[n, v])
            recovered = (suvr - 1.0) / UPTAKE
            err = np.abs(recovered[mask_zyx] - fields[n, v][mask_zyx]).max()
            assert err < 1e-5, (n, v, err)

    # With --resolution the MNI mask's grid is exactly the simulator's mni-grid at that resolution.
    from pyrovae_pde.data.simulate import mni_gm_mask

    resampled = import_cohort(manifest, mask="mni-gm", reference=root / "cerebellum.nii.gz", resolution=8.0,
                              progress=False)
    sim_mask, spacing, origin = mni_gm_mask(8.0)
    np.testing.assert_array_equal(resampled["mask"].values, sim_mask)
    for axis, dim in enumerate("zyx"):
        np.testing.assert_allclose(resampled[dim].values, origin[axis] + spacing * np.arange(sim_mask.shape[axis]))


# ---------------------------------------------------------------------------------------------
# Import, export, round trip
# ---------------------------------------------------------------------------------------------

def test_import_grid_values_orientation_and_attrs(cohort):
    ds = import_cohort(cohort["manifest"], mask=cohort["mask"], reference=cohort["reference"], progress=False)
    mask_zyx = to_zyx(cohort["mask_array"])
    np.testing.assert_array_equal(ds["mask"].values, mask_zyx)
    assert ds.attrs["input_axcodes"] == "LAS" and list(ds.attrs["input_shape"]) == list(SHAPE)
    np.testing.assert_allclose(ds["affine"].values, AFFINE)
    lo, hi = ds.attrs["suvr_min"], ds.attrs["suvr_max"]
    assert ds.attrs["normalisation"] == "suvr" and 1.0 <= lo < hi <= 1.0 + UPTAKE
    inside = ds["signal"].values[:, :, mask_zyx]
    assert inside.min() == pytest.approx(0.0, abs=1e-6) and inside.max() == pytest.approx(1.0, abs=1e-6)
    assert np.all(ds["signal"].values[:, :, ~mask_zyx] == 0)  # outside the mask: 0, even where NaN
    field = to_zyx(cohort["fields"]["sub-01", 2])
    suvr = invert_normalisation(ds, ds["signal"].values[1, 2])
    np.testing.assert_allclose((suvr[mask_zyx] - 1) / UPTAKE, field[mask_zyx], atol=1e-5)
    assert float(ds["reference_mean"][1, 2]) == pytest.approx(cohort["levels"]["sub-01", 2], rel=1e-6)
    assert ds["signal"].dtype == np.float32


def test_cli_import_then_export_round_trip(cohort, tmp_path, capsys):
    out = tmp_path / "data.nc"
    code, stdout, err = run_cli(["import", cohort["manifest"], "--mask", cohort["mask"], "--reference",
                                 cohort["reference"], "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert "3 subjects, 9 scans" in stdout
    load_dataset(out)
    export_dir = tmp_path / "export"
    code, stdout, err = run_cli(["export-nifti", out, "--out", export_dir, "--scale", "image", "--no-progress"],
                                capsys)
    assert code == 0, err
    files = sorted(p.name for p in export_dir.iterdir())
    assert files == sorted(f"sub-{s:02d}_visit-{v}.nii.gz" for s in range(3) for v in range(3))
    mask = cohort["mask_array"]
    for row_index, row in enumerate(cohort["rows"]):
        original = nib.load(str(cohort["root"] / row["image"]))
        exported = nib.load(str(export_dir / f"{row['subject']}_visit-{row_index % 3}.nii.gz"))
        assert exported.shape == original.shape
        np.testing.assert_allclose(exported.affine, original.affine)
        np.testing.assert_allclose(exported.get_fdata()[mask], original.get_fdata()[mask], rtol=1e-5)
        assert np.all(exported.get_fdata()[~mask] == 0)


def test_export_other_dims_and_geometry_from_another_file(cohort, tmp_path):
    ds = import_cohort(cohort["manifest"], mask=cohort["mask"], reference=cohort["reference"], progress=False,
                       slice_axial=4)
    assert ds["signal"].dims == ("subject", "visit", "y", "x")
    data = tmp_path / "data.nc"
    ds.to_netcdf(data, engine="h5netcdf")
    # A forecast-like file: dims (subject, time, y, x), no geometry of its own.
    forecast = xr.Dataset({"forecast": (("subject", "time", "y", "x"),
                                        np.stack([ds["signal"].values[:, 0]] * 2, axis=1))},
                          coords={"subject": ds["subject"].values, "time": [1.5, 5.0]})
    path = tmp_path / "forecast.nc"
    forecast.to_netcdf(path, engine="h5netcdf")
    with pytest.raises(ImagingError, match="--like"):
        export_nifti(path, tmp_path / "nope", variable="forecast")
    written = export_nifti(path, tmp_path / "fc", variable="forecast", scale="suvr", geometry=data)
    assert sorted(p.name for p in written)[:2] == ["sub-00_time-1.5_forecast.nii.gz", "sub-00_time-5_forecast.nii.gz"]
    img = nib.load(str(written[0]))
    assert img.shape == SHAPE
    volume = to_zyx(img.get_fdata())
    expected = invert_normalisation(ds, ds["signal"].values[0, 0])
    inside = ds["mask"].values == 1
    np.testing.assert_allclose(volume[4][inside], expected[inside], rtol=1e-5)
    assert np.all(np.delete(volume, 4, axis=0) == 0)  # other slices are filled
    with pytest.raises(ImagingError, match="subject and visit"):
        export_nifti(path, tmp_path / "x", variable="forecast", scale="image", geometry=data)


def test_resolution_resamples_onto_one_grid(tmp_path, capsys):
    """Scans on different grids sample one world-space linear field; resampled values must match it."""
    root = tmp_path / "res"
    root.mkdir()
    i, j, k = np.indices(SHAPE)
    c = (np.array(SHAPE) - 1) / 2
    mask = ((i - c[0]) / 2.5) ** 2 + ((j - c[1]) / 3.5) ** 2 + ((k - c[2]) / 2.5) ** 2 <= 1.0
    reference = np.zeros(SHAPE, bool)
    reference[3:7, 4:8, 0:2] = True
    _write_nifti(root / "mask.nii.gz", mask)
    _write_nifti(root / "ref.nii.gz", reference)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [2.0, -2.0, 0.0]

    def field(affine, level, x=None, y=None, z=None):
        if x is None:
            x, y, z = np.einsum("ab,bijk->aijk", affine[:3, :3], np.indices(SHAPE)) + affine[:3, 3, None, None, None]
        return level * (2.0 + 0.01 * x + 0.02 * y - 0.015 * z)

    rows, levels = [], {}
    for n in range(2):
        for v in range(2):
            affine = shifted if (n, v) == (1, 1) else AFFINE
            levels[n, v] = 900.0 + 50 * n + 20 * v
            _write_nifti(root / f"s{n}_{v}.nii.gz", field(affine, levels[n, v]), affine)
            rows.append({"subject": f"s{n}", "time": float(v), "image": f"s{n}_{v}.nii.gz"})
    manifest = _write_manifest(root / "manifest.csv", rows)
    out = tmp_path / "res.nc"
    args = ["import", manifest, "--mask", root / "mask.nii.gz", "--reference", root / "ref.nii.gz", "--out", out,
            "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "subject 's1', visit 1" in err and "s1_1.nii.gz" in err and "affine differs" in err
    assert "--resolution" in err and not out.exists()
    code, stdout, err = run_cli(args + ["--resolution", "3"], capsys)
    assert code == 0, err
    ds = load_dataset(out)
    assert "scipy.ndimage.affine_transform" in ds.attrs["resampled"] and "order 1 (trilinear)" in ds.attrs["resampled"]
    assert np.allclose(np.diff(ds["x"].values), 3.0) and np.allclose(np.diff(ds["z"].values), 3.0)
    inside = ds["mask"].values == 1
    assert inside.sum() >= 10
    z, y, x = np.meshgrid(ds["z"].values, ds["y"].values, ds["x"].values, indexing="ij")
    for n in range(2):
        for v in range(2):
            image = invert_normalisation(ds, ds["signal"].values[n, v], float(ds["reference_mean"][n, v]))
            expected = field(None, levels[n, v], x, y, z)
            np.testing.assert_allclose(image[inside], expected[inside], rtol=1e-5)


def test_dates_single_scan_subjects_and_graph(tmp_path):
    c = make_cohort(tmp_path / "g", n_subjects=2, times=(0.0, 1.0))
    rows = [{"subject": "sub-00", "date": "2020-01-01", "image": "sub-00_ses-0.nii.gz"},
            {"subject": "sub-00", "date": "2021-07-02", "image": "sub-00_ses-1.nii.gz"},
            {"subject": "sub-01", "date": "2019-03-01", "image": "sub-01_ses-0.nii.gz"},
            {"subject": "lonely", "date": "2019-03-01", "image": "sub-01_ses-1.nii.gz"},
            {"subject": "sub-01", "date": "2020-03-01", "image": "sub-01_ses-1.nii.gz"}]
    manifest = _write_manifest(c["root"] / "dates.csv", rows, ("subject", "date", "image"))
    frame = read_manifest(manifest)
    assert frame["time"].tolist() == pytest.approx([0.0, 548 / 365.25, 0.0, 0.0, 366 / 365.25])
    # Atlas: two labels splitting the mask; connectome CSV with a header of region names.
    mask = c["mask_array"]
    atlas = np.where(mask, np.where(np.indices(SHAPE)[0] < 5, 3, 7), 0)
    _write_nifti(c["root"] / "atlas.nii.gz", atlas)
    (c["root"] / "names.csv").write_text("label,name\n3,left\n7,right\n")
    (c["root"] / "conn.csv").write_text(",right,left\nright,0,0.5\nleft,0.5,0\n")
    with pytest.warns(ImagingWarning, match="lonely"):
        ds = import_cohort(manifest, reference=c["reference"], atlas=c["root"] / "atlas.nii.gz",
                           connectome=c["root"] / "conn.csv", labels=c["root"] / "names.csv", progress=False)
    validate_dataset(ds)
    assert ds.attrs["domain"] == "graph" and list(ds["node"].values) == ["left", "right"]
    assert list(ds["subject"].values) == ["sub-00", "sub-01"] and ds.attrs["dropped_subjects"] == "lonely"
    np.testing.assert_allclose(ds["adjacency"].values, [[0, 0.5], [0.5, 0]])
    suvr = invert_normalisation(ds, ds["signal"].values[1, 1])
    field = c["fields"]["sub-01", 1]
    expected = [1 + UPTAKE * field[atlas == 3].mean(), 1 + UPTAKE * field[atlas == 7].mean()]
    np.testing.assert_allclose(suvr, expected, rtol=1e-5)
    written = export_nifti(ds, tmp_path / "graph_out", scale="suvr")
    painted = nib.load(str(written[0])).get_fdata()  # sub-00 visit 0
    expected0 = invert_normalisation(ds, ds["signal"].values[0, 0])
    assert painted[atlas == 3] == pytest.approx(expected0[0], rel=1e-5)
    assert painted[atlas == 7] == pytest.approx(expected0[1], rel=1e-5)


def test_all_subjects_single_scan_is_an_error(cohort):
    manifest = _write_manifest(cohort["root"] / "one.csv", cohort["rows"][::3])
    with pytest.warns(ImagingWarning), pytest.raises(ImagingError, match="no subject has two or more scans"):
        import_cohort(manifest, mask=cohort["mask"], reference=cohort["reference"], progress=False)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming subject/visit/file, and no output left behind
# ---------------------------------------------------------------------------------------------

def _break_missing_file(c):
    os.remove(c["root"] / "sub-01_ses-1.nii.gz")
    return ["sub-01", "visit 1", "sub-01_ses-1.nii.gz", "not found"], []


def _break_not_nifti(c):
    (c["root"] / "sub-02_ses-2.nii.gz").write_text("subject,time\nthis is a CSV, not an image\n")
    return ["sub-02", "visit 2", "sub-02_ses-2.nii.gz", "not a readable NIfTI"], []


def _break_4d(c):
    _write_nifti(c["root"] / "sub-00_ses-1.nii.gz", np.ones(SHAPE + (3,)))
    return ["sub-00", "visit 1", "sub-00_ses-1.nii.gz", "4-D image", "3 frames"], []


def _break_shape(c):
    _write_nifti(c["root"] / "sub-02_ses-0.nii.gz", np.ones((10, 12, 8)))
    return ["sub-02", "visit 0", "sub-02_ses-0.nii.gz", "shape (10, 12, 8) differs", "--resolution"], []


def _break_affine(c):
    affine = AFFINE.copy()
    affine[:3, :3] *= 1.5
    _write_nifti(c["root"] / "sub-02_ses-1.nii.gz", np.ones(SHAPE), affine)
    return ["sub-02", "visit 1", "sub-02_ses-1.nii.gz", "affine differs", "voxel size (3, 3, 3)"], []


def _rewrite_manifest(c, rows):
    _write_manifest(c["manifest"], rows)


def _break_duplicate(c):
    rows = [dict(r) for r in c["rows"]]
    rows[4]["time"] = rows[3]["time"]
    _rewrite_manifest(c, rows)
    return ["sub-01", "two scans at time 0", "lines 5 and 6", "manifest.csv"], []


def _break_unsorted(c):
    rows = [dict(r) for r in c["rows"]]
    rows[7], rows[8] = rows[8], rows[7]
    _rewrite_manifest(c, rows)
    return ["sub-02", "line 10", "time 1 comes after time 2.5", "unsorted", "ascending"], []


def _break_negative(c):
    rows = [dict(r) for r in c["rows"]]
    rows[0]["time"] = -1.0
    _rewrite_manifest(c, rows)
    return ["line 2", "sub-00", "negative time -1"], []


def _break_nan_in_mask(c):
    path = c["root"] / "sub-01_ses-2.nii.gz"
    data = nib.load(str(path)).get_fdata()
    data[tuple(np.argwhere(c["mask_array"])[5])] = np.nan
    _write_nifti(path, data)
    return ["sub-01", "visit 2", "sub-01_ses-2.nii.gz", "NaN/inf voxels inside the mask", "voxel (i, j, k)"], []


def _break_empty_reference(c):
    _write_nifti(c["reference"], np.zeros(SHAPE))
    return ["reference region", "ref.nii.gz", "empty"], []


def _break_connectome(c):
    atlas = np.where(c["mask_array"], 1 + (np.indices(SHAPE)[0] >= 5) + 2 * (np.indices(SHAPE)[1] >= 6), 0)
    _write_nifti(c["root"] / "atlas.nii.gz", atlas)
    np.save(c["root"] / "conn.npy", np.ones((3, 3)) - np.eye(3))
    extra = ["--atlas", c["root"] / "atlas.nii.gz", "--connectome", c["root"] / "conn.npy"]
    return ["conn.npy", "atlas labels missing from the connectome", "4 labels", "labels [4]"], extra


BAD_INPUTS = {
    "missing-image": _break_missing_file, "not-nifti": _break_not_nifti, "4d-image": _break_4d,
    "shape-mismatch": _break_shape, "affine-mismatch": _break_affine, "duplicate-time": _break_duplicate,
    "unsorted-times": _break_unsorted, "negative-time": _break_negative, "nan-in-mask": _break_nan_in_mask,
    "empty-reference": _break_empty_reference, "atlas-labels-missing": _break_connectome,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_error_and_no_output(case, cohort, tmp_path, capsys):
    expected, extra = BAD_INPUTS[case](cohort)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "data.nc"
    code, stdout, err = run_cli(["import", cohort["manifest"], "--mask", cohort["mask"], "--reference",
                                 cohort["reference"], "--out", out, "--no-progress", *extra], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pyrovae-pde import: error: "), err
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert list(out_dir.iterdir()) == []  # no output and no temporary file


def test_existing_output_untouched_on_error(cohort, tmp_path, capsys):
    out = tmp_path / "data.nc"
    out.write_bytes(b"previous")
    _break_nan_in_mask(cohort)
    code, _, _ = run_cli(["import", cohort["manifest"], "--mask", cohort["mask"], "--reference",
                          cohort["reference"], "--out", out, "--no-progress"], capsys)
    assert code == 2 and out.read_bytes() == b"previous"


@pytest.mark.parametrize("text, fragment", [
    ("subject,image\ns1,a.nii\n", "lacks column(s) time (or date)"),
    ("subject,time,date,image\ns1,0,2020-01-01,a.nii\n", "line 2 (subject 's1'): give exactly one of 'time' or 'date'"),
    ("subject,time,image\ns1,abc,a.nii\n", "time 'abc' is not a number"),
    ("subject,time,image\ns1,0,\n", "line 2 (subject 's1'): the 'image' cell is empty"),
    ("subject,date,image\ns1,2020-02-30,a.nii\n", "not a valid calendar date"),
    ("subject,date,image\ns1,2021-01-01,a.nii\ns1,2020-01-01,b.nii\n", "date 2020-01-01 comes after date 2021-01-01"),
])
def test_manifest_errors(tmp_path, text, fragment):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(ImagingError) as info:
        read_manifest(path)
    assert fragment in str(info.value) and str(path) in str(info.value)
