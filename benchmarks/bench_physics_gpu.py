"""Benchmark: the physics step of ``bench_physics.py`` on a CUDA GPU, against the same machine's CPU.

    python benchmarks/bench_physics_gpu.py --json physics_gpu.json

The step is the training batch of ``bench_physics.py`` (paper grid, 3 components, visits 0, 6, 24,
float32, forward + backward) for N subjects. For each N: ours (``solve`` defaults) on the GPU and on
the host CPU (all its cores), and the dopri5/roll baseline on the GPU for the smaller N; the median
of ``--reps`` repetitions after one warm-up, with ``torch.cuda.synchronize`` around each GPU step.
Max abs error against the float64 reference for the first N; peak GPU memory of each GPU step
(``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_physics import baseline_step, disc_problem, make_batch, ours_step, reference  # noqa: E402

from pyrovae_pde.physics import GridDomain  # noqa: E402


def on(batch: dict, device: str) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def timed(step, device: str, reps: int) -> tuple[float, torch.Tensor, float]:
    """Median seconds of ``step()`` over ``reps`` after a warm-up, its last output, peak GPU GB."""
    out = step()
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    return statistics.median(times), out, peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--baseline-max", type=int, default=256, help="largest N for the dopri5 baseline")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("CUDA is not available on this machine")
    mask, u0 = disc_problem(32)
    domain = GridDomain(mask)
    rows = []
    for n in args.subjects:
        batch = make_batch(mask, u0, n)
        gpu = on(batch, "cuda")
        row = {"subjects": n}
        row["ours_gpu_s"], ours_out, row["ours_gpu_peak_gb"] = timed(lambda gpu=gpu: ours_step(domain, gpu), "cuda",
                                                                     args.reps)
        row["ours_cpu_s"], _, _ = timed(lambda batch=batch: ours_step(domain, batch), "cpu", max(1, args.reps // 2))
        if n <= args.baseline_max:
            row["dopri5_gpu_s"], base_out, row["dopri5_gpu_peak_gb"] = timed(lambda gpu=gpu: baseline_step(gpu), "cuda",
                                                                              args.reps)
            if n == args.subjects[0]:
                ref = reference(domain, batch)
                row["ours_max_error"] = float((ours_out.cpu().double() - ref).abs().max())
                row["dopri5_max_error"] = float((base_out.cpu().double() - ref).abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
