#!/usr/bin/env python3
"""How long `planner.optimize` takes over a 1 GiB sweep of budgets (issue #10's goal: <= 1 s on 2 cores).

Every shipped model on every shipped GPU profile (a40, a40x2: one rank of two, h200), budgets
from 10 GiB up to the GPU's memory in 1 GiB steps; a budget nothing fits is skipped. Prints the
median, 99th percentile and worst wall time and the slowest budgets (the ones
bench/test_planner_speed.py should time), and writes them with every plan's time to
bench/results/planner_sweep_<date>.json. CPU only.

    python bench/planner_sweep.py [--models mixtral-8x7b,qwen3-30b-a3b] [--gpus h200]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GPUS = ("a40", "a40x2", "h200")


def main() -> None:
    import planner
    import profiles
    from fluxmoe.errors import FluxMoEError
    from profiles.registry import list_models
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--gpus", default=",".join(GPUS))
    ap.add_argument("--slowest", type=int, default=10)
    a = ap.parse_args()
    jobs = []
    for model in a.models.split(","):
        for gpu in a.gpus.split(","):
            top = int(profiles.load_gpu(gpu).gpu_memory_bytes // 2**30)
            jobs += [(model, gpu, gib) for gib in range(10, top + 1)]
    rows = []
    for model, gpu, gib in tqdm(jobs, desc="plans"):
        profile = profiles.load(model, gpu=gpu)
        start = time.perf_counter()
        try:
            plan = planner.optimize(profile, f"{gib}GiB")
        except FluxMoEError:
            continue  # nothing fits this budget
        rows.append({"model": model, "gpu": gpu, "budget_gib": gib, "s": round(time.perf_counter() - start, 4),
                     "status": plan.solver_status})
    times = sorted(r["s"] for r in rows)
    summary = {"plans": len(rows), "median_s": statistics.median(times),
               "p99_s": times[min(len(times) - 1, int(0.99 * len(times)))], "worst_s": times[-1],
               "over_1s": sum(t > 1.0 for t in times)}
    slowest = sorted(rows, key=lambda r: -r["s"])[:a.slowest]
    report = {"what": "planner.optimize wall time over a 1 GiB budget sweep", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "summary": summary, "slowest": slowest, "plans": rows}
    path = os.path.join(ROOT, "bench", "results", f"planner_sweep_{report['date']}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{summary['plans']} plans: median {summary['median_s']:.3f} s, 99th percentile {summary['p99_s']:.3f} s, "
          f"worst {summary['worst_s']:.3f} s, {summary['over_1s']} over 1 s ({path})")
    print(f"{'model':<20} {'gpu':<6} {'budget':>7} {'s':>7}  status")
    for r in slowest:
        print(f"{r['model']:<20} {r['gpu']:<6} {r['budget_gib']:>5}Gi {r['s']:>7.3f}  {r['status']}")


if __name__ == "__main__":
    main()
