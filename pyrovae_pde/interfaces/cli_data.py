"""Subcommands for data: ``simulate`` and ``validate``."""
from __future__ import annotations

import argparse

import numpy as np

from .cli import at_least, comma_list


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def axial_slice(text: str) -> int:
    """``axial:K`` -> K, the index of an axial slice (argparse type)."""
    plane, _, index = text.partition(":")
    if plane != "axial" or not index.isdigit():
        raise argparse.ArgumentTypeError(f"expected --slice axial:K with an integer K, got {text!r}")
    return int(index)


def cmd_simulate(args: argparse.Namespace) -> int:
    from ..data import save_dataset, simulate

    ds = simulate(args.benchmark, args.subjects, seed=args.seed, components=args.components,
                  weights=args.weights, noise_sd=args.noise_sd, resolution=args.resolution,
                  slice_axial=args.slice)
    save_dataset(ds, args.out)
    counts = {str(k): int(v) for k, v in zip(*np.unique(ds["true_subtype"].values.astype(str), return_counts=True))}
    n_visits = int((~np.isnan(ds["time"].values)).sum())
    print(f"wrote {args.out}: benchmark {args.benchmark}, {ds.sizes['subject']} subjects, {n_visits} scans, "
          f"domain {ds.attrs['domain']} {tuple(ds['signal'].shape[2:])}, subtypes {counts}, "
          f"noise sd {args.noise_sd}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ..data import load_dataset

    ds = load_dataset(args.data)
    print(f"{args.data}: valid (schema_version {ds.attrs['schema_version']}, domain {ds.attrs['domain']}, "
          f"{ds.sizes['subject']} subjects, {ds.sizes['visit']} visit slots)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..data import BENCHMARKS

    p = subparsers.add_parser("simulate", help="simulate a benchmark cohort with ground truth",
                              description="Simulate a benchmark cohort and write a contract file.")
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    p.add_argument("--subjects", type=at_least(1), required=True, help="number of subjects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--components", type=comma_list, default=None,
                   help="comma list of reaction terms (default: the benchmark's)")
    p.add_argument("--weights", type=_float_list, default=None, help="comma list of subtype weights")
    p.add_argument("--noise-sd", type=float, default=0.0, help="Gaussian noise sd on visits after the first")
    p.add_argument("--resolution", type=float, default=None, help="mni-grid: voxel size in mm (default 6)")
    p.add_argument("--slice", type=axial_slice, default=None, help="mni-grid: 2-D slice, axial:K")
    p.add_argument("--out", required=True, help="output NetCDF file")
    p.set_defaults(handler=cmd_simulate)

    p = subparsers.add_parser("validate", help="check a file against the data contract")
    p.add_argument("data", help="contract NetCDF file")
    p.set_defaults(handler=cmd_validate)
