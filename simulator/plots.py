"""Pictures of what-if studies: throughput against budget, and a run's step timeline."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fluxmoe.names import System  # noqa: E402
from simulator.engine import SimulationResult  # noqa: E402

STYLES = {System.FLUXMOE: dict(marker="o", lw=2), System.VLLM: dict(marker="s", ls="--", ms=8, mfc="none"),
          System.VLLM_OFFLOAD: dict(marker="^", ls=":"), System.VLLM_PREFETCH: dict(marker="v", ls="-.")}


def plot_sweep(rows: list[dict], path: str | Path, title: str) -> Path:
    """rows: {'budget_gib': x, '<system>': output tok/s or None}. Writes a PNG."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for system in System:
        points = [(r["budget_gib"], r[system.value]) for r in rows if r.get(system.value)]
        if points:
            ax.plot(*zip(*points), label=system.label, **STYLES[system])
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


def plot_timeline(runs: list[tuple[System, SimulationResult, int]], path: str | Path) -> Path:
    """Step durations, batch sizes and KV use over time; runs: (system, result, its KV bytes)."""
    fig, axes = plt.subplots(3, 1, figsize=(8, 6.5), sharex=True)
    for system, result, kv_bytes in runs:
        t = [r.start_s for r in result.timeline]
        style = dict(lw=0.9, label=system.label, ls=STYLES[system].get("ls", "-"))
        axes[0].plot(t, [(r.end_s - r.start_s) * 1e3 for r in result.timeline], **style)
        axes[1].plot(t, [r.sequences for r in result.timeline], **style)
        axes[2].plot(t, [100 * r.kv_used_bytes / kv_bytes for r in result.timeline], **style)
    axes[0].set_ylabel("step (ms)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("sequences")
    axes[2].set_ylabel("KV used (%)")
    axes[2].set_xlabel("time (s)")
    axes[0].legend(fontsize=8)
    fig.suptitle("\n".join(result.summary() for _, result, _ in runs), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
