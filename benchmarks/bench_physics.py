"""Benchmark: forward + backward of one training batch through the physics solver.

    .venv/bin/python benchmarks/bench_physics.py                      # full run (~3-5 min on 2 cores)
    .venv/bin/python benchmarks/bench_physics.py --quick              # smoke run (~1 min)
    .venv/bin/python benchmarks/bench_physics.py --write-results      # also update benchmarks/RESULTS.md

The batch: 64 subjects x 3 components (fisher_kpp, saturating, zeldovich) on the paper grid (32x32
disc mask), visits t = 0, 6, 24, float32, D ~ U(0.01, 1) and r ~ U(0.01, 0.1) per (subject,
component), both requiring grad; the step is ``solve(...).sum().backward()``.

Compared side by side, interleaved, median of ``--reps`` repetitions after one warm-up each:

(a) ours: ``pyrovae_pde.physics.solve`` with its defaults (method "auto" -> spectral);
(b) the straightforward implementation: ``torchdiffeq.odeint`` dopri5 (rtol 1e-3, atol 1e-4) on the
    dense 32x32 grid with a torch.roll masked Laplacian (4 directions; neighbours outside the mask
    do not count, i.e. no flux), one odeint call per component over all subjects;
(a') ours as plain Strang splitting with uniform steps r*dt <= 0.05 (``extrapolate=False``), the
    previous default, to show what the extrapolation and the graded step choice buy.

Accuracy: max abs error of each against a tight float64 reference (``solve`` with method
"dopri5", rtol 1e-8, atol 1e-10). Memory: in a fresh subprocess per measurement, the peak resident
set size during the step minus the RSS just before it (Linux VmHWM, reset through
/proc/self/clear_refs; falls back to ru_maxrss when that is not allowed). This is process memory
(tensors, autograd graph, allocator and BLAS buffers), not just live tensor bytes. Scaling rows
(subjects, grid size, a 3-D ball) also run in fresh subprocesses.

Threads: ``--threads`` (default 1) sets torch's intra-op threads and OpenBLAS threads. On a small
shared machine extra threads mostly add synchronisation cost; quote ratios from one run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTION = "## Physics solver (issue: foundation)"


def _threads_from_argv() -> str:
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "1"


# BLAS reads these at import: set them before numpy/torch are imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", _threads_from_argv())
os.environ.setdefault("OMP_NUM_THREADS", _threads_from_argv())

import numpy as np  # noqa: E402
import torch  # noqa: E402

COMPONENTS = ("fisher_kpp", "saturating", "zeldovich")
F_TORCH = {
    "fisher_kpp": lambda u: u * (1.0 - u),
    "saturating": lambda u: u * (1.0 - u) ** 2,
    "zeldovich": lambda u: u * u * (1.0 - u),
}
TIMES = (0.0, 6.0, 24.0)


# --------------------------------------------------------------------------- problems
def disc_problem(grid: int):
    """The paper grid for grid=32; for larger grids the disc and the bump scale with the grid."""
    from pyrovae_pde.data.simulate import paper_grid_mask

    if grid == 32:
        return paper_grid_mask()
    scale = grid / 32.0
    yy, xx = np.mgrid[0:grid, 0:grid]
    dist = np.hypot(yy - grid / 2.0, xx - grid / 2.0)
    mask = (dist < 15.0 * scale).astype(np.int8)
    radius = (grid - 1) / 4.0
    return mask, np.where(dist < radius, np.exp(-dist ** 2 / (2 * radius ** 2)), 0.0) * mask


def ball_problem(size: int = 17, radius: float = 8.0):
    zz, yy, xx = np.indices((size,) * 3, dtype=float)
    centre = (size - 1) / 2.0
    dist = np.sqrt((zz - centre) ** 2 + (yy - centre) ** 2 + (xx - centre) ** 2)
    mask = (dist <= radius).astype(np.int8)
    bump_radius = (size - 1) / 4.0
    return mask, np.where(dist < bump_radius, np.exp(-dist ** 2 / (2 * bump_radius ** 2)), 0.0) * mask


def make_batch(mask: np.ndarray, u0_field: np.ndarray, n_subjects: int, seed: int = 0,
               dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    k = len(COMPONENTS)
    return {
        "mask": mask,
        "u0": torch.as_tensor(np.broadcast_to(u0_field, (n_subjects, *u0_field.shape)).copy(), dtype=dtype),
        "times": torch.tensor([TIMES] * n_subjects, dtype=dtype),
        "D": (0.01 + 0.99 * torch.rand(n_subjects, k, generator=gen, dtype=torch.float64)).to(dtype),
        "r": (0.01 + 0.09 * torch.rand(n_subjects, k, generator=gen, dtype=torch.float64)).to(dtype),
    }


def leaves(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["D"].clone().requires_grad_(True), batch["r"].clone().requires_grad_(True)


# --------------------------------------------------------------------------- the two implementations
def ours_step(domain, batch: dict, **options) -> torch.Tensor:
    from pyrovae_pde.physics import solve

    d, r = leaves(batch)
    out = solve(domain, batch["u0"], batch["times"], d, r, reactions=COMPONENTS, **options)
    out.sum().backward()
    assert d.grad is not None and r.grad is not None
    return out.detach()  # (N, K, T, *space)


def roll_laplacian_terms(mask: np.ndarray, dtype, device=None) -> list[tuple[int, int, torch.Tensor]]:
    """(shift, dim, weight) per direction: weight 1 where the cell and its neighbour are both inside."""
    inside = torch.as_tensor(mask != 0)
    terms = []
    for axis in range(mask.ndim):
        dim = axis + 1  # dim 0 is the subject
        for shift in (1, -1):
            both = inside & torch.roll(inside, shift, axis)
            edge = [slice(None)] * mask.ndim
            edge[axis] = 0 if shift == 1 else -1  # roll wraps around: those pairs are not neighbours
            both[tuple(edge)] = False
            terms.append((shift, dim, both.to(dtype=dtype, device=device)))
    return terms


def baseline_step(batch: dict, rtol: float = 1e-3, atol: float = 1e-4) -> torch.Tensor:
    import torchdiffeq

    d_all, r_all = leaves(batch)
    u0 = batch["u0"]
    terms = roll_laplacian_terms(batch["mask"], u0.dtype, u0.device)
    t = batch["times"][0]
    expand = (slice(None),) + (None,) * (u0.dim() - 1)
    outs = []
    for k, name in enumerate(COMPONENTS):
        d, r, f = d_all[:, k][expand], r_all[:, k][expand], F_TORCH[name]

        def rhs(_t, u, d=d, r=r, f=f):
            lap = sum(w * (u - torch.roll(u, shift, dim)) for shift, dim, w in terms)
            return -d * lap + r * f(u)

        outs.append(torchdiffeq.odeint(rhs, u0, t, method="dopri5", rtol=rtol, atol=atol))  # (T, N, *space)
    out = torch.stack(outs, dim=0)  # (K, T, N, *space)
    out.sum().backward()
    return out.detach().permute(2, 0, 1, *range(3, out.dim()))  # (N, K, T, *space)


def reference(domain, batch: dict) -> torch.Tensor:
    from pyrovae_pde.physics import solve

    with torch.no_grad():
        return solve(domain, batch["u0"].double(), batch["times"].double(), batch["D"].double(),
                     batch["r"].double(), reactions=COMPONENTS, method="dopri5", rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- measurement helpers
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    """One fresh-process measurement: time (median of reps) and peak RSS increase of the step."""
    from pyrovae_pde.physics import GridDomain

    torch.set_num_threads(args.threads)
    mask, u0 = ball_problem() if args.child_grid == 0 else disc_problem(args.child_grid)
    batch = make_batch(mask, u0, args.subjects)
    t0 = time.perf_counter()
    domain = GridDomain(mask)
    if args.child == "ours":
        domain.eigh(torch.float32, "cpu")  # one-off per domain, cached; timed separately
    setup_s = time.perf_counter() - t0
    step = (lambda: ours_step(domain, batch)) if args.child == "ours" else (lambda: baseline_step(batch))
    gc.collect()
    # Memory is counted from the state after setup (imports, domain, inputs) and before the first step;
    # freed memory the allocator keeps counts for later steps too, as it does in a training loop.
    rss_before = _status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, peaks, how = [], [], ""
    for _ in range(args.child_reps):  # no warm-up: the first step of a fresh process is cold
        reset = _reset_peak()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if reset and rss_before is not None and _status_kb("VmHWM") is not None:
            peaks.append((_status_kb("VmHWM") - rss_before) / 1024.0)
            how = "VmHWM (reset before each step) - VmRSS before the first step"
        else:  # lifetime peak: only an increase over everything before counts
            peaks.append((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) / 1024.0)
            how = "ru_maxrss increase"
    print(json.dumps({"nodes": int((mask != 0).sum()), "setup_s": setup_s, "times": times,
                      "median_s": statistics.median(times), "best_s": min(times), "peaks_mb": peaks,
                      "peak_mb": max(peaks), "how": how}))


def run_child(kind: str, subjects: int, grid: int, reps: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--subjects", str(subjects),
           "--child-grid", str(grid), "--child-reps", str(reps), "--threads", str(threads)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {cmd} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main
def compare(args: argparse.Namespace) -> dict:
    from pyrovae_pde.physics import GridDomain

    mask, u0 = disc_problem(32)
    batch = make_batch(mask, u0, args.subjects)
    t0 = time.perf_counter()
    domain = GridDomain(mask)
    domain.eigh(torch.float32, "cpu")
    setup_s = time.perf_counter() - t0
    print(f"paper grid: {int(mask.sum())} active cells; eigendecomposition (one-off, cached) {setup_s:.2f} s",
          flush=True)
    coarse = dict(extrapolate=False, reaction_step=0.05, initial_reaction_step=0.05)
    ours_out = ours_step(domain, batch)  # warm-up
    coarse_out = ours_step(domain, batch, **coarse)
    base_out = baseline_step(batch)
    ours_t, coarse_t, base_t = [], [], []
    for rep in range(args.reps):  # interleaved
        t0 = time.perf_counter()
        ours_step(domain, batch)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        baseline_step(batch)
        base_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours_step(domain, batch, **coarse)
        coarse_t.append(time.perf_counter() - t0)
        print(f"  rep {rep + 1}/{args.reps}: ours {ours_t[-1]:.3f} s, straightforward {base_t[-1]:.3f} s, "
              f"ours plain Strang {coarse_t[-1]:.3f} s", flush=True)
    t0 = time.perf_counter()
    ref = reference(domain, batch)
    print(f"  reference solve {time.perf_counter() - t0:.1f} s", flush=True)
    ratios = [b / o for o, b in zip(ours_t, base_t)]
    return {
        "ours_s": statistics.median(ours_t), "base_s": statistics.median(base_t),
        "ours_all": ours_t, "base_all": base_t,
        "ratio_of_medians": statistics.median(base_t) / statistics.median(ours_t),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ours_err": float((ours_out.double() - ref).abs().max()),
        "coarse_s": statistics.median(coarse_t), "coarse_all": coarse_t,
        "coarse_err": float((coarse_out.double() - ref).abs().max()),
        "coarse_ratio": statistics.median(base_t) / statistics.median(coarse_t),
        "base_err": float((base_out.double() - ref).abs().max()),
        "setup_s": setup_s, "nodes": int((mask != 0).sum()),
    }


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu} (shared with other work; load average {load} at the end of the run), "
            f"{platform.python_version()}, torch {torch.__version__}")


NOTES = (
    "How (a) gets there: Strang splitting with diffusion exact in the eigenbasis, Richardson-"
    "extrapolated over n and 2n steps (order 4 where the field is smooth), step counts per subject and "
    "component (each component's own rate; runs that have finished an interval drop out of the dense "
    "products), a finer step in the first visit interval only (the error of the other intervals is "
    "small because the field is smooth by then; the first one starts from the rough initial scan), "
    "and reaction flows whose backward pass uses the closed-form sensitivities of a scalar "
    "autonomous ODE (d phi/d u0 = f(phi)/f(u0), d phi/d s = f(phi)) instead of recording RK4 "
    "substeps. Row (a') is plain Strang with r dt <= 0.05, the previous default. What remains "
    "(torch.profiler, measured separately): about 55% of (a) is the dense (rows x n) @ (n x n) "
    "eigenbasis products (about 87 GFLOP/s on one core here, close to the core's peak), the rest "
    "element-wise reaction flows and autograd bookkeeping. A step costs O(N K n^2): time grows "
    "linearly with subjects and with the square of the active node count.")


def _mb(res: dict) -> str:
    """Peak memory of each step in one fresh process (they differ: allocator reuse, cold first step)."""
    return " / ".join(f"{p:.0f}" for p in res["peaks_mb"]) + " MB"


def markdown(args, comp, memory, scaling, wall_s) -> str:
    lines = [SECTION, "", "```bash", f".venv/bin/python benchmarks/bench_physics.py {' '.join(args.argv)}".rstrip(),
             "```", "",
             f"One training batch: {args.subjects} subjects x 3 components (fisher_kpp, saturating, zeldovich), "
             f"paper grid (32x32 disc, {comp['nodes']} active cells), t = 0, 6, 24, float32, D ~ U(0.01, 1), "
             "r ~ U(0.01, 0.1), both requiring grad; timed step = forward + `out.sum().backward()`. "
             f"Median of {args.reps} interleaved repetitions after a warm-up; torch threads = {args.threads}. "
             "Errors: max abs difference from a float64 dopri5 reference (rtol 1e-8, atol 1e-10) over "
             "all outputs. Memory: in a fresh subprocess, peak RSS during each of 3 successive steps minus "
             "the RSS after setup, before the first step (process memory: tensors, autograd graph, memory "
             "the allocator keeps; not tensor bytes).", "",
             "| implementation | fwd+bwd (median) | all reps (s) | max abs error | peak memory |",
             "|---|---|---|---|---|",
             f"| (a) ours: `solve` default (spectral) | {comp['ours_s']:.2f} s | "
             f"{', '.join(f'{t:.2f}' for t in comp['ours_all'])} | {comp['ours_err']:.1e} | "
             f"{_mb(memory['ours'])} |",
             f"| (b) torchdiffeq dopri5 (1e-3/1e-4), roll Laplacian, 1 odeint per component | {comp['base_s']:.2f} s | "
             f"{', '.join(f'{t:.2f}' for t in comp['base_all'])} | {comp['base_err']:.1e} | "
             f"{_mb(memory['baseline'])} |",
             "| (a') ours, plain Strang: `extrapolate=False, reaction_step=0.05, initial_reaction_step=0.05` | "
             f"{comp['coarse_s']:.2f} s | {', '.join(f'{t:.2f}' for t in comp['coarse_all'])} | "
             f"{comp['coarse_err']:.1e} | not measured |", "",
             f"Speed-up (b)/(a): **{comp['ratio_of_medians']:.1f}x** (ratio of medians; per-repetition "
             f"ratios {comp['ratio_min']:.1f}x to {comp['ratio_max']:.1f}x); plain Strang (a'): "
             f"{comp['coarse_ratio']:.1f}x. Target: >= 20x. "
             f"One-off eigendecomposition of the paper-grid Laplacian (cached per domain, not in the "
             f"step): {comp['setup_s']:.2f} s.", ""]
    lines += [NOTES, ""]
    if scaling:
        lines += [f"Scaling of (a): a fresh subprocess per row runs {args.scaling_reps} steps without warm-up "
                  "(the first is cold); 'best' is the fastest step, 'all' lists every step. The "
                  "eigendecomposition is one-off setup per domain (cached), listed apart:", "",
                  "| domain | active nodes | subjects | fwd+bwd best | all steps (s) | peak memory | setup (eigh) |",
                  "|---|---|---|---|---|---|---|"]
        for row in scaling:
            lines.append(f"| {row['label']} | {row['nodes']} | {row['subjects']} | {row['best_s']:.2f} s | "
                         f"{', '.join(f'{t:.2f}' for t in row['times'])} | {_mb(row)} | {row['setup_s']:.2f} s |")
        lines.append("")
    lines += [f"Machine: {machine()}. Whole benchmark wall time {wall_s:.0f} s. "
              f"Measured {time.strftime('%Y-%m-%d')}.", ""]
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    """Replace this benchmark's section in RESULTS.md (or append it), leaving other sections alone."""
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _m: text, old) if pattern.search(old) else old.rstrip() + "\n\n" + text
    path.write_text(new.lstrip("\n") if old else new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the comparison")
    parser.add_argument("--scaling-reps", type=int, default=2, help="steps per scaling row")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="2 reps; scaling only up to 256 subjects and 48^2")
    parser.add_argument("--max-subjects", type=int, default=1024,
                        help="largest batch in the scaling rows (1024 subjects needs ~15 GB RAM)")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--write-results", nargs="?", const=str(HERE / "RESULTS.md"), default=None,
                        metavar="PATH", help="update this benchmark's section of RESULTS.md")
    parser.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--child-grid", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--child-reps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.argv = [a for a in sys.argv[1:]]
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.reps = min(args.reps, 2)
    start = time.perf_counter()
    comp = compare(args)
    print(f"ours {comp['ours_s']:.3f} s, straightforward {comp['base_s']:.3f} s, ratio "
          f"{comp['ratio_of_medians']:.1f}x; errors {comp['ours_err']:.1e} / {comp['base_err']:.1e}", flush=True)
    memory = {kind: run_child(kind, args.subjects, 32, 3, args.threads) for kind in ("ours", "baseline")}
    print(f"peak memory per step: ours {memory['ours']['peaks_mb']} MB, straightforward "
          f"{memory['baseline']['peaks_mb']} MB ({memory['ours']['how']})", flush=True)
    scaling = []
    if not args.no_scaling:
        rows = [("paper grid 32^2", 32, 64), ("paper grid 32^2", 32, 256), ("paper grid 32^2", 32, 1024),
                ("disc 48^2", 48, 64), ("disc 64^2", 64, 64), ("3-D ball r=8 in 17^3", 0, 64)]
        rows = [r for r in rows if r[2] <= args.max_subjects]
        if args.quick:
            rows = [r for r in rows if r[2] <= 256 and r[1] in (32, 48)]
        for label, grid, subjects in rows:
            res = run_child("ours", subjects, grid, args.scaling_reps, args.threads)
            res.update(label=label, subjects=subjects)
            scaling.append(res)
            print(f"  {label}, {res['nodes']} nodes, {subjects} subjects: {res['median_s']:.2f} s, "
                  f"{res['peak_mb']:.0f} MB, setup {res['setup_s']:.2f} s", flush=True)
    text = markdown(args, comp, memory, scaling, time.perf_counter() - start)
    print("\n" + text)
    if args.write_results:
        write_results(Path(args.write_results), text)
        print(f"updated {args.write_results}")


if __name__ == "__main__":
    main()
