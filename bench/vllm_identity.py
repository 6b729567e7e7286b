#!/usr/bin/env python3
"""Greedy tokens and logprobs with the FluxMoE plugin against plain vLLM, bit for bit
(GPU machine, vLLM 0.26.0 carried as ../shared/device/README.md says).

For a small model folder: plain vLLM (eager, CUDA graphs), then the plugin with experts all in
the host tier, all host-compressed, all compressed, and mixed per layer and per expert (all
four tiers), at prefetch depths 0-2, host experts fetched whole or routed-only, in
eager mode and with CUDA graphs (full graphs for decode, piecewise for the prefill batch); and
a negative control (one resident expert negated after start-up) that must differ. Each run is
its own process (bench/vllm_run.py). Writes bench/results/vllm_identity_<model>_<date>.json
and prints a table.

    python3 bench/vllm_identity.py --model models/mixtral-tiny --base bench/plans/mixtral-tiny.json

On several GPUs every run, plain ones included, gets vLLM's split, and the base plan is one
rank's shard (issue #15; made with `fluxmoe plan --gpu h200x2 [--expert-parallel]`):

    python3 bench/vllm_identity.py --model models/mixtral-tiny --base bench/plans/mixtral-tiny-tp2.json \
        --tensor-parallel-size 2
    python3 bench/vllm_identity.py --model models/mixtral-tiny --base bench/plans/mixtral-tiny-ep2.json \
        --tensor-parallel-size 2 --expert-parallel
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.environ.get("FLUXMOE_RESULTS_DIR", os.path.join(ROOT, "bench", "results"))

from bench.vllm_run import launch  # noqa: E402
from fluxmoe.names import Tier  # noqa: E402
from planner.plan import LayerPlan, Plan  # noqa: E402

CYCLE = (Tier.RESIDENT, Tier.HOST, Tier.COMPRESSED, Tier.HOST_COMPRESSED)


def with_tiers(plan: Plan, tiers: dict[int, list[Tier]], depth: int) -> Plan:
    """The plan with these tiers per layer and this prefetch depth (the pool sized to fit)."""
    layers = [LayerPlan(layer=layer, resident=[e for e, t in enumerate(ts) if t is Tier.RESIDENT],
                        compressed=[e for e, t in enumerate(ts) if t is Tier.COMPRESSED],
                        host=[e for e, t in enumerate(ts) if t is Tier.HOST],
                        host_compressed=[e for e, t in enumerate(ts) if t is Tier.HOST_COMPRESSED])
              for layer, ts in tiers.items()]
    most = max(sum(t is not Tier.RESIDENT for t in ts) for ts in tiers.values())
    return dataclasses.replace(plan, layers=layers, prefetch_depth=depth, staging_slots=(depth + 1) * most)


def variants(plan: Plan) -> dict[str, Plan]:
    layers = sorted(lp.layer for lp in plan.layers)
    experts = plan.layers[0].num_experts
    every = lambda tier: {layer: [tier] * experts for layer in layers}  # noqa: E731
    per_layer = {layer: ([Tier.RESIDENT] * experts if i == 0 else [Tier.HOST] * experts if i == 1 else
                         [Tier.COMPRESSED] * experts if i == 2 else [CYCLE[e % len(CYCLE)] for e in range(experts)])
                 for i, layer in enumerate(layers)}
    per_expert = {layer: [CYCLE[(e + i) % len(CYCLE)] for e in range(experts)] for i, layer in enumerate(layers)}
    return {"host_d1": with_tiers(plan, every(Tier.HOST), 1),
            "host_compressed_d1": with_tiers(plan, every(Tier.HOST_COMPRESSED), 1),
            "compressed_d0": with_tiers(plan, every(Tier.COMPRESSED), 0),
            "per_layer_d1": with_tiers(plan, per_layer, 1),
            "per_expert_d2": with_tiers(plan, per_expert, 2),
            # Host experts fetched routed-only, after the router (executor/routed_fetch.py).
            "host_routed_d1": dataclasses.replace(with_tiers(plan, every(Tier.HOST), 1), routed_fetch=True),
            "per_expert_routed_d2": dataclasses.replace(with_tiers(plan, per_expert, 2), routed_fetch=True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--base", required=True, help="a plan for the model (any budget): its shapes and hashes")
    ap.add_argument("--only", default="", help="comma-separated run names")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--expert-parallel", action="store_true")
    a = ap.parse_args()
    base = Plan.load(a.base)
    if (base.tensor_parallel, base.expert_parallel) != (a.tensor_parallel_size,
                                                        a.tensor_parallel_size if a.expert_parallel else 1):
        raise SystemExit(f"--base: a plan for tensor_parallel={base.tensor_parallel}, expert_parallel="
                         f"{base.expert_parallel}; this run asks for {a.tensor_parallel_size}"
                         f"{' with expert parallel' if a.expert_parallel else ''}")
    split = ((f"_tp{a.tensor_parallel_size}" if a.tensor_parallel_size > 1 else "")
             + ("_ep" if a.expert_parallel else ""))
    name = os.path.basename(a.model.rstrip("/")) + split
    plans_dir = os.path.join(RESULTS, "plans")
    os.makedirs(plans_dir, exist_ok=True)
    paths = {}
    for key, plan in variants(base).items():
        paths[key] = os.path.join(plans_dir, f"{name}-{key}.json")
        plan.save(paths[key])
    common = ["--model", a.model, "--greedy", "--dummy-scale", "0.1", "--capture-sizes", "1,2,4,8,512", "--max-num-seqs", "8",
              "--num-prompts", "8", "--input-len", "64", "--output-len", "24"]
    if "qwen3-next" in name:
        common += ["--gdn-prefill-backend", "triton"]  # no flashinfer on the GPU machine
    if a.tensor_parallel_size > 1:
        common += ["--tensor-parallel-size", str(a.tensor_parallel_size)] + (["--expert-parallel"] if a.expert_parallel
                                                                              else [])
    runs = [("plain_graphs", [], "plain_graphs"), ("plain_eager", ["--eager"], "plain_eager"),
            ("plain_eager_again", ["--eager"], "plain_eager"),  # is plain vLLM itself repeatable?
            ("host_d1_graphs", ["--plan", paths["host_d1"]], "plain_graphs"),
            ("host_compressed_d1_graphs", ["--plan", paths["host_compressed_d1"]], "plain_graphs"),
            ("host_compressed_d1_eager", ["--plan", paths["host_compressed_d1"], "--eager"], "plain_eager"),
            ("compressed_d0_eager", ["--plan", paths["compressed_d0"], "--eager"], "plain_eager"),
            ("per_layer_d1_graphs", ["--plan", paths["per_layer_d1"]], "plain_graphs"),
            ("per_layer_d1_eager", ["--plan", paths["per_layer_d1"], "--eager"], "plain_eager"),
            ("per_expert_d2_graphs", ["--plan", paths["per_expert_d2"]], "plain_graphs"),
            ("host_routed_d1_graphs", ["--plan", paths["host_routed_d1"]], "plain_graphs"),
            ("host_routed_d1_eager", ["--plan", paths["host_routed_d1"], "--eager"], "plain_eager"),
            ("per_expert_routed_d2_graphs", ["--plan", paths["per_expert_routed_d2"]], "plain_graphs"),
            ("control_corrupted_d2_graphs", ["--plan", paths["per_expert_d2"], "--corrupt"], "plain_graphs")]
    if a.only:
        keep = set(a.only.split(",")) | {"plain_graphs", "plain_eager", "plain_eager_again"}
        runs = [r for r in runs if r[0] in keep]
    out_dir = RESULTS
    date = datetime.date.today().isoformat()
    results = {}
    with open(os.path.join(out_dir, f"vllm_identity_{name}_{date}.log"), "w") as log:
        for label, extra, _ in runs:
            results[label] = launch([*common, *extra, "--label", label], log)
            print(label, "error" if "error" in results[label] else "ok", flush=True)
    rows = []
    for label, _, reference in runs:
        r, ref = results[label], results.get(reference, {})
        if "error" in r or "error" in ref:
            rows.append((label, reference, "ERROR", r.get("error") or ref.get("error"), None))
            continue
        same_tokens = r["tokens"] == ref["tokens"]
        same_logprobs = r["logprobs"] == ref["logprobs"]
        rows.append((label, reference, same_tokens, same_logprobs, r["startup_s"]))
    # The device machine's copy of the tree carries stale git metadata: pass FLUXMOE_COMMIT there.
    commit = os.environ.get("FLUXMOE_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                capture_output=True, text=True, cwd=ROOT).stdout.strip()
    device = next((r["gpu"] for r in results.values() if "gpu" in r), "?")
    report = {"what": "greedy tokens and logprobs, plugin vs plain vLLM 0.26.0, same dummy weights",
              "model": a.model, "device": device, "date": date, "commit": commit,
              "rows": [dict(run=r[0], reference=r[1], same_tokens=r[2], same_logprobs=r[3], startup_s=r[4])
                       for r in rows],
              "runs": {k: {kk: vv for kk, vv in v.items() if kk not in ("tokens", "logprobs")} for k, v in results.items()}}
    with open(os.path.join(out_dir, f"vllm_identity_{name}_{date}.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{'run':32} {'vs':14} {'tokens':>7} {'logprobs':>9} {'start s':>8}")
    for r in rows:
        print(f"{r[0]:32} {r[1]:14} {str(r[2]):>7} {str(r[3])[:60]:>9} {str(r[4]):>8}")


if __name__ == "__main__":
    main()
