"""Connectomes as graph domains: the shipped human connectome (``"hcp83"``) and user CSV matrices.

From matrix to graph (the same for a shipped name and a user CSV)::

    W         the matrix as read: symmetric, >= 0 (e.g. mean streamline counts); diagonal set to 0
    A         = W / max(W), entries below ``threshold`` (default 1e-2) set to 0
    adjacency = A * n / sum(A)          (mean weighted degree 1; Laplacian L = diag(adjacency 1) - adjacency)

Why: streamline counts span five orders of magnitude (34 to 4e6 on hcp83) and every pair of regions
gets some probabilistic streamlines, most of them tracking noise; dropping those under 1% of the
strongest connection is the convention of the source package (Connectomes.jl) and leaves the
strong, reproducible tracts (937 of 3403 edges on hcp83, still one connected graph). The
normalisation to mean weighted degree 1 is the one of the synthetic ``modular_connectome``, so the
Laplacian's spectrum (hcp83: lambda_2 = 0.11, lambda_max = 3.2; modular: 0.19, 2.1), the
simulators' ranges of D (per year) and the cohort-derived default priors (``cohort_priors``) carry
over unchanged. Give ``threshold=0`` to keep every positive weight.

``"hcp83"``: Lausanne-2018 scale-1 parcellation (Desikan-Killiany cortex, 7 subcortical regions
per hemisphere, brainstem), group-average HCP probabilistic tractography, from Connectomes.jl
(MIT licence); the files, their provenance and the HCP acknowledgement are in
``pyrovae_pde/connectomes/hcp83/`` (``SOURCE.md``, ``LICENSE-Connectomes.jl.txt``).
"""
from __future__ import annotations

import csv
import difflib
import io
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.sparse.csgraph import connected_components

from ..errors import DomainError, MissingFileError, UnknownNameError
from ..physics import Domain, GraphDomain
from ..physics.domains import adjacency_problem

__all__ = ["Connectome", "DEFAULT_THRESHOLD", "available_connectomes", "connectome_graph", "load_connectome",
           "read_matrix_csv"]

DEFAULT_THRESHOLD = 1e-2
_SHIPPED = {"hcp83": "Lausanne-2018 scale 1, HCP group-average probabilistic streamline counts (Connectomes.jl)"}


@dataclass(eq=False)
class Connectome:
    """A connectome ready to carry the PDE.

    ``adjacency`` (n, n) float64: the graph (module docstring), symmetric, zero diagonal, connected;
    ``weights`` (n, n): the matrix as read (diagonal 0); ``regions`` (n,) names in matrix order.
    Shipped connectomes also give ``centroids`` (n, 3) region centres in mm (MNI-like space),
    ``lobes`` and ``hemispheres`` (n,) and ``lengths`` (n, n) mean streamline lengths in mm.
    """

    name: str
    regions: list[str]
    adjacency: np.ndarray
    weights: np.ndarray
    threshold: float
    source: str
    centroids: np.ndarray | None = None
    lobes: list[str] | None = None
    hemispheres: list[str] | None = None
    lengths: np.ndarray | None = None

    @property
    def n_regions(self) -> int:
        return len(self.regions)

    @property
    def n_edges(self) -> int:
        """Undirected edges of ``adjacency`` (pairs with a positive weight)."""
        return int(np.count_nonzero(np.triu(self.adjacency, 1)))

    def domain(self) -> Domain:
        """The ``GraphDomain`` of ``adjacency``."""
        return GraphDomain(self.adjacency)


def available_connectomes() -> dict[str, str]:
    """Names of the shipped connectomes and a one-line description of each."""
    return dict(_SHIPPED)


def load_connectome(source: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD) -> Connectome:
    """A shipped connectome by name (``available_connectomes()``) or a CSV matrix by path.

    The CSV has a header row of region names (its first cell is ignored, e.g. ``region``) and one
    row per region, first cell the region's name, in the header's order, then its weights. It must
    be square, numeric, finite, nonnegative and symmetric (to rtol 1e-6); the diagonal is ignored.
    It becomes the graph of the module docstring, which must be connected. Raises one
    :class:`DomainError` naming the file and the problem (row and column of a bad cell).
    """
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise DomainError(f"connectome threshold must be in [0, 1) (a fraction of the largest weight), got {threshold}")
    text = os.fspath(source)
    if text in _SHIPPED:
        return _load_shipped(text, threshold)
    path = Path(text)
    if not path.is_file():
        if path.suffix or os.sep in text:
            raise MissingFileError(f"connectome {path}: file not found")
        close = difflib.get_close_matches(text, list(_SHIPPED), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"unknown connectome {text!r}: neither a shipped name ({', '.join(_SHIPPED)}) "
                               f"nor a CSV file{hint}")
    where = f"connectome {path}"
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DomainError(f"{where}: not a text CSV file ({exc})") from None
    weights, regions = read_matrix_csv(content, where)
    return Connectome(path.stem, regions, connectome_graph(weights, regions, threshold, where), weights,
                      float(threshold), str(path))


def _load_shipped(name: str, threshold: float) -> Connectome:
    import pandas as pd

    folder = resources.files("pyrovae_pde").joinpath("connectomes", name)
    where = f"connectome {name!r}"
    weights, regions = read_matrix_csv(folder.joinpath("connectome.csv").read_text(encoding="utf-8"), where)
    lengths, _ = read_matrix_csv(folder.joinpath("connectome_lengths.csv").read_text(encoding="utf-8"), where)
    table = pd.read_csv(io.StringIO(folder.joinpath("regions.csv").read_text(encoding="utf-8")),
                        keep_default_na=False)
    return Connectome(name, regions, connectome_graph(weights, regions, threshold, where), weights, float(threshold),
                      f"pyrovae_pde/connectomes/{name}", centroids=table[["x", "y", "z"]].to_numpy(float),
                      lobes=table["lobe"].astype(str).tolist(), hemispheres=table["hemisphere"].astype(str).tolist(),
                      lengths=lengths)


def read_matrix_csv(text: str, where: str) -> tuple[np.ndarray, list[str]]:
    """(weights (n, n) float64 with zero diagonal, region names (n,)) from a labelled square CSV matrix.

    Checks shape, names, numbers, finiteness, sign and symmetry; ``where`` prefixes each message.
    """
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not rows:
        raise DomainError(f"{where}: empty file; expected a header row of region names and one row per region")
    names = [cell.strip() for cell in rows[0][1:]]
    body = rows[1:]
    _check_names(where, names, body)
    matrix = np.empty((len(names), len(names)))
    for i, row in enumerate(body):
        for j, cell in enumerate(row[1:]):
            try:
                matrix[i, j] = float(cell)
            except ValueError:
                raise DomainError(f"{where}: row {names[i]!r}, column {names[j]!r}: {cell.strip()!r} is not a "
                                  "number; every cell must be a weight (0 for no connection)") from None
    np.fill_diagonal(matrix, 0.0)
    problem = adjacency_problem(matrix)
    if problem is not None:
        kind, (i, j) = problem
        pair = f"row {names[i]!r}, column {names[j]!r}"
        raise DomainError(f"{where}: " + {
            "nonfinite": f"{pair}: {matrix[i, j]} is not a finite weight; use 0 for no connection",
            "negative": f"{pair}: negative weight {matrix[i, j]:g}; weights must be >= 0",
            "asymmetric": f"not symmetric: {pair} is {matrix[i, j]:g} but the reverse is {matrix[j, i]:g}; "
                          "symmetrise it, e.g. (W + W.T) / 2",
        }[kind])
    return matrix, names


def _check_names(where: str, names: list[str], body: list[list[str]]) -> None:
    """The header names each region once, and the rows list the same regions in the same order."""
    if not names:
        raise DomainError(f"{where}: the header row names no regions; expected 'region,<name 1>,<name 2>,...'")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or "" in names:
        raise DomainError(f"{where}: the header's region names must be unique and non-empty; "
                          f"{'repeated: ' + ', '.join(map(repr, dupes[:5])) if dupes else 'one is empty'}")
    if len(body) != len(names):
        raise DomainError(f"{where}: not square: the header names {len(names)} regions but there are {len(body)} "
                          "rows; give one row per region")
    for i, row in enumerate(body):
        if len(row) != len(names) + 1:
            raise DomainError(f"{where}: not square: row {i + 1} ({row[0].strip()!r}) has {len(row) - 1} weights, "
                              f"the header names {len(names)} regions")
        if row[0].strip() != names[i]:
            raise DomainError(f"{where}: row {i + 1} is named {row[0].strip()!r} but column {i + 1} of the header "
                              f"is {names[i]!r}; the first column must list the header's regions in the same order")


def connectome_graph(weights: np.ndarray, regions: list[str], threshold: float = DEFAULT_THRESHOLD,
                     where: str = "connectome") -> np.ndarray:
    """The graph adjacency (n, n) of checked ``weights`` (n, n): max-normalised, entries below
    ``threshold`` dropped, scaled to mean weighted degree 1 (module docstring); it must be connected."""
    largest = float(weights.max()) if weights.size else 0.0
    if not largest > 0:
        raise DomainError(f"{where}: every weight is 0; a connectome needs connections between regions")
    adjacency = weights / largest
    adjacency[adjacency < threshold] = 0.0
    adjacency *= len(regions) / adjacency.sum()
    for graph, cut in ((weights, ""), (adjacency, f" after dropping weights below {threshold:g} of the largest")):
        n_parts, part = connected_components(graph > 0, directed=False)
        if n_parts > 1:
            small = np.flatnonzero(part == int(np.argmin(np.bincount(part))))
            listed = ", ".join(repr(regions[k]) for k in small[:5]) + (", ..." if small.size > 5 else "")
            raise DomainError(f"{where}: the graph{cut} is not connected ({n_parts} parts; {listed} "
                              f"{'is' if small.size == 1 else 'are'} cut off from the rest), so pathology could not "
                              "spread between the parts; " + ("lower the threshold" if cut else "connect them"))
    return adjacency

