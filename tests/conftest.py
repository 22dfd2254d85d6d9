"""Shared fixtures for the physics / contract / simulator tests (kept small on purpose)."""
from __future__ import annotations

import os

# Small dense/tensor ops dominate these tests. On a small shared machine extra BLAS / intra-op
# threads only add synchronisation cost (measured under load: a 700x700 eigh 0.16 s with one
# OpenBLAS thread vs 2.5-5 s with two; tiny torch solves 25x slower with two threads), so the
# tests use one thread. The variable is inherited by CLI subprocesses too.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
try:  # numpy may already be imported (and its BLAS pool started) by a plugin: limit it directly.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
except ImportError:  # threadpoolctl is optional
    pass


@pytest.fixture(scope="session")
def paper_ds():
    """A small noisy paper-grid cohort (3 subjects, seed 1): the good file the bad-file tests break."""
    from pyrovae_pde.data import simulate

    return simulate("paper-grid", 3, seed=1, noise_sd=0.02)


@pytest.fixture(scope="session")
def graph_ds():
    """A small graph cohort (5 subjects, seed 3, irregular visits with NaN padding)."""
    from pyrovae_pde.data import simulate

    return simulate("graph", 5, seed=3, noise_sd=0.01)
