"""``pyrovae-pde demo`` (the README's first command), on a small cohort: a realistic simulated cohort
(observation noise, unequal subtypes), a fit, scores on new subjects, plots and the report."""
from __future__ import annotations

import re

import pytest
import xarray as xr

from pyrovae_pde.interfaces.api import SubtypeModel
from pyrovae_pde.interfaces.cli import main


@pytest.fixture
def quick_fits(monkeypatch):
    """The demo's fit with a short warm-up (as the other tests' quick fits), so the test takes ~1 minute."""
    fit = SubtypeModel.fit

    def quick(self, ds, **kwargs):
        kwargs.setdefault("warmup_sleep_steps", 50)
        kwargs.setdefault("distill_steps", 50)
        return fit(self, ds, **kwargs)

    monkeypatch.setattr(SubtypeModel, "fit", quick)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
def test_demo_simulates_a_noisy_unequal_cohort_fits_scores_and_reports(tmp_path, capsys, quick_fits):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--subjects", "60", "--test-subjects", "40", "--epochs", "6",
                 "--amortize-steps", "150"]) == 0
    stdout = capsys.readouterr().out
    # the cohort is noisy and its subtypes unequal, as printed
    assert "fisher_kpp 50%, saturating 30%, zeldovich 20%" in stdout and "noise sd 0.05" in stdout
    train = xr.open_dataset(out / "train.nc", engine="h5netcdf")
    assert float(train.attrs["noise_sd"]) == 0.05
    counts = {str(k): int((train["true_subtype"] == k).sum()) for k in ("fisher_kpp", "saturating", "zeldovich")}
    assert counts["fisher_kpp"] > counts["zeldovich"], counts
    train.close()
    for name in ("training.png", "recovery.png", "posterior_test.nc", "run/model.json", "report/report.md",
                 "report/subtypes.png", "report/parameters.png"):
        assert (out / name).is_file(), name
    report = (out / "report" / "report.md").read_text()
    assert "## Subtypes" in report and "accuracy against the file's true_subtype" in report
    accuracy = float(re.search(r"subtype accuracy on new subjects: ([0-9.]+)", stdout).group(1))
    coverage = float(re.search(r"90% interval coverage of D\s+([0-9.]+)", stdout).group(1))
    # measured 0.900 and 0.900 on this cohort (seed 0, 40 new subjects); with noise neither is a trivial 1.0
    assert 0.7 < accuracy and 0.7 < coverage, stdout


def test_demo_weights_must_be_three_nonnegative_numbers(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--weights", "0.5,0.5"]) == 2
    assert "--weights '0.5,0.5': give three nonnegative numbers" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
