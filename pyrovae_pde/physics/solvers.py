"""Batched solvers of du/dt = -D L u + r f_k(u) over subjects AND components.

Three interchangeable methods share one signature:

* ``"spectral"`` (``"auto"`` for domains up to ``SPECTRAL_MAX_NODES`` nodes): diffusion is solved
  exactly in the eigenbasis of L (u -> V exp(-D Lambda dt) V^T u), the pointwise reaction by its
  exact flow (or RK4), combined by second-order Strang splitting, and by default Richardson
  extrapolation of n and 2n steps. The step count per visit interval is chosen per subject and
  component from the dimensionless reaction step r*dt of that component's own rate (so a
  component's solution never depends on the others), finer in the first interval, which starts from the
  observed (rough) initial field. Fields are kept in [0, 1], the range of a normalised
  concentration that the exact solution never leaves.
* ``"chebyshev"`` (``"auto"`` above ``SPECTRAL_MAX_NODES``): the same splitting, step counts,
  reaction flows, extrapolation and clamping, with each diffusion step exp(-D dt L) v evaluated by
  a Chebyshev expansion on [0, Gershgorin bound of L] using only sparse CSR products (see
  ``chebyshev.py``): no eigenbasis and no dense n x n matrix, for 3-D masks of 10^4-10^6 voxels.
* any torchdiffeq method (``"dopri5"``, ``"rk4"``, ...): the method-of-lines system with the
  sparse Laplacian, integrated by ``torchdiffeq.odeint`` (or ``odeint_adjoint``) over the union
  of all subjects' visit times (relative to each subject's first visit).

Tests hold the spectral path to the torchdiffeq reference and to scipy's ``solve_ivp``, and the
Chebyshev path to the spectral one and to scipy (tests/test_physics_large.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import SolverInputError
from .chebyshev import DEFAULT_EXPM_TOL, Diffuse, chebyshev_propagator
from .domains import Domain
from .reactions import ReactionTerm, get_reaction

SPECTRAL_MAX_NODES = 6000
DEFAULT_REACTION_STEP = 0.9  # largest r*dt of a Strang step after the first visit interval
DEFAULT_INITIAL_REACTION_STEP = 0.2  # ... and within the first interval (rough initial data)
DEFAULT_MAX_SUBSTEP = 0.9  # largest RK4 substep of reaction terms without an exact flow


def _resolve_reactions(reactions: Sequence[str | ReactionTerm]) -> list[ReactionTerm]:
    if isinstance(reactions, (str, ReactionTerm)):
        reactions = (reactions,)
    terms = [r if isinstance(r, ReactionTerm) else get_reaction(r) for r in reactions]
    if not terms:
        raise SolverInputError("reactions must name at least one reaction term")
    return terms


def relative_times(times: torch.Tensor) -> torch.Tensor:
    """Times (N, T) -> time since each subject's first visit, NaN (missing) carried forward."""
    if torch.isnan(times[:, 0]).any():
        raise SolverInputError("times[:, 0] (each subject's first visit) must not be NaN")
    filled = times.clone()
    for j in range(1, times.shape[1]):
        filled[:, j] = torch.where(torch.isnan(times[:, j]), filled[:, j - 1], times[:, j])
    return filled - filled[:, :1]


def _check(domain: Domain, u0: torch.Tensor, times: torch.Tensor, diffusivity: torch.Tensor,
           reaction: torch.Tensor, n_components: int) -> None:
    n = u0.shape[0]
    if times.dim() != 2 or times.shape[0] != n:
        raise SolverInputError(f"times must have shape (N, T) with N={n} subjects, got {tuple(times.shape)}")
    for name, value in (("diffusivity", diffusivity), ("reaction", reaction)):
        if tuple(value.shape) != (n, n_components):
            raise SolverInputError(
                f"{name} must have shape (N, K) = ({n}, {n_components}), got {tuple(value.shape)}")


@dataclass(frozen=True)
class SolverSettings:
    """How ``solve``/``solve_active`` integrate (every field has the solvers' default).

    ``method``: ``"spectral"``, ``"chebyshev"``, ``"auto"`` (spectral up to ``SPECTRAL_MAX_NODES``
    nodes, else chebyshev; see ``resolve_method``) or a torchdiffeq method name. Spectral and
    chebyshev (the same splitting, different diffusion steps): ``reaction_step`` and
    ``initial_reaction_step`` are the largest r*dt of a Strang step after and within the first
    visit interval; ``extrapolate`` combines n and 2n steps (Richardson); ``max_steps`` caps the
    steps per interval; ``rate_floor`` is the smallest rate in the step-count rule (``None``: the
    batch's largest); ``max_substep`` bounds the RK4 substeps of terms without an exact flow;
    ``expm_tol`` (chebyshev only) bounds each diffusion step's per-node truncation error relative
    to max|u| (one expansion degree per visit interval, the largest any subject in the batch needs,
    so batch mates change a subject's result by at most that per step). torchdiffeq: ``rtol``, ``atol`` and
    ``adjoint`` (``odeint_adjoint``).
    """

    method: str = "auto"
    reaction_step: float = DEFAULT_REACTION_STEP
    initial_reaction_step: float = DEFAULT_INITIAL_REACTION_STEP
    extrapolate: bool = True
    max_steps: int | None = None
    rate_floor: float | None = 0.0
    max_substep: float = DEFAULT_MAX_SUBSTEP
    expm_tol: float = DEFAULT_EXPM_TOL
    rtol: float = 1e-6
    atol: float = 1e-8
    adjoint: bool = False


def _with_options(settings: SolverSettings | None, options: dict) -> SolverSettings:
    settings = SolverSettings() if settings is None else settings
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(SolverSettings)})
    if unknown:
        raise SolverInputError(f"unknown solver option {unknown[0]!r}; the options are the fields of SolverSettings: "
                               f"{', '.join(f.name for f in dataclasses.fields(SolverSettings))}")
    return dataclasses.replace(settings, **options) if options else settings


def resolve_method(domain: Domain, method: str = "auto") -> str:
    """The method ``solve_active`` uses on ``domain`` for ``method``: ``"auto"`` is ``"spectral"`` up to
    ``SPECTRAL_MAX_NODES`` nodes (dense eigenbasis, built once) and ``"chebyshev"`` above; any other
    name is returned unchanged. Record it with a run to know which solver produced its fields."""
    if method == "auto":
        return "spectral" if domain.n_nodes <= SPECTRAL_MAX_NODES else "chebyshev"
    return method


def solve_active(domain: Domain, u0: torch.Tensor, times: torch.Tensor, diffusivity: torch.Tensor,
                 reaction: torch.Tensor, reactions: Sequence[str | ReactionTerm] = ("fisher_kpp",),
                 settings: SolverSettings | None = None, *, step_rates: torch.Tensor | None = None,
                 **options) -> torch.Tensor:
    """Solve on active nodes: u0 (N, n_nodes), times (N, T), diffusivity/reaction (N, K).

    Returns (N, K, T, n_nodes); entry [:, :, 0] is u0. Times in the unit of the rates; D in
    (length unit)^2 per time unit, r per time unit. Spectral steps per visit interval are
    ceil(interval * max(r_ik, rate_floor) / reaction_step) per subject i and component k, with
    r_ik that component's own rate (0 without one) and ``initial_reaction_step`` in the first
    interval; a fixed floor (default 0) makes each (subject, component) result independent of its
    batch and of the subject's other components, ``None`` uses the batch's largest rate.
    ``max_steps`` caps the steps per interval (accuracy then degrades for the largest r*dt only).
    ``extrapolate`` combines n and 2n steps by Richardson extrapolation (fourth order in smooth
    intervals, three times the products of plain Strang with n steps); without it the result is
    plain Strang, which keeps [0, 1] and positivity exactly.
    ``max_substep`` bounds the RK4 substeps of reaction terms that have no exact flow.
    ``step_rates`` (N,) or (N, K), if given, replaces the rates in the step-count rule: solves that
    must share their discretisation (finite differences in the rates) pass one value.
    ``settings``: a ``SolverSettings``; keyword ``options`` override its fields.
    """
    settings = _with_options(settings, options)
    terms = _resolve_reactions(reactions)
    _check(domain, u0, times, diffusivity, reaction, len(terms))
    if u0.shape[-1] != domain.n_nodes:
        raise SolverInputError(f"u0 must have {domain.n_nodes} active values per subject, got {u0.shape[-1]}")
    times = times.to(dtype=u0.dtype, device=u0.device)
    tau = relative_times(times)
    if (tau[:, 1:] < tau[:, :-1]).any():
        raise SolverInputError("each subject's visit times must be ascending")
    method = resolve_method(domain, settings.method)
    if method == "spectral":
        propagator = _eigenbasis_propagator(domain, u0.dtype, u0.device)
    elif method == "chebyshev":
        propagator = chebyshev_propagator(domain, u0.dtype, u0.device, settings.expm_tol)
    else:
        return _solve_odeint(domain, u0, tau, diffusivity, reaction, terms,
                             dataclasses.replace(settings, method=method))
    return _solve_split(u0, tau, diffusivity, reaction, terms, settings, propagator, step_rates)


def solve(domain: Domain, u0: torch.Tensor, times: torch.Tensor, diffusivity: torch.Tensor,
          reaction: torch.Tensor, reactions: Sequence[str | ReactionTerm] = ("fisher_kpp",),
          settings: SolverSettings | None = None, **options) -> torch.Tensor:
    """Solve du/dt = -D L u + r f_k(u) for N subjects and K components in one call.

    Args:
        domain: a ``GridDomain`` or ``GraphDomain``.
        u0: initial fields (N, *space) on the full grid (zero outside the mask) or (N, n_nodes).
        times: visit times (N, T), per subject, ascending; NaN marks a missing visit (its output
            is unspecified). The solve starts at each subject's first visit.
        diffusivity, reaction: (N, K) rates, K = len(reactions); ``reaction`` is ignored for
            components without a rate (``diffusion``).
        reactions: names (or ``ReactionTerm`` objects) of the K components' reaction terms.
        settings: a ``SolverSettings`` (method, step sizes, tolerances); keyword ``options``
            override its fields, e.g. ``method="dopri5"``, ``rtol=1e-8``.

    Returns:
        (N, K, T, *space) fields, differentiable in u0, diffusivity and reaction.
    """
    if tuple(u0.shape[1:]) != tuple(domain.spatial_shape):
        raise SolverInputError(
            f"u0 must have shape (N, {', '.join(map(str, domain.spatial_shape))}), got {tuple(u0.shape)}")
    out = solve_active(domain, domain.gather(u0), times, diffusivity, reaction, reactions,
                       _with_options(settings, options))
    return domain.scatter(out)


def _reaction_flow(terms: list[ReactionTerm], u: torch.Tensor, s: torch.Tensor,
                   substeps: int) -> torch.Tensor:
    """Apply each component's reaction flow: u (R, K, n), s (R, K, 1) reaction time."""
    if len(terms) == 1:
        return terms[0].flow(u, s, substeps=substeps)
    return torch.stack([term.flow(u[:, k], s[:, k], substeps=substeps) for k, term in enumerate(terms)],
                       dim=1)


def _step_counts(interval: torch.Tensor, subject_rate: torch.Tensor, reaction_step: float,
                 max_steps: int | None) -> torch.Tensor:
    """Strang steps per subject for one visit interval: ceil(interval * rate / reaction_step)."""
    n_steps = torch.ceil(interval * subject_rate / reaction_step).clamp(min=1)
    if max_steps is not None:
        n_steps = n_steps.clamp(max=max_steps)
    return torch.where(interval > 0, n_steps, torch.zeros_like(n_steps))


Propagator = Callable[[torch.Tensor, torch.Tensor], Diffuse]


def _eigenbasis_propagator(domain: Domain, dtype: torch.dtype, device: torch.device | str) -> Propagator:
    """Exact diffusion steps in the dense eigenbasis of L (see ``chebyshev_propagator`` for the contract)."""
    evals, evecs = domain.eigh(dtype, device)  # (n,), (n, n)

    def prepare(diffusivity: torch.Tensor, dt: torch.Tensor) -> Diffuse:
        decay = torch.exp(-diffusivity[..., None] * evals * dt)  # (R, K, n)
        return lambda state, rows: ((state @ evecs) * decay[:rows]) @ evecs.T

    return prepare


def _strang_interval(u: torch.Tensor, interval: torch.Tensor, n_steps: torch.Tensor,
                     diffusivity: torch.Tensor, rate: torch.Tensor, propagator: Propagator,
                     terms: list[ReactionTerm], substeps: int) -> torch.Tensor:
    """Advance u (R, K, n) over one visit interval (R,) by n_steps (R,) Strang steps per run.

    ``propagator``: the diffusion steps (eigenbasis or Chebyshev). ``substeps``: RK4 substeps per
    reaction flow of a full step (for terms without an exact flow).

    Runs are sorted by step count, so at step m the runs still stepping are a leading block and
    the diffusion products are spent on those rows only.
    """
    most = int(n_steps.max()) if n_steps.numel() else 0
    if not most:
        return u
    order = torch.argsort(n_steps, descending=True, stable=True)
    steps = n_steps[order]  # (R,) descending
    dt = (interval[order] / steps.clamp(min=1))[:, None, None]  # (R, 1, 1)
    diffuse = propagator(diffusivity[order], dt)
    full_s = rate[order][..., None] * dt  # (R, K, 1) reaction time of one step
    active_rows = [int((steps > m).sum()) for m in range(most)]
    # R(h/2) D(h) R(h/2) per step, with adjacent half reactions merged:
    # R(h/2) D R(h) D ... R(h) D R(h/2).
    state = _reaction_flow(terms, u[order], 0.5 * full_s, substeps)
    for m, rows in enumerate(active_rows):
        # Clamping to [0, 1] (the invariant range of the exact solution) removes float32 round-off
        # of the eigenbasis products (and the Chebyshev truncation error), which the unstable
        # equilibria of the reaction ODE (u = 0, and u = 1 for saturating terms) would otherwise amplify.
        diffused = diffuse(state[:rows], rows).clamp(0.0, 1.0)
        last = (m == steps[:rows] - 1).to(full_s)[:, None, None]  # (rows, 1, 1)
        stepped = _reaction_flow(terms, diffused, full_s[:rows] * (1.0 - 0.5 * last), substeps)
        state = stepped if rows == state.shape[0] else torch.cat([stepped, state[rows:]], dim=0)
    return state[torch.argsort(order)]


def _solve_split(u0: torch.Tensor, tau: torch.Tensor, diffusivity: torch.Tensor, reaction: torch.Tensor,
                 terms: list[ReactionTerm], settings: SolverSettings, propagator: Propagator,
                 step_rates: torch.Tensor | None = None) -> torch.Tensor:
    rate_floor = settings.rate_floor
    n_sub, n_comp = diffusivity.shape
    has_rate = torch.tensor([t.has_rate for t in terms], device=u0.device, dtype=u0.dtype)
    rate = reaction * has_rate  # (N, K); zero for rate-free components
    # Step counts are per subject AND component, from max(its own rate, rate_floor): a component's
    # solution depends on its own D and r only, not on the subject's other components nor on its
    # batch mates, so the mixture's likelihood solves each mechanism exactly as a simulator that
    # solves it alone (rate_floor=None: everyone gets the steps of the batch's largest rate).
    if step_rates is None:
        step_rate = rate.detach().abs()
    else:
        step_rate = step_rates.detach().to(rate)
        step_rate = (step_rate[:, None] if step_rate.dim() == 1 else step_rate).expand(n_sub, n_comp)
    shared = n_comp == 1 or rate_floor is None or (step_rates is not None and step_rates.dim() == 1)
    if rate_floor is None:
        rate_floor = float(step_rate.max()) if step_rate.numel() else 0.0
    step_rate = step_rate.clamp(min=rate_floor)  # (N, K)
    # One solve for all components only where the call's form makes their step counts equal, never
    # by comparing values: a subject's roundoff must not depend on its batch mates (one process
    # against a batch split over ranks).
    if shared:
        return _split_with_steps(u0, tau, diffusivity, rate, terms, settings, propagator, step_rate[:, 0])
    return torch.cat([_split_with_steps(u0, tau, diffusivity[:, k:k + 1], rate[:, k:k + 1], terms[k:k + 1], settings,
                                        propagator, step_rate[:, k]) for k in range(n_comp)], dim=1)


def _split_with_steps(u0: torch.Tensor, tau: torch.Tensor, diffusivity: torch.Tensor, rate: torch.Tensor,
                      terms: list[ReactionTerm], settings: SolverSettings, propagator: Propagator,
                      step_rate: torch.Tensor) -> torch.Tensor:
    """Strang splitting over every visit interval, all K components with the step counts of
    ``step_rate`` (N,); u0 (N, n), tau (N, T), diffusivity and rate (N, K) -> (N, K, T, n)."""
    reaction_step, initial_reaction_step = settings.reaction_step, settings.initial_reaction_step
    extrapolate, max_steps, max_substep = settings.extrapolate, settings.max_steps, settings.max_substep
    n_sub, n_comp = diffusivity.shape
    # Richardson extrapolation: every subject is solved twice, with n and with 2n Strang steps per
    # interval (runs 0..N-1 coarse, N..2N-1 fine); (4 fine - coarse) / 3 cancels the h^2 error term.
    copies = 2 if extrapolate else 1
    refinement = 2 ** torch.arange(copies, device=u0.device).repeat_interleave(n_sub)  # (C N,)
    run_diffusivity, run_rate = diffusivity.repeat(copies, 1), rate.repeat(copies, 1)  # (C N, K)
    start = u0.unsqueeze(1).expand(n_sub, n_comp, u0.shape[-1])  # (N, K, n)
    u = start.repeat(copies, 1, 1)  # (C N, K, n)
    outputs = [start]
    for j in range(tau.shape[1] - 1):
        interval = tau[:, j + 1] - tau[:, j]  # (N,)
        # The first interval starts from the observed (possibly rough) initial field, where the
        # splitting error is largest: it gets the finer step.
        step = initial_reaction_step if j == 0 else reaction_step
        n_steps = _step_counts(interval.detach(), step_rate, step, max_steps)
        # Fixed from the step bound, not from the data, so batch mates do not change a subject.
        substeps = max(1, math.ceil(step / max_substep))
        u = _strang_interval(u, interval.repeat(copies), n_steps.repeat(copies) * refinement,
                             run_diffusivity, run_rate, propagator, terms, substeps)
        if extrapolate:
            outputs.append(((4.0 * u[n_sub:] - u[:n_sub]) / 3.0).clamp(0.0, 1.0))
        else:
            outputs.append(u)
    return torch.stack(outputs, dim=2)  # (N, K, T, n)


def _solve_odeint(domain: Domain, u0: torch.Tensor, tau: torch.Tensor, diffusivity: torch.Tensor,
                  reaction: torch.Tensor, terms: list[ReactionTerm], settings: SolverSettings) -> torch.Tensor:
    method, rtol, atol, adjoint = settings.method, settings.rtol, settings.atol, settings.adjoint
    import torchdiffeq

    lap = domain.sparse_laplacian(u0.dtype, u0.device)
    n_sub, n_comp = diffusivity.shape
    n = u0.shape[-1]
    grid, inverse = torch.unique(tau, sorted=True, return_inverse=True)  # (G,), (N, T)
    has_rate = torch.tensor([t.has_rate for t in terms], device=u0.device, dtype=u0.dtype)

    class RHS(torch.nn.Module):
        def forward(self, t, u):  # u (N*K*n,)
            # Rates are derived inside forward so odeint_adjoint can differentiate through them.
            rate = (reaction * has_rate)[..., None]  # (N, K, 1)
            diff = diffusivity[..., None]  # (N, K, 1)
            u = u.view(n_sub, n_comp, n)
            lu = torch.sparse.mm(lap, u.reshape(-1, n).T).T.reshape(n_sub, n_comp, n)
            react = torch.stack([term.f(u[:, k]) for k, term in enumerate(terms)], dim=1)
            return (-diff * lu + rate * react).reshape(-1)

    y0 = u0.unsqueeze(1).expand(n_sub, n_comp, n).reshape(-1)
    if grid.numel() == 1:
        sol = y0[None]
    else:
        integrate = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
        kwargs = {}
        if adjoint:
            kwargs["adjoint_params"] = tuple(p for p in (diffusivity, reaction) if p.requires_grad)
        sol = integrate(RHS(), y0, grid, method=method, rtol=rtol, atol=atol, **kwargs)
    sol = sol.view(grid.numel(), n_sub, n_comp, n)
    # Pick each subject's own visit times out of the shared grid.
    idx = inverse.T[:, :, None, None].expand(-1, -1, n_comp, n)  # (T, N, K, n)
    picked = torch.gather(sol, 0, idx)  # (T, N, K, n)
    return picked.permute(1, 2, 0, 3)
