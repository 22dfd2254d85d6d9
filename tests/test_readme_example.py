"""The README's Python example runs as written and makes the objects it says it makes."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = "### Python"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning",
                                        "ignore:.*Shape validation.*", "ignore:.*Pareto k.*")


def readme_python_example(text: str) -> str:
    """The first fenced ```python block under the ``### Python`` heading (before the next heading)."""
    lines = text.splitlines()
    try:
        start = lines.index(HEADING)
    except ValueError:
        raise AssertionError(f"README.md has no {HEADING!r} heading") from None
    block, inside, closed = None, False, False
    for line in lines[start + 1:]:
        if not inside and re.match(r"#{1,3} ", line):
            break  # the next heading: the section ended without a python block
        if not inside and line.strip() == "```python":
            block, inside = [], True
        elif inside and line.strip() == "```":
            closed = True
            break
        elif inside:
            block.append(line)
    assert block and closed, f"no closed ```python block under {HEADING!r} in README.md"
    return "\n".join(block) + "\n"


def test_readme_block_is_found():
    code = readme_python_example(README.read_text())
    assert "from pyrovae_pde import" in code and "compare(" in code and "```" not in code


def test_readme_python_example_runs(capsys):
    code = readme_python_example(README.read_text())
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)

    ds = namespace["ds"]
    n = ds.sizes["subject"]
    posterior = namespace["posterior"]
    assert posterior["subtype_prob"].dims == ("subject", "subtype")
    np.testing.assert_allclose(posterior["subtype_prob"].sum("subtype"), 1.0, rtol=1e-6)

    evidence = namespace["evidence"]
    assert math.isfinite(evidence.log_evidence) and evidence.log_evidence_se >= 0

    table = namespace["comparison"].table
    assert set(table["model"]) == {"fisher_kpp", "mixture"} and table.iloc[0]["model"] == "mixture"
    assert namespace["comparison"].verdict.startswith("verdict:")

    check = namespace["check"]
    assert set(check.table["statistic"]) == {"total_burden", "spread", "max"} and len(check.verdicts()) == 3

    forecast = namespace["forecast"]
    assert list(forecast["time"].values) == [10.0, 12.0]
    assert forecast["mean"].dims == ("subject", "time", "node") and forecast.sizes["subject"] == n
    assert (forecast["q05"] <= forecast["q95"]).all()

    idata = namespace["idata"]
    groups = idata.groups() if callable(idata.groups) else [g.strip("/") for g in idata.groups]  # arviz 0.x / 1.x
    assert {"posterior", "log_likelihood", "posterior_predictive"} <= set(groups)
    assert idata["posterior"]["subtype_prob"].sizes["subject"] == n

    printed = capsys.readouterr().out
    assert "log evidence" in printed and "verdict:" in printed
