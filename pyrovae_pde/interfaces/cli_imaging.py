"""Subcommands for neuroimaging: ``import`` (NIfTI cohort -> contract file), ``import-regional``
(regional PET table on a connectome -> contract file) and ``export-nifti``."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable, TypeVar

from .cli_data import axial_slice

T = TypeVar("T")


def _warning_lines(command: str, make: Callable[[], T]) -> T:
    """``make()``, its warnings printed as one line each after it succeeds (none if it fails)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = make()
    for warning in caught:
        print(f"pyrovae-pde {command}: warning: {warning.message}", file=sys.stderr)
    return result


def cmd_import(args: argparse.Namespace) -> int:
    from ..data.contract import save_dataset
    from ..data.imaging import import_cohort

    ds = _warning_lines("import", lambda: import_cohort(
        args.manifest, reference=args.reference, mask=args.mask, resolution=args.resolution,
        slice_axial=args.slice, atlas=args.atlas, connectome=args.connectome, labels=args.labels,
        suvr_min=args.suvr_min, suvr_max=args.suvr_max, dtype="float64" if args.float64 else "float32",
        progress=not args.no_progress))
    save_dataset(ds, args.out, validate=False)  # import_cohort has validated it
    n_scans = int((~ds["time"].isnull()).sum())
    shape = tuple(ds["signal"].shape[2:])
    if ds.attrs["domain"] == "graph":
        where = f"graph of {ds.sizes['node']} regions"
    elif len(shape) == 3:
        where = f"grid {shape} (z, y, x)"
    else:
        where = f"grid {shape} (y, x), axial slice {ds.attrs['slice_axial']}"
    print(f"wrote {args.out}: {ds.sizes['subject']} subjects, {n_scans} scans, {where}; SUVR scaled by "
          f"[{ds.attrs['suvr_min']:.4g}, {ds.attrs['suvr_max']:.4g}] -> [0, 1]; resampled: {ds.attrs['resampled']}")
    return 0


def cmd_import_regional(args: argparse.Namespace) -> int:
    from ..data.contract import save_dataset
    from ..data.regional import import_regional

    ds = _warning_lines("import-regional", lambda: import_regional(
        args.table, args.connectome, reference_region=args.reference_region, suvr_min=args.suvr_min,
        suvr_max=args.suvr_max, threshold=args.threshold))
    save_dataset(ds, args.out, validate=False)  # import_regional has validated it
    n_scans = int((~ds["time"].isnull()).sum())
    print(f"wrote {args.out}: {ds.sizes['subject']} subjects, {n_scans} visits, graph of {ds.sizes['node']} regions "
          f"(connectome {ds.attrs['connectome']}, {int((ds['adjacency'].values > 0).sum()) // 2} edges); SUVR scaled "
          f"by [{ds.attrs['suvr_min']:.4g}, {ds.attrs['suvr_max']:.4g}] -> [0, 1]")
    return 0


def cmd_export_nifti(args: argparse.Namespace) -> int:
    from ..data.imaging import export_nifti

    written = export_nifti(args.data, args.out, variable=args.variable, scale=args.scale, geometry=args.like,
                           fill=args.fill, progress=not args.no_progress)
    print(f"wrote {len(written)} NIfTI file(s) of {args.variable!r} ({args.scale} scale) to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..data.connectomes import DEFAULT_THRESHOLD

    p = subparsers.add_parser(
        "import", help="import a longitudinal NIfTI PET cohort (manifest CSV) into a contract file",
        description="Read a manifest CSV (subject, time or date, image), load the NIfTI scans, normalise to "
                    "SUVR by a reference region, scale the cohort to [0, 1] and write a contract file "
                    "atomically. Grid output by default; regional means on a graph with --atlas and "
                    "--connectome. See data_schemas/MANIFEST.md.")
    p.add_argument("manifest", help="manifest CSV; image paths are relative to its folder")
    p.add_argument("--out", required=True, help="output NetCDF contract file")
    p.add_argument("--mask", default=None,
                   help="brain mask NIfTI (voxels > 0.5), or 'mni-gm' for nilearn's MNI152 grey-matter mask "
                        "(scans in MNI space); required for grid output")
    p.add_argument("--reference", required=True, help="reference-region mask NIfTI for SUVR (e.g. cerebellum)")
    p.add_argument("--resolution", type=float, default=None,
                   help="resample all images onto an isotropic grid of this voxel size (mm); without it all "
                        "images must share the mask's shape and affine")
    p.add_argument("--slice", type=axial_slice, default=None, help="2-D output: one axial slice, axial:K")
    p.add_argument("--atlas", default=None, help="label image NIfTI (0 = background): graph output")
    p.add_argument("--connectome", default=None,
                   help="regions x regions matrix, CSV or NPY, rows in ascending atlas-label order")
    p.add_argument("--labels", default=None, help="optional CSV with columns label,name (region names)")
    p.add_argument("--suvr-min", type=float, default=None, help="SUVR mapped to 0 (default: cohort minimum)")
    p.add_argument("--suvr-max", type=float, default=None, help="SUVR mapped to 1 (default: cohort maximum)")
    p.add_argument("--float64", action="store_true", help="store the signal as float64 (default float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_import)

    p = subparsers.add_parser(
        "import-regional", help="import a long regional PET table (subject, time, region, value) on a connectome",
        description="Read a long CSV table with columns subject, time (years) or date (ISO), region and value, one "
                    "row per subject, visit and region; map the regions onto a connectome by name, optionally "
                    "divide by a reference region (SUVR), scale the cohort to [0, 1] and write a graph contract "
                    "file atomically. See data_schemas/REGIONAL.md.")
    p.add_argument("table", help="regional table CSV")
    p.add_argument("--connectome", required=True,
                   help="a shipped connectome (hcp83) or a CSV matrix with a header row and first column of "
                        "region names")
    p.add_argument("--out", required=True, help="output NetCDF contract file")
    p.add_argument("--reference-region", default=None,
                   help="region (a value of the region column) each visit's values are divided by (SUVR); "
                        "it need not be a connectome region")
    p.add_argument("--suvr-min", type=float, default=None, help="SUVR mapped to 0 (default: cohort minimum)")
    p.add_argument("--suvr-max", type=float, default=None, help="SUVR mapped to 1 (default: cohort maximum)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="drop connectome weights below this fraction of the largest (default 0.01)")
    p.set_defaults(handler=cmd_import_regional)

    p = subparsers.add_parser(
        "export-nifti", help="write fields of a contract/result file back to NIfTI in the input space",
        description="Write one NIfTI per field of VARIABLE (e.g. {subject}_visit-{j}.nii.gz) with the input "
                    "grid's affine. The variable may have any leading dims (subject, visit, time, subtype, ...) "
                    "before its spatial dims.")
    p.add_argument("data", help="NetCDF file holding the variable")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--variable", default="signal", help="variable to export (default signal)")
    p.add_argument("--scale", choices=("stored", "suvr", "image"), default="stored",
                   help="stored values, SUVR (inverted [0, 1] scaling), or image units (also times each scan's "
                        "reference mean; needs subject and visit dims)")
    p.add_argument("--like", default=None,
                   help="file written by 'pyrovae-pde import' that holds the geometry (default: DATA itself)")
    p.add_argument("--fill", type=float, default=0.0, help="value outside the mask / slice / atlas (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_export_nifti)
