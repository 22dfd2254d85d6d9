"""Per-rank memory of a distributed fit (issue 16, "Beyond one machine"): `fit --distributed` on
cohorts of several sizes, each rank reading only its own subjects, against the whole cohort on every
rank (the package before the lazy reads, given as ``--baseline DIR``).

For each size a graph cohort (68 regions, up to 5 visits) is simulated once into ``--workdir``; then

    torchrun --nproc_per_node=2 benchmarks/bench_distributed_memory.py --rank-json PREFIX -- \\
        fit COHORT --components diffusion,fisher_kpp --out RUN --distributed --epochs 1 \\
        --prior diffusivity=0.05,1 --prior reaction=0.1,1

runs the command line's fit inside each rank, which writes to PREFIX.rankR.json its peak RSS
(``resource.getrusage``: the most resident memory the process ever had), its RSS after importing
torch, pyro, xarray and the package (before any data), and how many subjects' signal it read
(``LazyCohort``; the baseline reads all). Usage:

    .venv/bin/python benchmarks/bench_distributed_memory.py --sizes 500 2000 [--baseline DIR] [--ranks 2]

``--baseline DIR``: a checkout of the package from before the lazy shards (e.g. a `git worktree`),
put first on PYTHONPATH for the same command. The ranks run one thread each (torchrun's default).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIT_ARGS = ["--components", "diffusion,fisher_kpp", "--distributed", "--epochs", "1", "--seed", "0",
            "--prior", "diffusivity=0.05,1", "--prior", "reaction=0.1,1"]


def _rss_mb() -> float:
    """This process's resident memory now (MB), from /proc (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rank_main(prefix: str, argv: list[str]) -> int:
    """One rank: the CLI's fit in this process, then its memory record."""
    import resource

    import h5netcdf  # noqa: F401  (imported before the baseline RSS: every mode needs them)
    import pyro  # noqa: F401
    import torch  # noqa: F401
    import xarray  # noqa: F401

    import pyrovae_pde.inference.train  # noqa: F401
    import pyrovae_pde.interfaces.api  # noqa: F401
    from pyrovae_pde.interfaces.cli import main

    after_imports = _rss_mb()
    read = {"subjects": None, "signal_bytes": 0}
    try:  # the current package: count what each rank reads
        from pyrovae_pde.data.cohort import LazyCohort

        original = LazyCohort.subset

        def subset(self, index):
            data = original(self, index)
            read["subjects"] = self.read_subjects
            read["signal_bytes"] += data.signal.element_size() * data.signal.nelement()
            return data

        LazyCohort.subset = subset
    except ImportError:  # the baseline: every rank holds the whole cohort
        pass
    start = time.perf_counter()
    code = main(argv)
    record = {"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)), "exit": code,
              "seconds": round(time.perf_counter() - start, 1), "rss_after_imports_mb": round(after_imports, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "subjects_read": read["subjects"], "held_signal_mb": round(read["signal_bytes"] / 2 ** 20, 2)}
    Path(f"{prefix}.rank{record['rank']}.json").write_text(json.dumps(record))
    return code


def one(n: int, label: str, workdir: Path, ranks: int, pythonpath: str | None) -> dict:
    """One distributed fit of the cohort of ``n`` subjects; its ranks' records."""
    import xarray as xr

    from pyrovae_pde.data import save_dataset, simulate

    cohort = workdir / f"graph_{n}.nc"
    if not cohort.exists():
        save_dataset(simulate("graph", n, seed=1, noise_sd=0.02, components=("diffusion", "fisher_kpp")), cohort)
    with xr.open_dataset(cohort, engine="h5netcdf") as ds:
        file_mb = ds["signal"].nbytes / 2 ** 20
        active_mb = ds.sizes["subject"] * ds.sizes["visit"] * ds.sizes["node"] * 4 / 2 ** 20
    prefix = workdir / f"mem_{label}_{n}"
    for old in workdir.glob(f"{prefix.name}.rank*.json"):
        old.unlink()
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else sys.executable, *([] if torchrun.exists() else
                                                                   ["-m", "torch.distributed.run"]),
           f"--nproc_per_node={ranks}", str(Path(__file__).resolve()), "--rank-json", str(prefix), "--",
           "fit", str(cohort), "--out", str(workdir / f"run_{label}_{n}"), *FIT_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    start = time.perf_counter()
    # in the work directory, so that a checkout in the current directory does not shadow the baseline
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=workdir)
    records = [json.loads(p.read_text()) for p in sorted(workdir.glob(f"{prefix.name}.rank*.json"))]
    out = {"subjects": n, "label": label, "exit": proc.returncode,
           "wall_seconds": round(time.perf_counter() - start, 1), "cohort_signal_mb_file_float64": round(file_mb, 2),
           "cohort_signal_mb_active_float32": round(active_mb, 2), "ranks": records, "command": " ".join(cmd)}
    if proc.returncode != 0:
        out["error"] = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank-json"]:  # inside torchrun: one rank
        return rank_main(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--baseline", help="a checkout of the package before the lazy shards, run side by side")
    parser.add_argument("--workdir", help="keep cohorts and runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pyrovae_bench_distributed_"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs = [("lazy", None)] + ([("baseline", str(Path(args.baseline).resolve()))] if args.baseline else [])
    results = []
    for n in args.sizes:
        for label, path in runs:
            res = one(n, label, workdir, args.ranks, path)
            results.append(res)
            print(json.dumps(res), flush=True)
    print("\n| subjects | run | whole-cohort signal (file f64 / active f32, MB) | subjects read per rank "
          "| signal held per rank (MB) | peak RSS per rank (MB) | peak - RSS after imports (MB) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ranks = r["ranks"]

        def cell(key: str, ranks=ranks) -> str:
            return " / ".join(str(x[key]) for x in ranks) or "failed"

        above = " / ".join(f"{x['peak_rss_mb'] - x['rss_after_imports_mb']:.1f}" for x in ranks) or "failed"
        read = cell("subjects_read") if all(x["subjects_read"] is not None for x in ranks) else "all"
        held = cell("held_signal_mb") if read != "all" else f"{r['cohort_signal_mb_active_float32']} (all)"
        print(f"| {r['subjects']} | {r['label']} | {r['cohort_signal_mb_file_float64']} / "
              f"{r['cohort_signal_mb_active_float32']} | {read} | {held} | {cell('peak_rss_mb')} | {above} | "
              f"{r['wall_seconds']} |")
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
