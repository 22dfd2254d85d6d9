"""Spatial domains of the reaction-diffusion PDE.

Both kinds of domain reduce to one symmetric positive semi-definite Laplacian ``L`` over the
*active* nodes (cells inside the brain mask, or graph regions), so the solvers only ever see
``Domain``: a node count, a way to gather/scatter fields, and ``L``.

    du/dt = -D * (L u) + r * f(u)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import DomainError

SPECTRAL_RANGE_DENSE = 3000  # nodes up to which spectral_range uses dense eigenvalues


@dataclass(eq=False)
class Domain:
    """A domain with ``n_nodes`` active nodes and Laplacian ``laplacian`` (scipy CSR, n x n).

    ``spatial_shape`` is the shape of a full field: the grid shape for grids, ``(n_nodes,)``
    for graphs. ``active_index`` (n_nodes,) holds the flat indices of active nodes in that shape.
    """

    laplacian: sp.csr_matrix
    spatial_shape: tuple[int, ...]
    active_index: np.ndarray
    kind: str
    spacing: tuple[float, ...] = ()  # grid spacing per axis (mm); empty for graphs
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_nodes(self) -> int:
        return int(self.active_index.size)

    @property
    def ndim(self) -> int:
        return len(self.spatial_shape)

    def gather(self, field_: torch.Tensor) -> torch.Tensor:
        """Full fields ``(..., *spatial_shape)`` -> active values ``(..., n_nodes)``."""
        flat = field_.reshape(*field_.shape[: field_.dim() - self.ndim], -1)
        index = torch.as_tensor(self.active_index, device=field_.device)
        return flat.index_select(-1, index)

    def scatter(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Active values ``(..., n_nodes)`` -> full fields ``(..., *spatial_shape)``; ``fill`` outside."""
        size = int(np.prod(self.spatial_shape))
        out = values.new_full((*values.shape[:-1], size), fill)
        index = torch.as_tensor(self.active_index, device=values.device)
        out[..., index] = values
        return out.reshape(*values.shape[:-1], *self.spatial_shape)

    def fingerprint(self) -> str:
        """A short hash identifying the domain (shape, active nodes and Laplacian)."""
        import hashlib

        if "fingerprint" not in self._cache:
            h = hashlib.sha256()
            h.update(repr((self.kind, self.spatial_shape)).encode())
            h.update(np.ascontiguousarray(self.active_index, dtype=np.int64).tobytes())
            lap = self.laplacian.tocsr()
            lap.sort_indices()
            h.update(np.round(lap.data, 10).tobytes())
            h.update(lap.indices.astype(np.int64).tobytes())
            h.update(lap.indptr.astype(np.int64).tobytes())
            self._cache["fingerprint"] = h.hexdigest()[:16]
        return self._cache["fingerprint"]

    def eigh(self, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenpairs of ``L``: eigenvalues (n,) >= 0 and orthonormal eigenvectors (n, n), cached."""
        key = ("eigh", dtype, str(device))
        if key not in self._cache:
            base_key = ("eigh_np",)
            if base_key not in self._cache:
                evals, evecs = np.linalg.eigh(self.laplacian.toarray())
                self._cache[base_key] = (np.clip(evals, 0.0, None), evecs)
            evals, evecs = self._cache[base_key]
            self._cache[key] = (
                torch.as_tensor(evals, dtype=dtype, device=device),
                torch.as_tensor(evecs, dtype=dtype, device=device),
            )
        return self._cache[key]

    def spectral_range(self) -> tuple[float, float]:
        """(slowest, fastest) nonzero diffusion rates of ``L``: its smallest positive eigenvalue
        (the slowest mode that diffusion equilibrates; 1/length^2) and its largest one, cached.
        Dense eigenvalues up to ``SPECTRAL_RANGE_DENSE`` nodes, sparse Lanczos above."""
        if "spectral_range" not in self._cache:
            n = self.n_nodes
            if ("eigh_np",) in self._cache or n <= SPECTRAL_RANGE_DENSE:
                evals = (self._cache[("eigh_np",)][0] if ("eigh_np",) in self._cache
                         else np.linalg.eigvalsh(self.laplacian.toarray()))
            else:
                from scipy.sparse.linalg import eigsh

                top = eigsh(self.laplacian, k=1, which="LA", return_eigenvectors=False)
                # shift-invert near 0 finds the smallest eigenvalues (zero per connected part, then lambda_2)
                low = eigsh(self.laplacian + 1e-8 * sp.identity(n), k=min(n - 1, 8), sigma=0.0, which="LM",
                            return_eigenvectors=False)
                evals = np.concatenate([np.asarray(low) - 1e-8, top])
            evals = np.sort(np.asarray(evals, dtype=float))
            largest = float(evals[-1]) if evals.size else 0.0
            positive = evals[evals > 1e-9 * max(largest, 1e-300)]
            self._cache["spectral_range"] = (float(positive[0]) if positive.size else 0.0, largest)
        return self._cache["spectral_range"]

    def sparse_laplacian(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """``L`` as a torch sparse CSR tensor, cached per dtype/device."""
        key = ("sparse", dtype, str(device))
        if key not in self._cache:
            coo = self.laplacian.tocoo()
            index = torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long)
            values = torch.as_tensor(coo.data, dtype=dtype)
            tensor = torch.sparse_coo_tensor(index, values, coo.shape, check_invariants=True).coalesce()
            self._cache[key] = tensor.to(device)
        return self._cache[key]

    def gershgorin_bound(self) -> float:
        """An upper bound on the eigenvalues of ``L`` (1/length^2): max_i sum_j |L_ij|, from the sparse
        matrix (no eigen-decomposition), cached."""
        if "gershgorin" not in self._cache:
            row_sums = abs(self.laplacian).sum(axis=1)
            self._cache["gershgorin"] = float(np.max(row_sums)) if self.n_nodes else 0.0
        return self._cache["gershgorin"]

    def scaled_laplacian(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """B = 2 L / b - I (b = ``gershgorin_bound``; spectrum in [-1, 1]) as torch sparse CSR, cached."""
        key = ("scaled", dtype, str(device))
        if key not in self._cache:
            bound = self.gershgorin_bound()
            scaled = (2.0 / bound) * self.laplacian if bound > 0 else self.laplacian
            scaled = sp.csr_matrix(scaled - sp.identity(self.n_nodes, format="csr"))
            scaled.sort_indices()
            with warnings.catch_warnings():  # torch flags sparse CSR as "beta"; its CPU/CUDA matmul is what we use
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                self._cache[key] = torch.sparse_csr_tensor(
                    torch.as_tensor(scaled.indptr, dtype=torch.long), torch.as_tensor(scaled.indices, dtype=torch.long),
                    torch.as_tensor(scaled.data, dtype=dtype), scaled.shape, check_invariants=True).to(device)
        return self._cache[key]


def GridDomain(mask: np.ndarray, spacing: float | Sequence[float] = 1.0) -> Domain:
    """A 2-D or 3-D grid restricted to ``mask`` (nonzero = inside the brain).

    Uses the 4/6-neighbour stencil over cells inside the mask with no-flux at the mask edge:
    only neighbours inside the mask count. ``spacing`` in mm (one value or one per axis);
    the Laplacian is in 1/mm^2.
    """
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise DomainError(f"mask must be 2-D or 3-D, got {mask.ndim}-D with shape {mask.shape}")
    inside = mask != 0
    if not inside.any():
        raise DomainError("mask has no cell inside the brain (all zeros); a domain needs at least one cell")
    spacings = np.broadcast_to(np.asarray(spacing, dtype=float), (mask.ndim,))
    if not np.all(np.isfinite(spacings)) or np.any(spacings <= 0):
        raise DomainError(f"grid spacing must be positive and finite, got {tuple(spacings)}")

    index_of = -np.ones(mask.shape, dtype=np.int64)
    active_index = np.flatnonzero(inside)
    index_of.flat[active_index] = np.arange(active_index.size)
    rows, cols, vals = [], [], []
    for axis in range(mask.ndim):
        weight = 1.0 / spacings[axis] ** 2
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        both = inside[tuple(lo)] & inside[tuple(hi)]
        a = index_of[tuple(lo)][both]
        b = index_of[tuple(hi)][both]
        rows += [a, b]
        cols += [b, a]
        vals += [np.full(a.size, weight), np.full(b.size, weight)]
    n = active_index.size
    adjacency = sp.csr_matrix(
        (np.concatenate(vals) if vals else [], (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    laplacian = sp.diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency
    return Domain(sp.csr_matrix(laplacian), tuple(mask.shape), active_index, "grid",
                  tuple(float(h) for h in spacings))


def adjacency_problem(matrix: np.ndarray) -> tuple[str, tuple[int, ...]] | None:
    """The first problem of a square weight matrix as a graph's adjacency, or None.

    Checked in this order: ``("nonfinite", (i, j))``, ``("negative", (i, j))``,
    ``("asymmetric", (i, j))`` (the largest |A - A^T| entry, beyond rtol 1e-6 / atol 1e-10),
    ``("diagonal", (i,))`` (a self-loop). Callers word the message in their own terms (entries,
    atlas labels) and the fix.
    """
    bad = ~np.isfinite(matrix)
    if bad.any():
        return "nonfinite", tuple(int(v) for v in np.argwhere(bad)[0])
    if (matrix < 0).any():
        return "negative", tuple(int(v) for v in np.argwhere(matrix < 0)[0])
    if not np.allclose(matrix, matrix.T, rtol=1e-6, atol=1e-10):
        return "asymmetric", tuple(int(v) for v in np.unravel_index(np.argmax(np.abs(matrix - matrix.T)),
                                                                      matrix.shape))
    diagonal = np.flatnonzero(np.diag(matrix) != 0)
    if diagonal.size:
        return "diagonal", (int(diagonal[0]),)
    return None


_DOMAIN_ADJACENCY_MESSAGES = {
    "nonfinite": "adjacency has NaN or inf entries; replace them with 0 (no connection)",
    "negative": "adjacency has negative weights; connection strengths must be >= 0",
    "asymmetric": "adjacency is not symmetric; symmetrise it, e.g. (A + A.T) / 2",
    "diagonal": "adjacency has nonzero diagonal entries (self-loops); set the diagonal to 0",
}


def GraphDomain(adjacency: np.ndarray) -> Domain:
    """A graph with symmetric, nonnegative ``adjacency`` (n, n) and zero diagonal; L = diag(A 1) - A."""
    adjacency = np.asarray(adjacency, dtype=float)
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise DomainError(f"adjacency must be a square (node, neighbor) matrix, got shape {adjacency.shape}")
    problem = adjacency_problem(adjacency)
    if problem is not None:
        raise DomainError(_DOMAIN_ADJACENCY_MESSAGES[problem[0]])
    sym = 0.5 * (adjacency + adjacency.T)
    laplacian = np.diag(sym.sum(axis=1)) - sym
    n = sym.shape[0]
    return Domain(sp.csr_matrix(laplacian), (n,), np.arange(n), "graph")
