"""Where an imported cohort lives: its options, the common grid, the masks, and the output layout.

The layout says which input voxels each scan contributes and where they go: one value per voxel
inside the mask (grid output, optionally one axial slice) or one regional mean per atlas label
(graph output, with the connectome as adjacency).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import ImagingError
from .imaging_atlas import load_connectome, read_label_names, short_list
from .imaging_grid import Grid, axis_coords, binary, canonical_index, grid_of, mni_gm_on, open_nifti, volume_on_grid
from .imaging_manifest import scan_where

__all__ = ["MNI_GM", "ImportOptions", "Space", "Layout", "ImportPlan", "choose_grid", "canonical_space",
           "brain_mask", "reference_voxels", "layout_for"]

MNI_GM = "mni-gm"


@dataclass(frozen=True)
class ImportOptions:
    """The keyword arguments of :func:`~pyrovae_pde.data.imaging.import_cohort`, checked together."""
    reference: str | os.PathLike
    mask: str | os.PathLike | None = None
    resolution: float | None = None
    slice_axial: int | None = None
    atlas: str | os.PathLike | None = None
    connectome: str | os.PathLike | None = None
    labels: str | os.PathLike | None = None
    suvr_min: float | None = None
    suvr_max: float | None = None
    dtype: str = "float32"
    progress: bool = True

    def __post_init__(self) -> None:
        graph = self.graph
        if graph and (self.atlas is None or self.connectome is None):
            raise ImagingError("graph output needs both --atlas (label image) and --connectome (regions x regions)")
        if graph and self.slice_axial is not None:
            raise ImagingError("--slice applies to grid output only; drop it when using --atlas/--connectome")
        if not graph and self.mask is None:
            raise ImagingError("grid output needs a brain mask: --mask FILE or --mask mni-gm")
        if self.resolution is not None and not (math.isfinite(self.resolution) and self.resolution > 0):
            raise ImagingError(f"--resolution must be a positive number of mm, got {self.resolution}")
        if self.dtype not in ("float32", "float64"):
            raise ImagingError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def graph(self) -> bool:
        """Regional means on a graph (atlas and connectome) rather than a voxel grid."""
        return self.atlas is not None or self.connectome is not None

    @property
    def mni(self) -> bool:
        """The mask is nilearn's MNI152 grey-matter mask."""
        return isinstance(self.mask, str) and self.mask == MNI_GM

    @property
    def resample(self) -> bool:
        """Every image is resampled onto a grid of ``resolution`` mm."""
        return self.resolution is not None


@dataclass(frozen=True)
class Space:
    """The grid everything is read on and its RAS+ reorientation (see :func:`canonical_index`)."""
    grid: Grid
    resampled: str  # how images came onto the grid, for the output attrs
    zyx: np.ndarray  # zyx[z, y, x] = flat input voxel index (full 3-D canonical grid)
    canonical_affine: np.ndarray
    coords: dict[str, np.ndarray]
    aligned: bool


@dataclass(frozen=True)
class Layout:
    """Which input voxels feed the output values and where they go; graph fields are None for grids."""
    src_idx: tuple[np.ndarray, ...]  # input voxel indices (i, j, k) read from each scan
    spatial_shape: tuple[int, ...]  # output spatial shape: (z, y, x), (y, x) or (regions,)
    n_values: int
    out_sel: np.ndarray | None = None  # grid: flat output position of each voxel in src_idx
    region_of: np.ndarray | None = None  # graph: region index of each voxel in src_idx
    voxels_per_region: np.ndarray | None = None
    atlas_labels: np.ndarray | None = None
    names: list[str] | None = None
    adjacency: np.ndarray | None = None
    atlas_out: np.ndarray | None = None  # graph: atlas labels on the (z, y, x) grid, 0 outside the regions


def choose_grid(rows: pd.DataFrame, source: str, options: ImportOptions) -> tuple[Grid, str]:
    """(grid, how images come onto it): the given images' grid, or a resampled ``resolution`` mm grid."""
    if options.resample:
        return _resampled_grid(rows, options), (
            f"scipy.ndimage.affine_transform onto a {options.resolution:g} mm RAS grid: order 1 (trilinear) "
            "for images, order 0 (nearest) for mask, reference and atlas")
    return _given_grid(rows, source, options), "no (all images share one grid)"


def canonical_space(grid: Grid, resampled: str) -> Space:
    """``grid`` with its RAS+ reorientation and the coordinates of the canonical axes."""
    zyx, _, canonical_affine = canonical_index(grid)
    coords, aligned = axis_coords(canonical_affine, zyx.shape[::-1])  # (i, j, k) after reorientation
    return Space(grid, resampled, zyx, canonical_affine, coords, aligned)


def _given_grid(rows: pd.DataFrame, source: str, options: ImportOptions) -> Grid:
    """The grid of the mask, else the atlas, else the first scan; every image must share it."""
    mask, atlas = options.mask, options.atlas
    if mask is not None and not options.mni:
        return grid_of(open_nifti(mask, f"mask {mask}"), f"the mask {mask}")
    if options.graph:
        return grid_of(open_nifti(atlas, f"atlas {atlas}"), f"the atlas {atlas}")
    first = rows.iloc[0]
    return grid_of(open_nifti(first["image"], scan_where(source, next(rows.itertuples()))),
                   f"the first scan {first['image_given']!r}")


def _resampled_grid(rows: pd.DataFrame, options: ImportOptions) -> Grid:
    """An isotropic ``resolution`` mm grid: the MNI grid, or one covering the mask, atlas or first scan."""
    resolution, mask = options.resolution, options.mask
    if options.mni:
        from .simulate import mni_gm_mask

        volume, spacing, origin = mni_gm_mask(resolution)
        affine = np.diag([spacing, spacing, spacing, 1.0])
        affine[:3, 3] = origin[::-1]
        return Grid(tuple(int(s) for s in volume.shape[::-1]), affine, f"the {resolution:g} mm MNI grid")
    first = rows.iloc[0]
    src_path, what = ((mask, "mask") if mask is not None else (options.atlas, "atlas") if options.graph
                      else (first["image"], "first scan"))
    src = open_nifti(src_path, f"{what} {src_path}")
    from nibabel.processing import vox2out_vox

    shape, affine = vox2out_vox((src.shape[:3], src.affine), voxel_sizes=(resolution,) * 3)
    return Grid(tuple(int(s) for s in shape), np.asarray(affine, float),
                f"the {resolution:g} mm grid covering the {what}")


def brain_mask(options: ImportOptions, grid: Grid) -> np.ndarray | None:
    """The brain mask on ``grid`` (input voxel order i, j, k), or None without a mask."""
    mask = options.mask
    if mask is None:
        return None
    if options.mni:
        brain = mni_gm_on(grid)
        if not brain.any():
            raise ImagingError(f"--mask mni-gm: the MNI152 grey-matter mask does not overlap {grid.source}; are the "
                               "scans in MNI space? Otherwise give --mask FILE")
        return brain
    brain = binary(volume_on_grid(mask, f"mask {mask}", grid, options.resample, order=0))
    if not brain.any():
        raise ImagingError(f"mask {mask}: no voxel is inside (> 0.5) on {grid.source}")
    return brain


def reference_voxels(options: ImportOptions, grid: Grid) -> tuple[np.ndarray, ...]:
    """Indices (i, j, k) of the reference region's voxels on ``grid``; it must not be empty."""
    reference, resample = options.reference, options.resample
    ref = binary(volume_on_grid(reference, f"reference region {reference}", grid, resample, order=0))
    if not ref.any():
        raise ImagingError(f"reference region {reference}: the reference region is empty (no voxel > 0.5"
                           f"{' after resampling' if resample else ''}); SUVR needs a nonempty reference region")
    return np.nonzero(ref)


def layout_for(options: ImportOptions, space: Space, brain: np.ndarray | None) -> Layout:
    """The graph layout (atlas regions) or the grid layout (mask voxels, optionally one slice)."""
    if options.graph:
        return _graph_layout(options, space, brain)
    return _grid_layout(options, space, brain)


def _graph_layout(options: ImportOptions, space: Space, brain: np.ndarray | None) -> Layout:
    """Atlas regions (inside the mask, if any) as nodes; the connectome as their adjacency."""
    atlas, grid = options.atlas, space.grid
    atlas_vol = np.rint(np.nan_to_num(np.asarray(
        volume_on_grid(atlas, f"atlas {atlas}", grid, options.resample, order=0), dtype=float))).astype(np.int64)
    atlas_labels = np.unique(atlas_vol[atlas_vol > 0])
    if atlas_labels.size == 0:
        raise ImagingError(f"atlas {atlas}: no positive labels (0 is background)")
    region_vox = atlas_vol > 0
    if brain is not None:
        region_vox &= brain
        inside = np.unique(atlas_vol[region_vox])
        outside = np.setdiff1d(atlas_labels, inside)
        if outside.size:
            raise ImagingError(f"atlas {atlas}: labels {short_list(outside.tolist())} have no voxel inside the mask "
                               f"{options.mask}; remove them from the atlas and connectome or use a larger mask")
    src_idx = np.nonzero(region_vox)
    region_of = np.searchsorted(atlas_labels, atlas_vol[src_idx])
    names = read_label_names(options.labels, atlas_labels)
    adjacency = load_connectome(options.connectome, atlas_labels, names, f"atlas {atlas}")
    zyx = space.zyx
    atlas_out = np.where(region_vox, atlas_vol, 0).reshape(-1)[zyx.reshape(-1)].reshape(zyx.shape)
    return Layout(src_idx, (atlas_labels.size,), atlas_labels.size, region_of=region_of,
                  voxels_per_region=np.bincount(region_of, minlength=atlas_labels.size).astype(float),
                  atlas_labels=atlas_labels, names=names, adjacency=adjacency, atlas_out=atlas_out)


def _grid_layout(options: ImportOptions, space: Space, brain: np.ndarray) -> Layout:
    """The mask's voxels on the canonical grid, or in one axial slice of it."""
    zyx, slice_axial = space.zyx, options.slice_axial
    if slice_axial is not None:
        if not 0 <= slice_axial < zyx.shape[0]:
            raise ImagingError(f"--slice axial:{slice_axial} is outside 0..{zyx.shape[0] - 1} on {space.grid.source}")
        zyx = zyx[slice_axial]
    active = brain.reshape(-1)[zyx.reshape(-1)]
    if not active.any():
        raise ImagingError(f"--slice axial:{slice_axial}: the mask has no voxel in this slice")
    out_sel = np.flatnonzero(active)
    src_idx = np.unravel_index(zyx.reshape(-1)[out_sel], space.grid.shape)
    return Layout(src_idx, zyx.shape, out_sel.size, out_sel=out_sel)


@dataclass(frozen=True)
class ImportPlan:
    """Everything needed to read the scans and assemble the dataset, once the grid and layout are known."""
    source: str  # the manifest, for messages
    options: ImportOptions
    space: Space
    ref_idx: tuple[np.ndarray, ...]  # reference-region voxels (i, j, k) on the grid
    layout: Layout
