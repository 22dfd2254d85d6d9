"""Assemble an imported cohort into a contract-v1 dataset: variables, coordinates and attrs.

The attrs record the normalisation constants and the input geometry (affine, shape, orientation,
slice), so :func:`~pyrovae_pde.data.imaging.export_nifti` and
:func:`~pyrovae_pde.data.imaging.invert_normalisation` can undo the import exactly.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import xarray as xr

from .contract import SCHEMA_VERSION
from .imaging_space import ImportPlan
from .imaging_suvr import CohortValues, Scaling

__all__ = ["contract_dataset"]


def contract_dataset(plan: ImportPlan, values: CohortValues, signal: np.ndarray, scaling: Scaling,
                     dropped: list[str]) -> xr.Dataset:
    """The (not yet validated) dataset of an import; ``signal`` is scaled, ``dropped`` the single-scan subjects."""
    attrs = _attrs(plan, scaling, dropped)
    variables = {
        "time": (("subject", "visit"), values.times),
        "reference_mean": (("subject", "visit"), values.reference_mean),
        "image_file": (("subject", "visit"), values.image_file),
        "affine": (("affine_row", "affine_col"), plan.space.grid.affine.astype(np.float64)),
    }
    ds_coords = {"subject": np.array(values.subjects, dtype=object)}
    if plan.options.graph:
        _add_graph(plan, signal, variables, ds_coords, attrs)
    else:
        _add_grid(plan, signal, variables, ds_coords, attrs)
    return xr.Dataset(variables, coords=ds_coords, attrs=attrs)


def _attrs(plan: ImportPlan, scaling: Scaling, dropped: list[str]) -> dict:
    """The attrs shared by grid and graph output: normalisation, masks and input geometry."""
    options, grid = plan.options, plan.space.grid
    mask, slice_axial = options.mask, options.slice_axial
    return {
        "schema_version": SCHEMA_VERSION,
        "domain": "graph" if options.graph else "grid",
        "time_unit": "year",
        "source": "pyrovae-pde import (NIfTI cohort)",
        "manifest": str(plan.source),
        "normalisation": "suvr",
        "normalisation_formula": "signal = (image / reference_mean - suvr_min) / (suvr_max - suvr_min)",
        "normalisation_inverse": "image = (signal * (suvr_max - suvr_min) + suvr_min) * reference_mean",
        "suvr_min": scaling.lo,
        "suvr_max": scaling.hi,
        "suvr_min_rule": scaling.lo_rule,
        "suvr_max_rule": scaling.hi_rule,
        "reference_region": str(options.reference),
        "mask": ("mni-gm: nilearn MNI152 grey-matter mask, nearest-neighbour onto the grid" if options.mni
                 else str(mask) if mask is not None else "none"),
        "resampled": plan.space.resampled,
        "input_shape": np.asarray(grid.shape, dtype=np.int64),
        "input_axcodes": "".join(nib.aff2axcodes(grid.affine)),
        "axis_order": ("voxel axes reoriented to RAS+ (nibabel.as_closest_canonical: flips/permutations only) "
                       "and ordered (z, y, x) = canonical (k, j, i); variable 'affine' is the input grid's "
                       "voxel-to-world affine (mm) with shape attr 'input_shape'"),
        "grid_coordinates": ("world mm (RAS)" if plan.space.aligned else
                             "mm along the voxel axes from the first voxel (oblique affine; see 'affine')"),
        "slice_axial": int(slice_axial) if slice_axial is not None else -1,
        "dropped_subjects": ", ".join(dropped),
    }


def _add_graph(plan: ImportPlan, signal: np.ndarray, variables: dict, ds_coords: dict, attrs: dict) -> None:
    """Graph output: regional signal, adjacency, node labels and the atlas on the (z, y, x) grid."""
    layout, options = plan.layout, plan.options
    names = layout.names
    variables["signal"] = (("subject", "visit", "node"), signal)
    variables["adjacency"] = (("node", "neighbor"), layout.adjacency)
    variables["node_label"] = (("node",), layout.atlas_labels.astype(np.int64))
    variables["atlas"] = (("z", "y", "x"), layout.atlas_out.astype(np.int32))
    ds_coords.update(node=np.array(names, dtype=object), neighbor=np.array(names, dtype=object))
    attrs["atlas"] = str(options.atlas)
    attrs["connectome"] = str(options.connectome)
    attrs["regional_value"] = "mean over the region's voxels (inside the mask, if any) of the SUVR"


def _add_grid(plan: ImportPlan, signal: np.ndarray, variables: dict, ds_coords: dict, attrs: dict) -> None:
    """Grid output: voxel signal, the output mask, axis coordinates and voxel size."""
    layout, space, slice_axial = plan.layout, plan.space, plan.options.slice_axial
    spatial_shape = layout.spatial_shape
    dims = ("z", "y", "x") if slice_axial is None else ("y", "x")
    variables["signal"] = (("subject", "visit", *dims), signal)
    mask_flat = np.zeros(int(np.prod(spatial_shape)), np.int8)
    mask_flat[layout.out_sel] = 1
    variables["mask"] = (dims, mask_flat.reshape(spatial_shape))
    ds_coords.update({d: space.coords[d] for d in dims})
    if slice_axial is not None:
        attrs["slice_z_mm"] = float(space.coords["z"][slice_axial])
    sizes = np.linalg.norm(space.canonical_affine[:3, :3], axis=0)
    attrs["voxel_size_mm"] = sizes[::-1].astype(float)  # (z, y, x)
