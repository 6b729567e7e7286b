"""FluxMoE against the baselines on one workload, and the simulator-verified planner."""

from __future__ import annotations

from dataclasses import replace

import planner
from fluxmoe.errors import ConfigError, InfeasibleError
from fluxmoe.names import System
from planner.cost_model import BATCH_GRID
from planner.memory import VLLM_MAX_NUM_SEQS
from planner.plan import Plan, SimulatedFigures, WorkloadShape
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


OFFLOAD_SETTINGS = 6  # offload sizes tried for vLLM + CPU offload, besides the planner's


def offload_settings(profile: Profile, plan: Plan, workload: Workload, steps: int = OFFLOAD_SETTINGS) -> list[dict]:
    """vLLM + CPU offload as a user would tune it: configs from the least offload that holds the
    longest request to everything the host budget takes, and the planner's own setting."""
    from planner.memory import MemoryModel

    planned = baseline_config(plan, System.VLLM_OFFLOAD)
    if planned is None:
        return []
    mem = MemoryModel.of(profile, plan.inputs.reserve_bytes if plan.inputs else None)
    longest = max(workload.requests, key=lambda r: r.prompt_tokens + r.output_tokens)
    least = mem.offload_for_kv(plan.budget_bytes, mem.kv_per_sequence(longest.prompt_tokens + longest.output_tokens))
    most = min(plan.host_budget_bytes, mem.all_experts_bytes)
    sizes = {int(planned["offload_bytes"])}
    if least <= most:
        sizes |= {int(least + (most - least) * i / max(1, steps - 1)) for i in range(steps)}
    configs = [baseline_settings(mem, System.VLLM_OFFLOAD, plan.budget_bytes, offload) for offload in sorted(sizes)]
    return [c for c in configs if c["kv_cache_bytes"] > 0]


PREFETCH_GROUPS = (2, 4, 8)  # offload_group_size values tried (vLLM's examples use 4 and 8)
PREFETCH_STEPS = (1, 2)
PREFETCH_SIMULATED = 3  # settings simulated in full, the best by one steady step each


def prefetch_settings(profile: Profile, plan: Plan, workload: Workload,
                      simulated: int = PREFETCH_SIMULATED) -> list[dict]:
    """vLLM's prefetch offloader as a user would tune it within the budget: every group /
    offloaded / step of the grid whose KV (what the budget leaves after its weights and its
    buffers, which vLLM 0.26 would place beyond --gpu-memory-utilization) holds the longest
    request and whose offloaded experts fit the host budget, ranked by the output rate of one
    steady decode step at the batch its KV holds; the best `simulated` are returned."""
    from planner.cost_model import CostModel, StepShape
    from planner.memory import MemoryModel
    from simulator.prefetch_offload import PrefetchOffload

    mem = MemoryModel.of(profile, plan.inputs.reserve_bytes if plan.inputs else None)
    cost = CostModel(profile, plan.workload.routing_skew)
    longest = max(workload.requests, key=lambda r: r.prompt_tokens + r.output_tokens)
    prompt, output = round(workload.mean_prompt_tokens), max(1, round(workload.mean_output_tokens))
    per_seq = mem.kv_per_sequence(prompt + output)
    cap = min(VLLM_MAX_NUM_SEQS, len(workload))
    ranked = []
    for group in PREFETCH_GROUPS:
        for offloaded in range(1, group + 1):
            for step in PREFETCH_STEPS:
                setting = PrefetchOffload(group, offloaded, step)
                if not setting.layers(profile.model) or setting.host_bytes(profile.model) > plan.host_budget_bytes:
                    continue
                kv = setting.kv_cache_bytes(mem, plan.budget_bytes)
                if kv < mem.kv_per_sequence(longest.prompt_tokens + longest.output_tokens):
                    continue
                batch = max(1, min(cap, kv // per_seq))
                rate = batch / setting.steady_step_s(cost, StepShape.steady_decode(batch, prompt, output))
                ranked.append((-rate, setting.label, dict(kv_cache_bytes=kv, max_num_seqs=VLLM_MAX_NUM_SEQS,
                                                          prefetch_offload=setting)))
    return [config for *_, config in sorted(ranked, key=lambda x: x[:2])[:simulated]]


def baseline_settings(memory, system: System | str, budget: int, offload_bytes: int = 0) -> dict:
    """KV, batch cap and offload bytes of a baseline in `budget` (its KV is what its weights
    leave) when `offload_bytes` is asked of vLLM + CPU offload (it moves whole parameters)."""
    footprint = memory.baseline(System(system), budget, offload_bytes)
    return dict(kv_cache_bytes=footprint.kv_cache_bytes, max_num_seqs=footprint.max_num_seqs,
                offload_bytes=footprint.offload_bytes)


def baseline_configs(profile: Profile, plan: Plan, workload: Workload, system: System,
                     tune_offload: bool = True) -> list[dict]:
    """The settings a baseline is simulated at: the offloaders' tuned ones, plain vLLM's one."""
    if system is System.VLLM_PREFETCH:
        return prefetch_settings(profile, plan, workload)
    config = baseline_config(plan, system)
    if config is None:
        return []
    if system is System.VLLM_OFFLOAD and tune_offload:
        return offload_settings(profile, plan, workload)
    return [config]


def simulate_systems(profile: Profile, plan: Plan, workload: Workload, systems=SYSTEMS, tune_offload: bool = True,
                     **options) -> dict[System, SimulationResult | None]:
    """Each system's simulated result on `workload` (None where it does not fit the budget).
    vLLM + CPU offload and vLLM's prefetch offloader are tuned (`offload_settings`,
    `prefetch_settings`): each one's best simulated setting is reported, and `result.setting`
    says which it was."""
    results: dict[System, SimulationResult | None] = {}
    for system in map(System, systems):
        if system is System.FLUXMOE:
            results[system] = simulate(profile, workload, plan=plan, **options)
            continue
        configs = baseline_configs(profile, plan, workload, system, tune_offload)
        best = None
        for config in configs:
            try:
                result = simulate(profile, workload, system=system, **config, **options,
                                  routing_skew=plan.workload.routing_skew)
            except ConfigError:
                continue  # e.g. its KV cannot hold the longest request
            result.setting = dict(config, tried=len(configs))
            if "prefetch_offload" in config:  # named as vLLM's flags take it, for reports and JSON
                result.setting["prefetch_offload"] = config["prefetch_offload"].label
            if best is None or result.output_tokens_per_s > best.output_tokens_per_s:
                best = result
        results[system] = best
    return results


def verified_optimize(profile: Profile, budget: int | str, workload: Workload, *, top_k: int = 3,
                      shape: WorkloadShape | None = None, **options) -> Plan:
    """The planner's `top_k` best candidates, each simulated on `workload`; the best simulated wins.

    This is the plan `fluxmoe plan` and `fluxmoe simulate` pick by default. The returned plan
    carries its simulated figures in `plan.simulated`. Batch sizes stop at the first candidate
    that holds every request at once: more is memory spent for nothing. Candidates are
    simulated in the planner's order and ties keep the earlier one, so the pick is
    deterministic. shape: what the planner assumes of the workload (default: `workload`'s mean
    lengths, uniform routing)."""
    options.setdefault("workload", shape or workload.shape())
    options.setdefault("max_num_seqs", next((b for b in BATCH_GRID if b >= len(workload)), BATCH_GRID[-1]))
    options.setdefault("requests", len(workload))
    best: tuple[float, Plan, SimulationResult] | None = None
    candidates = planner.candidate_plans(profile, budget, top_k=top_k, **options)
    # The best all-resident plan is plain vLLM's configuration; with vLLM's own admission (by KV,
    # up to its max_num_seqs) it is exactly plain vLLM, so the pick is never worse than plain vLLM
    # (the closed form may rank paged plans above it that the simulation does not confirm).
    if not any(not any(lp.paged for lp in plan.layers) for plan in candidates):
        try:
            candidates += planner.candidate_plans(profile, budget, top_k=1, paging=False, **options)
        except InfeasibleError:
            pass
    candidates += [replace(plan, max_num_seqs=VLLM_MAX_NUM_SEQS) for plan in candidates
                   if plan.max_num_seqs < VLLM_MAX_NUM_SEQS and not any(lp.paged for lp in plan.layers)]
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
