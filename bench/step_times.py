#!/usr/bin/env python3
"""Where the simulator's step model and vLLM's steps part ways, step by step (issue #12).

On the GPU machine (vLLM 0.26.0 carried): each run is bench/vllm_run.py with --step-log, in
its own process, so its engine's every step is recorded: when it was scheduled, its tokens,
sequences and context. Results go to bench/results/step_times_<date>.json after each run.

    python3 bench/step_times.py --runs plain_short,plain_long

On any machine: the recorded steps beside the cost model's time for the same step shapes
(planner/cost_model.py, as the simulator takes them), summed by kind of step: prefill chunks
(tokens beyond one per sequence) and pure decode steps, by batch size.

    python3 bench/step_times.py --analyze bench/results/step_times_<date>.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.environ.get("FLUXMOE_RESULTS_DIR", os.path.join(ROOT, "bench", "results"))

RUNS = {  # name: vllm_run.py options
    "plain_short": ["--model", "models/mixtral-8x7b", "--util", "0.9", "--num-prompts", "256", "--input-len", "512",
                    "--output-len", "128", "--max-model-len", "2048"],
    "plain_long": ["--model", "models/mixtral-8x7b", "--util", "0.9", "--num-prompts", "128", "--input-len", "4096",
                   "--output-len", "512", "--max-model-len", "4608"],
    "resident_long": ["--model", "models/mixtral-8x7b", "--plan", "bench/plans/mixtral-8x7b-full.json", "--util", "0.9",
                      "--num-prompts", "128", "--input-len", "4096", "--output-len", "512", "--max-model-len", "4608"],
    "plain_short_twice": ["--model", "models/mixtral-8x7b", "--util", "0.9", "--num-prompts", "256", "--input-len",
                          "512", "--output-len", "128", "--max-model-len", "2048", "--repeat", "2"],
    "plain_long_twice": ["--model", "models/mixtral-8x7b", "--util", "0.9", "--num-prompts", "128", "--input-len",
                         "4096", "--output-len", "512", "--max-model-len", "4608", "--repeat", "2"],
    "resident_long_twice": ["--model", "models/mixtral-8x7b", "--plan", "bench/plans/mixtral-8x7b-full.json", "--util",
                            "0.9", "--num-prompts", "128", "--input-len", "4096", "--output-len", "512",
                            "--max-model-len", "4608", "--repeat", "2"],
    "resident_short_twice": ["--model", "models/mixtral-8x7b", "--plan", "bench/plans/mixtral-8x7b-full.json",
                             "--util", "0.9", "--num-prompts", "256", "--input-len", "512", "--output-len", "128",
                             "--max-model-len", "2048", "--repeat", "2"],
    "standin_plan_twice": ["--model", "models/mixtral-8x7b-8layers", "--plan",
                           "bench/plans/mixtral-8x7b-8layers-a40-4tier.json", "--num-prompts", "256", "--input-len",
                           "512", "--output-len", "128", "--max-model-len", "2048", "--repeat", "2"],
    "standin_plain": ["--model", "models/mixtral-8x7b-8layers", "--util", "0.9", "--num-prompts", "256",
                      "--input-len", "512", "--output-len", "128", "--max-model-len", "2048"],
}


def measure(names: list[str], timeout_s: float) -> str:
    from bench.vllm_run import launch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = dict(what="vLLM 0.26.0 engine steps (bench/vllm_run.py --step-log), dummy weights, CUDA graphs",
               date=datetime.date.today().isoformat(), commit=commit, runs={})
    path = os.path.join(RESULTS, f"step_times_{out['date']}.json")
    os.makedirs(RESULTS, exist_ok=True)
    if os.path.exists(path):  # runs of the same day add to it
        out["runs"] = json.load(open(path))["runs"]
    with open(os.path.join(RESULTS, f"step_times_{out['date']}.log"), "a") as log:
        for name in names:
            result = launch([*RUNS[name], "--step-log", "--label", name], log, timeout_s)
            result.pop("probe", None)
            out["runs"][name] = result
            out["device"] = result.get("gpu", out.get("device", ""))
            with open(path, "w") as f:
                json.dump(out, f, indent=1)
            print(name, {k: result.get(k) for k in ("error", "startup_s", "elapsed_s", "output_tok_s", "kv_tokens")},
                  flush=True)
    return path


def compare(run: dict) -> list[dict]:
    """Per kind of step (prefill chunks, decode by batch): measured seconds against the cost
    model's for the same shapes. A step's time is until the next one is scheduled (the last:
    until the run's end). vLLM 0.26 schedules asynchronously, so a schedule can come before the
    step before it has ended (two equal prefill steps of the stand-in: 190 ms, then 25 ms;
    bench/NOTES.md, session 11): the split between kinds is approximate, the "all" row is the
    measurement. Kernel times per step: vllm_run.py --kernel-profile."""
    import profiles
    from planner.cost_model import CostModel, StepShape

    profile = profiles.Profile(profiles.load_model(os.path.join(ROOT, run["model"])), profiles.load_gpu("h200"))
    cost = CostModel(profile)
    step_s = _step_model(run, profile, cost)
    steps = run["steps"]
    ends = [s[0] for s in steps[1:]] + [run["elapsed_s"]]
    groups: dict[str, dict] = {}
    for (start, tokens, seqs, context), end in zip(steps, ends):
        shape = StepShape(tokens, seqs, context / seqs)
        model = step_s(shape)
        if tokens > seqs:
            kind = "prefill chunks"
        else:
            kind = f"decode, batch {'<64' if seqs < 64 else '64-191' if seqs < 192 else '>=192'}"
        g = groups.setdefault(kind, dict(kind=kind, steps=0, tokens=0, measured_s=0.0, model_s=0.0))
        g["steps"] += 1
        g["tokens"] += tokens
        g["measured_s"] += end - start
        g["model_s"] += model
    rows = sorted(groups.values(), key=lambda g: g["kind"])
    rows.append(dict(kind="all", **{k: sum(g[k] for g in rows) for k in ("steps", "tokens", "measured_s", "model_s")}))
    for g in rows:
        g["model_error"] = g["model_s"] / g["measured_s"] - 1
    return rows


def _step_model(run: dict, profile, cost) -> Callable:
    """The step time the simulator gives this run's system: a FluxMoE plan's, vLLM's UVA offload
    (the bytes it really moves), the prefetch offloader's steady step, or plain vLLM's."""
    from planner.memory import MemoryModel
    from planner.plan import Plan
    from simulator.prefetch_offload import PrefetchOffload

    settings = run.get("settings", {})
    if run.get("plan"):
        plan = Plan.load(os.path.join(ROOT, run["plan"]))
        return lambda shape: cost.step_time(plan.tier_counts(), shape, plan.prefetch_depth).total_s
    if settings.get("cpu_offload_gb"):
        moved = MemoryModel.of(profile).uva_offloaded_bytes(int(settings["cpu_offload_gb"] * 2**30))
        return lambda shape: cost.offload_step_time(shape, moved).total_s
    if settings.get("offload_backend") == "prefetch":
        setting = PrefetchOffload(settings["offload_group_size"], settings["offload_num_in_group"],
                                  settings["offload_prefetch_step"])
        return lambda shape: setting.steady_step_s(cost, shape)
    return lambda shape: cost.resident_step_time(shape).total_s


def analyze(path: str) -> None:
    data = json.load(open(path))
    for name, run in data["runs"].items():
        if "steps" not in run:
            print(f"{name}: no steps ({run.get('error', 'not recorded')})")
            continue
        print(f"\n{name}: {run['model']}{' with ' + run['plan'] if run.get('plan') else ''}, "
              f"{run['output_tok_s']} output tok/s measured, {len(run['steps'])} steps")
        print(f"  {'steps':<24} {'n':>5} {'tokens':>8} {'measured s':>11} {'model s':>9} {'model err':>10}")
        for g in compare(run):
            print(f"  {g['kind']:<24} {g['steps']:>5} {g['tokens']:>8} {g['measured_s']:>11.3f} {g['model_s']:>9.3f} "
                  f"{g['model_error']:>+10.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="plain_short", help=f"comma-separated, of: {', '.join(RUNS)}")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per run")
    ap.add_argument("--analyze", default="", help="a step_times JSON: the table, no GPU needed")
    a = ap.parse_args()
    if a.analyze:
        analyze(a.analyze)
        return
    unknown = [n for n in a.runs.split(",") if n not in RUNS]
    if unknown:
        raise SystemExit(f"--runs: unknown {unknown}; known: {', '.join(RUNS)}")
    analyze(measure(a.runs.split(","), a.timeout))


if __name__ == "__main__":
    main()
