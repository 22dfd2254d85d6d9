"""One error family (every error a user can trigger derives from PyrovaePDEError and the CLI prints
it as one line) and figures that leave the matplotlib backend to the caller."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pyrovae_pde import errors
from pyrovae_pde.interfaces.cli import main


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_class_derives_from_the_base(name):
    assert issubclass(getattr(errors, name), errors.PyrovaePDEError)


def test_unknown_reaction_is_a_package_error_and_still_a_key_error():
    from pyrovae_pde.physics import get_reaction

    with pytest.raises(errors.UnknownNameError) as info:
        get_reaction("no_such_term")
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("unknown reaction term 'no_such_term'")  # no quotes around the message


def test_cli_prints_a_package_error_as_one_line(tmp_path, capsys):
    assert main(["simulate", "--benchmark", "graph", "--subjects", "4", "--components", "no_such_term",
                 "--out", str(tmp_path / "x.nc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyrovae-pde simulate: error:") and "no_such_term" in err[0]
    assert "Traceback" not in "\n".join(err)


def test_plots_do_not_choose_a_backend(tmp_path):
    """Drawing a figure through the package keeps the backend the caller chose (a notebook's inline
    backend must survive); only the command line picks Agg."""
    code = f"""
import matplotlib
matplotlib.use("svg")
import pandas as pd
from pyrovae_pde.interfaces.plots import plot_comparison
from pyrovae_pde.inference.ppc import plot_ppc_figures
table = pd.DataFrame({{"model": ["a", "b"], "status": ["ranked", "not converged"],
                      "log_evidence_diff": [0.0, 3.0], "log_evidence_diff_se": [0.0, 1.0],
                      "elpd_loo_diff": [0.0, 2.0], "elpd_loo_diff_se": [0.0, 1.0],
                      "elpd_cv_diff": [0.0, 2.5], "elpd_cv_diff_se": [0.0, 1.0]}})
plot_comparison(table, r"{tmp_path / 'cmp.png'}")
print(matplotlib.get_backend())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "svg"
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_an_unknown_solver_option_names_the_settings():
    import torch

    from pyrovae_pde.physics import GraphDomain, SolverSettings, solve

    domain = GraphDomain(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    args = (torch.rand(1, 2, dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64),
            torch.tensor([[0.5]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64))
    with pytest.raises(errors.SolverInputError, match="unknown solver option 'reaction_stepp'.*reaction_step"):
        solve(domain, *args, reaction_stepp=0.1)
    # settings and keyword options agree
    a = solve(domain, *args, settings=SolverSettings(reaction_step=0.1))
    b = solve(domain, *args, reaction_step=0.1)
    assert torch.equal(a, b)
