"""Writes notebooks/what_if_capacity.ipynb (cells kept here, reviewable as code). Run to regenerate."""

from pathlib import Path

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell("""# What-if: throughput against GPU memory budget

FluxMoE against plain vLLM and vLLM with CPU weight offload (vLLM-O), simulated with the
SimPy serving model on the shipped profiles: Mixtral-8x7B and Qwen3-Next-80B-A3B, on an A40
(and two A40s in tensor parallel, budgets per GPU) and on an H200. Each point: `planner.optimize` at that
budget, then the same offline workload served by each system. vLLM needs the whole model in
the budget; vLLM-O offloads what does not fit and reads it over PCIe every step.

Budgets "comparable to" the A40 setups use vLLM's default `gpu_memory_utilization=0.9`:
0.9 x 45 GiB = 40.5 GiB of each A40."""),
    nbf.v4.new_code_cell("""import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import profiles
from fluxmoe.errors import InfeasibleError
from simulator import Workload, simulate_systems, verified_optimize

WORKLOAD = Workload.synthetic(200, 512, 128)  # offline: all requests at t=0, a throughput run
GiB = 2**30

def sweep(model, gpu, budgets_gib):
    profile = profiles.load(model, gpu=gpu)
    rows = []
    for b in budgets_gib:
        try:
            plan = verified_optimize(profile, int(b * GiB), WORKLOAD, top_k=3)  # simulator-backed planner
        except InfeasibleError:
            continue
        results = simulate_systems(profile, plan, WORKLOAD, keep_timeline=False)
        rows.append({"budget_gib": b, **{s: (r.output_tokens_per_s if r else np.nan) for s, r in results.items()}})
    return rows"""),
    nbf.v4.new_code_cell("""studies = {
    ("mixtral-8x7b", "a40"): [20, 30, 40.5, 44],
    ("qwen3-next-80b-a3b", "a40"): [20, 30, 40.5, 44],
    ("mixtral-8x7b", "a40x2"): [20, 30, 40.5, 44],
    ("qwen3-next-80b-a3b", "a40x2"): [20, 30, 40.5, 44],
    ("mixtral-8x7b", "h200"): [30, 46, 70, 100, 130],
    ("qwen3-next-80b-a3b", "h200"): [20, 40, 70, 100, 130],
}
curves = {key: sweep(*key, budgets) for key, budgets in studies.items()}"""),
    nbf.v4.new_code_cell("""fig, axes = plt.subplots(3, 2, figsize=(11, 10))
styles = {"fluxmoe": ("FluxMoE", "o-"), "vllm": ("vLLM", "s--"), "vllm_offload": ("vLLM + CPU offload", "^:")}
for ax, ((model, gpu), rows) in zip(axes.flat, curves.items()):
    for system, (label, style) in styles.items():
        ax.plot([r["budget_gib"] for r in rows], [r[system] for r in rows], style, label=label, mfc="none")
    ax.set_title(f"{model} on {gpu}")
    ax.set_yscale("log"); ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("GPU memory budget per GPU (GiB)"); ax.set_ylabel("output tok/s (simulated)")
axes[0, 0].legend(fontsize=8)
fig.tight_layout()
fig.savefig("what_if_capacity.png", dpi=110)"""),
    nbf.v4.new_markdown_cell("""## Speed-ups at the A40-comparable budgets

FluxMoE over vLLM-O and over plain vLLM (where it fits), one A40 and two, 40.5 GiB of each."""),
    nbf.v4.new_code_cell("""summary = []
for model in ("mixtral-8x7b", "qwen3-next-80b-a3b"):
    for label, gpu, budget in (("one A40", "a40", 40.5), ("two A40s", "a40x2", 40.5)):
        row = next(r for r in curves[(model, gpu)] if r["budget_gib"] == budget)
        summary.append((model, label, row["fluxmoe"], row["fluxmoe"] / row["vllm_offload"],
                        row["fluxmoe"] / row["vllm"] if row["vllm"] == row["vllm"] else float("nan")))
print(f"{'model':20s} {'setup':9s} {'FluxMoE tok/s':>14s} {'/ vLLM-O':>9s} {'/ vLLM':>8s}")
for model, label, tps, vs_o, vs_v in summary:
    print(f"{model:20s} {label:9s} {tps:14.0f} {vs_o:9.2f} {vs_v:8.2f}")"""),
    nbf.v4.new_markdown_cell("""## Two H200s: tensor parallel or expert parallel?

Models that do not fit one H200 (Qwen3-Next-80B, 160 GB of bf16; Mixtral-8x22B, 282 GB) on two,
per-GPU budgets. Tensor parallel cuts every expert in two (each rank pages half of every expert
over its own PCIe link); expert parallel gives each rank half the experts whole, and a layer
waits for the rank its tokens route to most. Both pay two all-reduces a layer (NCCL on the
H200 pair, measured: `profiles/interconnects/h200x2.json`). FluxMoE's throughput for each."""),
    nbf.v4.new_code_cell("""def split_sweep(model, budgets_gib):
    rows = []
    for b in budgets_gib:
        row = {"budget_gib": b}
        for mode, ep in (("TP", False), ("EP", True)):
            profile = profiles.load(model, gpu="h200x2", expert_parallel=ep)
            try:
                plan = verified_optimize(profile, int(b * GiB), WORKLOAD, top_k=2)
            except InfeasibleError:
                row[mode] = np.nan
                continue
            row[mode] = simulate_systems(profile, plan, WORKLOAD, systems=("fluxmoe",),
                                         keep_timeline=False)["fluxmoe"].output_tokens_per_s
        rows.append(row)
    return rows

splits = {"qwen3-next-80b-a3b": split_sweep("qwen3-next-80b-a3b", [30, 46, 80]),
          "mixtral-8x22b": split_sweep("mixtral-8x22b", [60, 100, 139])}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for ax, (model, rows) in zip(axes, splits.items()):
    for mode, style in (("TP", "o-"), ("EP", "s--")):
        ax.plot([r["budget_gib"] for r in rows], [r[mode] for r in rows], style, label=mode, mfc="none")
    ax.set_title(f"{model} on two H200s"); ax.grid(True, alpha=0.3)
    ax.set_xlabel("GPU memory budget per GPU (GiB)"); ax.set_ylabel("output tok/s (simulated)")
axes[0].legend()
fig.tight_layout()
for model, rows in splits.items():
    print(model, "; ".join(f"{r['budget_gib']} GiB: TP {r['TP']:.0f}, EP {r['EP']:.0f}" for r in rows))"""),
    nbf.v4.new_markdown_cell("""## Checks on these numbers

The study's own claims, checked where it runs: FluxMoE's simulated throughput never falls as
the budget grows, and it is never below plain vLLM where vLLM fits (all resident is in its
plan space). Where vLLM-O beats it, the budgets are listed, not hidden: at 20 GiB, Qwen3-Next's
512-expert layers need a 3.2 GB staging buffer that vLLM-O, streaming weights in place, does
not (fetching only the routed experts is the lever)."""),
    nbf.v4.new_code_cell("""for key, rows in curves.items():
    flux = [r["fluxmoe"] for r in rows]
    assert all(b >= a * 0.999 for a, b in zip(flux, flux[1:])), f"{key}: throughput fell as the budget grew: {flux}"
    for r in rows:
        if r["vllm"] == r["vllm"]:  # vLLM fits this budget
            assert r["fluxmoe"] >= r["vllm"] * 0.999, f"{key} at {r['budget_gib']} GiB: below plain vLLM"
below = [f"{model} on {gpu} at {r['budget_gib']} GiB ({r['fluxmoe']:.0f} vs {r['vllm_offload']:.0f} tok/s)"
         for (model, gpu), rows in curves.items() for r in rows if r["fluxmoe"] < r["vllm_offload"]]
print("checks passed: monotone in budget, never below plain vLLM")
print("vLLM-O ahead of FluxMoE at:", "; ".join(below) or "none")"""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"}})
nbf.write(nb, Path(__file__).with_name("what_if_capacity.ipynb"))
