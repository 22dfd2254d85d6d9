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

from pyrovae_pde.inference import amortize as _amortize  # noqa: E402

# Fits in these tests run a short amortization stage (the default is sized for real cohorts);
# tests of the amortized posterior itself ask for their own number of steps.
_amortize.DEFAULT_STEPS = 150


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


def tiny_grid_problem():
    """A 6x6 disc-like grid (corners cut), 2 subjects x 3 components with D, r and u0 requiring
    grad, irregular times, and a fixed weighting of the output: (domain, u0, d, r, times, weight)."""
    import numpy as np

    from pyrovae_pde.physics import GridDomain

    f64 = torch.float64
    yy, xx = np.mgrid[0:6, 0:6]
    mask = (np.hypot(yy - 2.5, xx - 2.5) < 3.2).astype(np.int8)
    rng = np.random.default_rng(0)
    u0 = torch.tensor(rng.uniform(0, 1, (2, 6, 6)) * mask, requires_grad=True)
    # Rates chosen away from the spectral step-count switch points (ceil(dt * max r / step)).
    d = torch.tensor([[0.3, 0.7, 0.2], [0.9, 0.15, 0.5]], dtype=f64, requires_grad=True)
    r = torch.tensor([[0.43, 0.81, 0.62], [0.27, 0.55, 0.71]], dtype=f64, requires_grad=True)
    times = torch.tensor([[0.0, 0.5, 1.2], [0.5, 0.9, 1.3]], dtype=f64)
    weight = torch.tensor(rng.normal(size=(6, 6)))
    return GridDomain(mask), u0, d, r, times, weight


def graph_mixture_module(domain, ds):
    """A diffusion + fisher_kpp MixturePDE on ``domain`` with the graph benchmark's ranges as priors (seed 0)."""
    from pyrovae_pde.model.module import MixturePDE
    from pyrovae_pde.model.priors import LogNormalPrior, Priors

    torch.manual_seed(0)
    return MixturePDE(domain, ("diffusion", "fisher_kpp"), ds.sizes["visit"],
                      Priors(LogNormalPrior(0.05, 1.0), LogNormalPrior(0.1, 1.0)), time_scale=5.0)
