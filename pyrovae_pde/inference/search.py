"""Global search for each subject's posterior mode under each component, independent of the encoder.

For subject i and component k, theta = (a, b) = (log D, log r) has the Normal prior of the
LogNormal priors in log space, and the negative log posterior (up to a constant)

    F_ik(theta) = sse_ik(theta) / (2 sigma^2) + (a - a0)^2 / (2 sa^2) + (b - b0)^2 / (2 sb^2)

(no b term for rate-free components). ``search_modes`` finds argmin F in two stages:

1. a coarse grid over the prior's support (``grid_size`` points per coordinate over
   +-``span`` prior sds, every component of a batch of subjects in one batched solve per point,
   with plain Strang steps), optionally with the encoder's guess as one more candidate;
2. Levenberg-Marquardt from the best candidate with forward-difference Jacobians, until the
   Newton decrement g^T H^-1 g (H the Gauss-Newton Hessian) falls below ``tolerance`` for every
   component of a subject, or ``max_iter`` iterations; each (subject, component) reports whether
   it converged.

The result is a ``laplace.LaplaceFit`` (the Laplace approximation at the modes) with the
convergence flags. The encoder, when given, only adds a candidate: the grid alone finds the
basin, so an untrained encoder gives the same modes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.cohort import CohortTensors
from ..errors import InputError
from ..model.module import MixturePDE
from .encoding import GuideSummary
from .laplace import LaplaceFit, laplace_evidence, posterior_hessian, solve_residuals

# log of the factor on a component's rate that sets the solver's step counts during the
# search: finite differences and trial points must share the discretisation of their base point.
RATE_MARGIN = 0.3
DTYPE_OUT = torch.float64


@dataclass
class ModeSearch(LaplaceFit):
    """A ``LaplaceFit`` at the searched modes, plus per (subject, component) diagnostics:
    ``converged`` (N, K) bool, ``decrement`` (N, K) the final Newton decrement (nats),
    ``iterations`` (N,) LM iterations used by each subject."""

    converged: torch.Tensor = None
    decrement: torch.Tensor = None
    iterations: torch.Tensor = None


def _prior_terms(module: MixturePDE, has_rate: torch.Tensor, dtype):
    return (*module.prior_terms(dtype, has_rate.device), has_rate.to(dtype))


def _batch_size(module: MixturePDE, data: CohortTensors, points: int, budget: float = 2e7) -> int:
    per_subject = points * module.n_components * max(1, data.signal.shape[1] - 1) * data.signal.shape[2]
    return max(1, int(budget // per_subject))


def grid_candidates(module: MixturePDE, data: CohortTensors, noise_sd: float, grid_size: int = 7,
                    span: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best point of a coarse grid over the prior's support, per (subject, component).

    Returns (a, b, objective), each (N, K), float32; b is 0 for rate-free components.
    """
    has_rate = module.rate_mask(data.signal.device)
    la, sa, lb, sb, rate_f = _prior_terms(module, has_rate, torch.float32)
    steps = torch.linspace(-span, span, grid_size, dtype=torch.float32, device=data.signal.device)
    # The grid spans the base prior (the population prior's hyperprior), which holds every
    # component's population; points are shared by the components, each scored under its own prior.
    base = module.priors
    if module.rate_index:
        ga, gb = torch.meshgrid(base.diffusivity.loc + base.diffusivity.scale * steps,
                                base.reaction.loc + base.reaction.scale * steps, indexing="ij")
        ga, gb = ga.reshape(-1), gb.reshape(-1)  # (P,)
    else:
        ga, gb = base.diffusivity.loc + base.diffusivity.scale * steps, torch.zeros_like(steps)
    n_points, k = ga.numel(), module.n_components
    n = data.n_subjects
    best_obj = torch.full((n, k), math.inf, device=data.signal.device)
    best_a = torch.zeros(n, k, device=data.signal.device)
    best_b = torch.zeros(n, k, device=data.signal.device)
    s2 = float(noise_sd) ** 2
    bs = _batch_size(module, data, n_points)
    for start in range(0, n, bs):
        sl = slice(start, start + bs)
        sig = data.signal[sl].float()
        m = sig.shape[0]
        rep = lambda x: x.repeat_interleave(n_points, 0)  # noqa: E731  (m*P, ...) subject-major
        a = ga.repeat(m)[:, None].expand(-1, k)  # (m*P, K)
        b = gb.repeat(m)[:, None].expand(-1, k)
        resid = solve_residuals(module, rep(sig), rep(data.times[sl].float()), rep(data.observed[sl, 1:].float()),
                           a, b, None, coarse=True)  # (m*P, K, M)
        obj = (0.5 * (resid ** 2).sum(-1) / s2 + 0.5 * ((a - la) / sa) ** 2
               + rate_f * 0.5 * ((b - lb) / sb) ** 2).reshape(m, n_points, k)
        idx = obj.argmin(dim=1)  # (m, K)
        best_obj[sl] = obj.gather(1, idx[:, None]).squeeze(1)
        best_a[sl] = ga[idx]
        best_b[sl] = torch.where(has_rate, gb[idx], torch.zeros_like(gb[idx]))
    return best_a, best_b, best_obj


def _starting_points(problem: "_NewtonSearch", data: CohortTensors, noise_sd: float, grid: bool, grid_size: int,
                     span: float, start: GuideSummary | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (subject, component)'s start (N, K): the best grid point, or ``start`` where it is better."""
    module, has_rate = problem.module, problem.has_rate
    la, sa, lb, sb, _ = problem.prior
    if grid:
        a0, b0, obj0 = grid_candidates(module, data, noise_sd, grid_size, span)
    else:
        if start is None:
            raise InputError("search_modes(grid=False) needs a start")
        return start.d_loc.float(), torch.nan_to_num(start.r_loc.float())
    if start is not None:  # the encoder's (or an earlier) guess competes with the grid
        sa_, sb_ = start.d_loc.float(), torch.where(has_rate, torch.nan_to_num(start.r_loc.float()), 0.0)
        resid = solve_residuals(module, data.signal.float(), data.times.float(), data.observed[:, 1:].float(),
                                sa_, sb_, None, coarse=True)
        obj_s = (0.5 * (resid ** 2).sum(-1) / float(noise_sd) ** 2 + 0.5 * ((sa_ - la) / sa) ** 2
                 + has_rate.float() * 0.5 * ((sb_ - lb) / sb) ** 2)
        better = obj_s < obj0
        a0, b0 = torch.where(better, sa_, a0), torch.where(better, sb_, b0)
    return a0, b0


@dataclass(frozen=True)
class _NewtonSearch:
    """Levenberg-Marquardt to a Newton-decrement tolerance, batched over (subject, component), with
    forward-difference Jacobians of the model's own solver at every iterate."""

    module: MixturePDE
    prior: tuple  # la, sa, lb, sb, rate_f (has_rate as 0/1 in the search's dtype)
    has_rate: torch.Tensor  # (K,) bool
    variance: float  # sigma^2
    step: float  # finite-difference step in log space

    def rates_of(self, b):
        """Step-count rates (B, K): each component's own rate times the margin (0 without a rate)."""
        if not self.module.rate_index:
            return None
        return torch.exp(b) * math.exp(RATE_MARGIN) * self.has_rate.to(b.dtype)

    def objective(self, resid, a, b):
        la, sa, lb, sb, rate_f = self.prior
        return (0.5 * (resid ** 2).sum(-1) / self.variance + 0.5 * ((a - la) / sa) ** 2
                + rate_f * 0.5 * ((b - lb) / sb) ** 2)

    def solve_with_jacobian(self, sig, tim, msk, a, b, rates):
        step, rate_index = self.step, self.module.rate_index
        pts_a, pts_b = [a, a + step], [b, b]
        if rate_index:
            pts_a.append(a)
            pts_b.append(b + step)
        npts = len(pts_a)

        def rep(x):
            return x.repeat(npts, *([1] * (x.dim() - 1)))

        resid = solve_residuals(self.module, rep(sig), rep(tim), rep(msk), torch.cat(pts_a), torch.cat(pts_b),
                                rep(rates) if rates is not None else None)
        resid = resid.reshape(npts, a.shape[0], *resid.shape[1:])
        ja = (resid[1] - resid[0]) / step
        jb = (resid[2] - resid[0]) / step if rate_index else torch.zeros_like(ja)
        return resid[0], ja, jb

    def newton(self, resid, ja, jb, a, b, lam):
        """LM step (da, db) at damping lam, the gradient and the Newton decrement."""
        la, sa, lb, sb, rate_f = self.prior
        s2 = self.variance
        haa, hab, hbb = posterior_hessian((ja ** 2).sum(-1), (ja * jb).sum(-1), (jb ** 2).sum(-1), s2,
                                          (la, sa, lb, sb), self.has_rate)
        ga = (ja * resid).sum(-1) / s2 + (a - la) / sa ** 2
        gb = rate_f * ((jb * resid).sum(-1) / s2 + (b - lb) / sb ** 2)
        det = haa * hbb - hab ** 2
        decrement = (hbb * ga ** 2 - 2 * hab * ga * gb + haa * gb ** 2) / det
        daa, dbb = haa * (1 + lam), hbb * (1 + lam)
        det_l = daa * dbb - hab ** 2
        da = -(dbb * ga - hab * gb) / det_l
        db = -(daa * gb - hab * ga) / det_l * rate_f
        size = torch.maximum(da.abs(), db.abs()).clamp_min(1.0)  # at most one unit of log per step
        return da / size, db / size, decrement

    def search(self, batch, a, b, max_iter: int, tolerance: float) -> tuple:
        """One batch (signal, times, observed mask of later visits) from (a, b) (B, K): returns
        (a, b, J_aa, J_ab, J_bb, SSE, Newton decrement), each (B, K), and the iterations (B,)."""
        sig, tim, msk = batch
        device = a.device
        m, k = a.shape
        lam = torch.full_like(a, 1e-3)
        done = torch.zeros(m, k, dtype=torch.bool, device=device)
        decrement = torch.full_like(a, math.inf)
        iters = torch.zeros(m, dtype=torch.long, device=device)
        rows = torch.arange(m, device=device)
        for it in range(max_iter + 1):
            active = rows[~done.all(dim=1)]
            if active.numel() == 0:
                break
            ra, rb = a[active], b[active]
            rates = self.rates_of(rb)
            r0, ja_, jb_ = self.solve_with_jacobian(sig[active], tim[active], msk[active], ra, rb, rates)
            da, db, dec = self.newton(r0, ja_, jb_, ra, rb, lam[active])
            decrement[active] = dec
            newly_done = dec < tolerance
            done[active] = done[active] | newly_done
            if it == max_iter:
                break
            iters[active] += 1
            obj = self.objective(r0, ra, rb)
            ta, tb = self.module.clamp_theta(ra + da, rb + db)
            r1 = solve_residuals(self.module, sig[active], tim[active], msk[active], ta, tb, rates)
            better = (self.objective(r1, ta, tb) < obj) & ~newly_done
            a[active] = torch.where(better, ta, ra)
            b[active] = torch.where(better, tb, rb)
            lam[active] = torch.where(better, (lam[active] / 5).clamp_min(1e-6), lam[active] * 10)
            # LM with a huge damping makes no progress: the point is as good as this model gets
            stuck = lam[active] > 1e8
            done[active] = done[active] | stuck
        # Final residuals and Jacobians at the modes, with the discretisation of the final rates.
        resid, ja, jb = self.solve_with_jacobian(sig, tim, msk, a, b, self.rates_of(b))
        return (a, b, (ja ** 2).sum(-1), (ja * jb).sum(-1), (jb ** 2).sum(-1), (resid ** 2).sum(-1),
                decrement, iters)


def search_modes(module: MixturePDE, data: CohortTensors, noise_sd: float, grid_size: int = 7,
                 span: float = 3.0, start: GuideSummary | None = None, max_iter: int = 30,
                 tolerance: float = 1e-6, dtype: torch.dtype = torch.float64, step: float | None = None,
                 batch_size: int | None = None, hessian_noise_sd: float | None = None,
                 grid: bool = True) -> ModeSearch:
    """Posterior mode and Laplace approximation of p(log D, log r | x_i, subtype k), found globally.

    Args:
        noise_sd: observation sd sigma of the likelihood (the model's, noise floor included).
        grid_size, span: the coarse grid (points per coordinate, half-width in prior sds).
        start: optional extra candidates (the encoder's guess, or earlier modes); with
            ``grid=False`` the only start.
        max_iter, tolerance: LM iterations at most, and the Newton decrement (nats) below which
            a (subject, component) counts as converged.
        dtype: precision of the LM solves (the model's own solver); the grid uses float32.
        step: finite-difference step in log space (default 1e-4 in float64, 1e-2 in float32).
        hessian_noise_sd: sigma of the final Hessian and Laplace evidence (default ``noise_sd``).
    Subjects without later visits converge to the prior's centre (their evidence is 0).
    """
    device = data.signal.device
    has_rate = module.rate_mask(device)
    problem = _NewtonSearch(module, _prior_terms(module, has_rate, dtype), has_rate, float(noise_sd) ** 2,
                            step if step is not None else (1e-4 if dtype == torch.float64 else 1e-2))
    a0, b0 = _starting_points(problem, data, noise_sd, grid, grid_size, span, start)
    bs = batch_size or _batch_size(module, data, 3, 4e6)
    parts = []
    for begin in range(0, data.n_subjects, bs):
        sl = slice(begin, begin + bs)
        batch = (data.signal[sl].to(dtype), data.times[sl].to(dtype), data.observed[sl, 1:].to(dtype))
        parts.append(problem.search(batch, a0[sl].to(dtype), b0[sl].to(dtype), max_iter, tolerance))
    a, b, jaa, jab, jbb, sse, decrement, iters = (torch.cat(p) for p in zip(*parts))
    a, b, jaa, jab, jbb, sse = (t.double() for t in (a, b, jaa, jab, jbb, sse))
    n_obs = data.observed[:, 1:].double().sum(1) * data.signal.shape[-1]
    h2 = float(hessian_noise_sd if hessian_noise_sd is not None else noise_sd) ** 2
    cov, log_evidence = laplace_evidence(a, b, jaa, jab, jbb, sse, n_obs, h2, module.prior_terms(DTYPE_OUT, device),
                                         has_rate)
    return ModeSearch(torch.stack([a, b], -1), cov, log_evidence, sse, n_obs, has_rate,
                      torch.stack([jaa, jab, jbb], -1), variance=h2, converged=decrement.double() < tolerance,
                      decrement=decrement.double(), iterations=iters)
