"""Simulated cohorts with ground truth, written in the data contract.

Benchmarks:

* ``paper-grid``: the paper's synthetic benchmark (32x32 grid, 1 mm, disc mask, visits 0, 6, 24).
* ``graph``: a modular synthetic connectome of 68 regions, 2-5 irregular visits per subject.
* ``hcp83``: the same visits on the shipped 83-region human connectome (``connectomes.load_connectome``),
  seeded in the entorhinal cortex and hippocampus (Braak I-II).
* ``mni-grid``: the MNI152 grey-matter mask shipped in nilearn's package data (no download),
  resampled to ``resolution`` mm (3-D) or one axial slice (2-D).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import xarray as xr

from ..errors import SimulationError
from ..physics import Domain, GraphDomain, GridDomain, get_reaction, solve_active
from .connectomes import load_connectome
from .contract import SCHEMA_VERSION

PAPER_COMPONENTS = ("fisher_kpp", "saturating", "zeldovich")
GRAPH_COMPONENTS = ("diffusion", "fisher_kpp")


@dataclass(frozen=True)
class Benchmark:
    name: str
    components: tuple[str, ...]
    diffusivity_range: tuple[float, float]
    reaction_range: tuple[float, float]
    build: Callable[..., xr.Dataset]


def _draw_truth(rng: np.random.Generator, n: int, components: Sequence[str], weights: Sequence[float] | None,
                diffusivity_range: tuple[float, float], reaction_range: tuple[float, float]):
    components = tuple(components)
    for name in components:
        get_reaction(name)  # unknown names fail here with the registered list
    if weights is None:
        weights = np.full(len(components), 1.0 / len(components))
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (len(components),) or (weights < 0).any() or weights.sum() <= 0:
        raise SimulationError(f"weights must be {len(components)} nonnegative numbers (one per component), "
                              f"got {list(weights)}")
    weights = weights / weights.sum()
    subtype = rng.choice(len(components), size=n, p=weights)
    diffusivity = rng.uniform(*diffusivity_range, size=n)
    reaction = rng.uniform(*reaction_range, size=n)
    has_rate = np.array([get_reaction(components[k]).has_rate for k in subtype])
    reaction = np.where(has_rate, reaction, 0.0)
    return subtype, diffusivity, reaction


def _simulate_fields(domain: Domain, u0: np.ndarray, times: np.ndarray, subtype: np.ndarray,
                     diffusivity: np.ndarray, reaction: np.ndarray, components: Sequence[str],
                     device: str = "cpu") -> np.ndarray:
    """Noise-free fields (N, T, n_nodes) on active nodes, one accurate solve per subtype group (float64,
    on ``device``)."""
    out = np.zeros((u0.shape[0], times.shape[1], domain.n_nodes))
    for k, name in enumerate(components):
        idx = np.flatnonzero(subtype == k)
        if idx.size == 0:
            continue
        sol = solve_active(
            domain, *(torch.as_tensor(a, dtype=torch.float64, device=device)
                      for a in (u0[idx], times[idx], diffusivity[idx, None], reaction[idx, None])),
            reactions=(name,), method="auto",  # spectral up to 6,000 nodes, chebyshev above (both float64)
            reaction_step=0.05, initial_reaction_step=0.01)
        out[idx] = sol[:, 0].cpu().numpy()
    return out


def _add_noise(rng: np.random.Generator, fields: np.ndarray, noise_sd: float) -> np.ndarray:
    if noise_sd < 0:
        raise SimulationError(f"noise sd must be >= 0, got {noise_sd}")
    noisy = fields.copy()
    noisy[:, 1:] += rng.normal(0.0, noise_sd, size=noisy[:, 1:].shape) if noise_sd > 0 else 0.0
    return noisy


def _truth_vars(components, subtype, diffusivity, reaction):
    return {
        "true_subtype": ("subject", np.array([components[k] for k in subtype], dtype=object)),
        "true_diffusivity": ("subject", diffusivity),
        "true_reaction": ("subject", reaction),
    }


def _grid_dataset(mask: np.ndarray, spacing: float, fields_active: np.ndarray, times: np.ndarray,
                  domain: Domain, subjects: list[str], truth: dict, attrs: dict,
                  origin: Sequence[float] | None = None) -> xr.Dataset:
    n, t = times.shape
    full = np.full((n, t, mask.size), 0.0)
    full[:, :, domain.active_index] = fields_active
    full = full.reshape(n, t, *mask.shape)
    full[np.isnan(times)] = np.nan
    dims = ("z", "y", "x")[-mask.ndim:]
    origin = origin if origin is not None else [0.0] * mask.ndim
    coords = {d: origin[a] + spacing * np.arange(mask.shape[a]) for a, d in enumerate(dims)}
    coords["subject"] = np.array(subjects, dtype=object)
    return xr.Dataset(
        {"signal": (("subject", "visit", *dims), full), "time": (("subject", "visit"), times),
         "mask": (dims, mask.astype(np.int8)), **truth},
        coords=coords, attrs={"schema_version": SCHEMA_VERSION, "domain": "grid", **attrs})


def paper_grid_mask() -> tuple[np.ndarray, np.ndarray]:
    """The paper's 32x32 disc mask (distance < 15 from (16, 16)) and initial field exp(-d^2/2R^2), d < R."""
    yy, xx = np.mgrid[0:32, 0:32]
    dist = np.hypot(yy - 16.0, xx - 16.0)
    mask = (dist < 15).astype(np.int8)
    radius = 31.0 / 4.0
    u0 = np.where(dist < radius, np.exp(-dist ** 2 / (2 * radius ** 2)), 0.0) * mask
    return mask, u0


def simulate_paper_grid(n_subjects: int, seed: int = 0, components: Sequence[str] = PAPER_COMPONENTS,
                        weights: Sequence[float] | None = None, noise_sd: float = 0.0,
                        diffusivity_range=(0.01, 1.0), reaction_range=(0.01, 0.1),
                        times: Sequence[float] = (0.0, 6.0, 24.0)) -> xr.Dataset:
    """The paper's synthetic cohort: every subject starts from the same bump; subtype-specific PDE."""
    rng = np.random.default_rng(seed)
    mask, u0_full = paper_grid_mask()
    domain = GridDomain(mask, 1.0)
    subtype, diffusivity, reaction = _draw_truth(rng, n_subjects, components, weights,
                                                 diffusivity_range, reaction_range)
    visit_times = np.tile(np.asarray(times, dtype=float), (n_subjects, 1))
    u0 = np.tile(u0_full.reshape(-1)[domain.active_index], (n_subjects, 1))
    fields = _add_noise(rng, _simulate_fields(domain, u0, visit_times, subtype, diffusivity, reaction,
                                              components), noise_sd)
    subjects = [f"sub-{i:04d}" for i in range(n_subjects)]
    return _grid_dataset(mask, 1.0, fields, visit_times, domain, subjects,
                         _truth_vars(components, subtype, diffusivity, reaction),
                         {"benchmark": "paper-grid", "seed": seed, "noise_sd": noise_sd, "time_unit": "year"})


def modular_connectome(n_nodes: int = 68, n_modules: int = 4, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """A symmetric modular connectome (n, n) with mean weighted degree 1, and region names."""
    rng = np.random.default_rng(seed)
    module = np.arange(n_nodes) * n_modules // n_nodes
    same = module[:, None] == module[None, :]
    prob = np.where(same, 0.4, 0.03)
    upper = np.triu(rng.random((n_nodes, n_nodes)) < prob, 1)
    weights = np.triu(rng.uniform(0.2, 1.0, (n_nodes, n_nodes)), 1) * upper
    adjacency = weights + weights.T
    # Keep the graph connected: a ring through all nodes with weak links.
    ring = np.roll(np.eye(n_nodes), 1, axis=1) * 0.1
    adjacency = np.maximum(adjacency, ring + ring.T)
    adjacency *= n_nodes / adjacency.sum()
    names = [f"M{m}_R{i:02d}" for i, m in enumerate(module)]
    return adjacency, names


def simulate_graph(n_subjects: int, seed: int = 0, components: Sequence[str] = GRAPH_COMPONENTS,
                   weights: Sequence[float] | None = None, noise_sd: float = 0.0,
                   diffusivity_range=(0.05, 1.0), reaction_range=(0.1, 1.0),
                   min_visits: int = 2, max_visits: int = 5) -> xr.Dataset:
    """Graph cohort on a 68-region modular connectome; seeded at 3 regions; irregular visits (years)."""
    adjacency, names = modular_connectome()
    n = adjacency.shape[0]

    def initial(rng: np.random.Generator, u0: np.ndarray) -> None:
        seeds = rng.choice(n, size=3, replace=False)
        u0[seeds] = rng.uniform(0.3, 0.8, size=3)

    return graph_cohort(adjacency, names, initial, n_subjects, seed=seed, components=components, weights=weights,
                        noise_sd=noise_sd, diffusivity_range=diffusivity_range, reaction_range=reaction_range,
                        min_visits=min_visits, max_visits=max_visits, attrs={"benchmark": "graph"})


def graph_cohort(adjacency: np.ndarray, names: Sequence[str],
                 initial: Callable[[np.random.Generator, np.ndarray], None], n_subjects: int, seed: int = 0,
                 components: Sequence[str] = GRAPH_COMPONENTS,
                 weights: Sequence[float] | None = None, noise_sd: float = 0.0,
                 diffusivity_range=(0.05, 1.0), reaction_range=(0.1, 1.0),
                 min_visits: int = 2, max_visits: int = 5, attrs: dict | None = None) -> xr.Dataset:
    """A simulated cohort on the graph ``adjacency`` (n, n) with region ``names`` (n,).

    Each subject gets ``min_visits``..``max_visits`` visits 0.5-2 years apart (times in years) and
    an initial state set in place by ``initial(rng, u0)`` on a zero (n,) array; ``attrs`` are added
    to the dataset's attributes (e.g. ``benchmark``).
    """
    rng = np.random.default_rng(seed)
    domain = GraphDomain(adjacency)
    n = adjacency.shape[0]
    subtype, diffusivity, reaction = _draw_truth(rng, n_subjects, components, weights,
                                                 diffusivity_range, reaction_range)
    n_visits = rng.integers(min_visits, max_visits + 1, size=n_subjects)
    times = np.full((n_subjects, max_visits), np.nan)
    u0 = np.zeros((n_subjects, n))
    for i in range(n_subjects):
        gaps = rng.uniform(0.5, 2.0, size=n_visits[i] - 1)
        times[i, : n_visits[i]] = np.concatenate([[0.0], np.cumsum(gaps)])
        initial(rng, u0[i])
    fields = _simulate_fields(domain, u0, times, subtype, diffusivity, reaction, components)
    fields = _add_noise(rng, fields, noise_sd)
    fields[np.isnan(times)] = np.nan
    return xr.Dataset(
        {"signal": (("subject", "visit", "node"), fields), "time": (("subject", "visit"), times),
         "adjacency": (("node", "neighbor"), adjacency),
         **_truth_vars(components, subtype, diffusivity, reaction)},
        coords={"subject": np.array([f"sub-{i:04d}" for i in range(n_subjects)], dtype=object),
                "node": np.array(names, dtype=object), "neighbor": np.array(names, dtype=object)},
        attrs={"schema_version": SCHEMA_VERSION, "domain": "graph", **(attrs or {}), "seed": seed,
               "noise_sd": noise_sd, "time_unit": "year"})


# Braak I-II (transentorhinal/entorhinal, then hippocampus; Braak & Braak 1991, as staged on tau PET by
# Schoell et al. 2016, who put the parahippocampal gyrus in stage III): seed region -> relative level.
BRAAK_SEEDS = {"ctx-lh-entorhinal": 1.0, "ctx-rh-entorhinal": 1.0, "Left-Hippocampus": 0.5, "Right-Hippocampus": 0.5}


def simulate_hcp83(n_subjects: int, seed: int = 0, components: Sequence[str] = GRAPH_COMPONENTS,
                   weights: Sequence[float] | None = None, noise_sd: float = 0.0,
                   diffusivity_range=(0.05, 1.0), reaction_range=(0.1, 1.0),
                   min_visits: int = 2, max_visits: int = 5) -> xr.Dataset:
    """Cohort on the shipped 83-region human connectome (``load_connectome("hcp83")``), seeded in Braak I-II.

    As ``simulate_graph`` (same arguments, visits and truth) but on the real connectome, whose
    Laplacian is scaled like the synthetic one (mean weighted degree 1), so D (1/yr) and r (1/yr)
    have the same ranges. Each subject starts with ``level * U(0.3, 0.8)`` in each seed region of
    ``BRAAK_SEEDS`` (entorhinal cortex 1, hippocampus 0.5, drawn per region) and 0 elsewhere.
    """
    connectome = load_connectome("hcp83")
    index = np.array([connectome.regions.index(name) for name in BRAAK_SEEDS])
    level = np.array(list(BRAAK_SEEDS.values()))

    def initial(rng: np.random.Generator, u0: np.ndarray) -> None:
        u0[index] = level * rng.uniform(0.3, 0.8, size=index.size)

    return graph_cohort(connectome.adjacency, connectome.regions, initial, n_subjects, seed=seed,
                        components=components, weights=weights, noise_sd=noise_sd,
                        diffusivity_range=diffusivity_range, reaction_range=reaction_range,
                        min_visits=min_visits, max_visits=max_visits,
                        attrs={"benchmark": "hcp83", "connectome": "hcp83",
                               "connectome_threshold": connectome.threshold})


def mni_gm_mask(resolution: float = 6.0, slice_axial: int | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """MNI152 grey-matter mask from nilearn's package data at ``resolution`` mm.

    Returns (mask (z, y, x) or (y, x) int8, spacing mm, origin mm per axis). Needs the ``mni``
    extra (nilearn); nothing is downloaded.
    """
    try:
        from nilearn.datasets import load_mni152_gm_mask
        from nilearn.image import resample_img
    except ImportError:
        raise SimulationError("the mni-grid benchmark needs nilearn: pip install 'pyrovae_pde[mni]'") from None
    if resolution <= 0:
        raise SimulationError(f"resolution must be positive (mm), got {resolution}")
    img = load_mni152_gm_mask()
    target = np.diag([resolution] * 3)
    img = resample_img(img, target_affine=target, interpolation="nearest", force_resample=True,
                       copy_header=True)
    data = np.asarray(img.get_fdata() > 0.5)  # (i, j, k) = (x, y, z) in RAS
    origin = img.affine[:3, 3]
    volume = np.transpose(data, (2, 1, 0)).astype(np.int8)  # (z, y, x)
    origin_zyx = origin[::-1]
    if slice_axial is None:
        return volume, float(resolution), origin_zyx
    if not 0 <= slice_axial < volume.shape[0]:
        raise SimulationError(f"--slice axial:{slice_axial} is outside 0..{volume.shape[0] - 1} at "
                              f"{resolution} mm")
    return volume[slice_axial], float(resolution), origin_zyx[1:]


def simulate_mni_grid(n_subjects: int, seed: int = 0, components: Sequence[str] = PAPER_COMPONENTS,
                      weights: Sequence[float] | None = None, noise_sd: float = 0.0,
                      resolution: float = 6.0, slice_axial: int | None = None,
                      diffusivity_range=(1.0, 20.0), reaction_range=(0.05, 0.5),
                      times: Sequence[float] = (0.0, 2.0, 4.0), device: str = "cpu") -> xr.Dataset:
    """Cohort on real anatomy: a Gaussian seed in the grey-matter mask (D in mm^2/yr, r per yr); the
    PDE is solved on ``device`` (``"cuda"`` for 2 mm cohorts of hundreds of subjects)."""
    rng = np.random.default_rng(seed)
    mask, spacing, origin = mni_gm_mask(resolution, slice_axial)
    domain = GridDomain(mask, spacing)
    subtype, diffusivity, reaction = _draw_truth(rng, n_subjects, components, weights,
                                                 diffusivity_range, reaction_range)
    coords = np.stack(np.unravel_index(domain.active_index, mask.shape), axis=1) * spacing  # (n, ndim) mm
    u0 = np.zeros((n_subjects, domain.n_nodes))
    for i in range(n_subjects):
        centre = coords[rng.integers(domain.n_nodes)]
        d2 = ((coords - centre) ** 2).sum(axis=1)
        u0[i] = 0.8 * np.exp(-d2 / (2 * (2.5 * spacing) ** 2))
    visit_times = np.tile(np.asarray(times, dtype=float), (n_subjects, 1))
    fields = _add_noise(rng, _simulate_fields(domain, u0, visit_times, subtype, diffusivity, reaction,
                                              components, device), noise_sd)
    subjects = [f"sub-{i:04d}" for i in range(n_subjects)]
    return _grid_dataset(mask, spacing, fields, visit_times, domain, subjects,
                         _truth_vars(components, subtype, diffusivity, reaction),
                         {"benchmark": "mni-grid", "seed": seed, "noise_sd": noise_sd, "time_unit": "year",
                          "resolution_mm": spacing}, origin=origin)


BENCHMARKS: dict[str, Benchmark] = {
    "paper-grid": Benchmark("paper-grid", PAPER_COMPONENTS, (0.01, 1.0), (0.01, 0.1), simulate_paper_grid),
    "graph": Benchmark("graph", GRAPH_COMPONENTS, (0.05, 1.0), (0.1, 1.0), simulate_graph),
    "hcp83": Benchmark("hcp83", GRAPH_COMPONENTS, (0.05, 1.0), (0.1, 1.0), simulate_hcp83),
    "mni-grid": Benchmark("mni-grid", PAPER_COMPONENTS, (1.0, 20.0), (0.05, 0.5), simulate_mni_grid),
}


def simulate(benchmark: str, n_subjects: int, seed: int = 0, **kwargs) -> xr.Dataset:
    """Simulate ``n_subjects`` of the named benchmark (see ``BENCHMARKS``) with ground truth."""
    if benchmark not in BENCHMARKS:
        raise SimulationError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if n_subjects < 1:
        raise SimulationError(f"--subjects must be >= 1, got {n_subjects}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return BENCHMARKS[benchmark].build(n_subjects, seed=seed, **kwargs)
