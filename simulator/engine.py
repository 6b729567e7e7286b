"""The serving engine: arrivals, the scheduler's steps and their execution, on one SimPy clock.

`simulate(profile, plan, workload)` replays a workload against a plan (or a baseline) and
returns `SimulationResult`: throughput, latency percentiles, KV use, preemptions, busy
fractions and a per-step timeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy

from fluxmoe.errors import ConfigError
from fluxmoe.names import System
from planner.cost_model import CostModel, StepShape
from planner.plan import Plan
from profiles.registry import Profile
from simulator.adaptation import Adaptation, AdaptiveLoop, RoutingDrift
from simulator.execution import OffloadExecution, PagedExecution, ResidentExecution
from simulator.prefetch_offload import PrefetchOffload
from simulator.scheduler import Sequence, VLLMScheduler, vllm_batched_tokens
from simulator.workload import Workload


@dataclass
class StepRecord:
    start_s: float
    end_s: float
    tokens: int
    sequences: int
    prefill_tokens: int
    kv_used_bytes: int
    experts_moved: float = 0.0  # routed-only fetch: expected host experts moved in the step
    swaps: int = 0  # resident-host swaps made before the step (adaptation)


@dataclass
class Percentiles:
    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values: list[float]) -> "Percentiles":
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), float("nan"))
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(np.mean(values)))


@dataclass
class SimulationResult:
    system: str
    requests: int
    makespan_s: float
    output_tokens: int
    prompt_tokens: int
    tokens_per_s: float
    output_tokens_per_s: float
    ttft_s: Percentiles
    tpot_s: Percentiles
    e2e_s: Percentiles
    kv_utilization: float  # time-averaged share of the KV pool in use
    preemptions: int
    pcie_busy: float  # shares of the makespan
    decode_busy: float
    gpu_busy: float
    stall_s: float
    mean_in_system: float  # time-averaged number of requests in the system (Little's L)
    steps: int
    mean_batch: float  # sequences per step, averaged over steps
    timeline: list[StepRecord] = field(default_factory=list, repr=False)
    setting: dict = field(default_factory=dict)  # a baseline's knobs, where they were tuned
    sequences: list[Sequence] = field(default_factory=list, repr=False)
    adaptation: list[tuple[int, bool, str]] = field(default_factory=list)  # per window: (step, acted, why)

    def summary(self) -> str:
        return (f"{self.system}: {self.output_tokens_per_s:,.0f} output tok/s ({self.tokens_per_s:,.0f} total), "
                f"TTFT p50 {self.ttft_s.p50:.3f}s, TPOT p50 {self.tpot_s.p50 * 1e3:.1f} ms, "
                f"preemptions {self.preemptions}")


def _execution_for(env: simpy.Environment, cost: CostModel, plan: Plan | None, system: System, offload_bytes: float,
                   prefetch_offload: PrefetchOffload | None):
    if system is System.FLUXMOE:
        host_ids = [lp.host for lp in sorted(plan.layers, key=lambda lp: lp.layer)]
        return PagedExecution(env, cost, plan.tier_counts(), plan.prefetch_depth, plan.routed_fetch, host_ids)
    if system is System.VLLM_PREFETCH:
        return prefetch_offload.execution(env, cost)
    if system is System.VLLM:
        return ResidentExecution(env, cost)
    return OffloadExecution(env, cost, offload_bytes)


def simulate(profile: Profile, workload: Workload, *, plan: Plan | None = None, system: str = "fluxmoe",
             kv_cache_bytes: int | None = None, max_num_seqs: int | None = None, offload_bytes: float = 0.0,
             max_num_batched_tokens: int | None = None, keep_timeline: bool = True,
             progress: Callable[[int], None] | None = None, routing_skew: float | None = None,
             drift: RoutingDrift | None = None, adaptation: Adaptation | None = None,
             prefetch_offload: PrefetchOffload | None = None) -> SimulationResult:
    """Serve `workload` with a FluxMoE `plan` (system 'fluxmoe') or a baseline ('vllm',
    'vllm_offload', 'vllm_prefetch' with its `prefetch_offload` setting; baselines need
    kv_cache_bytes and max_num_seqs). `progress(n)` is called as
    requests finish. routing_skew: of expert popularity (planner.WorkloadShape); None: the
    plan's, or uniform without a plan. drift: per-expert popularity by phases of steps (it
    replaces routing_skew); adaptation: the closed loop re-places experts as it would on the
    GPU (simulator/adaptation.py; needs a FluxMoE plan and a drift). max_num_batched_tokens:
    None for vLLM's default on this GPU, offline (`LLM`) for a workload all there at t=0,
    else its server's (`vllm_batched_tokens`)."""
    try:
        system = System(system)
    except ValueError:
        raise ConfigError(f"system: expected one of {', '.join(s.value for s in System)}, got {system!r}") from None
    if system is System.FLUXMOE:
        if plan is None:
            raise ConfigError("system 'fluxmoe' needs a plan")
        plan.check_matches(profile)
        kv_cache_bytes = plan.kv_cache_bytes if kv_cache_bytes is None else kv_cache_bytes
        max_num_seqs = plan.max_num_seqs if max_num_seqs is None else max_num_seqs
    if kv_cache_bytes is None or max_num_seqs is None:
        raise ConfigError(f"system {system!r} needs kv_cache_bytes and max_num_seqs")
    if (system is System.VLLM_PREFETCH) != (prefetch_offload is not None):
        raise ConfigError(f"prefetch_offload: a setting for system 'vllm_prefetch' and only for it, got "
                          f"{prefetch_offload!r} for {system.value!r}")
    workload.check_fits(profile.model.max_context)
    longest = max(workload.requests, key=lambda r: r.prompt_tokens + r.output_tokens)
    if profile.model.kv_bytes_per_sequence(longest.prompt_tokens + longest.output_tokens) > kv_cache_bytes:
        raise ConfigError(f"request {longest.id} ({longest.prompt_tokens + longest.output_tokens} tokens) does not "
                          f"fit the KV cache of {kv_cache_bytes} bytes even alone")

    env = simpy.Environment()
    if routing_skew is None:
        routing_skew = plan.workload.routing_skew if plan is not None else 0.0
    if adaptation is not None and (system is not System.FLUXMOE or drift is None):
        raise ConfigError("adaptation: needs system 'fluxmoe' and a routing drift to adapt to")
    cost = CostModel(profile, routing_skew, drift.at(0) if drift is not None else None)
    execution = _execution_for(env, cost, plan, system, offload_bytes, prefetch_offload)
    loop = AdaptiveLoop(profile, plan, adaptation) if adaptation is not None else None
    if max_num_batched_tokens is None:
        max_num_batched_tokens = vllm_batched_tokens(profile.hardware.gpu_memory_bytes, workload.offline,
                                                     profile.hardware.name)
    scheduler = VLLMScheduler(profile.model, kv_cache_bytes, max_num_seqs, max_num_batched_tokens)
    timeline: list[StepRecord] = []
    finished: list[Sequence] = []
    arrived = env.event()
    stats = {"kv_area": 0.0, "in_system_area": 0.0, "in_system": 0, "last": 0.0, "steps": 0, "sequences": 0}

    def account(now: float) -> None:
        dt = now - stats["last"]
        stats["kv_area"] += dt * scheduler.used
        stats["in_system_area"] += dt * stats["in_system"]
        stats["last"] = now

    def arrivals():
        nonlocal arrived
        for request in workload.requests:
            if request.arrival_s > env.now:
                yield env.timeout(request.arrival_s - env.now)
            account(env.now)
            stats["in_system"] += 1
            scheduler.add(request)
            if not arrived.triggered:
                arrived.succeed()

    def engine():
        nonlocal arrived
        while len(finished) < len(workload.requests):
            if not scheduler.has_work:
                arrived = env.event()
                yield arrived
            step = scheduler.schedule()
            if step.empty:
                raise RuntimeError("scheduler made no progress with work waiting (KV pool too small?)")
            contexts = [seq.computed + n for seq, n in step.work]
            shape = StepShape(step.tokens, len(step.work), float(np.mean(contexts)))
            if drift is not None and drift.at(stats["steps"]) is not cost.popularity:
                cost.set_popularity(drift.at(stats["steps"]))
            start = env.now
            swaps = loop.swaps_before_step() if loop is not None else []
            for swap in swaps:  # between steps, on the GPU's timeline
                execution.swap(swap.layer, swap.into_gpu, swap.out_of_gpu)
            if swaps:
                yield env.timeout(len(swaps) * loop.swap_s)
                execution.busy.gpu_s += len(swaps) * loop.swap_s
            moved = getattr(execution.busy, "experts_moved", 0.0)
            yield env.process(execution.run_step(shape))
            if loop is not None:
                loop.after_step(step.tokens, env.now - start, cost.popularity)
            account(env.now)
            prefill = sum(n for seq, n in step.work if n > 1)
            stats["steps"] += 1
            stats["sequences"] += len(step.work)
            if keep_timeline:
                timeline.append(StepRecord(start, env.now, step.tokens, len(step.work), prefill, scheduler.used,
                                           getattr(execution.busy, "experts_moved", 0.0) - moved, len(swaps)))
            done = scheduler.complete(step, env.now)
            stats["in_system"] -= len(done)
            finished.extend(done)
            if progress and done:
                progress(len(done))

    env.process(arrivals())
    env.run(until=env.process(engine()))
    makespan = env.now - workload.requests[0].arrival_s
    out = sum(s.generated for s in finished)
    prompt = sum(s.request.prompt_tokens for s in finished)
    tpot = [(s.finish_s - s.first_token_s) / (s.generated - 1) for s in finished if s.generated > 1]
    busy = execution.busy
    return SimulationResult(
        system=system, requests=len(finished), makespan_s=makespan, output_tokens=out, prompt_tokens=prompt,
        tokens_per_s=(out + prompt) / makespan, output_tokens_per_s=out / makespan,
        ttft_s=Percentiles.of([s.first_token_s - s.request.arrival_s for s in finished]),
        tpot_s=Percentiles.of(tpot), e2e_s=Percentiles.of([s.finish_s - s.request.arrival_s for s in finished]),
        kv_utilization=stats["kv_area"] / (env.now * kv_cache_bytes) if env.now else 0.0,
        preemptions=scheduler.preemptions, pcie_busy=busy.link_s / makespan, decode_busy=busy.decode_s / makespan,
        gpu_busy=busy.gpu_s / makespan, stall_s=busy.stall_s, mean_in_system=stats["in_system_area"] / env.now,
        steps=stats["steps"], mean_batch=stats["sequences"] / max(1, stats["steps"]), timeline=timeline,
        sequences=finished, adaptation=loop.decisions if loop is not None else [])
