"""Benchmark: import a 200-subject x 3-visit cohort of 2 mm MNI-sized PET NIfTI images.

    .venv/bin/python benchmarks/bench_import.py [--subjects 200] [--visits 3] [--cache DIR]

The cohort is written once (int16 .nii.gz with a float scale factor, 91 x 109 x 91 voxels, the
FSL MNI152 2 mm affine, LAS) into ``--cache`` (default /tmp/pyrovae_bench_import) and reused by later
runs. The timed part is the command a user runs,

    pyrovae-pde import manifest.csv --mask mni-gm --reference cerebellum.nii.gz --out DATA.nc

end to end in a fresh process (startup, nilearn's grey-matter mask onto the scans' grid, reading and
normalising every scan with the progress bar, validation, atomic NetCDF write). No resampling: the
scans share one grid. Prints a markdown row for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = (91, 109, 91)
AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


def world_coords() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ijk = np.indices(SHAPE, dtype=np.float32)
    x = AFFINE[0, 0] * ijk[0] + AFFINE[0, 3]
    y = AFFINE[1, 1] * ijk[1] + AFFINE[1, 3]
    z = AFFINE[2, 2] * ijk[2] + AFFINE[2, 3]
    return x, y, z


def build_cohort(root: Path, n_subjects: int, n_visits: int, seed: int = 0) -> Path:
    """Write the cohort (once); returns the manifest. A file ``complete`` marks a finished cache."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    manifest = root / f"manifest_{n_subjects}x{n_visits}.csv"
    done = root / f"complete_{n_subjects}x{n_visits}"
    if done.exists():
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y, z = world_coords()
    brain = ((x / 80) ** 2 + ((y + 18) / 105) ** 2 + ((z - 10) / 85) ** 2) <= 1.0
    cerebellum = (np.abs(x) < 40) & (y > -85) & (y < -45) & (z > -50) & (z < -30)
    nib.save(nib.Nifti1Image(cerebellum.astype(np.uint8), AFFINE), str(root / "cerebellum.nii.gz"))
    cortex = gaussian_filter(rng.random(SHAPE).astype(np.float32), 3.0)
    cortex = (cortex - cortex.min()) / (cortex.max() - cortex.min())
    rows = []
    for s in range(n_subjects):
        subject = f"sub-{s:04d}"
        seed_centre = np.array([rng.uniform(-50, 50), rng.uniform(-80, 50), rng.uniform(-20, 60)])
        spread = np.exp(-((x - seed_centre[0]) ** 2 + (y - seed_centre[1]) ** 2 + (z - seed_centre[2]) ** 2)
                        / (2 * 25.0 ** 2))
        for v in range(n_visits):
            t = 1.5 * v
            level = rng.uniform(5000, 15000)  # Bq/ml-like scanner units
            uptake = 1.0 + 0.4 * cortex + 0.8 * spread * (1 - np.exp(-0.5 * (t + 1)))
            image = level * np.where(brain, uptake, 0.1) * (1 + 0.03 * rng.standard_normal(SHAPE, dtype=np.float32))
            image[cerebellum] = level * (1 + 0.03 * rng.standard_normal(int(cerebellum.sum())))
            img = nib.Nifti1Image(image.astype(np.float32), AFFINE)
            img.set_data_dtype(np.int16)  # stored as int16 + scl_slope, as many PET exports are
            name = f"{subject}/{subject}_ses-{v}_pet.nii.gz"
            (root / subject).mkdir(exist_ok=True)
            nib.save(img, str(root / name))
            rows.append({"subject": subject, "time": t, "image": name})
        if (s + 1) % 20 == 0:
            print(f"  wrote {s + 1}/{n_subjects} subjects", file=sys.stderr)
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["subject", "time", "image"])
        writer.writeheader()
        writer.writerows(rows)
    done.write_text("ok\n")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--visits", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/pyrovae_bench_import"))
    parser.add_argument("--keep-output", action="store_true", help="keep the imported NetCDF file")
    args = parser.parse_args()

    start = time.perf_counter()
    manifest = build_cohort(args.cache, args.subjects, args.visits)
    print(f"cohort ready in {time.perf_counter() - start:.1f} s: {manifest}", file=sys.stderr)
    size = sum(p.stat().st_size for p in args.cache.rglob("*.nii.gz")) / 2 ** 20
    out = args.cache / "imported.nc"
    exe = Path(sys.executable).with_name("pyrovae-pde")
    command = [str(exe), "import", str(manifest), "--mask", "mni-gm", "--reference",
               str(args.cache / "cerebellum.nii.gz"), "--out", str(out)]
    start = time.perf_counter()
    result = subprocess.run(command, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        print(f"import failed with status {result.returncode}", file=sys.stderr)
        return result.returncode
    out_size = out.stat().st_size / 2 ** 20
    if not args.keep_output:
        os.remove(out)
    n_scans = args.subjects * args.visits
    print(f"\nimport of {args.subjects} subjects x {args.visits} visits ({n_scans} scans, {SHAPE}, "
          f"{size:.0f} MiB of .nii.gz) took {elapsed:.1f} s ({1000 * elapsed / n_scans:.0f} ms/scan); "
          f"output {out_size:.0f} MiB")
    print(f"| {args.subjects} x {args.visits} | {n_scans} | {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} (2 mm) | "
          f"{elapsed:.1f} s | {out_size:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
