"""FluxMoE against the baselines on one workload, and the simulator-verified planner."""

from __future__ import annotations

from dataclasses import replace

import planner
from fluxmoe.errors import ConfigError
from fluxmoe.names import System
from planner.cost_model import BATCH_GRID
from planner.plan import Plan, SimulatedFigures
from profiles.registry import Profile
from simulator.engine import SimulationResult, simulate
from simulator.workload import Workload

SYSTEMS = tuple(System)


def baseline_config(plan: Plan, system: System | str) -> dict | None:
    """KV, batch cap and offload bytes of a baseline under the plan's budget (None if it cannot run).

    The planner worked these out with the one memory model (planner/memory.py): every byte
    left after the baseline's weights is KV, and vLLM admits by KV up to its max_num_seqs."""
    base = plan.baseline(System(system).value)
    if base is None or not base.feasible:
        return None
    return dict(kv_cache_bytes=base.kv_cache_bytes, max_num_seqs=base.max_num_seqs, offload_bytes=base.offload_bytes)


def simulate_systems(profile: Profile, plan: Plan, workload: Workload, systems=SYSTEMS,
                     **options) -> dict[System, SimulationResult | None]:
    """Each system's simulated result on `workload` (None where it does not fit the budget)."""
    results: dict[System, SimulationResult | None] = {}
    for system in map(System, systems):
        if system is System.FLUXMOE:
            results[system] = simulate(profile, workload, plan=plan, **options)
            continue
        config = baseline_config(plan, system)
        if config is None:
            results[system] = None
            continue
        try:
            results[system] = simulate(profile, workload, system=system, **config, **options)
        except ConfigError:
            results[system] = None  # e.g. its KV cannot hold the longest request
    return results


def verified_optimize(profile: Profile, budget: int | str, workload: Workload, *, top_k: int = 3,
                      **options) -> Plan:
    """The planner's `top_k` best candidates, each simulated on `workload`; the best simulated wins.

    This is the plan `fluxmoe plan` and `fluxmoe simulate` pick by default. The returned plan
    carries its simulated figures in `plan.simulated`. Batch sizes stop at the first candidate
    that holds every request at once: more is memory spent for nothing. Candidates are
    simulated in the planner's order and ties keep the earlier one, so the pick is
    deterministic."""
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
                               result.tpot_s.p50, result.preemptions, len(candidates),
                               pcie_busy=result.pcie_busy, gpu_busy=result.gpu_busy, stall_s=result.stall_s,
                               mean_batch=result.mean_batch)
    return replace(plan, simulated=figures)
