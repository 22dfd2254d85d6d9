"""Physics: domains, reaction registry and the batched solvers, held to independent references.

The references here share no code with the package: Laplacians are built by explicit neighbour
loops, and time integration is scipy's ``solve_ivp``. Everything runs in float64 unless a test
says otherwise, with fixed seeds.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import tiny_grid_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp

from pyrovae_pde.data.simulate import modular_connectome, paper_grid_mask
from pyrovae_pde.physics import (
    DomainError,
    GraphDomain,
    GridDomain,
    ReactionTerm,
    SolverInputError,
    registered_reactions,
    solve,
)
from pyrovae_pde.physics import reactions as reactions_module

F64 = torch.float64
REACTIONS = ("diffusion", "fisher_kpp", "saturating", "zeldovich")
# Reaction terms written out again, independently of the package's registry.
F_NUMPY = {
    "diffusion": lambda u: np.zeros_like(u),
    "fisher_kpp": lambda u: u * (1.0 - u),
    "saturating": lambda u: u * (1.0 - u) ** 2,
    "zeldovich": lambda u: u ** 2 * (1.0 - u),
}
REF_TOL = dict(rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- independent references
def loop_grid_laplacian(mask: np.ndarray, spacing=1.0) -> sp.csr_matrix:
    """No-flux 4/6-neighbour Laplacian over cells inside ``mask``, cells in C order, by explicit loops."""
    mask = np.asarray(mask) != 0
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (mask.ndim,))
    cells = [tuple(c) for c in np.argwhere(mask)]
    number = {c: k for k, c in enumerate(cells)}
    rows, cols, vals = [], [], []
    for k, cell in enumerate(cells):
        for axis in range(mask.ndim):
            for step in (-1, 1):
                nb = list(cell)
                nb[axis] += step
                nb = tuple(nb)
                if nb in number:  # neighbours outside the grid or the mask do not count (no flux)
                    w = 1.0 / spacing[axis] ** 2
                    rows += [k, k]
                    cols += [k, number[nb]]
                    vals += [w, -w]
    n = len(cells)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n))


def loop_graph_laplacian(adjacency: np.ndarray) -> np.ndarray:
    n = adjacency.shape[0]
    lap = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                lap[i, j] = -adjacency[i, j]
                lap[i, i] += adjacency[i, j]
    return lap


def ivp_reference(lap, u0: np.ndarray, t_eval, diffusivity, rate, reaction: str, method="RK45"):
    """solve_ivp of du/dt = -D L u + r f(u) for M stacked independent systems: u0 (M, n) -> (M, T, n)."""
    u0 = np.atleast_2d(u0)
    m = u0.shape[0]
    d = np.broadcast_to(np.asarray(diffusivity, dtype=float), (m,))[:, None]
    r = np.broadcast_to(np.asarray(rate, dtype=float), (m,))[:, None]
    f = F_NUMPY[reaction] if isinstance(reaction, str) else reaction

    def rhs(_t, y):
        u = y.reshape(m, -1)
        return (-d * (lap @ u.T).T + r * f(u)).ravel()

    t_eval = np.asarray(t_eval, dtype=float)
    sol = solve_ivp(rhs, (t_eval[0], t_eval[-1]), u0.ravel(), t_eval=t_eval, method=method, **REF_TOL)
    assert sol.success, sol.message
    return sol.y.T.reshape(len(t_eval), m, -1).transpose(1, 0, 2)


def ball_mask(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    return (dist <= radius).astype(np.int8)


def tensor(x, dtype=F64):
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=dtype)


# --------------------------------------------------------------------------- shared small problems
@pytest.fixture(scope="module")
def paper():
    mask, u0 = paper_grid_mask()
    return mask.astype(bool), u0, GridDomain(mask)


@pytest.fixture(scope="module")
def connectome():
    adjacency, _ = modular_connectome()
    return adjacency, GraphDomain(adjacency)


PAPER_PARAMS = [(0.01, 0.01), (0.01, 0.1), (1.0, 0.01), (1.0, 0.1), (0.3, 0.05)]  # (D, r), extremes included
PAPER_TIMES = (0.0, 6.0, 24.0)


@functools.lru_cache(maxsize=None)
def paper_reference(reaction: str) -> np.ndarray:
    mask, u0 = paper_grid_mask()
    lap = loop_grid_laplacian(mask)
    d, r = np.array(PAPER_PARAMS).T
    u0_active = np.tile(u0[mask != 0], (len(PAPER_PARAMS), 1))
    return ivp_reference(lap, u0_active, PAPER_TIMES, d, r, reaction)  # (M, T, n)


# --------------------------------------------------------------------------- accuracy vs solve_ivp
@pytest.mark.parametrize("method", ["auto", "dopri5"])
def test_paper_grid_matches_solve_ivp_for_every_reaction(paper, method):
    mask, u0, domain = paper
    m = len(PAPER_PARAMS)
    d = tensor([[p[0]] * len(REACTIONS) for p in PAPER_PARAMS])
    r = tensor([[p[1]] * len(REACTIONS) for p in PAPER_PARAMS])
    out = solve(domain, tensor(np.tile(u0, (m, 1, 1))), tensor([PAPER_TIMES] * m), d, r,
                reactions=REACTIONS, method=method)
    assert out.shape == (m, len(REACTIONS), 3, 32, 32) and out.dtype == F64
    errors = {}
    for k, name in enumerate(REACTIONS):
        got = out[:, k].numpy()[:, :, mask]  # (M, T, n) in C order, like the reference
        errors[name] = float(np.abs(got - paper_reference(name)).max())
    assert max(errors.values()) <= 1e-3, errors
    # The references differ between reactions by far more than the tolerance, so this is not vacuous.
    assert np.abs(paper_reference("fisher_kpp") - paper_reference("diffusion")).max() > 0.05


GRAPH_TIMES = np.array([
    [0.0, 0.7, np.nan, 2.9, 4.0],       # missing visit in the middle
    [1.5, 2.0, 3.1, np.nan, 6.5],       # first visit not at 0, missing visit in the middle
    [0.0, 5.0, np.nan, np.nan, np.nan],  # long single interval, padded
    [0.2, 1.1, 1.9, 2.8, 3.3],
])
GRAPH_D = np.array([1.0, 0.05, 0.5, 1.0])
GRAPH_R = np.array([1.0, 0.1, 0.6, 0.01])


@pytest.mark.parametrize("method", ["auto", "dopri5"])
def test_graph_irregular_times_match_solve_ivp_for_every_reaction(connectome, method):
    adjacency, domain = connectome
    lap = loop_graph_laplacian(adjacency)
    rng = np.random.default_rng(7)
    n_sub, n = GRAPH_TIMES.shape[0], adjacency.shape[0]
    u0 = np.zeros((n_sub, n))
    for i in range(n_sub):
        u0[i, rng.choice(n, 3, replace=False)] = rng.uniform(0.3, 0.8, 3)
    k_comp = len(REACTIONS)
    out = solve(domain, tensor(u0), tensor(GRAPH_TIMES), tensor(np.repeat(GRAPH_D[:, None], k_comp, 1)),
                tensor(np.repeat(GRAPH_R[:, None], k_comp, 1)), reactions=REACTIONS, method=method)
    assert out.shape == (n_sub, k_comp, GRAPH_TIMES.shape[1], n)
    errors = {}
    for k, name in enumerate(REACTIONS):
        worst = 0.0
        for i in range(n_sub):
            present = ~np.isnan(GRAPH_TIMES[i])
            ref = ivp_reference(lap, u0[i], GRAPH_TIMES[i][present], GRAPH_D[i], GRAPH_R[i], name,
                                method="LSODA")[0]
            worst = max(worst, float(np.abs(out[i, k].numpy()[present] - ref).max()))
        errors[name] = worst
    assert max(errors.values()) <= 1e-3, errors


@pytest.mark.parametrize("method,options,tol", [("auto", {}, 1e-10),
                                                ("dopri5", dict(rtol=1e-9, atol=1e-11), 1e-7)])
def test_zero_diffusivity_fisher_kpp_is_the_logistic_closed_form(paper, method, options, tol):
    mask, _, domain = paper
    rng = np.random.default_rng(3)
    u0 = rng.uniform(0.0, 1.0, (3, 32, 32)) * mask
    u0[0, mask] = np.where(rng.random(mask.sum()) < 0.2, 1.0, u0[0, mask])  # exact 0s and 1s too
    r = np.array([0.01, 0.1, 0.5])
    times = np.array(PAPER_TIMES)
    out = solve(domain, tensor(u0), tensor([PAPER_TIMES] * 3), torch.zeros(3, 1, dtype=F64), tensor(r[:, None]),
                reactions=("fisher_kpp",), method=method, **options)[:, 0].numpy()
    growth = np.exp(r[:, None, None, None] * times[None, :, None, None])
    closed = u0[:, None] * growth / (1.0 - u0[:, None] + u0[:, None] * growth)
    assert np.abs(out - closed).max() <= tol


# --------------------------------------------------------------------------- conservation and bounds
def _mass_problem(kind, connectome):
    rng = np.random.default_rng(11)
    if kind == "grid2d":
        mask, u0 = paper_grid_mask()
        return GridDomain(mask), mask != 0, np.stack([u0, rng.uniform(0, 1, u0.shape) * mask])
    if kind == "grid3d":
        mask = ball_mask((9, 9, 9), (4, 4, 4), 3.5)
        u0 = np.zeros((2, 9, 9, 9))
        u0[0, 4, 4, 2:6] = 1.0
        u0[1] = rng.uniform(0, 1, mask.shape) * mask
        return GridDomain(mask, spacing=(1.0, 0.8, 1.2)), mask != 0, u0
    adjacency, domain = connectome
    u0 = np.zeros((2, adjacency.shape[0]))
    u0[0, :3] = 1.0
    u0[1] = rng.uniform(0, 1, adjacency.shape[0])
    return domain, np.ones(adjacency.shape[0], bool), u0


@pytest.mark.parametrize("method", ["auto", "dopri5"])
@pytest.mark.parametrize("kind", ["grid2d", "grid3d", "graph"])
def test_pure_diffusion_conserves_mass_under_no_flux(connectome, kind, method):
    domain, inside, u0 = _mass_problem(kind, connectome)
    times = tensor([[0.0, 6.0, 24.0]] * 2)
    out = solve(domain, tensor(u0), times, tensor([[0.01], [1.0]]), tensor([[0.5], [0.5]]),
                reactions=("diffusion",), method=method).numpy()[:, 0]  # (N, T, *space)
    mass = out[:, :, inside].sum(-1)  # (N, T)
    np.testing.assert_allclose(mass, np.repeat(mass[:, :1], 3, axis=1), rtol=1e-10)
    assert np.all(out[:, :, ~inside] == 0.0)
    # Not vacuous: the fields did spread.
    for i in range(2):
        assert np.abs(out[i, 2] - u0[i]).max() > 1e-3


def _assert_in_unit_interval(values: np.ndarray, slack: float = 1e-9):
    assert values.min() >= -slack, values.min()
    assert values.max() <= 1.0 + slack, values.max() - 1.0


@pytest.mark.parametrize("method", ["auto", "dopri5"])
def test_sharp_unit_interval_data_stay_in_unit_interval(paper, method):
    mask, _, domain = paper
    rng = np.random.default_rng(5)
    u0 = np.stack([np.where(rng.random((32, 32)) < 0.5, 1.0, 0.0), np.ones((32, 32)),
                   rng.uniform(0, 1, (32, 32)) ** 4]) * mask
    d = tensor([[1.0] * 4, [0.01] * 4, [0.3] * 4])
    r = tensor([[0.1] * 4, [0.01] * 4, [0.5] * 4])
    out = solve(domain, tensor(u0), tensor([PAPER_TIMES] * 3), d, r, reactions=REACTIONS, method=method).numpy()
    _assert_in_unit_interval(out[..., mask])
    # A brain full of pathology stays full: L 1 = 0 and f(1) = 0 for every term.
    np.testing.assert_allclose(out[1][..., mask], 1.0, atol=1e-9)


SMALL_MASK = ball_mask((8, 8), (3.5, 3.5), 3.6)
SMALL_GRID = GridDomain(SMALL_MASK)
SMALL_GRAPH = GraphDomain(modular_connectome(n_nodes=12, n_modules=2, seed=1)[0])


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 31 - 1), kind=st.sampled_from(["grid", "graph"]),
       reaction=st.sampled_from(REACTIONS), diffusivity=st.floats(0.0, 2.0), rate=st.floats(0.0, 2.0),
       sharpness=st.floats(0.2, 6.0), gap=st.floats(0.01, 5.0))
def test_random_unit_interval_fields_stay_in_unit_interval(seed, kind, reaction, diffusivity, rate, sharpness, gap):
    rng = np.random.default_rng(seed)
    domain = SMALL_GRID if kind == "grid" else SMALL_GRAPH
    shape = (2, *domain.spatial_shape)
    u0 = rng.uniform(0, 1, shape) ** sharpness
    if kind == "grid":
        u0 = u0 * SMALL_MASK
    times = tensor([[0.0, gap, 3 * gap]] * 2)
    out = solve(domain, tensor(u0), times, tensor([[diffusivity], [diffusivity / 2]]),
                tensor([[rate], [rate]]), reactions=(reaction,)).numpy()
    _assert_in_unit_interval(out)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("options,fast", [
    (dict(method="spectral"), False),
    (dict(method="dopri5", rtol=1e-10, atol=1e-12), True),
    (dict(method="dopri5", rtol=1e-10, atol=1e-12, adjoint=True), True),
])
def test_gradients_match_finite_differences(options, fast):
    domain, u0, d, r, times, weight = tiny_grid_problem()

    def fn(u0_, d_, r_):
        out = solve(domain, u0_, times, d_, r_, reactions=("fisher_kpp", "saturating", "zeldovich"), **options)
        return (out * weight).sum((-2, -1))  # a fixed random projection over space: (N, K, T) outputs

    # Slow mode compares full Jacobians; fast mode (used for the costly adaptive solves) compares
    # v^T J u for random u, v, which also fails for any wrong entry with probability one.
    assert torch.autograd.gradcheck(fn, (u0, d, r), fast_mode=fast)


# --------------------------------------------------------------------------- batching, dtype, layout
def test_batch_equals_separate_solves_exactly_when_steps_coincide(paper):
    mask, u0_bump, domain = paper
    rng = np.random.default_rng(2)
    n_sub = 3
    u0 = np.stack([u0_bump, u0_bump ** 2, rng.uniform(0, 1, (32, 32))]) * mask
    times = tensor([PAPER_TIMES] * n_sub)
    d = tensor(rng.uniform(0.01, 1.0, (n_sub, 4)))
    r = torch.full((n_sub, 4), 0.07, dtype=F64)  # one rate: the same step counts in every call
    batch = solve(domain, tensor(u0), times, d, r, reactions=REACTIONS)
    for i in range(n_sub):
        for k, name in enumerate(REACTIONS):
            alone = solve(domain, tensor(u0[i:i + 1]), times[i:i + 1], d[i:i + 1, k:k + 1], r[i:i + 1, k:k + 1],
                          reactions=(name,))
            np.testing.assert_allclose(batch[i, k].numpy(), alone[0, 0].numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("options,tol", [(dict(method="auto", reaction_step=0.005, initial_reaction_step=0.005), 1e-12),
                                         (dict(method="auto"), 1e-12),
                                         (dict(method="dopri5", rtol=1e-10, atol=1e-12), 1e-8)])
def test_batch_equals_separate_solves_with_heterogeneous_rates_and_times(connectome, options, tol):
    # The spectral step counts are per (subject, component), from that component's own rate, so a
    # component solved alone takes the same steps and agrees to roundoff: the mixture's likelihood
    # of a mechanism is what a simulator of that mechanism alone computes. The adaptive torchdiffeq
    # path integrates all components together, to its tolerance.
    _, domain = connectome
    rng = np.random.default_rng(4)
    times = tensor(GRAPH_TIMES[:3])
    n_sub, n = 3, domain.n_nodes
    u0 = tensor(rng.uniform(0, 1, (n_sub, n)) * (rng.random((n_sub, n)) < 0.1))
    d = tensor(rng.uniform(0.05, 1.0, (n_sub, 4)))
    r = tensor(rng.uniform(0.1, 1.0, (n_sub, 4)))
    batch = solve(domain, u0, times, d, r, reactions=REACTIONS, **options)
    worst = 0.0
    for i in range(n_sub):
        present = ~torch.isnan(times[i])
        for k, name in enumerate(REACTIONS):
            alone = solve(domain, u0[i:i + 1], times[i:i + 1], d[i:i + 1, k:k + 1], r[i:i + 1, k:k + 1],
                          reactions=(name,), **options)
            worst = max(worst, float((batch[i, k][present] - alone[0, 0][present]).abs().max()))
    assert worst <= tol


def test_rate_floor_makes_each_subject_independent_of_its_batch(connectome):
    # solve_active's rate_floor fixes every subject's step count from its own rates, so the batch
    # equals separate solves to roundoff even with heterogeneous rates and irregular times.
    from pyrovae_pde.physics import solve_active

    _, domain = connectome
    rng = np.random.default_rng(6)
    times = tensor(GRAPH_TIMES)
    n_sub, n = times.shape[0], domain.n_nodes
    u0 = tensor(rng.uniform(0, 1, (n_sub, n)) * (rng.random((n_sub, n)) < 0.2))
    d = tensor(rng.uniform(0.05, 1.0, (n_sub, 4)))
    r = tensor(rng.uniform(0.1, 1.0, (n_sub, 4)))
    batch = solve_active(domain, u0, times, d, r, reactions=REACTIONS, rate_floor=1.0)
    for i in range(n_sub):
        present = ~torch.isnan(times[i])
        for k, name in enumerate(REACTIONS):
            alone = solve_active(domain, u0[i:i + 1], times[i:i + 1], d[i:i + 1, k:k + 1], r[i:i + 1, k:k + 1],
                                 reactions=(name,), rate_floor=1.0)
            np.testing.assert_allclose(batch[i, k][present].numpy(), alone[0, 0][present].numpy(),
                                       rtol=0, atol=1e-12)


def test_float32_is_close_to_float64_and_layout(paper):
    mask, u0_bump, domain = paper
    rng = np.random.default_rng(8)
    n_sub = 4
    u0 = np.stack([u0_bump] * 2 + [rng.uniform(0, 1, (32, 32)) * mask] * 2)
    d = rng.uniform(0.01, 1.0, (n_sub, 3))
    d[0] = [0.01, 1.0, 0.5]
    r = rng.uniform(0.01, 0.1, (n_sub, 3))
    args64 = (tensor(u0), tensor([PAPER_TIMES] * n_sub), tensor(d), tensor(r))
    args32 = tuple(a.float() for a in args64)
    comps = ("fisher_kpp", "saturating", "zeldovich")
    out64 = solve(domain, *args64, reactions=comps)
    out32 = solve(domain, *args32, reactions=comps)
    assert out32.dtype == torch.float32 and out64.dtype == F64
    assert out32.shape == out64.shape == (n_sub, 3, 3, 32, 32)
    assert float((out32.double() - out64).abs().max()) <= 1e-4
    # Zero outside the mask, and visit 0 is the initial field for every component.
    assert torch.all(out64[..., torch.as_tensor(~mask)] == 0)
    assert torch.equal(out64[:, :, 0], tensor(u0)[:, None].expand(-1, 3, -1, -1))


def test_graph_output_layout(connectome):
    _, domain = connectome
    out = solve(domain, torch.rand(2, 68, dtype=F64), tensor([[0.0, 1.0], [0.0, 2.0]]),
                torch.full((2, 2), 0.5, dtype=F64), torch.full((2, 2), 0.5, dtype=F64),
                reactions=("diffusion", "fisher_kpp"))
    assert out.shape == (2, 2, 2, 68)


# --------------------------------------------------------------------------- domains
def test_grid3d_laplacian_matches_six_neighbour_stencil():
    rng = np.random.default_rng(9)
    mask = (rng.random((4, 5, 6)) < 0.7).astype(np.int8)  # irregular, with holes
    spacing = (1.0, 2.0, 0.5)
    domain = GridDomain(mask, spacing)
    assert np.array_equal(domain.active_index, np.flatnonzero(mask))
    ref = loop_grid_laplacian(mask, spacing).toarray()
    np.testing.assert_allclose(domain.laplacian.toarray(), ref, rtol=0, atol=1e-12)
    assert ref.diagonal().max() > 0  # not vacuous


def test_grid2d_laplacian_matches_four_neighbour_stencil(paper):
    mask, _, domain = paper
    np.testing.assert_allclose(domain.laplacian.toarray(), loop_grid_laplacian(mask).toarray(), atol=1e-12)


def test_graph_laplacian_is_degree_minus_adjacency():
    rng = np.random.default_rng(10)
    a = np.triu(rng.uniform(0, 1, (9, 9)) * (rng.random((9, 9)) < 0.5), 1)
    a = a + a.T
    lap = GraphDomain(a).laplacian.toarray()
    np.testing.assert_allclose(lap, np.diag(a @ np.ones(9)) - a, atol=1e-12)
    np.testing.assert_allclose(lap, loop_graph_laplacian(a), atol=1e-12)


def test_spacing_scales_laplacian_and_matches_rescaled_diffusivity(paper):
    mask, u0, base = paper
    h = 2.5
    scaled = GridDomain(mask.astype(np.int8), spacing=h)
    np.testing.assert_allclose(scaled.laplacian.toarray(), base.laplacian.toarray() / h ** 2, atol=1e-14)
    times = tensor([PAPER_TIMES])
    a = solve(scaled, tensor(u0[None]), times, tensor([[0.8]]), tensor([[0.05]]))
    b = solve(base, tensor(u0[None]), times, tensor([[0.8 / h ** 2]]), tensor([[0.05]]))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-10)


@pytest.mark.parametrize("adjacency,word", [
    (np.array([[0, 1.0], [0.5, 0]]), "symmetric"),
    (np.array([[0, -1.0], [-1.0, 0]]), "negative"),
    (np.array([[1.0, 1.0], [1.0, 0]]), "diagonal"),
    (np.array([[0, np.nan], [np.nan, 0]]), "NaN"),
    (np.zeros((2, 3)), "square"),
])
def test_graph_domain_rejects_bad_adjacency(adjacency, word):
    with pytest.raises(DomainError, match=word):
        GraphDomain(adjacency)


@pytest.mark.parametrize("mask,spacing,word", [
    (np.zeros((4, 4)), 1.0, "all zeros"),
    (np.ones(5), 1.0, "2-D or 3-D"),
    (np.ones((3, 3)), 0.0, "spacing"),
    (np.ones((3, 3)), (1.0, np.inf), "spacing"),
])
def test_grid_domain_rejects_bad_mask_or_spacing(mask, spacing, word):
    with pytest.raises(DomainError, match=word):
        GridDomain(mask, spacing)


# --------------------------------------------------------------------------- reaction registry
def _allee(u):
    return u * (1.0 - u) * (u - 0.2) / 0.8  # bistable: decays below 0.2, grows above


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations in a test do not leak into other tests."""
    monkeypatch.setattr(reactions_module, "_REGISTRY", dict(reactions_module._REGISTRY))


def test_custom_reaction_registration_solves_like_solve_ivp(private_registry, connectome):
    from pyrovae_pde.physics import register_reaction

    adjacency, domain = connectome
    register_reaction(ReactionTerm("allee_test", _allee, description="Allee effect"))
    assert "allee_test" in registered_reactions()
    with pytest.raises(ValueError, match="already registered"):
        register_reaction(ReactionTerm("allee_test", _allee))
    with pytest.raises(ValueError, match="identifier"):
        register_reaction(ReactionTerm("not a name", _allee))
    rng = np.random.default_rng(12)
    u0 = rng.uniform(0, 1, (2, 68))
    times = np.array([[0.0, 1.0, 3.0], [0.0, 2.0, 4.0]])
    d, r = np.array([0.5, 0.1]), np.array([1.0, 0.4])
    lap = loop_graph_laplacian(adjacency)
    for method in ("auto", "dopri5"):
        out = solve(domain, tensor(u0), tensor(times), tensor(d[:, None]), tensor(r[:, None]),
                    reactions=("allee_test",), method=method)[:, 0].numpy()
        for i in range(2):
            ref = ivp_reference(lap, u0[i], times[i], d[i], r[i], _allee, method="LSODA")[0]
            assert np.abs(out[i] - ref).max() <= 1e-3, method
    # The term actually matters: the result differs from Fisher-KPP's.
    fisher = solve(domain, tensor(u0), tensor(times), tensor(d[:, None]), tensor(r[:, None]))[:, 0].numpy()
    assert np.abs(out - fisher).max() > 0.05


def test_unknown_reaction_name_lists_registered_names(private_registry, connectome):
    from pyrovae_pde.physics import register_reaction

    register_reaction(ReactionTerm("allee_test", _allee))
    _, domain = connectome
    with pytest.raises(KeyError) as info:
        solve(domain, torch.zeros(1, 68, dtype=F64), tensor([[0.0, 1.0]]), tensor([[1.0]]), tensor([[1.0]]),
              reactions=("no_such_term",))
    message = info.value.args[0]
    assert "no_such_term" in message
    for name in (*REACTIONS, "allee_test"):
        assert name in message


@pytest.mark.parametrize("case", ["nan_first", "descending", "rate_shape", "u0_shape"])
def test_solver_rejects_inconsistent_inputs(connectome, case):
    _, domain = connectome
    u0 = torch.zeros(2, 68, dtype=F64)
    times = tensor([[0.0, 1.0], [0.0, 2.0]])
    d = r = torch.ones(2, 1, dtype=F64)
    if case == "nan_first":
        times = tensor([[np.nan, 1.0], [0.0, 2.0]])
    elif case == "descending":
        times = tensor([[0.0, 1.0], [2.0, 1.0]])
    elif case == "rate_shape":
        d = torch.ones(2, 2, dtype=F64)
    else:
        u0 = torch.zeros(2, 67, dtype=F64)
    with pytest.raises(SolverInputError):
        solve(domain, u0, times, d, r)
