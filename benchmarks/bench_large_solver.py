"""Benchmark: forward + backward of one training batch through the Chebyshev solver on large 3-D grids.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_large_solver.py            # full (64 subjects)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_large_solver.py --quick    # short check (8 subjects)

Settings, each in a fresh subprocess (so peak memory is the step's own):

* MNI152 grey-matter grid (``mni_gm_mask``, nilearn package data) at 6 and 4 mm (``--resolutions``):
  method "chebyshev" (what "auto" picks above SPECTRAL_MAX_NODES nodes). 3 components (fisher_kpp,
  saturating, zeldovich), visits t = 0, 2, 4 yr, D ~ U(1, 20) mm^2/yr and r ~ U(0.05, 0.5) /yr per
  (subject, component) as the mni-grid simulator draws them, Gaussian seeds (sd 2.5 voxels, peak
  0.8) at random grey-matter voxels; float32; the model's settings (default steps, Richardson
  extrapolation, max_steps 200).
  ``--dopri5`` adds the previous large-domain default, torchdiffeq dopri5 (rtol 1e-6, atol 1e-8) on
  the sparse Laplacian, at each resolution.
* the 2-D paper grid (32x32 disc, 697 nodes): "spectral" and "chebyshev" side by side, same batch
  shape, D ~ U(0.01, 1), r ~ U(0.01, 0.1), t = 0, 6, 24 (the paper-grid simulator's ranges).

The step is ``loss = (solve_active(...) * w).sum(); loss.backward()`` w.r.t. D and r. Times are the
median of ``--reps`` (after one untimed warm-up unless ``--quick``); setup (mask, domain, eigenbasis
or Gershgorin bound and CSR matrix) is timed apart. Peak memory: the process's peak resident set
during the steps minus its RSS before them (Linux VmHWM reset through /proc/self/clear_refs; else the
ru_maxrss increase). Quote ratios from one run: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMPONENTS = ("fisher_kpp", "saturating", "zeldovich")


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _problem(grid: str, subjects: int, seed: int = 0):
    """(domain, u0 (N, n), times (N, T), D (N, K), r (N, K)) as float32 tensors."""
    import numpy as np
    import torch

    from pyrovae_pde.data.simulate import mni_gm_mask, paper_grid_mask
    from pyrovae_pde.physics import GridDomain

    rng = np.random.default_rng(seed)
    k = len(COMPONENTS)
    if grid == "paper":
        mask, field = paper_grid_mask()
        domain = GridDomain(mask)
        u0 = np.tile(field[mask != 0], (subjects, 1))
        times, d_range, r_range = (0.0, 6.0, 24.0), (0.01, 1.0), (0.01, 0.1)
    else:
        mask, spacing, _ = mni_gm_mask(float(grid))
        domain = GridDomain(mask, spacing)
        coords = np.stack(np.unravel_index(domain.active_index, mask.shape), axis=1) * spacing
        centres = coords[rng.integers(domain.n_nodes, size=subjects)]
        d2 = ((coords[None] - centres[:, None]) ** 2).sum(-1)
        u0 = 0.8 * np.exp(-d2 / (2 * (2.5 * spacing) ** 2))
        times, d_range, r_range = (0.0, 2.0, 4.0), (1.0, 20.0), (0.05, 0.5)
    d = rng.uniform(*d_range, (subjects, k))
    r = rng.uniform(*r_range, (subjects, k))
    as32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return domain, as32(u0), as32(np.tile(times, (subjects, 1))), as32(d), as32(r)


def child(grid: str, method: str, subjects: int, reps: int, warmup: bool) -> dict:
    import torch

    from pyrovae_pde.physics import SolverSettings, solve_active

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    domain, u0, times, d, r = _problem(grid, subjects)
    if method == "spectral":
        domain.eigh(torch.float32, "cpu")
    else:
        domain.scaled_laplacian(torch.float32, "cpu")
    setup_s = time.perf_counter() - start
    settings = SolverSettings(method=method, max_steps=200)  # the model's solver settings
    weight = torch.randn(domain.n_nodes, generator=torch.Generator().manual_seed(1))

    def step() -> tuple[float, float]:
        dd, rr = d.clone().requires_grad_(), r.clone().requires_grad_()
        t0 = time.perf_counter()
        loss = (solve_active(domain, u0, times, dd, rr, COMPONENTS, settings) * weight).sum()
        t1 = time.perf_counter()
        loss.backward()
        return t1 - t0, time.perf_counter() - t1

    if warmup:
        step()
    rss_before = _status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak()
    forward, backward = zip(*(step() for _ in range(reps)))
    if reset and rss_before is not None:
        peak_mb, how = (_status_kb("VmHWM") - rss_before) / 1024.0, "VmHWM - VmRSS before"
    else:
        peak_mb, how = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) / 1024.0, "ru_maxrss"
    return {"grid": grid, "method": method, "nodes": domain.n_nodes, "subjects": subjects, "setup_s": setup_s,
            "forward_s": statistics.median(forward), "backward_s": statistics.median(backward),
            "peak_mb": peak_mb, "memory": how}


def run_child(grid: str, method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{grid}:{method}", "--subjects",
           str(args.subjects), "--reps", str(args.reps)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{grid}:{method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(res: dict) -> str:
    total = res["forward_s"] + res["backward_s"]
    return (f"{res['grid']:>6} {res['method']:>10} {res['nodes']:>7} {res['subjects']:>4} {res['setup_s']:8.2f} "
            f"{res['forward_s']:9.2f} {res['backward_s']:9.2f} {total:8.2f} {res['peak_mb']:9.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 subjects, 1 rep, no warm-up, 6 mm only")
    parser.add_argument("--subjects", type=int, default=None, help="subjects per batch (default 64; quick 8)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3; quick 1)")
    parser.add_argument("--resolutions", type=float, nargs="+", default=None, help="MNI grids in mm (default 6 4)")
    parser.add_argument("--dopri5", action="store_true", help="also time dopri5 (the old default) on the MNI grids")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="append the result rows to this JSON-lines file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.subjects = args.subjects or (8 if args.quick else 64)
    args.reps = args.reps or (1 if args.quick else 3)
    if args.child:
        grid, method = args.child.split(":")
        print(json.dumps(child(grid, method, args.subjects, args.reps, warmup=not args.quick)))
        return
    resolutions = args.resolutions or ([6.0] if args.quick else [6.0, 4.0])
    methods = ("chebyshev", "dopri5") if args.dopri5 else ("chebyshev",)
    settings = [("paper", "spectral"), ("paper", "chebyshev")] + [(f"{res:g}", m) for res in resolutions
                                                                 for m in methods]
    print(f"{len(COMPONENTS)} components, float32, threads {args.threads}; times in s, peak in MB")
    print(f"{'grid':>6} {'method':>10} {'nodes':>7} {'subj':>4} {'setup':>8} {'forward':>9} {'backward':>9} "
          f"{'f+b':>8} {'peak':>9}")
    results = []
    for grid, method in settings:
        results.append(run_child(grid, method, args))
        print(_row(results[-1]), flush=True)
    spectral, chebyshev = results[0], results[1]
    ratio = ((chebyshev["forward_s"] + chebyshev["backward_s"]) / (spectral["forward_s"] + spectral["backward_s"]))
    print(f"paper grid chebyshev / spectral: f+b time {ratio:.2f}x, peak memory "
          f"{chebyshev['peak_mb'] / max(spectral['peak_mb'], 1e-9):.2f}x")
    for res in results[2:]:
        if res["method"] == "dopri5":
            cheb = next(c for c in results if c["grid"] == res["grid"] and c["method"] == "chebyshev")
            print(f"{res['grid']} mm dopri5 / chebyshev: f+b time "
                  f"{(res['forward_s'] + res['backward_s']) / (cheb['forward_s'] + cheb['backward_s']):.1f}x")
    if args.json:
        with args.json.open("a") as fh:
            for res in results:
                fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
