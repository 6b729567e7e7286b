"""Pictures of what-if studies: throughput against budget, and a run's step timeline."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from simulator.engine import SimulationResult  # noqa: E402

LABELS = {"fluxmoe": "FluxMoE", "vllm": "vLLM", "vllm_offload": "vLLM + CPU offload"}


def plot_sweep(rows: list[dict], path: str | Path, title: str) -> Path:
    """rows: {'budget_gib': x, '<system>': output tok/s or None}. Writes a PNG."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"fluxmoe": dict(marker="o", lw=2), "vllm": dict(marker="s", ls="--", ms=8, mfc="none"),
              "vllm_offload": dict(marker="^", ls=":")}
    for system, label in LABELS.items():
        points = [(r["budget_gib"], r[system]) for r in rows if r.get(system)]
        if points:
            ax.plot(*zip(*points), label=label, **styles[system])
    ax.set_xlabel("GPU memory budget (GiB)")
    ax.set_ylabel("output tokens/s (simulated)")
    ax.set_title(title)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_timeline(result: SimulationResult, path: str | Path) -> Path:
    """One CSV row per engine step: start, end, tokens, sequences, prefill tokens, KV bytes used."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["start_s", "end_s", "tokens", "sequences", "prefill_tokens", "kv_used_bytes"])
        for r in result.timeline:
            writer.writerow([f"{r.start_s:.6f}", f"{r.end_s:.6f}", r.tokens, r.sequences, r.prefill_tokens,
                             r.kv_used_bytes])
    return Path(path)


def plot_timeline(result: SimulationResult, path: str | Path, kv_cache_bytes: int) -> Path:
    """Step durations, batch sizes and KV use over time."""
    t = [r.start_s for r in result.timeline]
    fig, axes = plt.subplots(3, 1, figsize=(8, 6), sharex=True)
    axes[0].plot(t, [(r.end_s - r.start_s) * 1e3 for r in result.timeline], lw=0.8)
    axes[0].set_ylabel("step (ms)")
    axes[1].plot(t, [r.sequences for r in result.timeline], lw=0.8)
    axes[1].set_ylabel("sequences")
    axes[2].plot(t, [100 * r.kv_used_bytes / kv_cache_bytes for r in result.timeline], lw=0.8)
    axes[2].set_ylabel("KV used (%)")
    axes[2].set_xlabel("time (s)")
    fig.suptitle(result.summary(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
