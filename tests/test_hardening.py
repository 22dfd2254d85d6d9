"""Damaged run directories, flags that cannot make sense and logs that are not a terminal: each
gives one line naming the file or flag and the fix, never a traceback, and writes nothing."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pyrovae_pde.data import save_dataset, simulate
from pyrovae_pde.interfaces.cli import main


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small graph cohort and a run fitted by `pyrovae-pde fit` in a child process whose stderr
    is a pipe (as in a batch job's log); returns (root, data, run, stderr)."""
    root = tmp_path_factory.mktemp("hardening")
    data = root / "cohort.nc"
    save_dataset(simulate("graph", 24, seed=2, noise_sd=0.02, components=("fisher_kpp",)), data)
    run = root / "run"
    proc = subprocess.run([sys.executable, "-m", "pyrovae_pde", "fit", str(data), "--components", "fisher_kpp",
                           "--out", str(run), "--epochs", "2", "--amortize-steps", "50",
                           "--prior", "diffusivity=0.05,1",
                           "--prior", "reaction=0.1,1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return root, data, run, proc.stderr


def _one_line_error(capsys, *parts):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for part in parts:
        assert part in err[0], (part, err[0])
    return err[0]


def test_a_log_gets_lines_not_progress_bar_redraws(fitted):
    """stderr a pipe: no progress-bar redraws, one log line per epoch with its figures."""
    *_, stderr = fitted
    assert "\r" not in stderr
    epochs = [line for line in stderr.splitlines() if ": epoch " in line]
    assert [line.split(": epoch ")[1].split(":")[0] for line in epochs] == ["1/2", "2/2"], stderr
    assert all("validation ELBO" in line for line in epochs)
    assert len(stderr.strip().splitlines()) < 15


def test_quiet_leaves_a_log_without_epoch_lines(fitted, tmp_path):
    _, data, _, _ = fitted
    proc = subprocess.run([sys.executable, "-m", "pyrovae_pde", "--quiet", "fit", str(data), "--components",
                           "fisher_kpp", "--out", str(tmp_path / "run"), "--epochs", "1", "--amortize-steps", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ": epoch " not in proc.stderr and "\r" not in proc.stderr
    assert (tmp_path / "run" / "model.json").exists()


def test_library_users_can_route_the_training_log(caplog):
    from pyrovae_pde import SubtypeModel

    ds = simulate("graph", 12, seed=3, noise_sd=0.02, components=("diffusion",))
    with caplog.at_level("INFO", logger="pyrovae_pde"):
        SubtypeModel("diffusion").fit(ds, epochs=1, progress=False)
    assert any(r.name == "pyrovae_pde.inference.train" and "epoch 1/1" in r.getMessage() for r in caplog.records)


def test_a_second_writer_of_a_run_directory_is_refused_and_writes_nothing(fitted, tmp_path, capsys):
    from pyrovae_pde.data.locking import locked_run_directory

    _, data, _, _ = fitted
    run = tmp_path / "run"
    with locked_run_directory(run):
        assert main(["fit", str(data), "--components", "fisher_kpp", "--out", str(run), "--epochs", "1"]) == 2
    _one_line_error(capsys, str(run), "is being written by process", "another --out")
    assert not (run / "model.json").exists() and not (run / "checkpoint.pt").exists()


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    """The lock is the operating system's: kill -9 of its holder frees it (fit --resume can go on)."""
    from pyrovae_pde.data.locking import locked_run_directory

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from pyrovae_pde.data.locking import locked_run_directory\n"
                               f"with locked_run_directory({str(run)!r}):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from pyrovae_pde.errors import RunDirectoryBusyError

    with pytest.raises(RunDirectoryBusyError, match=f"process {holder.pid}"):
        with locked_run_directory(run):
            pass
    holder.kill()
    holder.wait()
    with locked_run_directory(run):
        pass


@pytest.mark.parametrize("command", ["predict", "ppc", "export-arviz"])
@pytest.mark.parametrize("damage", ["truncated model.pt", "model.json not JSON", "model.json without components"])
def test_a_damaged_run_directory_gives_one_line_and_writes_nothing(fitted, tmp_path, capsys, command, damage):
    _, data, run, _ = fitted
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    if damage == "truncated model.pt":
        blob = (broken / "model.pt").read_bytes()
        (broken / "model.pt").write_bytes(blob[: len(blob) // 2])
        expected = ["model.pt", "truncated or damaged", "refit"]
    elif damage == "model.json not JSON":
        (broken / "model.json").write_text('{"components": ["fisher_kpp"], ')
        expected = ["model.json", "not valid JSON", "refit"]
    else:
        text = (broken / "model.json").read_text().replace('"components"', '"kinds"', 1)
        (broken / "model.json").write_text(text)
        expected = ["model.json", "no 'components' entry", "refit"]
    out = tmp_path / ("out.nc" if command != "ppc" else "ppc")
    args = {"predict": ["predict", str(broken), str(data), "--out", str(out)],
            "ppc": ["ppc", str(broken), str(data), "--out", str(out), "--draws", "10", "--particles", "4"],
            "export-arviz": ["export-arviz", str(broken), str(data), "--out", str(out), "--draws", "10",
                             "--particles", "4"]}[command]
    assert main(args) == 2
    _one_line_error(capsys, *expected)
    assert not out.exists()


def test_resume_from_a_truncated_checkpoint_says_start_again(fitted, tmp_path, capsys):
    _, data, run, _ = fitted
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    blob = (broken / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(blob[: len(blob) // 3])
    assert main(["fit", str(data), "--components", "fisher_kpp", "--out", str(broken), "--resume",
                 "--epochs", "3"]) == 2
    _one_line_error(capsys, "checkpoint.pt", "truncated or damaged", "without --resume")


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--batch-size", "-4"], "argument --batch-size: must be >= 1, got -4"),
    (["--restarts", "two"], "argument --restarts: expected a whole number >= 1, got 'two'"),
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
])
def test_flags_that_cannot_make_sense_are_refused_by_the_parser(fitted, tmp_path, capsys, flags, message):
    _, data, _, _ = fitted
    out = tmp_path / "never"
    assert main(["fit", str(data), "--components", "fisher_kpp", "--out", str(out), *flags]) == 2
    _one_line_error(capsys, "pyrovae-pde fit: error: " + message)
    assert not out.exists()


def test_predict_still_accepts_zero_particles():
    """--particles 0 means the Laplace approximation alone (no importance draws): the parser's
    range for predict starts at 0, not 1."""
    from pyrovae_pde.interfaces.cli import build_parser

    args = build_parser().parse_args(["predict", "run", "cohort.nc", "--out", "post.nc", "--particles", "0"])
    assert args.particles == 0


def test_a_model_pt_from_another_domain_is_named(fitted, tmp_path, capsys):
    """model.pt whose connectome differs from the one model.json records (same shapes, so the
    weights still load): the fingerprints disagree and the command says the files do not belong together."""
    import torch

    _, data, run, _ = fitted
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    tensors = torch.load(broken / "model.pt", weights_only=False)
    adjacency = tensors["adjacency"].clone()
    i, j = torch.nonzero(adjacency > 0)[0].tolist()
    adjacency[i, j] = adjacency[j, i] = 2 * adjacency[i, j]
    tensors["adjacency"] = adjacency
    torch.save(tensors, broken / "model.pt")
    out = tmp_path / "post.nc"
    assert main(["predict", str(broken), str(data), "--out", str(out)]) == 2
    _one_line_error(capsys, "model.pt holds a different domain", "model.json records", "different runs", "refit")
    assert not out.exists()


def test_a_batch_larger_than_the_cohort_is_refused_before_anything_is_written(fitted, tmp_path, capsys):
    _, data, _, _ = fitted
    out = tmp_path / "never"
    assert main(["fit", str(data), "--components", "fisher_kpp", "--out", str(out), "--batch-size", "64"]) == 2
    _one_line_error(capsys, "--batch-size 64 is larger than the cohort (24 subjects)", "at most 24")
    assert not out.exists()
