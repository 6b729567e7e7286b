"""FluxMoE against the baselines on one workload, and the simulator-verified planner."""

from __future__ import annotations

from dataclasses import replace

import planner
from planner.search import BATCH_GRID
from fluxmoe.errors import ConfigError
from planner.plan import Plan, SimulatedFigures
from profiles.registry import Profile
from simulator.engine import SimulationResult, simulate
from simulator.workload import Workload

SYSTEMS = ("fluxmoe", "vllm", "vllm_offload")


VLLM_MAX_NUM_SEQS = 1024  # vLLM's default on large GPUs; KV decides admission below it


def baseline_config(profile: Profile, plan: Plan, system: str) -> dict | None:
    """KV, batch cap and offload bytes of a baseline under the plan's budget (None if it cannot run).

    Baselines run as vLLM would: every byte left after the weights is KV and admission is
    limited by it (up to vLLM's default max_num_seqs), not by the planner's batch choice."""
    base = plan.baseline(system)
    if base is None or not base.feasible:
        return None
    m = profile.model
    weights_on_gpu = m.total_bytes - base.offload_bytes
    kv = plan.budget_bytes - plan.memory.reserve_bytes - weights_on_gpu
    return dict(kv_cache_bytes=kv, max_num_seqs=VLLM_MAX_NUM_SEQS, offload_bytes=base.offload_bytes)


def simulate_systems(profile: Profile, plan: Plan, workload: Workload, systems=SYSTEMS,
                     **options) -> dict[str, SimulationResult | None]:
    """Each system's simulated result on `workload` (None where it does not fit the budget)."""
    results: dict[str, SimulationResult | None] = {}
    for system in systems:
        if system == "fluxmoe":
            results[system] = simulate(profile, workload, plan=plan, **options)
            continue
        config = baseline_config(profile, plan, system)
        if config is None:
            results[system] = None
            continue
        try:
            results[system] = simulate(profile, workload, system=system, **config, **options)
        except ConfigError:
            results[system] = None  # e.g. its KV cannot hold the longest request
    return results


def verified_optimize(profile: Profile, budget: int | str, workload: Workload, *, top_k: int = 4,
                      **options) -> Plan:
    """The planner's `top_k` best candidates, each simulated on `workload`; the best simulated wins.

    The returned plan carries its simulated figures in `plan.simulated`. Batch sizes stop at the
    first candidate that holds every request at once: more is memory spent for nothing.
    """
    options.setdefault("workload", workload.shape())
    options.setdefault("max_num_seqs", next((b for b in BATCH_GRID if b >= len(workload)), BATCH_GRID[-1]))
    best: tuple[float, Plan, SimulationResult] | None = None
    candidates = planner.candidate_plans(profile, budget, top_k=top_k, **options)
    for plan in candidates:
        result = simulate(profile, workload, plan=plan, keep_timeline=False)
        if best is None or result.output_tokens_per_s > best[0]:
            best = (result.output_tokens_per_s, plan, result)
    _, plan, result = best
    figures = SimulatedFigures(workload.name, result.output_tokens_per_s, result.tokens_per_s, result.ttft_s.p50,
                               result.tpot_s.p50, result.preemptions, len(candidates))
    return replace(plan, simulated=figures)
