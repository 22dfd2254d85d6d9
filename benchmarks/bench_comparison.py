"""Model comparison that holds up (issue: comparison): how often `compare` names the generating structure.

For every setting (benchmark, data, cohort size, noise, prior, data seed) a cohort is simulated from a
single PDE or from the two-mechanism mixture, and three models are compared exactly as
`pyrovae-pde compare` does it (each fitted ``--repeats`` times with the default training, then
evidence by quadrature with the globals integrated, PSIS-LOO, K-fold CV, verdict):

* graph (68-region connectome, 2-5 irregular visits): fisher_kpp, diffusion, fisher_kpp+diffusion;
* paper-grid (32x32 disc, visits 0, 6, 24): fisher_kpp, zeldovich, fisher_kpp+zeldovich.

Priors: ``matched`` (the simulator's ranges as the central 95% intervals) or ``default`` (derived
from the cohort's follow-up and Laplacian). One JSON line per setting goes to ``--json``; settings
already there are skipped (so a run can be resumed or split with ``--shard I/N``);
``--summary`` prints the tables of RESULTS.md from that file.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_comparison.py --benchmark graph --json cmp.jsonl --shard 0/2 &
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_comparison.py --benchmark graph --json cmp.jsonl --shard 1/2
    .venv/bin/python benchmarks/bench_comparison.py --summary cmp.jsonl
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

SETTINGS = {
    "graph": dict(mechanisms=("fisher_kpp", "diffusion"), matched={"diffusivity": (0.05, 1.0), "reaction": (0.1, 1.0)}),
    "paper-grid": dict(mechanisms=("fisher_kpp", "zeldovich"),
                       matched={"diffusivity": (0.01, 1.0), "reaction": (0.01, 0.1)}),
}


def key(cfg: dict) -> str:
    return "|".join(str(cfg[k]) for k in ("benchmark", "data", "subjects", "noise", "prior", "seed"))


def configs(args) -> list[dict]:
    out = []
    for bench in args.benchmark:
        a, b = SETTINGS[bench]["mechanisms"]
        for n, noise, prior, seed, data in itertools.product(args.sizes, args.noise, args.priors, args.seeds,
                                                             (a, b, f"{a},{b}")):
            if args.data and data not in args.data:
                continue
            out.append({"benchmark": bench, "data": data, "subjects": n, "noise": noise, "prior": prior, "seed": seed})
    return out


def run_one(cfg: dict, repeats: int, folds: int, draws: int, population: str = "base") -> dict:
    import torch

    from pyrovae_pde.data import simulate
    from pyrovae_pde.interfaces.api import SubtypeModel, compare

    s = SETTINGS[cfg["benchmark"]]
    a, b = s["mechanisms"]
    components = tuple(cfg["data"].split(","))
    # data seeds are offset per data type so that the three data sets of a seed are independent
    data_seed = 1000 * (1 + ["single-a", "single-b", "mixture"].index(
        "mixture" if len(components) == 2 else ("single-a" if components[0] == a else "single-b"))) + cfg["seed"]
    ds = simulate(cfg["benchmark"], cfg["subjects"], seed=data_seed, noise_sd=cfg["noise"], components=components)
    priors = s["matched"] if cfg["prior"] == "matched" else None
    runs, fit_seconds = {}, 0.0
    for name in (a, b, f"{a},{b}"):
        for r in range(repeats):
            start = time.perf_counter()
            model = SubtypeModel(name, priors=priors).fit(ds, seed=r, progress=False, amortize_steps=0)
            fit_seconds += time.perf_counter() - start
            runs.setdefault(name, []).append(model)
    start = time.perf_counter()
    result = compare(runs, ds, n_draws=draws, seed=0, folds=folds, source="bench", population=population)
    compare_seconds = time.perf_counter() - start
    table = result.table.set_index("model")
    models = {}
    for name in table.index:
        row = table.loc[name]
        evs = result.evidences[name]
        models[name] = {"log_evidence": float(row["log_evidence"]), "se": float(row["log_evidence_se"]),
                        "mc_se": float(row["mc_se"]), "fit_spread": float(row["fit_spread"]),
                        "status": row["status"], "rank": None if np.isnan(row["rank"]) else int(row["rank"]),
                        "repeats": [e.log_evidence for e in evs], "repeat_se": [e.log_evidence_se for e in evs],
                        "elpd_loo": float(row["elpd_loo"]), "elpd_cv": float(row["elpd_cv"]),
                        "max_pareto_k": float(row["max_pareto_k"])}
    truth = cfg["data"]
    ranked = result.table[result.table["status"] == "ranked"]
    first = ranked.iloc[0]["model"] if len(ranked) else None
    z = float(ranked.iloc[1]["z"]) if len(ranked) > 1 else math.nan
    decided = result.verdict.startswith("verdict: ") and not result.verdict.startswith("verdict: not decided") \
        and not result.verdict.startswith("verdict: none")
    return {**cfg, "truth": truth, "first": first, "decided": decided, "z": z, "verdict": result.verdict,
            "correct": first == truth and decided, "wrong": decided and first != truth,
            "not_decided": not decided, "warnings": result.warnings, "models": models,
            "fit_seconds": round(fit_seconds, 1), "compare_seconds": round(compare_seconds, 1),
            "torch_threads": torch.get_num_threads()}


def _outcome(r: dict) -> str:
    """correct (the truth first, decided against another ranked model), single (only one model
    ranked: no comparison was made), undecided, or wrong."""
    if "the only model ranked" in r["verdict"] or r["verdict"].startswith("verdict: none"):
        return "single"
    if r["verdict"].startswith("verdict: not decided"):
        return "undecided"
    return "correct" if r["first"] == r["truth"] else "wrong"


def summary(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    print(f"{len(rows)} settings\n")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["benchmark"], r["data"], r["subjects"], r["noise"], r["prior"]), []).append(r)
    print("| benchmark | data | subjects | noise | prior | seeds | first & decided | only one ranked | not decided | "
          "wrong (z > 3) | repeats within 2 SE: all, ranked | median z | compare s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    agree_all, agree_ranked_all = [], []
    for k in sorted(groups):
        g = groups[k]
        agree, agree_ranked = [], []
        for r in g:
            for m in r["models"].values():
                v, se = m["repeats"], m["repeat_se"]
                if len(v) > 1:
                    ok = abs(v[0] - v[1]) <= 2 * math.hypot(se[0], se[1])
                    agree.append(ok)
                    if m["status"] == "ranked":
                        agree_ranked.append(ok)
        agree_all += agree
        agree_ranked_all += agree_ranked
        outcomes = [_outcome(r) for r in g]
        wrong3 = sum(o == "wrong" and r["z"] > 3 for o, r in zip(outcomes, g))
        zs = [r["z"] for r, o in zip(g, outcomes) if o == "correct" and np.isfinite(r["z"])]
        print(f"| {' | '.join(str(x) for x in k)} | {len(g)} | {outcomes.count('correct')} | "
              f"{outcomes.count('single')} | {outcomes.count('undecided')} | {outcomes.count('wrong')} ({wrong3}) | "
              f"{np.mean(agree) if agree else float('nan'):.2f}, "
              f"{np.mean(agree_ranked) if agree_ranked else float('nan'):.2f} | "
              f"{np.median(zs) if zs else float('nan'):.1f} | "
              f"{np.median([r['fit_seconds'] + r['compare_seconds'] for r in g]):.0f} |")
    outcomes = [_outcome(r) for r in rows]
    print(f"\nall: {outcomes.count('correct')}/{len(rows)} first and decided, {outcomes.count('single')} with only "
          f"one model ranked, {outcomes.count('undecided')} not decided, {outcomes.count('wrong')} wrong "
          f"({sum(o == 'wrong' and r['z'] > 3 for o, r in zip(outcomes, rows))} at z > 3); repeats within 2 SE: "
          f"{np.mean(agree_all) if agree_all else float('nan'):.3f} of {len(agree_all)} (ranked models: "
          f"{np.mean(agree_ranked_all) if agree_ranked_all else float('nan'):.3f} of {len(agree_ranked_all)})")
    for r, o in zip(rows, outcomes):
        if o != "correct":
            print(f"- {key(r)}: {r['verdict']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", nargs="+", choices=sorted(SETTINGS), default=["graph"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--priors", nargs="+", choices=("matched", "default"), default=["matched", "default"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--evidence-population", choices=("base", "learned"), default="base",
                        help="population priors the models are compared under (compare's option)")
    parser.add_argument("--data", nargs="+", help="only these data types (e.g. diffusion fisher_kpp,diffusion)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th setting starting at I")
    parser.add_argument("--json", help="append one JSON line per setting (settings already there are skipped)")
    parser.add_argument("--summary", metavar="JSONL", help="print the summary tables of a results file and exit")
    args = parser.parse_args(argv)
    if args.summary:
        summary(args.summary)
        return 0
    done = set()
    if args.json and Path(args.json).exists():
        done = {key(json.loads(line)) for line in open(args.json)}
    index, count = (int(v) for v in args.shard.split("/"))
    todo = [c for i, c in enumerate(configs(args)) if i % count == index and key(c) not in done]
    print(f"{len(todo)} settings to run", flush=True)
    for cfg in todo:
        res = run_one(cfg, args.repeats, args.folds, args.draws, args.evidence_population)
        res["evidence_population"] = args.evidence_population
        line = json.dumps(res, default=float)
        print(json.dumps({k: res[k] for k in ("benchmark", "data", "subjects", "noise", "prior", "seed", "first",
                                                "decided", "z", "fit_seconds", "compare_seconds")}), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
