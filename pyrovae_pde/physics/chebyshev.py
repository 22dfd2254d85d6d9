"""Diffusion propagator exp(-t L) v by a Chebyshev expansion, for domains too large for a dense eigenbasis.

On the spectrum interval [0, b] of L (b: the Gershgorin bound ``Domain.gershgorin_bound``),
x = b (1 + y) / 2 maps to y in [-1, 1] and, with a = t b / 2,

    exp(-t x) = exp(-a) exp(-a y) = sum_k c_k T_k(y),   c_k = (2 - [k = 0]) (-1)^k ive(k, a),

where ive(k, a) = I_k(a) exp(-a) is scipy's scaled modified Bessel function. Truncated at degree m,
the error on the spectrum is at most sum_{k > m} |c_k| (|T_k| <= 1 there), so the error of the
propagated vector in the 2-norm is at most that times ||v||_2. The degree is the smallest m whose
dropped coefficients sum to <= tol / sqrt(n): then every node's error is <= tol * max|v|. For large a
the coefficients fall like exp(-k^2 / 2a), so m grows like sqrt(2 a log(sqrt(n) / tol)).

Only sparse matrix products with ``Domain.scaled_laplacian`` (torch CSR, CPU or CUDA) are used; no
n x n dense matrix is formed. Gradients use exp(-tL) = exp(-tL)^T and d/dt exp(-tL) v = -L exp(-tL) v,
so backward costs one more expansion and keeps no intermediate Chebyshev vectors.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from scipy.special import ive

from .domains import Domain

DEFAULT_EXPM_TOL = 1e-10  # per-node truncation error of one propagator application, relative to max|v|

Diffuse = Callable[[torch.Tensor, int], torch.Tensor]


def chebyshev_coefficients(a: np.ndarray, tol: float) -> np.ndarray:
    """Coefficients (m + 1, M) of exp(-a_j (1 + y)) = sum_k c_kj T_k(y), y in [-1, 1], for a (M,) >= 0.

    One degree m for all columns: the smallest at which every column's dropped |c_k| sum to <= tol.
    """
    a = np.asarray(a, dtype=float).ravel()
    top = float(a.max()) if a.size else 0.0
    # Beyond k ~ 10 sqrt(a) + 40 every ive(k, a) is below exp(-50): the cut-off loses nothing.
    k = np.arange(int(10.0 * math.sqrt(top) + 40.0) + 1)
    coeffs = ive(k[:, None], a[None, :])  # (kmax + 1, M)
    coeffs[1:] *= 2.0
    coeffs[1::2] *= -1.0
    tail = np.cumsum(np.abs(coeffs)[::-1], axis=0)[::-1]  # tail[k] = sum_{j >= k} |c_j|, (kmax + 1, M)
    fine = np.all(tail <= tol, axis=1)  # monotone in k
    degree = int(np.argmax(fine)) - 1 if fine.any() else k.size - 1
    return coeffs[: max(degree, 0) + 1]


def _apply_series(v: torch.Tensor, coeffs: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
    """sum_k coeffs[k] T_k(B) v for v (..., n), coeffs (m + 1, prod(...)), B = ``operator`` (n, n) sparse."""
    n = v.shape[-1]
    # (n, M), a copy (it is overwritten below): the sparse product wants contiguous columns.
    x0 = v.reshape(-1, n).T.clone(memory_format=torch.contiguous_format)
    out = x0 * coeffs[0]
    if coeffs.shape[0] > 1:
        x1 = torch.sparse.mm(operator, x0)
        out.addcmul_(x1, coeffs[1])
        x2 = torch.empty_like(x1)
        for c in coeffs[2:]:
            # T_{k+1} = 2 B T_k - T_{k-1}, into three rotating buffers (fresh ones per term cost
            # page faults that measured ~1.7x the time on the 4 mm MNI grid).
            torch.addmm(x0, operator, x1, beta=-1.0, alpha=2.0, out=x2)
            out.addcmul_(x2, c)
            x0, x1, x2 = x1, x2, x0
    return out.T.reshape(v.shape)


class _Propagate(torch.autograd.Function):
    """y = p(L) v ~ exp(-t L) v with fixed coefficients; gradients of the exact exponential."""

    @staticmethod
    def forward(ctx, v, time, coeffs, operator, bound):
        y = _apply_series(v, coeffs, operator)
        ctx.save_for_backward(time, coeffs, y)
        ctx.operator, ctx.bound = operator, bound
        return y

    @staticmethod
    def backward(ctx, grad):
        time, coeffs, y = ctx.saved_tensors
        grad_v = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_v = _Propagate.apply(grad, time, coeffs, ctx.operator, ctx.bound)
        if ctx.needs_input_grad[1]:
            n = y.shape[-1]
            # L y = (b / 2) (B y + y) with B = 2 L / b - I.
            by = torch.sparse.mm(ctx.operator, y.reshape(-1, n).T.contiguous()).T.reshape(y.shape)
            lap_y = 0.5 * ctx.bound * (by + y)
            grad_t = (-(grad * lap_y).sum(-1, keepdim=True)).sum_to_size(time.shape)
        return grad_v, grad_t, None, None, None


def _degree_groups(a: np.ndarray, ratio: float = 4.0) -> np.ndarray:
    """Group label per column: columns whose a = t b / 2 lie within a factor ``ratio`` of each other
    share a group (their degrees within a factor ~sqrt(ratio)); a <= 1 is one group."""
    return np.floor(np.log(np.maximum(a, 1.0)) / math.log(ratio)).astype(np.int64)


def chebyshev_propagator(domain: Domain, dtype: torch.dtype, device: torch.device | str,
                         tol: float = DEFAULT_EXPM_TOL) -> Callable[[torch.Tensor, torch.Tensor], Diffuse]:
    """A factory of diffusion steps: ``prepare(diffusivity (R, K), dt (R, 1, 1))`` returns
    ``diffuse(state (rows, K, n), rows) -> exp(-D dt L) state`` for the leading ``rows`` runs.

    The coefficients of all R x K runs are computed once per call of ``prepare``; per-node error
    <= ``tol`` * max|state| per application. Runs are grouped by D dt (within a factor 4) and each
    group gets the degree its largest D dt needs: in a batch drawn from a wide prior (a sleep phase,
    a grid search), a few runs with large D dt would otherwise set the degree of all of them.
    """
    bound = domain.gershgorin_bound()
    operator = domain.scaled_laplacian(dtype, device)
    n = domain.n_nodes

    def prepare(diffusivity: torch.Tensor, dt: torch.Tensor) -> Diffuse:
        time = diffusivity[..., None] * dt  # (R, K, 1), D * dt
        if bound <= 0.0:  # no edges: L = 0
            return lambda state, rows: state
        k = diffusivity.shape[1]
        a = (time.detach() * (0.5 * bound)).reshape(-1).cpu().double().numpy()  # (R K,)
        labels = _degree_groups(a)
        groups = []  # (columns (M_g,) ascending, as numpy and as a tensor; coefficients (m_g + 1, M_g))
        for label in np.unique(labels):
            columns = np.flatnonzero(labels == label)
            coeffs = torch.as_tensor(chebyshev_coefficients(a[columns], tol / math.sqrt(n)), dtype=dtype,
                                     device=device)
            groups.append((columns, torch.as_tensor(columns, device=time.device), coeffs))
        if len(groups) == 1:
            coeffs = groups[0][2]
            return lambda state, rows: _Propagate.apply(state, time[:rows], coeffs[:, : rows * k], operator, bound)
        flat_time = time.reshape(-1, 1)  # (R K, 1)

        def diffuse(state: torch.Tensor, rows: int) -> torch.Tensor:
            flat = state.reshape(rows * k, n)
            parts, order = [], []
            for columns, on_device, coeffs in groups:
                # the group's columns among the leading runs (on the host: no device sync per step)
                used = int(np.searchsorted(columns, rows * k))
                if used:
                    cols = on_device[:used]
                    parts.append(_Propagate.apply(flat[cols], flat_time[cols], coeffs[:, :used], operator, bound))
                    order.append(cols)
            out = torch.cat(parts)[torch.argsort(torch.cat(order))]
            return out.reshape(state.shape)

        return diffuse

    return prepare
