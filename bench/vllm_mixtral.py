#!/usr/bin/env python3
"""Full Mixtral-8x7B shape on the H200 inside vLLM 0.26.0 (dummy weights, CUDA graphs):
plain vLLM, the plugin with everything resident (its overhead), and the plugin at a 46 GiB
budget, each with its KV cache, start-up time and throughput on 256 x (512 in, 128 out).
Runs are separate processes (bench/vllm_run.py), one after the other; results are kept as
they come in bench/results/vllm_mixtral_<date>.json, and a table is printed last.

    python3 bench/vllm_mixtral.py [--only plain,resident,budget46]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.environ.get("FLUXMOE_RESULTS_DIR", os.path.join(ROOT, "bench", "results"))

from bench.vllm_identity import run  # noqa: E402

RUNS = {
    "plain": ["--util", "0.9"],
    "resident": ["--plan", "bench/plans/mixtral-8x7b-full.json", "--util", "0.9"],
    "budget46": ["--plan", "bench/plans/mixtral-8x7b-46gib.json"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(RUNS))
    ap.add_argument("--num-prompts", default="256")
    a = ap.parse_args()
    import profiles

    spec = profiles.load_model(os.path.join(ROOT, "models", "mixtral-8x7b"))
    date = datetime.date.today().isoformat()
    out = os.path.join(RESULTS, f"vllm_mixtral_{date}.json")
    # The device machine's copy of the tree carries stale git metadata: pass FLUXMOE_COMMIT there.
    commit = os.environ.get("FLUXMOE_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                capture_output=True, text=True, cwd=ROOT).stdout.strip()
    report = {"what": "Mixtral-8x7B shape, vLLM 0.26.0, dummy weights, CUDA graphs, 256 x (512 in, 128 out)",
              "date": date, "commit": commit, "runs": {}}
    common = ["--model", "models/mixtral-8x7b", "--num-prompts", a.num_prompts, "--input-len", "512",
              "--output-len", "128", "--max-model-len", "2048"]
    with open(os.path.join(RESULTS, f"vllm_mixtral_{date}.log"), "a") as log:
        for name in a.only.split(","):
            r = run([*common, *RUNS[name], "--label", name], log)
            if "kv_tokens" in r:
                r["kv_bytes"] = r["kv_tokens"] * spec.kv_bytes_per_token
                if "fluxmoe" in r:
                    r["kv_vs_plan"] = round(r["kv_bytes"] / r["fluxmoe"]["plan_kv_bytes"] - 1, 4)
            report["runs"][name] = r
            report["device"] = r.get("gpu", report.get("device"))
            with open(out, "w") as f:
                json.dump(report, f, indent=1)
            print(name, json.dumps(r)[:400], flush=True)
    runs = report["runs"]
    if "plain" in runs and "resident" in runs and "total_tok_s" in runs["plain"] and "total_tok_s" in runs["resident"]:
        report["resident_over_plain"] = round(runs["resident"]["total_tok_s"] / runs["plain"]["total_tok_s"], 4)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{'run':10} {'start s':>8} {'KV GiB':>8} {'KV vs plan':>10} {'total tok/s':>12} {'output tok/s':>12}")
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:10} ERROR {r['error'][:200]}")
            continue
        print(f"{name:10} {r['startup_s']:>8} {r['kv_bytes'] / 2**30:>8.2f} {str(r.get('kv_vs_plan', '-')):>10} "
              f"{r['total_tok_s']:>12} {r['output_tok_s']:>12}")
    if "resident_over_plain" in report:
        print(f"plugin (all resident) / plain vLLM throughput: {report['resident_over_plain']}")


if __name__ == "__main__":
    main()
