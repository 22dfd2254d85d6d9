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


@pytest.fixture
def graph_training():
    """A 40-subject graph cohort's tensors and a factory of identically initialised diffusion +
    fisher_kpp modules: what the checkpoint/resume tests train, interrupt and resume."""
    from pyrovae_pde.data import cohort_tensors, domain_from_dataset, simulate
    from pyrovae_pde.model.module import MixturePDE

    ds = simulate("graph", 40, seed=5, noise_sd=0.02)
    domain = domain_from_dataset(ds)

    def fresh():
        torch.manual_seed(0)
        return MixturePDE(domain, ("diffusion", "fisher_kpp"), ds.sizes["visit"], time_scale=5.0)

    return cohort_tensors(ds, domain), fresh
