"""Laplace approximation of each subject's posterior given each subtype.

For subject i and component k, theta = (a, b) = (log D, log r) has a Normal prior (the LogNormal
priors in log space) and the likelihood of the later observed visits given the PDE solution,
Normal with the observation sd sigma. ``laplace_fit`` finds the mode by Levenberg-Marquardt,
started at the amortized guide's means (every component of every subject in a batch goes through
one batched solve per evaluation), with forward-difference Jacobians at the start and at the mode
and Broyden updates in between, and returns the Gaussian approximation N(mode, H^-1), H the
Gauss-Newton Hessian of the negative log
posterior, and the Laplace estimate of the evidence

    log p(x_i | k) ~= log p(x_i | theta*) + log p(theta*) + (d/2) log(2 pi) - (1/2) log det H,

with d = 2 (d = 1 for components without a rate, whose log r coordinate is unused).

``two_level=True`` (what ``predict`` uses) runs the search on coarse solves and corrects its mode
and residuals with one solve of the model's own solver, at about a third of the cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.cohort import CohortTensors
from ..model.likelihood import LOG_2PI, NOISE_FLOOR, gaussian_log_likelihood, normal_log_density
from ..model.module import MixturePDE
from . import distributed as ddp
from .encoding import GuideSummary, encode_cohort

SEARCH_RATE_MARGIN = 0.3  # log of the factor on the guide's rate that sets the search's step counts


@dataclass
class LaplaceFit:
    """Per (subject, component) Gaussian approximations over theta = (log D, log r).

    mean (N, K, 2), cov (N, K, 2, 2) (for rate-free components the log r row/column is a unit
    placeholder), log_evidence (N, K), sse (N, K) at the mode, n_obs (N,), has_rate (K,) bool,
    jtj (N, K, 3): the likelihood's J^T J entries (aa, ab, bb) at the mode, before dividing by sigma^2;
    variance: the observation variance sigma^2 of cov and log_evidence (None: not recorded).
    """

    mean: torch.Tensor
    cov: torch.Tensor
    log_evidence: torch.Tensor
    sse: torch.Tensor
    n_obs: torch.Tensor
    has_rate: torch.Tensor
    jtj: torch.Tensor
    variance: float | None = None

    def covariance(self, variance: float, prior: tuple) -> torch.Tensor:
        """Inverse Gauss-Newton Hessian (N, K, 2, 2) at the modes for observation variance
        ``variance`` and the prior ``prior`` (``MixturePDE.prior_terms``)."""
        return _inverse(*posterior_hessian(self.jtj[..., 0], self.jtj[..., 1], self.jtj[..., 2], variance, prior,
                                  self.has_rate))[0]


def posterior_hessian(jaa: torch.Tensor, jab: torch.Tensor, jbb: torch.Tensor, variance: float, prior: tuple,
                      has_rate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gauss-Newton Hessian entries (aa, ab, bb) of the negative log posterior over (log D, log r),
    from the likelihood's J^T J entries (..., K) and the prior (la, sa, lb, sb), each (K,);
    rate-free components get a unit placeholder for bb."""
    _, sa, _, sb = prior
    return (jaa / variance + 1 / sa ** 2, jab / variance, jbb / variance + torch.where(has_rate, 1 / sb ** 2, 1.0))


def _inverse(haa: torch.Tensor, hab: torch.Tensor, hbb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse (..., 2, 2) and determinant (...) of the symmetric 2 x 2 matrices [[haa, hab], [hab, hbb]]."""
    det = haa * hbb - hab ** 2
    inv = torch.stack([torch.stack([hbb, -hab], -1), torch.stack([-hab, haa], -1)], -2) / det[..., None, None]
    return inv, det


def laplace_evidence(a: torch.Tensor, b: torch.Tensor, jaa: torch.Tensor, jab: torch.Tensor, jbb: torch.Tensor,
                     sse: torch.Tensor, n_obs: torch.Tensor, variance: float, prior: tuple,
                     has_rate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Covariance (N, K, 2, 2) and Laplace log evidence (N, K) at modes (a, b) (N, K) with the
    likelihood's J^T J entries, residual sums of squares ``sse`` (N, K), ``n_obs`` (N,) observed
    values and observation variance ``variance``:
    log p(x | theta*) + log p(theta*) + (d/2) log(2 pi) - (1/2) log det H."""
    la, sa, lb, sb = (t.to(a) for t in prior)
    cov, det = _inverse(*posterior_hessian(jaa, jab, jbb, variance, (la, sa, lb, sb), has_rate))
    rate_d = has_rate.to(a.dtype)
    log_lik = gaussian_log_likelihood(sse, n_obs[:, None], math.sqrt(variance))
    log_prior = normal_log_density(a, la, sa) + rate_d * normal_log_density(b, lb, sb)
    return cov, log_lik + log_prior + 0.5 * (1 + rate_d) * LOG_2PI - 0.5 * torch.log(det)


def pooled_residual_variance(sse: torch.Tensor, n_obs: torch.Tensor, share: ddp.Share | None = None) -> float | None:
    """Residual variance pooled over subjects at each subject's best component: sse (N, K), n_obs (N,).
    None when no subject has a later observed visit. ``share`` (distributed): these are this rank's
    subjects; pooled over every rank's, in subject order (one process's value)."""
    best = sse.min(dim=1).values
    if share is not None:
        best, n_obs = ddp.gather_rows(share, best, n_obs)
    if float(n_obs.sum()) <= 0:
        return None
    return float(best.sum() / n_obs.sum())


def _residuals_and_jacobians(module: MixturePDE, signal: torch.Tensor, times: torch.Tensor,
                             mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor, step: float,
                             step_rates: torch.Tensor | None, base: torch.Tensor | None = None,
                             fresh: torch.Tensor | None = None, coarse: bool = False):
    """Residuals (B, K, M) at theta = (a, b) (B, K) and forward-difference Jacobian columns.

    All points share the step counts set by ``step_rates`` (B, K), so the difference sees the PDE's
    dependence on theta, not a change of discretisation. ``base``: residuals at theta already
    solved with these step counts, except for the rows where ``fresh`` (B,) is True."""
    n = a.shape[0]
    rows = torch.arange(n, device=a.device)
    if base is not None:
        rows = rows[fresh]
    points_a, points_b, index = [a[rows], a + step], [b[rows], b], [rows, torch.arange(n, device=a.device)]
    if module.rate_index:
        points_a.append(a)
        points_b.append(b + step)
        index.append(index[1])
    index = torch.cat(index)
    resid = solve_residuals(module, signal[index], times[index], mask[index], torch.cat(points_a), torch.cat(points_b),
                            step_rates[index] if step_rates is not None else None, coarse)  # (rows + 2 B, K, M)
    start = resid[:len(rows)]
    if base is not None:
        start = base.clone()
        start[rows] = resid[:len(rows)]
    shifted = resid[len(rows):].reshape(-1, n, *resid.shape[1:])
    ja = (shifted[0] - start) / step
    jb = (shifted[1] - start) / step if module.rate_index else torch.zeros_like(ja)
    return start, ja, jb


def solve_residuals(module: MixturePDE, signal: torch.Tensor, times: torch.Tensor, mask: torch.Tensor,
                    a: torch.Tensor, b: torch.Tensor, step_rates: torch.Tensor | None,
                    coarse: bool = False) -> torch.Tensor:
    """Residuals (B, K, M) at theta = (a, b), with the solver's step counts set by ``step_rates``."""
    rate = module.rate_index
    with torch.no_grad():
        fields = module.predict(signal[:, 0], times, torch.exp(a), torch.exp(b[:, rate]) if rate else None,
                                step_rates=step_rates, coarse=coarse)
    resid = (fields[:, :, 1:] - signal[:, None, 1:]) * mask[:, None, :, None]
    return resid.reshape(*resid.shape[:2], -1)


@dataclass(frozen=True)
class _LevenbergMarquardt:
    """The batched per-(subject, component) mode search of ``laplace_fit`` and its settings."""

    module: MixturePDE
    prior: tuple  # (loc, scale) of log D and of log r: la, sa, lb, sb
    has_rate: torch.Tensor  # (K,) bool
    variance: float  # sigma^2 of the likelihood during the search
    step: float  # finite-difference step in log space
    broyden: bool
    two_level: bool
    together: bool = False  # distributed: a batch's iterations stop when no rank's subject still gains

    def objective(self, resid, a, b):
        la, sa, lb, sb = self.prior
        return (0.5 * (resid ** 2).sum(-1) / self.variance + 0.5 * ((a - la) / sa) ** 2
                + self.has_rate.to(a.dtype) * 0.5 * ((b - lb) / sb) ** 2)

    def damped_step(self, resid, ja, jb, a, b, lam):
        """Levenberg-Marquardt step at damping ``lam``, at most e-fold in either coordinate."""
        la, sa, lb, sb = self.prior
        s2, rate_f = self.variance, self.has_rate.to(a.dtype)
        haa, hab, hbb = posterior_hessian((ja ** 2).sum(-1), (ja * jb).sum(-1), (jb ** 2).sum(-1), s2, self.prior,
                                 self.has_rate)
        ga = (ja * resid).sum(-1) / s2 + (a - la) / sa ** 2
        gb = (jb * resid).sum(-1) / s2 + rate_f * (b - lb) / sb ** 2
        daa, dbb = haa * (1 + lam), hbb * (1 + lam)
        det = daa * dbb - hab ** 2
        step_a = -(dbb * ga - hab * gb) / det
        step_b = -(daa * gb - hab * ga) / det * rate_f
        size = torch.maximum(step_a.abs(), step_b.abs()).clamp_min(1.0)
        return step_a / size, step_b / size

    def step_rates(self, b, margin):
        """Solver step counts per (subject, component) (B, K): its own rate times a margin (0 without a rate)."""
        if not self.module.rate_index:
            return None
        return torch.exp(b) * math.exp(margin) * self.has_rate.to(b.dtype)

    def fit(self, batch, a, b, n_iter: int, tol: float) -> tuple:
        """Search one batch (signal, times, observed mask of later visits) from (a, b) (B, K);
        returns (a, b, J_aa, J_ab, J_bb, SSE), each (B, K)."""
        module, two_level = self.module, self.two_level
        sig, tim, msk = batch
        rate_f = self.has_rate.to(a.dtype)
        # The search keeps one discretisation per subject, so that its comparisons of the objective
        # see theta, not the step counts; the final Jacobian gets its own at the mode.
        search_rates = self.step_rates(b, SEARCH_RATE_MARGIN)
        resid, ja, jb = _residuals_and_jacobians(module, sig, tim, msk, a, b, self.step, search_rates,
                                                 coarse=two_level)
        obj = self.objective(resid, a, b)
        lam = torch.full_like(a, 1e-2)
        for _ in range(n_iter):
            step_a, step_b = self.damped_step(resid, ja, jb, a, b, lam)
            a1, b1 = module.clamp_theta(a + step_a, b + step_b)
            if self.broyden:
                resid1 = solve_residuals(module, sig, tim, msk, a1, b1, search_rates, two_level)
                # Correct J along the step so that it maps the step onto the change in residuals.
                da, db = (a1 - a)[..., None], (b1 - b)[..., None]
                miss = resid1 - resid - ja * da - jb * db
                norm2 = (da ** 2 + db ** 2).clamp_min(1e-30)
                ja, jb = ja + miss * da / norm2, jb + miss * db / norm2 * rate_f[:, None]
            else:
                resid1, ja1, jb1 = _residuals_and_jacobians(module, sig, tim, msk, a1, b1, self.step, search_rates,
                                                            coarse=two_level)
            obj1 = self.objective(resid1, a1, b1)
            better = obj1 < obj
            if not self.broyden:
                ja, jb = (torch.where(better[..., None], new, old) for new, old in ((ja1, ja), (jb1, jb)))
            gain = float(torch.where(better, obj - obj1, torch.zeros_like(obj)).max())
            if self.together:
                gain = ddp.reduce_max(gain)
            a, b = torch.where(better, a1, a), torch.where(better, b1, b)
            resid = torch.where(better[..., None], resid1, resid)
            obj = torch.where(better, obj1, obj)
            lam = torch.where(better, lam / 3, lam * 5)
            if gain < tol:  # no subject's log posterior moved by more than tol nats
                break
        if n_iter or two_level:
            a, b, resid, ja, jb = self._at_the_mode(batch, a, b, resid, search_rates, lam)
        return a, b, (ja ** 2).sum(-1), (ja * jb).sum(-1), (jb ** 2).sum(-1), (resid ** 2).sum(-1)

    def idle(self, n_iter: int, tol: float) -> None:
        """A rank without subjects in a batch (``together``): the batch's decisions to stop, taken with the others."""
        for _ in range(n_iter):
            if ddp.reduce_max(0.0) < tol:
                break

    def _at_the_mode(self, batch, a, b, resid, search_rates, lam):
        """The final Jacobian at the mode (rows whose rate outgrew the search's steps re-solved) and,
        two-level, one Gauss-Newton step on the model's own solver's objective."""
        module, two_level = self.module, self.two_level
        sig, tim, msk = batch
        final_rates = self.step_rates(b, 0.0)
        fresh = None
        if final_rates is not None:
            fresh = (final_rates > search_rates).any(dim=1)  # (B,)
            final_rates = torch.maximum(final_rates, search_rates)
        resid, ja, jb = _residuals_and_jacobians(module, sig, tim, msk, a, b, self.step, final_rates,
                                                 base=resid if fresh is not None else None, fresh=fresh,
                                                 coarse=two_level)
        if two_level:  # one solve with the model's own solver, then one Gauss-Newton step on its objective
            fine = solve_residuals(module, sig, tim, msk, a, b, final_rates)
            step_a, step_b = self.damped_step(fine, ja, jb, a, b, torch.zeros_like(lam))
            a, b = module.clamp_theta(a + step_a, b + step_b)
            # Defect correction: the coarse residuals there plus the fine-minus-coarse defect at
            # the search's mode (smooth in theta), instead of the linear model's prediction.
            resid = solve_residuals(module, sig, tim, msk, a, b, final_rates, True) + (fine - resid)
        return a, b, resid, ja, jb


def laplace_fit(module: MixturePDE, data: CohortTensors, noise_sd: float, n_iter: int = 4,
                step: float | None = None, tol: float = 1e-2, batch_size: int | None = None,
                dtype: torch.dtype = torch.float32, hessian_noise_sd: float | str | None = None,
                start: GuideSummary | None = None, broyden: bool = True, two_level: bool = False,
                share: ddp.Share | None = None) -> LaplaceFit:
    """Levenberg-Marquardt mode and Laplace approximation of p(log D, log r | x_i, subtype k).

    The Jacobian is a forward difference at the start and at the end; in between each iteration
    solves only its trial point and updates the Jacobian by Broyden's secant rule.

    Args:
        noise_sd: observation sd sigma of the likelihood (the model's, noise floor included).
        n_iter: LM iterations (each one batched solve per subject and component); stops early
            once no log posterior improves by more than ``tol`` nats.
        step: finite-difference step in log space (default 1e-2 in float32, 1e-4 in float64).
        dtype: precision of the solves.
        hessian_noise_sd: sigma for the final Hessian and evidence (default ``noise_sd``), or
            ``"least_squares"``: the pooled residual sd at the modes (each subject's best
            component), with the model's noise floor; the noise the SVI fit learns also absorbs
            the encoder's amortization error, which the refined modes no longer have.
        start: the guide's summary if already computed (default: run the encoder).
        broyden: update the Jacobian by secants between iterations (one point per iteration);
            False: a forward-difference Jacobian at every trial point (three points, slower, a
            more precise mode for proposals that must be well centred).
        two_level: search (and take the Jacobians) with coarse solves (plain Strang steps of the
            model's ``reaction_step``, a fifth to a third of the cost of its own solver); then
            solve once with the model's solver at the search's mode, move towards the mode of
            that objective by one Gauss-Newton step, and take the residuals there as a coarse
            solve plus the fine-minus-coarse defect at the search's mode. The defect is smooth
            in theta, so the step is small (checked against ``two_level=False`` in the tests).
        share: distributed, ``data`` holds this rank's subjects, at ``share.rows`` of a cohort of
            ``share.n_total``: the batches are one process's (restricted to these subjects), each
            batch's iterations stop when no rank's subject still gains, and the ``"least_squares"``
            noise is pooled over every rank's subjects, so that each subject's fit is the one a
            single process makes.
    Subjects without later visits keep the prior (their evidence is 0).
    """
    guide = start if start is not None else encode_cohort(module, data.to(data.signal.device, torch.float32))
    step = step if step is not None else (1e-2 if dtype == torch.float32 else 1e-4)
    has_rate = module.rate_mask(data.signal.device)
    n, k = guide.d_loc.shape
    if batch_size is None:  # about 4e6 residual values per batch and point
        batch_size = max(1, int(4e6 // (k * data.signal.shape[1] * data.signal.shape[2])))
    problem = _LevenbergMarquardt(module, module.prior_terms(dtype, data.signal.device), has_rate,
                                  float(noise_sd) ** 2, step, broyden, two_level, share is not None)
    a_all = guide.d_loc.to(dtype).clone()
    b_all = torch.where(has_rate, guide.r_loc, torch.zeros_like(guide.r_loc)).to(dtype).clone()
    parts = [tuple(a_all.new_zeros((0, k)) for _ in range(6))]
    for start in range(0, n if share is None else share.n_total, batch_size):
        sl = slice(start, start + batch_size) if share is None else share.within(start, start + batch_size)
        if share is not None and sl.start >= sl.stop:  # none of this batch's subjects here
            problem.idle(n_iter, tol)
            continue
        batch = (data.signal[sl].to(dtype), data.times[sl].to(dtype), data.observed[sl, 1:].to(dtype))
        parts.append(problem.fit(batch, a_all[sl], b_all[sl], n_iter, tol))
    pri = problem.prior
    a, b, jaa, jab, jbb, sse = (torch.cat(p).double() for p in zip(*parts))
    n_obs = data.observed[:, 1:].double().sum(1) * data.signal.shape[-1]
    if hessian_noise_sd == "least_squares":
        h2 = (pooled_residual_variance(sse, n_obs, share) or 0.0) + NOISE_FLOOR ** 2
    else:
        h2 = float(hessian_noise_sd if hessian_noise_sd is not None else noise_sd) ** 2
    cov, log_evidence = laplace_evidence(a, b, jaa, jab, jbb, sse, n_obs, h2, pri, has_rate)
    return LaplaceFit(torch.stack([a, b], -1), cov, log_evidence, sse, n_obs, has_rate,
                      torch.stack([jaa, jab, jbb], -1), variance=h2)
