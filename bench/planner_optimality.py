#!/usr/bin/env python3
"""How far the planner's pick is from what a much deeper search finds (issue #10: a plan users
can trust): on every Nth budget of the 1 GiB sweep (bench/planner_sweep.py), `planner.optimize`
as shipped (MILPs stopped at MILP_NODE_LIMIT nodes) against the same search with MILPs given
`--nodes` nodes. Both keep the 1% gap, so "deep" is the best within the gap the search can
prove, not a brute-force optimum. Writes bench/results/planner_optimality_<date>.json; prints
the summary and the budgets furthest below the deep search last. CPU only, a few minutes.

    python bench/planner_optimality.py [--every 6] [--nodes 20000]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GPUS = ("a40", "a40x2", "h200")


def main() -> None:
    import planner
    import profiles
    from fluxmoe.errors import FluxMoEError
    from planner import search
    from profiles.registry import list_models
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=6, help="every Nth budget of the sweep")
    ap.add_argument("--nodes", type=int, default=20000, help="node limit of the deep search's MILPs")
    ap.add_argument("--worst", type=int, default=10)
    a = ap.parse_args()
    jobs = [(model, gpu, gib) for model in list_models() for gpu in GPUS
            for gib in range(10, int(profiles.load_gpu(gpu).gpu_memory_bytes // 2**30) + 1)][::a.every]
    shipped_nodes, shipped_limit = search.MILP_NODE_LIMIT, search.MILP_SAFETY_TIME_LIMIT_S
    rows = []
    for model, gpu, gib in tqdm(jobs, desc="budgets"):
        profile = profiles.load(model, gpu=gpu)
        row = {"model": model, "gpu": gpu, "budget_gib": gib}
        try:
            for name, nodes, limit in (("shipped", shipped_nodes, shipped_limit), ("deep", a.nodes, 60.0)):
                search.MILP_NODE_LIMIT, search.MILP_SAFETY_TIME_LIMIT_S = nodes, limit
                start = time.perf_counter()
                plan = planner.optimize(profile, f"{gib}GiB")
                row[name] = {"output_tokens_per_s": plan.predicted.output_tokens_per_s,
                             "s": round(time.perf_counter() - start, 3), "status": plan.solver_status}
        except FluxMoEError:
            continue  # nothing fits this budget
        finally:
            search.MILP_NODE_LIMIT, search.MILP_SAFETY_TIME_LIMIT_S = shipped_nodes, shipped_limit
        row["shipped_vs_deep"] = row["shipped"]["output_tokens_per_s"] / row["deep"]["output_tokens_per_s"] - 1
        rows.append(row)
    ratios = sorted(r["shipped_vs_deep"] for r in rows)
    summary = {"budgets": len(rows), "below_deep_over_0.5%": sum(x < -0.005 for x in ratios),
               "below_deep_over_1%": sum(x < -0.01 for x in ratios), "worst": ratios[0],
               "above_deep_over_0.5%": sum(x > 0.005 for x in ratios), "deep_nodes": a.nodes,
               "shipped_nodes": shipped_nodes}
    report = {"what": "planner.optimize as shipped against MILPs with many more nodes, every "
                      f"{a.every}th budget of the 1 GiB sweep", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "summary": summary, "rows": rows}
    path = os.path.join(ROOT, "bench", "results", f"planner_optimality_{report['date']}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{summary['budgets']} budgets ({path}): shipped below deep by >0.5% at {summary['below_deep_over_0.5%']}, "
          f">1% at {summary['below_deep_over_1%']}, worst {summary['worst']:+.2%}; above deep by >0.5% at "
          f"{summary['above_deep_over_0.5%']}")
    print(f"{'model':<20} {'gpu':<6} {'budget':>7} {'shipped':>9} {'deep':>9} {'diff':>7}  shipped status")
    for r in sorted(rows, key=lambda r: r["shipped_vs_deep"])[:a.worst]:
        print(f"{r['model']:<20} {r['gpu']:<6} {r['budget_gib']:>5}Gi {r['shipped']['output_tokens_per_s']:>9.1f} "
              f"{r['deep']['output_tokens_per_s']:>9.1f} {r['shipped_vs_deep']:>+7.2%}  {r['shipped']['status']}")


if __name__ == "__main__":
    main()
