"""The Chebyshev solver path for large domains (no dense eigenbasis), held to scipy and to the spectral path.

References share no code with the package: the 3-D Laplacian is assembled here from a difference
(incidence) matrix, diffusion is scipy's ``expm_multiply`` and reaction-diffusion scipy's
``solve_ivp``. float64 and fixed seeds unless a test says otherwise.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import tiny_grid_problem
from scipy.integrate import solve_ivp
from scipy.sparse.linalg import expm_multiply

from pyrovae_pde.data.simulate import paper_grid_mask
from pyrovae_pde.physics import (
    SPECTRAL_MAX_NODES,
    Domain,
    GraphDomain,
    GridDomain,
    resolve_method,
    solve,
    solve_active,
)
from pyrovae_pde.physics.chebyshev import _degree_groups, chebyshev_coefficients, chebyshev_propagator

F64 = torch.float64
BALL_SHAPE, BALL_RADIUS = (36, 36, 36), 17.0


def tensor(x, dtype=F64):
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=dtype)


def ball_mask(shape, radius) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    centre = [(s - 1) / 2 for s in shape]
    return (np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) <= radius).astype(np.int8)


def incidence_laplacian(mask: np.ndarray, spacing: float = 1.0) -> sp.csr_matrix:
    """G^T G / h^2 with G the (edges, cells) difference matrix of neighbouring cells both inside the mask."""
    inside = mask != 0
    number = np.full(mask.shape, -1)
    number[inside] = np.arange(inside.sum())  # C order, like the domain's active nodes
    blocks = []
    for axis in range(mask.ndim):
        a = np.moveaxis(number, axis, 0)
        lo, hi = a[:-1].ravel(), a[1:].ravel()
        keep = (lo >= 0) & (hi >= 0)
        m = int(keep.sum())
        rows = np.repeat(np.arange(m), 2)
        cols = np.stack([lo[keep], hi[keep]], axis=1).ravel()
        blocks.append(sp.csr_matrix((np.tile([1.0, -1.0], m), (rows, cols)), shape=(m, number.max() + 1)))
    grad = sp.vstack(blocks).tocsr()
    return (grad.T @ grad / spacing ** 2).tocsr()


@functools.lru_cache(maxsize=None)
def ball():
    mask = ball_mask(BALL_SHAPE, BALL_RADIUS)
    return mask, GridDomain(mask)


def ball_initial(mask: np.ndarray, n_sub: int) -> np.ndarray:
    """(n_sub, n) smooth seeds at different places, values in [0, 0.8]."""
    coords = np.argwhere(mask != 0).astype(float)
    centres = [(10.0, 17.5, 17.5), (25.0, 12.0, 20.0), (17.5, 25.0, 10.0)]
    return np.stack([0.8 * np.exp(-((coords - c) ** 2).sum(1) / (2 * 3.0 ** 2)) for c in centres[:n_sub]])


# --------------------------------------------------------------------------- accuracy vs scipy on a 3-D ball
BALL_TIMES = (0.0, 3.0, 8.0)
BALL_D = (0.4, 1.5)  # per subject
BALL_R = (0.6, 0.25)


def test_ball_is_large_and_auto_picks_chebyshev_without_anything_dense(monkeypatch):
    mask, domain = ball()
    assert domain.n_nodes >= 20000 > SPECTRAL_MAX_NODES
    assert resolve_method(domain) == resolve_method(domain, "auto") == "chebyshev"
    assert resolve_method(GridDomain(paper_grid_mask()[0])) == "spectral"
    assert resolve_method(domain, "dopri5") == "dopri5"

    def refuse(*args, **kwargs):
        raise AssertionError("the Chebyshev path must not build a dense eigenbasis or spectrum")

    monkeypatch.setattr(Domain, "eigh", refuse)
    monkeypatch.setattr(Domain, "spectral_range", refuse)
    monkeypatch.setattr(np.linalg, "eigh", refuse)
    monkeypatch.setattr(np.linalg, "eigvalsh", refuse)
    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    u0 = tensor(ball_initial(mask, 1))
    out = solve_active(domain, u0, tensor([[0.0, 0.5]]), tensor([[1.0]]), tensor([[0.5]]))
    assert out.shape == (1, 1, 2, domain.n_nodes)
    # The Gershgorin bound of the 6-neighbour stencil is 2 * 6 / h^2 for a mask with interior cells.
    assert domain.gershgorin_bound() == pytest.approx(12.0)


def test_ball_matches_scipy_expm_multiply_and_solve_ivp():
    mask, domain = ball()
    lap = incidence_laplacian(mask)
    assert abs(lap - domain.laplacian).max() < 1e-12  # the domain's L, built independently
    n_sub = len(BALL_D)
    u0 = ball_initial(mask, n_sub)
    times = np.array(BALL_TIMES)
    per_component = lambda x: tensor(np.repeat(np.array(x)[:, None], 2, 1))  # (N,) -> (N, K)
    out = solve_active(domain, tensor(u0), tensor([BALL_TIMES] * n_sub), per_component(BALL_D), per_component(BALL_R),
                       reactions=("fisher_kpp", "diffusion"), method="chebyshev").numpy()  # (N, K, T, n)
    errors = {}
    for i in range(n_sub):
        ref_diffusion = expm_multiply(-BALL_D[i] * lap, u0[i], start=times[0], stop=times[-1],
                                      num=int(times[-1]) + 1, endpoint=True)[times.astype(int)]  # (T, n)
        d, r = BALL_D[i], BALL_R[i]
        sol = solve_ivp(lambda _t, u, d=d, r=r: -d * (lap @ u) + r * u * (1.0 - u), (times[0], times[-1]), u0[i],
                        t_eval=times, method="RK45", rtol=1e-7, atol=1e-10)
        assert sol.success, sol.message
        errors[("diffusion", i)] = float(np.abs(out[i, 1] - ref_diffusion).max())
        errors[("fisher_kpp", i)] = float(np.abs(out[i, 0] - sol.y.T).max())
    assert max(errors.values()) <= 2e-3, errors  # measured: fisher_kpp 2.3e-5, diffusion 3e-14
    # Pure diffusion has no splitting error: it is the expansion's truncation alone.
    assert max(v for (name, _), v in errors.items() if name == "diffusion") <= 1e-9, errors
    # Not vacuous: growth and spreading changed the fields by far more than the tolerance.
    assert np.abs(out[:, 0, -1] - out[:, 1, -1]).max() > 0.1
    assert np.abs(out[:, 1, -1] - u0).max() > 0.1


# --------------------------------------------------------------------------- agreement with the spectral path
PAPER_TERMS = ("fisher_kpp", "saturating", "zeldovich", "diffusion")


def _paper_problem(dtype=F64):
    mask, u0 = paper_grid_mask()
    rng = np.random.default_rng(1)
    # Strictly inside (0, 1): where a field is 0 to round-off, clamping to [0, 1] keeps or cuts a
    # gradient depending on the sign of the round-off, which differs between the two paths.
    fields = (0.02 + 0.9 * np.stack([u0, u0 ** 2, rng.uniform(0, 1, u0.shape)])) * mask
    d = rng.uniform(0.01, 1.0, (3, 4))
    d[0, 0] = 1e-3  # almost no diffusion in one run
    r = rng.uniform(0.01, 0.1, (3, 4))
    times = np.array([[0.0, 6.0, 24.0], [0.0, 3.0, 10.0], [1.0, 2.5, 7.0]])
    return GridDomain(mask), *(tensor(x, dtype) for x in (fields, times, d, r))


def test_paper_grid_chebyshev_equals_spectral_values_and_gradients():
    domain, u0, times, d, r = _paper_problem()
    weight = torch.randn(32, 32, dtype=F64, generator=torch.Generator().manual_seed(0))
    results = {}
    for method in ("spectral", "chebyshev"):
        dd, rr, uu = d.clone().requires_grad_(), r.clone().requires_grad_(), u0.clone().requires_grad_()
        out = solve(domain, uu, times, dd, rr, reactions=PAPER_TERMS, method=method)
        grads = torch.autograd.grad((out * weight).sum(), (dd, rr, uu))
        results[method] = (out.detach(), *grads)
    spectral, chebyshev = results["spectral"], results["chebyshev"]
    # Both paths take the same Strang steps; they differ by the expansion's truncation (expm_tol
    # 1e-10 per step) only, far inside the 1e-3 asked of a solver here.
    assert float((spectral[0] - chebyshev[0]).abs().max()) <= 1e-8
    for name, a, b in zip(("D", "r", "u0"), spectral[1:], chebyshev[1:]):
        assert float((a - b).abs().max()) <= 1e-7 * float(a.abs().max()), name
    assert float(spectral[1].abs().max()) > 1.0  # gradients are not vacuous


def test_chebyshev_gradient_at_zero_diffusivity_is_the_one_sided_difference():
    # At D = 0 the fields' derivative is -dt L u, nonzero at the edge of a seed's support. The
    # Chebyshev step is the identity there (exact zeros stay zero), so clamping to [0, 1] does not
    # cut it; the spectral path's round-off (+-1e-17 at those cells) gets clamped and loses it.
    domain, _, times, _, r = _paper_problem()
    d = torch.zeros(1, 1, dtype=F64, requires_grad=True)
    args = (tensor(paper_grid_mask()[1][None]), times[:1])
    out = solve(domain, *args, d, r[:1, :1], reactions=("fisher_kpp",), method="chebyshev")
    (grad,) = torch.autograd.grad(out.sum(), d)
    h = 1e-7
    shifted = solve(domain, *args, torch.full((1, 1), h, dtype=F64), r[:1, :1], reactions=("fisher_kpp",),
                    method="chebyshev")
    assert float(grad) == pytest.approx(float((shifted.sum() - out.detach().sum()) / h), rel=1e-4)
    assert abs(float(grad)) > 1.0


def test_paper_grid_float32_chebyshev_is_close_to_float64():
    domain, *args = _paper_problem()
    out64 = solve(domain, *args, reactions=PAPER_TERMS, method="chebyshev")
    out32 = solve(domain, *(a.float() for a in args), reactions=PAPER_TERMS, method="chebyshev")
    assert out32.dtype == torch.float32
    assert float((out32.double() - out64).abs().max()) <= 1e-4




def test_chebyshev_gradients_match_finite_differences():
    domain, u0, d, r, times, weight = tiny_grid_problem()

    def fn(u0_, d_, r_):
        out = solve(domain, u0_, times, d_, r_, reactions=("fisher_kpp", "saturating", "zeldovich"),
                    method="chebyshev", expm_tol=1e-13)
        return (out * weight).sum((-2, -1))

    assert torch.autograd.gradcheck(fn, (u0, d, r))


# --------------------------------------------------------------------------- bounds and batching
def test_sharp_fields_stay_in_unit_interval_on_3d_grid():
    mask = ball_mask((14, 14, 14), 6.5)
    domain = GridDomain(mask, spacing=(1.0, 0.8, 1.2))
    rng = np.random.default_rng(5)
    n = domain.n_nodes
    u0 = np.stack([np.where(rng.random(n) < 0.5, 1.0, 0.0), np.ones(n), rng.uniform(0, 1, n) ** 4])
    d = tensor([[1.0] * 4, [0.01] * 4, [3.0] * 4])
    r = tensor([[0.1] * 4, [0.01] * 4, [0.9] * 4])
    for dtype in (F64, torch.float32):
        out = solve_active(domain, tensor(u0, dtype), tensor([[0.0, 0.7, 5.0]] * 3, dtype), d.to(dtype),
                           r.to(dtype), reactions=PAPER_TERMS, method="chebyshev").numpy()
        assert out.min() >= 0.0 and out.max() <= 1.0
        # A brain full of pathology stays full (L 1 = 0, f(1) = 0), up to the expansion's truncation.
        np.testing.assert_allclose(out[1], 1.0, atol=1e-6 if dtype == torch.float32 else 1e-9)
        # Pure diffusion from the sharp field conserves mass as the exact flow does (no clamping
        # is needed for it: every value stays inside [0, 1] and L's null space is kept).
        mass = out[0, 3].sum(-1)
        np.testing.assert_allclose(mass, mass[0], rtol=1e-5 if dtype == torch.float32 else 1e-9)


def test_batch_over_subjects_and_components_equals_separate_solves():
    mask, domain = ball()
    n_sub = 3
    u0 = tensor(ball_initial(mask, n_sub))
    times = tensor([[0.0, 0.4, 1.0], [0.0, 0.7, 0.9], [0.2, 0.5, 1.2]])
    d = tensor([[0.2, 1.0], [2.0, 0.5], [0.05, 0.8]])
    r = tensor([[0.9, 0.0], [0.3, 0.0], [1.2, 0.0]])
    terms = ("fisher_kpp", "diffusion")
    # rate_floor fixes each subject's step counts from its own rates, as in the spectral tests.
    batch = solve_active(domain, u0, times, d, r, reactions=terms, method="chebyshev", rate_floor=1.5)
    for i in range(n_sub):
        for k, name in enumerate(terms):
            alone = solve_active(domain, u0[i:i + 1], times[i:i + 1], d[i:i + 1, k:k + 1], r[i:i + 1, k:k + 1],
                                 reactions=(name,), method="chebyshev", rate_floor=1.5)
            # The expansion degree is the batch's largest; a lower one alone differs by < expm_tol per step.
            np.testing.assert_allclose(batch[i, k].numpy(), alone[0, 0].numpy(), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- the expansion itself
@pytest.mark.parametrize("a", [0.0, 1e-3, 0.7, 12.0, 250.0])
def test_chebyshev_coefficients_reproduce_the_exponential(a):
    tol = 1e-12
    coeffs = chebyshev_coefficients(np.array([a]), tol)[:, 0]
    y = np.cos(np.linspace(0, np.pi, 2001))
    series = np.polynomial.chebyshev.chebval(y, coeffs)
    assert np.abs(series - np.exp(-a * (1.0 + y))).max() <= 2 * tol
    if a > 1:
        # The degree is near the smallest that reaches tol, not just a generous cut-off.
        assert np.abs(np.polynomial.chebyshev.chebval(y, coeffs[:-3]) - np.exp(-a * (1.0 + y))).max() > tol


def test_graph_domain_chebyshev_matches_expm_multiply():
    rng = np.random.default_rng(3)
    a = np.triu(rng.uniform(0, 2, (40, 40)) * (rng.random((40, 40)) < 0.2), 1)
    a = a + a.T
    domain = GraphDomain(a)
    u0 = rng.uniform(0, 1, (2, 40))
    d = np.array([0.3, 2.0])
    out = solve_active(domain, tensor(u0), tensor([[0.0, 1.5]] * 2), tensor(d[:, None]), tensor([[0.0], [0.0]]),
                       reactions=("diffusion",), method="chebyshev", expm_tol=1e-13)[:, 0, 1].numpy()
    lap = np.diag(a.sum(1)) - a
    ref = np.stack([expm_multiply(-1.5 * d[i] * sp.csr_matrix(lap), u0[i]) for i in range(2)])
    assert np.abs(out - ref).max() <= 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_chebyshev_on_cuda_matches_cpu():
    domain, u0, times, d, r = _paper_problem()
    results = {}
    for device in ("cpu", "cuda"):
        dd = d.clone().to(device).requires_grad_()
        out = solve(domain, u0.to(device), times.to(device), dd, r.to(device), reactions=PAPER_TERMS,
                    method="chebyshev")
        (grad,) = torch.autograd.grad(out.sum(), dd)
        results[device] = (out.cpu(), grad.cpu())
    for a, b in zip(results["cpu"], results["cuda"]):
        assert float((a - b).abs().max()) <= 1e-9 * max(1.0, float(a.abs().max()))


def test_runs_with_very_different_diffusion_times_each_get_their_own_degree():
    """One call with D dt over six orders of magnitude (a sleep batch drawn from a wide prior) is split
    into degree groups, and every run still matches scipy's expm_multiply; its columns read in the
    order given, including the leading-rows form used while runs stop stepping."""
    mask, domain = ball()
    lap = domain.laplacian
    rng = np.random.default_rng(3)
    diffusivity = 10.0 ** rng.uniform(-3, 3, size=(6, 2))  # (R, K)
    dt = np.full((6, 1, 1), 0.5)
    a = diffusivity.ravel() * 0.5 * domain.gershgorin_bound() / 2
    assert len(np.unique(_degree_groups(a))) >= 3
    state = np.stack([ball_initial(mask, 2)] * 6) * rng.uniform(0.5, 1.0, size=(6, 2, 1))  # (R, K, n)
    diffuse = chebyshev_propagator(domain, F64, "cpu")(tensor(diffusivity), tensor(dt))
    for rows in (6, 4):
        out = diffuse(tensor(state[:rows]), rows).numpy()
        for i in range(rows):
            for k in range(2):
                ref = expm_multiply(-diffusivity[i, k] * 0.5 * lap, state[i, k])
                assert np.abs(out[i, k] - ref).max() <= 1e-9


def _saved_bytes_per_subject(encoder, domain, n_visits: int, batch: int = 1) -> float:
    """Bytes the encoder's forward keeps for backward, per subject (distinct saved tensors)."""
    saved: dict = {}

    def pack(x):
        saved[(x.data_ptr(), tuple(x.shape))] = x.numel() * x.element_size()
        return x

    signal = torch.rand(batch, n_visits, domain.n_nodes)
    times = torch.linspace(0.0, 4.0, n_visits).expand(batch, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = encoder(signal, times, torch.ones(batch, n_visits, dtype=torch.bool))
    assert all(torch.isfinite(o).all() for o in out)
    return sum(saved.values()) / batch


def test_3d_encoder_at_2mm_keeps_no_wide_activation_at_full_resolution():
    """At 2 mm (190,468 grey-matter voxels in a 95x117x99 box) the encoder's stored activations stay
    below twice its input (the visit features); a first convolution of full width at full resolution
    stores about 11 times the input (599 MB per subject with 3 visits).
    The stem applies to grids of more than 2^12 voxels in their box."""
    from pyrovae_pde.data.simulate import mni_gm_mask
    from pyrovae_pde.model.encoders import N_FEATURES, GridEncoder
    from pyrovae_pde.physics import GridDomain

    kwargs = dict(d_prior=(0.0, 1.0), r_prior=(0.0, 1.0), n_components=3, n_rate_components=3)
    mask, spacing, _ = mni_gm_mask(2.0)
    domain = GridDomain(mask.astype(bool), spacing=spacing)
    encoder = GridEncoder(domain, 3, **kwargs)
    input_bytes = (N_FEATURES * 3 + 1) * mask.size * 4
    assert _saved_bytes_per_subject(encoder, domain, 3) < 2.0 * input_bytes
    # 6 mm (44,880 voxels in the box): two stem layers; without a stem (runs saved before it), the
    # first convolution is full width at full resolution.
    mask6, spacing6, _ = mni_gm_mask(6.0)
    domain6 = GridDomain(mask6.astype(bool), spacing=spacing6)
    def convolutions(encoder):
        return [layer for layer in encoder.body if isinstance(layer, torch.nn.Conv3d)]

    assert [c.stride for c in convolutions(GridEncoder(domain6, 3, **kwargs))[:3]] == [(2, 2, 2), (2, 2, 2), (1, 1, 1)]
    legacy = convolutions(GridEncoder(domain6, 3, stem_max_voxels=None, **kwargs))[0]
    assert legacy.stride == (1, 1, 1) and legacy.out_channels == 32
