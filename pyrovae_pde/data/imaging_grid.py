"""Voxel grids: open NIfTI volumes, check or resample them onto one grid, and reorient to RAS+.

The import's voxel axes are the input grid's axes reoriented to the closest RAS+ orientation (flips
and permutations only; ``nibabel.as_closest_canonical``) and ordered (z, y, x).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from ..errors import ImagingError

__all__ = ["Grid", "open_nifti", "grid_of", "volume_on_grid", "binary", "mni_gm_on", "canonical_index",
           "axis_coords"]

_AFFINE_ATOL_MM = 1e-3  # NIfTI stores affines in float32; differences below this are rounding


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape (i, j, k), voxel-to-world affine (mm), and where it came from (for messages)."""
    shape: tuple[int, int, int]
    affine: np.ndarray
    source: str


def _fmt_vec(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def open_nifti(path: str | os.PathLike, where: str) -> nib.Nifti1Pair:
    """nibabel image of a 3-D NIfTI file (a trailing axis of length 1 is allowed)."""
    if not Path(path).is_file():
        raise ImagingError(f"{where}: file not found ({path})")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many kinds for unreadable files
        raise ImagingError(f"{where}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, nib.Nifti1Pair):
        raise ImagingError(f"{where}: a {type(img).__name__} image, not NIfTI; convert it to .nii or .nii.gz")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        return img
    if len(shape) != 3:
        extra = f" with {shape[3]} frames" if len(shape) == 4 else ""
        raise ImagingError(f"{where}: a {len(shape)}-D image of shape {tuple(shape)}{extra}; each scan must be "
                           "one 3-D volume (average or split the frames first, e.g. with fslmaths -Tmean)")
    return img


def _read_data(img: nib.Nifti1Pair, where: str) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise ImagingError(f"{where}: could not read the image data ({type(exc).__name__}: {exc})") from None
    return data.reshape(data.shape[:3]) if data.ndim == 4 else data


def grid_of(img: nib.Nifti1Pair, source: str) -> Grid:
    """The grid (shape and affine) of an opened image."""
    return Grid(tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=float), source)


def _check_grid(img: nib.Nifti1Pair, grid: Grid, where: str) -> None:
    shape = tuple(int(s) for s in img.shape[:3])
    affine = np.asarray(img.affine, dtype=float)
    if shape == grid.shape and np.allclose(affine, grid.affine, rtol=0, atol=_AFFINE_ATOL_MM):
        return
    if shape != grid.shape:
        what = f"shape {shape} differs from {grid.shape}"
    else:
        sizes, ref_sizes = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(grid.affine[:3, :3], axis=0)
        what = (f"affine differs (voxel size {_fmt_vec(sizes)} vs {_fmt_vec(ref_sizes)} mm, origin "
                f"{_fmt_vec(affine[:3, 3])} vs {_fmt_vec(grid.affine[:3, 3])} mm; max difference "
                f"{np.abs(affine - grid.affine).max():.4g})")
    raise ImagingError(f"{where}: grid mismatch with {grid.source}: {what}; every image must share the "
                       "shape and affine of the mask (or first scan), or pass --resolution MM to resample "
                       "all images onto one grid")


def _resample(data: np.ndarray, src_affine: np.ndarray, grid: Grid, order: int, cval: float) -> np.ndarray:
    """Resample a volume onto ``grid`` with scipy.ndimage.affine_transform (order 1 trilinear, 0 nearest)."""
    from scipy.ndimage import affine_transform

    vox = np.linalg.inv(src_affine) @ grid.affine  # target voxel -> source voxel
    return affine_transform(np.asarray(data, dtype=np.float64), vox[:3, :3], offset=vox[:3, 3],
                            output_shape=grid.shape, order=order, mode="constant", cval=cval, prefilter=False)


def volume_on_grid(path: str | os.PathLike, where: str, grid: Grid, resample: bool, order: int,
                   cval: float = 0.0) -> np.ndarray:
    """The 3-D data of a NIfTI file on ``grid``: checked against it, or resampled onto it."""
    img = open_nifti(path, where)
    data = _read_data(img, where)
    if resample:
        return _resample(data, np.asarray(img.affine, dtype=float), grid, order, cval)
    _check_grid(img, grid, where)
    return data


def binary(data: np.ndarray) -> np.ndarray:
    """Mask volume -> bool (voxels > 0.5 are inside: binary masks and probability maps both work)."""
    return np.nan_to_num(np.asarray(data, dtype=float), nan=0.0) > 0.5


def mni_gm_on(grid: Grid) -> np.ndarray:
    """nilearn's MNI152 grey-matter mask, nearest-neighbour resampled onto ``grid`` (bool)."""
    try:
        from nilearn.datasets import load_mni152_gm_mask
    except ImportError:
        raise ImagingError("--mask mni-gm needs nilearn: pip install 'pyrovae_pde[mni]'") from None
    img = load_mni152_gm_mask()
    return binary(_resample(np.asarray(img.dataobj), np.asarray(img.affine, float), grid, order=0, cval=0.0))


def canonical_index(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(zyx, ornt, canonical affine): zyx[z, y, x] is the flat (C-order) input voxel index."""
    ornt = io_orientation(grid.affine)
    index = np.arange(int(np.prod(grid.shape)), dtype=np.int64).reshape(grid.shape)
    canonical = apply_orientation(index, ornt)
    affine = grid.affine @ inv_ornt_aff(ornt, grid.shape)
    return np.ascontiguousarray(canonical.transpose(2, 1, 0)), ornt, affine


def axis_coords(canonical_affine: np.ndarray, shape_ijk: Sequence[int]) -> tuple[dict[str, np.ndarray], bool]:
    """Coordinates (mm) of the canonical axes x, y, z; world mm when the affine is axis-aligned."""
    lin = canonical_affine[:3, :3]
    aligned = np.allclose(lin, np.diag(np.diag(lin)), atol=1e-6 * np.abs(lin).max())
    sizes = np.linalg.norm(lin, axis=0)
    coords = {}
    for axis, name in enumerate("xyz"):
        coords[name] = canonical_affine[axis, 3] + sizes[axis] * np.arange(shape_ijk[axis], dtype=float)
    return coords, aligned
