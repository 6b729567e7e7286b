"""The residency search behind `planner.optimize(profile, budget)`: the best predicted plan.

For each candidate (batch size B, prefetch depth D) a small MILP (PuLP, HiGHS in-process)
chooses how many of each MoE layer's experts are resident, compressed or on the host,
minimizing the cost model's steady-state step time under the GPU budget (FlexGen's shape:
epigraph variables for the max of GPU time and link time, one stall variable per layer for
transfers the prefetch window cannot hide). Two passes, branch-and-bound across candidates:
1. candidates in order of an upper bound (B over the all-resident step time), each solved
   as LPs (one per staging slot count for models with few experts) whose roundings are real
   plans, until no candidate's upper bound beats the best plan found;
2. a MILP, with a cutoff at the best plan's rate, only for (candidate, slot count) whose LP
   bound beats the best plan by more than the gap, best bound first.
The answer is within the gap of the optimum over the whole candidate grid.
"""

from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import pulp

from fluxmoe.errors import ConfigError, InfeasibleError
from fluxmoe.names import System
from fluxmoe.units import format_bytes, format_bytes_up, parse_bytes
from planner.arena_layout import FUSED_MOE_MAX_ROWS, all_span_groups
from planner.cost_model import BATCH_GRID, CostModel, StepShape, TierCounts, tier_counts
from planner.memory import VLLM_MAX_NUM_SEQS, MemoryModel
from planner.popularity import ExpertPopularity
from planner.plan import (BaselinePrediction, LayerPlan, Plan, PlanInputs, Prediction,
                          WorkloadShape)
from planner.solver import freeze_variables, solver
from profiles.registry import Profile

PREFETCH_DEPTHS = (0, 1, 2, 3)
SLOT_ENUMERATION_MAX_EXPERTS = 16
# The MILP stops on a node count, never on the clock alone, so a plan does not depend on how
# busy the machine is; the wall-clock guard is a safety net whose hit the plan reports.
# 100 nodes: with CBC, the same plans as 2000 nodes on the slowest Mixtral-8x7B budgets of the
# H200 (91-100 GiB) at a third of the time. 50 since HiGHS skips strong branching and restarts
# (planner/solver.py): the same plans on the slowest budgets, and within 0.9% over the 1 GiB sweep.
MILP_NODE_LIMIT = 50
MILP_SAFETY_TIME_LIMIT_S = 60.0
# MILPs solved side by side in the second pass, in waves (the plan is the same on any machine).
MILP_THREADS = 2
MILP_WAVE = 4
# Routed-only fetch is planned only for steps that route to at most this share of a layer's
# experts: it serializes the link with compute, which whole-layer prefetch overlaps (measured on
# the H200, bench/results/routed_fetch_h200_*.json: 0.81x the step time at a 0.71 share on
# Qwen3-Next's shape, 1.18x at all of Mixtral's experts).
ROUTED_FETCH_MAX_SHARE = 0.5


@dataclass(frozen=True)
class Candidate:
    """A solved (batch, depth): its placement and the step time the MILP found."""

    batch: int
    depth: int
    tiers: list[TierCounts]
    step_time_s: float
    staging_slots: int
    status: str
    routed: bool = False  # host experts fetched routed-only


@dataclass(frozen=True)
class Relaxation:
    """One (batch, depth) after its LPs: the bound on its step time for each slot count the
    LPs fixed (None: slots free), and its best rounding."""

    batch: int
    depth: int
    bounds_s: dict[int | None, float]
    rounding: Candidate | None

    @property
    def bound_s(self) -> float:
        return min(self.bounds_s.values())

    def certified(self, gap: float) -> bool:
        return self.rounding is not None and self.rounding.step_time_s <= self.bound_s * (1 + gap)


@dataclass
class _PlacementModel:
    """A built placement LP and the handles that re-solving it changes."""

    prob: pulp.LpProblem
    tiers: list[tuple[pulp.LpVariable, ...]]  # (resident, compressed, host, host-compressed) per layer
    slots: pulp.LpVariable
    landing: pulp.LpVariable
    step_time: pulp.LpVariable
    unit: float  # seconds per unit of time in the model
    whole: list[pulp.LpVariable] = field(default_factory=list)  # per layer, all resident (where spans bind)

    @property
    def integer_variables(self) -> list[pulp.LpVariable]:
        return [v for layer in self.tiers for v in layer] + [self.slots, self.landing, *self.whole]


class _Problem:
    """Everything fixed for one optimize() call: profile, budget, workload, derived sizes."""

    def __init__(self, profile: Profile, budget_bytes: int, host_budget_bytes: int, workload: WorkloadShape,
                 reserve_bytes: int, tpot_limit_s: float | None, max_num_seqs: int, mip_gap: float = 0.01,
                 requests: int | None = None, host_compressed: bool = True, routed: bool = False,
                 popularity: ExpertPopularity | None = None, kv_cache_bytes: int | None = None):
        self.profile, self.model = profile, profile.model
        self.cost = CostModel(profile, workload.routing_skew, popularity)
        self.mem = MemoryModel.of(profile, reserve_bytes)
        self.budget, self.host_budget, self.workload = budget_bytes, host_budget_bytes, workload
        self.reserve, self.tpot_limit_s, self.max_num_seqs = reserve_bytes, tpot_limit_s, max_num_seqs
        self.requests = requests
        self.host_compressed = host_compressed
        self.routed = routed  # host experts fetched routed-only (after the router, unhidden)
        self.kv_per_seq = self.mem.kv_per_sequence(workload.prompt_tokens + workload.output_tokens)
        self.kv_fixed = kv_cache_bytes
        self.gap = mip_gap
        self.safety_hits = 0
        self._models: dict[tuple[int, int, bool], _PlacementModel] = {}
        self._spans_can_bind: dict[int, bool] = {}

    def kv_bytes(self, batch: int) -> float:
        """KV a plan for `batch` sequences holds: their own, or a running engine's whole cache,
        whose size cannot change (inf where that cache holds fewer than `batch` sequences)."""
        if self.kv_fixed is None:
            return batch * self.kv_per_seq
        return self.kv_fixed if batch * self.kv_per_seq <= self.kv_fixed else math.inf

    def step(self, batch: int) -> StepShape:
        return StepShape.steady_decode(batch, self.workload.prompt_tokens, self.workload.output_tokens)

    def expert_memory_lower_bound(self, depth: int) -> float:
        """No placement at this depth needs less GPU memory for experts than this."""
        return self.mem.least_expert_bytes(depth)

    def _model(self, batch: int, depth: int, minimize_memory: bool) -> _PlacementModel:
        """The placement model for one (batch, depth): variables per MoE layer, epigraph for time.
        Built once and re-solved with other slot bounds, integrality or cutoffs: building it in
        PuLP costs as much as HiGHS solving it."""
        key = (batch, depth, minimize_memory)
        if key in self._models:
            return self._models[key]
        m, cost = self.model, self.cost
        step = self.step(batch)
        # Times enter the model in units of the step's compute, so they are O(1) for the solver: in
        # seconds a small model's step (tens of microseconds) fell under the solver's tolerances, and
        # it called a placement 1.5% slower than the best "optimal" (found by brute force).
        unit = max(sum(cost.layer_compute_s(step)), 1e-30)
        compute = [t / unit for t in cost.layer_compute_s(step)]
        decode_s, transfer_s = cost.decode_s_per_expert / unit, cost.routed_s_per_expert / unit
        routed_s = transfer_s * cost.routed_share(step.tokens) if self.routed else 0.0  # per host expert, on the path
        eb, ceb, E = self.mem.expert_bytes, self.mem.compressed_expert_bytes, m.num_experts
        prob = pulp.LpProblem("placement", pulp.LpMinimize)
        transfer_c = cost.compressed_transfer_s_per_expert / unit
        hc_max = E if self.host_compressed else 0
        r = {l: pulp.LpVariable(f"r{l}", 0, E) for l in m.moe_layers}
        c = {l: pulp.LpVariable(f"c{l}", 0, E) for l in m.moe_layers}
        h = {l: pulp.LpVariable(f"h{l}", 0, E) for l in m.moe_layers}
        hc = {l: pulp.LpVariable(f"hc{l}", 0, hc_max) for l in m.moe_layers}
        landing = pulp.LpVariable("landing", 0, 1 if self.host_compressed else 0)  # landing slots held (0/1)
        slots = pulp.LpVariable("slots", 0, E)  # staging slots per buffer of the pool
        step_time = pulp.LpVariable("step_time", 0)
        for l in m.moe_layers:
            prob += r[l] + c[l] + h[l] + hc[l] == E
            prob += slots >= c[l] + h[l] + hc[l]
            prob += hc[l] <= hc_max * landing
        whole = {}
        if self.spans_can_bind(depth):
            # Each fused-MoE call within vLLM's row limit (planner/arena_layout.py): per group of
            # layers around a staging buffer, the buffer plus the group's paged layers' resident
            # stacks. whole[l] = 1 marks an all-resident layer, which takes no arena rows.
            for l in m.moe_layers:
                whole[l] = pulp.LpVariable(f"whole{l}", 0, 1)
                prob += r[l] >= E * whole[l]
                prob += r[l] <= E - 1 + whole[l]
            moe = list(m.moe_layers)
            for group in all_span_groups(len(moe), depth + 1):
                prob += slots + pulp.lpSum(r[moe[i]] - E * whole[moe[i]] for i in group) <= FUSED_MOE_MAX_ROWS
        routed = {l: routed_s * h[l] for l in m.moe_layers}  # cost.layer_routed_s
        if self.routed and cost.popularity is not None:
            # The coldest h experts on the host: their expected routed count is convex in h.
            for i, l in enumerate(m.moe_layers):
                routed[l] = pulp.LpVariable(f"routed{l}", 0)
                for slope, intercept in cost.popularity.routed_chords(i, step.tokens):
                    prob += routed[l] >= transfer_s * (slope * h[l] + intercept)
        path = {l: compute[l] + (routed[l] if l in c else 0) for l in range(m.num_layers)}
        decode = {l: decode_s * (c[l] + hc[l]) for l in m.moe_layers}  # cost.layer_decode_s
        gpu = {l: path[l] + decode.get(l, 0) for l in range(m.num_layers)}
        transfer_h = cost.stack_transfer_s_per_expert / unit
        link = {l: (0 if self.routed else transfer_h) * h[l] + transfer_c * hc[l] for l in m.moe_layers}
        stalls = []
        for l in m.moe_layers:  # as cost.step_time: the window's compute and the layer's own decodes
            stall = pulp.LpVariable(f"stall{l}", 0)
            window = pulp.lpSum(path[j] for j in cost.window_layers(m.num_layers, l, depth)) + decode[l]
            prob += stall >= link[l] - window
            stalls.append(stall)
        prob += step_time >= pulp.lpSum(gpu.values()) + pulp.lpSum(stalls)
        prob += step_time >= pulp.lpSum(link.values()) + pulp.lpSum(routed.values())
        # MemoryModel.placement_bytes, linear in the variables, plus the KV of `batch` sequences.
        memory = (self.mem.fixed_bytes + self.kv_bytes(batch)
                  + pulp.lpSum(eb * r[l] + ceb * c[l] for l in m.moe_layers) + (depth + 1) * eb * slots
                  + self.mem.landing_bytes * landing)
        prob += pulp.lpSum(eb * h[l] + ceb * hc[l] for l in m.moe_layers) <= self.host_budget
        if minimize_memory:
            prob += memory
        else:
            prob += memory <= self.budget
            if self.tpot_limit_s is not None:
                prob += step_time + cost.fixed_s(step) / unit <= self.tpot_limit_s / unit
            prob += step_time
        freeze_variables(prob)
        model = _PlacementModel(prob, [(r[l], c[l], h[l], hc[l]) for l in m.moe_layers], slots, landing, step_time,
                                unit, list(whole.values()))
        self._models[key] = model
        return model

    def _build(self, batch: int, depth: int, integer: bool, minimize_memory: bool, slots_fixed: int | None = None,
               cutoff_s: float | None = None, whole_fixed: tuple[int, ...] | None = None):
        """Solve the placement model: integer or relaxed, slots fixed or free, and with a cutoff
        only placements faster than `cutoff_s` (seconds, before the step's fixed part);
        `whole_fixed`: which layers are all resident (1) or paged (0), where spans can bind."""
        model = self._model(batch, depth, minimize_memory)
        prob, E = model.prob, self.model.num_experts
        for var in model.integer_variables:
            var.cat = pulp.LpInteger if integer else pulp.LpContinuous
        model.slots.lowBound, model.slots.upBound = (0, E) if slots_fixed is None else (slots_fixed, slots_fixed)
        for i, var in enumerate(model.whole):
            var.lowBound, var.upBound = (0, 1) if whole_fixed is None else (whole_fixed[i], whole_fixed[i])
        started = time.perf_counter()
        prob.solve(solver(self.gap, MILP_NODE_LIMIT, MILP_SAFETY_TIME_LIMIT_S,
                          None if cutoff_s is None else cutoff_s / model.unit))
        if time.perf_counter() - started >= MILP_SAFETY_TIME_LIMIT_S:
            self.safety_hits += 1
        if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return None
        values = [tuple(v.value() for v in layer) for layer in model.tiers]
        return prob, values, pulp.value(prob.objective) * (1 if minimize_memory else model.unit)  # seconds or bytes

    def spans_can_bind(self, depth: int) -> bool:
        """Could some placement at this depth give a fused-MoE call more rows than vLLM takes?"""
        if depth not in self._spans_can_bind:
            E = self.model.num_experts
            self._spans_can_bind[depth] = any(E + len(g) * (E - 1) > FUSED_MOE_MAX_ROWS
                                              for g in all_span_groups(self.model.num_moe_layers, depth + 1))
        return self._spans_can_bind[depth]

    def spans_fit(self, tiers: list[TierCounts], depth: int) -> bool:
        return not self.spans_can_bind(depth) or _widest_span(tiers, depth) <= FUSED_MOE_MAX_ROWS

    def _span_fixing(self, values: list[tuple[float, ...]], lp_whole: list[float], slots: float,
                     depth: int) -> tuple[int, ...]:
        """Which layers to make all resident so that each group's span fits with the LP's
        residents and slots: those the LP made all resident, and in each group, of the partly
        resident layers that do not fit, as many as do not fit, those the LP leans most toward."""
        E = self.model.num_experts
        fixing = [int(v[0] >= E - 1e-6) for v in values]  # the LP's own all-resident layers stay so
        for group in all_span_groups(len(values), depth + 1):
            partly = [i for i in group if not fixing[i]]
            fits, rows = 0, slots
            for i in sorted(partly, key=lambda i: (values[i][0], i)):  # fewest residents first
                if rows + values[i][0] > FUSED_MOE_MAX_ROWS:
                    break
                rows, fits = rows + values[i][0], fits + 1
            by_lean = sorted(partly, key=lambda i: (-lp_whole[i], -values[i][0], i))
            for i in by_lean[:len(partly) - fits]:
                fixing[i] = 1
        return tuple(fixing)

    def memory_bytes(self, tiers: list[TierCounts], depth: int, batch: int) -> float:
        """GPU bytes a placement needs: fixed part, KV for `batch`, experts, staging."""
        return self.mem.placement_bytes(tiers, depth) + self.kv_bytes(batch)

    def _fits(self, tiers: list[TierCounts], depth: int, batch: int) -> bool:
        return self.mem.fits(self.budget, self.host_budget, tiers, depth, self.kv_bytes(batch))

    def _roundings(self, values: list[tuple[float, ...]], depth: int, batch: int) -> list[list[TierCounts]]:
        """Integer placements near the LP's (values: resident, compressed, host, host-compressed
        per layer): per-layer ceilings of the host tiers, and roundings that keep the LP's totals
        per tier, a little above, spread by largest remainders or evenly around the cycle."""
        E = self.model.num_experts
        out = self._whole_layer_roundings(values, depth, batch) if self.spans_can_bind(depth) else []
        for round_c in (round, math.ceil):
            tiers = []
            for _, c, h, hc in values:
                hi = min(E, math.ceil(h - 1e-6))
                hci = min(E - hi, math.ceil(hc - 1e-6))
                ci = min(E - hi - hci, round_c(c - 1e-6) if round_c is math.ceil else round_c(c))
                tiers.append(tier_counts(E - hi - hci - ci, ci, hi, hci))
            out.append(tiers)

        def spread(fractions: list[float], total: int, caps: list[int]) -> list[int]:
            """Floors, then one more each for the largest remainders with room, until `total`."""
            counts = [min(cap, math.floor(f + 1e-6)) for f, cap in zip(fractions, caps)]
            need = total - sum(counts)
            for i in sorted(range(len(fractions)), key=lambda i: counts[i] - fractions[i]):
                if need <= 0:
                    break
                if counts[i] < caps[i]:
                    counts[i], need = counts[i] + 1, need - 1
            return counts

        def even(fractions: list[float], total: int, caps: list[int]) -> list[int]:
            """`total` spread evenly around the cycle of layers (stalls and their windows are cyclic)."""
            n = len(caps)
            return [min(cap, (i + 1) * total // n - i * total // n) for i, cap in enumerate(caps)]

        def total(i: int) -> int:
            return math.ceil(sum(v[i] for v in values) - 1e-6)

        extra_hc = (0, 1) if total(3) else (0,)
        for place in (spread, even):
            for extra_h in (0, 1, 2):
                hs = place([v[2] for v in values], total(2) + extra_h, [E] * len(values))
                for more_hc in extra_hc:
                    hcs = place([v[3] for v in values], total(3) + more_hc, [E - x for x in hs])
                    for extra_c in (0, 1, 2):
                        cs = place([v[1] for v in values], total(1) + extra_c, [E - x - y for x, y in zip(hs, hcs)])
                        out.append([tier_counts(E - hi - hci - ci, ci, hi, hci) for hi, hci, ci in zip(hs, hcs, cs)])
        return [self._to_host_until_it_fits(tiers, [i for i, t in enumerate(tiers) if t.paged], depth, batch)
                for tiers in out]

    def _whole_layer_roundings(self, values: list[tuple[float, ...]], depth: int, batch: int) -> list[list[TierCounts]]:
        """Roundings with resident experts only in whole layers: a few counts of resident layers
        around the LP's, placed where the LP leans most resident or evenly; every other
        layer paged, with the LP's host and host-compressed totals spread evenly and the rest
        compressed (`_roundings` then moves as many compressed experts to the host as the budget
        needs: paged layers stage all their experts, so the pool grows past the LP's)."""
        E, L = self.model.num_experts, len(values)
        whole = sum(v[0] for v in values) / E
        host, host_c = (math.ceil(sum(v[i] for v in values) - 1e-6) for i in (2, 3))
        out = []
        near = math.floor(whole + 1e-6)
        for k in range(max(0, near - 3), min(L, near + 2) + 1):
            by_lp = sorted(range(L), key=lambda i: (-values[i][0], i))[:k]
            evenly = [i * L // k for i in range(k)] if k else []
            for resident in {tuple(sorted(by_lp)), tuple(evenly)}:
                paged = [i for i in range(L) if i not in resident]
                room = len(paged) * E
                for extra_h in (0, 1, 2):
                    for more_hc in ((0, 1) if host_c else (0,)):
                        h_total = min(room, host + extra_h)
                        hc_total = min(room - h_total, host_c + more_hc)
                        hs = [(j + 1) * h_total // len(paged) - j * h_total // len(paged) for j in range(len(paged))]
                        hcs = [min(E - x, (j + 1) * hc_total // len(paged) - j * hc_total // len(paged))
                               for j, x in enumerate(hs)] if paged else []
                        tiers = [TierCounts(E, 0, 0, 0)] * L
                        for i, hi, hci in zip(paged, hs, hcs):
                            tiers[i] = tier_counts(0, E - hi - hci, hi, hci)
                        out.append(tiers)
        return out

    def _to_host_until_it_fits(self, tiers: list[TierCounts], paged: list[int], depth: int,
                               batch: int) -> list[TierCounts]:
        """Move compressed experts of `paged` layers to the host (host-compressed where allowed),
        evenly, until the placement fits the budget (or none are left)."""
        over = self.memory_bytes(tiers, depth, batch) - self.budget
        if over <= 0 or not paged:
            return tiers
        saved = self.mem.compressed_expert_bytes
        if self.host_compressed and not any(t.host_compressed for t in tiers):
            over += self.mem.landing_bytes
        moves = math.ceil(over / saved)
        tiers = list(tiers)
        for j, i in enumerate(paged):
            n = min(tiers[i].compressed, (j + 1) * moves // len(paged) - j * moves // len(paged))
            t = tiers[i]
            tiers[i] = (tier_counts(t.resident, t.compressed - n, t.host, t.host_compressed + n) if self.host_compressed
                        else tier_counts(t.resident, t.compressed - n, t.host + n, t.host_compressed))
        return tiers

    def relax(self, batch: int, depth: int, incumbent_rate: float = 0.0) -> Relaxation | None:
        """The LP bound for one (batch, depth) and the best integer rounding of its LP solutions;
        None if nothing fits or the bound cannot beat `incumbent_rate`."""
        step = self.step(batch)
        fixed = self.cost.fixed_s(step)
        relaxed = self._build(batch, depth, integer=False, minimize_memory=False)
        if relaxed is None or batch / (relaxed[2] + fixed) <= incumbent_rate:
            return None
        relaxations = [(None, relaxed)]
        to_round = [relaxed[1]]
        if self.spans_can_bind(depth):
            # The LP's residents in partly resident layers break the span limit once rounded: fix
            # which layers are all resident, solve the LP again, round that. Fixings: the LP's
            # leaning (three cuts), and per group of layers around a buffer as many partly resident
            # layers as its span takes at the LP's slots and residents, the rest all resident.
            model = self._model(batch, depth, False)
            lp_whole = [v.value() for v in model.whole]
            fixings = {tuple(int(w > cut) for w in lp_whole) for cut in (0.001, 0.5, 0.999)}
            fixings.add(self._span_fixing(relaxed[1], lp_whole, model.slots.value(), depth))
            for fixing in fixings:
                if (x := self._build(batch, depth, False, False, whole_fixed=fixing)) is not None:
                    to_round.append(x[1])
        if self.model.num_experts <= SLOT_ENUMERATION_MAX_EXPERTS:
            # Few, large experts: a fractional slot count makes the LP bound weak. The least LP
            # bound over every integer slot count is still a bound, and a much tighter one.
            relaxations = [(s, x) for s in range(self.model.num_experts + 1)
                           if (x := self._build(batch, depth, False, False, slots_fixed=s)) is not None]
            # Rounding costs more than the LP: only where the LP's bound beats the incumbent.
            to_round = [x[1] for _, x in relaxations if batch / (x[2] + fixed) > incumbent_rate]
        if not relaxations:
            return None
        bounds = {slots: x[2] + fixed for slots, x in relaxations}
        # Many roundings of neighbouring LP solutions coincide: each placement is costed once, the
        # first of equal ones kept (so the pick does not change).
        placements = dict.fromkeys(tuple(tiers) for values in to_round for tiers in self._roundings(values, depth, batch))
        rounded = [(self.cost.step_time(list(tiers), step, depth, self.routed).total_s, list(tiers))
                   for tiers in placements if self._fits(tiers, depth, batch) and self.spans_fit(tiers, depth)]
        rounded = [(t, tiers) for t, tiers in rounded if self.tpot_limit_s is None or t <= self.tpot_limit_s]
        best = None
        if rounded:
            t, tiers = min(rounded, key=lambda x: x[0])
            best = Candidate(batch, depth, tiers, t, max(x.paged for x in tiers),
                             f"LP rounding, within {max(0.0, t / min(bounds.values()) - 1):.2%} of its LP bound",
                             self.routed)
        return Relaxation(batch, depth, bounds, best)

    def milp(self, batch: int, depth: int, incumbent_rate: float = 0.0, slots: int | None = None) -> Candidate | None:
        """The MILP's placement for one (batch, depth) and staging slot count (None: any), asked
        only for those faster than `incumbent_rate` by more than the gap (closer ones cannot
        matter, and proving that none exists is where a MILP spends its time). HiGHS takes that
        as an objective bound, which prunes nodes by their LP bound but may still return a
        slower placement it found: callers compare the answer with their incumbent (pass 1 kept
        the LP rounding already). No MIP start: HiGHS 1.16 with presolve carried one into its
        presolved space with a wrong objective and called it optimal beside placements 8-10%
        faster (Qwen3-30B-A3B, H200, 66 GiB, 160 sequences); without presolve it found them, but
        node-limited MILPs then took other paths on other CPUs (the closed-loop test's plan at
        60 GiB differed on the GPU machine's), and plans must not depend on the machine."""
        step = self.step(batch)
        cutoff = (batch / (incumbent_rate * (1 + self.gap)) - self.cost.fixed_s(step)) if incumbent_rate > 0 else None
        solved = self._build(batch, depth, integer=True, minimize_memory=False, slots_fixed=slots, cutoff_s=cutoff)
        if solved is None:
            return None
        prob, values, _ = solved
        tiers = [TierCounts(*(round(v) for v in x)) for x in values]
        if prob.sol_status == pulp.LpSolutionIntegerFeasible:
            status = f"MILP stopped at its limit of {MILP_NODE_LIMIT} nodes"
        else:
            status = "MILP optimal" if self.gap == 0 else f"MILP optimal within {self.gap:.0%}"
        return Candidate(batch, depth, tiers, self.cost.step_time(tiers, step, depth, self.routed).total_s,
                         max(t.paged for t in tiers), status, self.routed)

    def smallest_budget(self, depth: int) -> tuple[int, list[TierCounts]]:
        """The least GPU memory any plan needs (one sequence at the shallowest depth), and its placement."""
        E = self.model.num_experts
        all_resident = [TierCounts(E, 0, 0)] * self.model.num_moe_layers
        solved = self._build(1, depth, integer=True, minimize_memory=True)
        tiers = all_resident if solved is None else [TierCounts(*(round(v) for v in x)) for x in solved[1]]
        if self.memory_bytes(all_resident, depth, 1) <= self.memory_bytes(tiers, depth, 1):
            tiers = all_resident
        return math.ceil(self.memory_bytes(tiers, depth, 1)), tiers

    def infeasible(self, depth: int) -> InfeasibleError:
        """Why nothing fits, with the smallest budget that works and its parts (which add up)."""
        m, mem, hw = self.model, self.mem, self.profile.hardware
        if self.tpot_limit_s is not None:
            fastest = self.cost.resident_step_time(self.step(1)).total_s
            if fastest > self.tpot_limit_s:
                return InfeasibleError(
                    f"no plan for {m.name} on {hw.name} meets a per-token limit of {self.tpot_limit_s * 1e3:g} ms at "
                    f"any budget: one sequence with every expert resident already takes {fastest * 1e3:.2f} ms "
                    f"per token")
        smallest, tiers = self.smallest_budget(depth)
        b = mem.breakdown(tiers, depth, self.kv_bytes(1))
        parts = [("non-expert weights", b.non_expert_bytes), ("resident experts", b.resident_expert_bytes),
                 ("compressed experts", b.compressed_expert_bytes), ("staging pool", b.staging_bytes),
                 ("one sequence's KV" if self.kv_fixed is None else "the running engine's KV cache", b.kv_cache_bytes),
                 ("reserve", b.reserve_bytes)]
        why = ""
        if mem.host_bytes(tiers) + m.expert_bytes > self.host_budget:
            why = (f" (the host budget of {format_bytes(self.host_budget)} holds only "
                   f"{self.host_budget // m.expert_bytes} experts, so the rest stay on the GPU)")
        limit = f" under a per-token limit of {self.tpot_limit_s * 1e3:g} ms" if self.tpot_limit_s else ""
        if smallest <= self.budget:
            return InfeasibleError(f"no plan for {m.name} on {hw.name} fits a budget of {format_bytes(self.budget)}"
                                   f"{limit}: the smallest placement fits but none meets the limit")
        return InfeasibleError(
            f"no plan for {m.name} on {hw.name} fits a budget of {format_bytes(self.budget)}{limit}; the smallest "
            f"budget that works is {format_bytes_up(smallest)}: "
            + " + ".join(f"{name} {format_bytes(n)}" for name, n in parts if n) + why)


def _resident_fits(p: _Problem, batch: int) -> bool:
    return p.mem.resident_kv(p.budget) >= p.kv_bytes(batch)


def _prediction(p: _Problem, batch: int, tiers: list[TierCounts] | None, depth: int,
                offload_bytes: float = 0.0) -> Prediction:
    step = p.step(batch)
    if tiers is None:
        t = p.cost.offload_step_time(step, offload_bytes)
    else:
        t = p.cost.step_time(tiers, step, depth, p.routed)
    out = batch / t.total_s
    return Prediction(batch, t.total_s, out, out * (1 + p.workload.prompt_tokens / p.workload.output_tokens),
                      t.gpu_s, t.link_s, t.stall_s)


def _best_over_batches(p: _Problem, predict, feasible, kv_for) -> Prediction | None:
    """A baseline at the batch vLLM would run: the most sequences its KV holds, up to vLLM's
    max_num_seqs (and the grid below it, where a latency limit binds)."""
    most = min(VLLM_MAX_NUM_SEQS, p.requests or VLLM_MAX_NUM_SEQS)  # never more sequences than requests
    cap = min(most, max(0, kv_for() // p.kv_per_seq)) if kv_for else most
    best = None
    for batch in sorted({b for b in BATCH_GRID if b <= most} | ({cap} if cap >= 1 else set())):
        if not feasible(batch):
            continue
        pred = predict(batch)
        if p.tpot_limit_s is not None and pred.step_time_s > p.tpot_limit_s:
            continue
        if best is None or pred.output_tokens_per_s > best.output_tokens_per_s:
            best = pred
    return best


def baselines(p: _Problem) -> list[BaselinePrediction]:
    """Plain vLLM (everything resident) and vLLM with CPU weight offload, each at its best batch.

    They depend on the model, GPU, budget, reserve, host budget, workload and latency limit
    only, never on FluxMoE's own options (its batch cap, depths, candidates)."""
    m, mem = p.model, p.mem
    plain = _best_over_batches(p, lambda b: _prediction(p, b, [TierCounts(m.num_experts, 0, 0)] * m.num_moe_layers, 1),
                               lambda b: _resident_fits(p, b), lambda: mem.resident_kv(p.budget))
    footprint = mem.baseline(System.VLLM, p.budget)
    out = [BaselinePrediction(System.VLLM.value, plain is not None, plain,
                              kv_cache_bytes=footprint.kv_cache_bytes if plain else 0,
                              max_num_seqs=footprint.max_num_seqs,
                              note="" if plain else "the model's weights and one sequence's KV exceed the budget")]

    def asked(b: int) -> int:  # expert bytes to offload for batch b's KV
        return mem.offload_for_kv(p.budget, b * p.kv_per_seq)

    def offload(b: int) -> int:  # what vLLM moves when asked for them (whole parameters)
        return mem.uva_offloaded_bytes(asked(b))

    offloaded = _best_over_batches(
        p, lambda b: _prediction(p, b, None, 0, offload(b)),
        lambda b: asked(b) <= mem.all_experts_bytes and offload(b) <= p.host_budget, None)
    footprint = mem.baseline(System.VLLM_OFFLOAD, p.budget, offload(offloaded.batch_size) if offloaded else 0)
    out.append(BaselinePrediction(System.VLLM_OFFLOAD.value, offloaded is not None, offloaded,
                                  offload_bytes=footprint.offload_bytes,
                                  kv_cache_bytes=footprint.kv_cache_bytes if offloaded else 0,
                                  max_num_seqs=footprint.max_num_seqs,
                                  note="" if offloaded else "nothing fits even with offload"))
    return out


def optimize(profile: Profile, budget: int | str, **options) -> Plan:
    """The plan with the best predicted output tokens/s for `profile` within `budget` GPU bytes.

    Options as for `candidate_plans` (workload, host_budget, objective, tpot_limit_s,
    reserve_bytes, max_num_seqs, prefetch_depths, mip_gap).
    """
    return candidate_plans(profile, budget, top_k=1, **options)[0]


def candidate_plans(profile: Profile, budget: int | str, *, top_k: int = 1, workload: WorkloadShape | None = None,
                    host_budget: int | str | None = None, objective: str = "throughput",
                    tpot_limit_s: float | None = None, reserve_bytes: int | str | None = None,
                    max_num_seqs: int = 1024, prefetch_depths: tuple[int, ...] = PREFETCH_DEPTHS,
                    mip_gap: float = 0.01, requests: int | None = None, host_compressed: bool = True,
                    paging: bool = True, routed_fetch: bool = True,
                    popularity: ExpertPopularity | None = None, kv_cache_bytes: int | None = None) -> list[Plan]:
    """The `top_k` best plans (best first) by predicted output tokens/s within `budget` GPU bytes.

    budget, host_budget, reserve_bytes: bytes or strings like "46GiB". objective: "throughput",
    or "throughput_under_latency" with `tpot_limit_s` (per-token time). host_compressed: may
    experts be kept FXMC-encoded on the host (False: the three tiers of the paper). paging=False:
    every expert resident (plain vLLM's configuration), for comparisons. Every plan keeps each
    paged layer's fused-MoE call within the rows vLLM takes (planner/arena_layout.py).
    routed_fetch: may host experts be fetched routed-only (executor/routed_fetch.py); the plan
    says so where it predicts that faster (small steps of fine-grained experts). vLLM's UVA
    offload reads only routed experts too, so without it small batches can lose to that baseline.
    popularity: measured per-expert shares (the running server's counts): each layer keeps its
    hottest experts resident and its coldest on the host, and routed fetch is costed per expert.
    kv_cache_bytes: a running engine's KV cache, which cannot be resized (vLLM 0.26): charged
    whole at every batch, and no batch larger than it holds (a budget change while serving).
    Raises InfeasibleError with the smallest workable budget when nothing fits.
    """
    started = time.perf_counter()
    hw, m = profile.hardware, profile.model
    budget_bytes = parse_bytes(budget, "budget")
    host_bytes = parse_bytes(host_budget, "host_budget") if host_budget is not None else hw.host_pinned_bytes
    reserve = MemoryModel.of(profile).reserve_bytes if reserve_bytes is None else parse_bytes(reserve_bytes,
                                                                                                "reserve_bytes")
    workload = workload or WorkloadShape()
    if objective not in ("throughput", "throughput_under_latency"):
        raise ConfigError(f"objective: expected 'throughput' or 'throughput_under_latency', got {objective!r}")
    if objective == "throughput_under_latency" and (tpot_limit_s is None or tpot_limit_s <= 0):
        raise ConfigError(f"tpot_limit_s: objective 'throughput_under_latency' needs a limit > 0, got {tpot_limit_s!r}")
    if budget_bytes > hw.gpu_memory_bytes:
        raise ConfigError(f"budget: {format_bytes(budget_bytes)} exceeds the {format_bytes(hw.gpu_memory_bytes)} "
                          f"of GPU {hw.name!r}")
    if top_k < 1:
        raise ConfigError(f"top_k: must be >= 1, got {top_k!r}")
    if max_num_seqs < 1 or not prefetch_depths or min(prefetch_depths) < 0:
        raise ConfigError(f"max_num_seqs must be >= 1 and prefetch_depths >= 0, got {max_num_seqs!r}, {prefetch_depths!r}")
    limit = tpot_limit_s if objective == "throughput_under_latency" else None
    if requests is not None and requests < 1:
        raise ConfigError(f"requests: must be >= 1, got {requests!r}")
    if popularity is not None and (popularity.num_layers, popularity.num_experts) != (m.num_moe_layers,
                                                                                       m.num_experts):
        raise ConfigError(f"popularity: covers {popularity.num_layers} layers of {popularity.num_experts} experts, "
                          f"model {m.name!r} has {m.num_moe_layers} MoE layers of {m.num_experts}")
    if kv_cache_bytes is not None and kv_cache_bytes < 0:
        raise ConfigError(f"kv_cache_bytes: must be >= 0, got {kv_cache_bytes!r}")
    problems = {routed: _Problem(profile, budget_bytes, host_bytes, workload, reserve, limit, max_num_seqs, mip_gap,
                                 requests, host_compressed, routed=routed, popularity=popularity,
                                 kv_cache_bytes=kv_cache_bytes)
                for routed in ((False, True) if routed_fetch else (False,))}
    p = problems[False]

    # Visit candidates by their upper bound: B over the all-resident step time.
    order = []
    # More sequences than requests is memory spent for nothing: the smallest grid batch that holds them all.
    enough = next((b for b in BATCH_GRID if b >= requests), BATCH_GRID[-1]) if requests else BATCH_GRID[-1]
    for batch in BATCH_GRID:
        if batch > max_num_seqs or batch > enough:
            continue
        step = p.step(batch)
        for depth in sorted(prefetch_depths):
            # Bytes paging must free: the overshoot of all-resident (staging is charged in the bound).
            need = p.mem.offload_for_kv(budget_bytes, p.kv_bytes(batch))
            if need == math.inf:  # more sequences than a fixed KV cache holds
                continue
            fastest = p.cost.paging_lower_bound_s(step, need, host_bytes, (depth + 1) / m.num_moe_layers,
                                                  host_compressed)
            if fastest < math.inf:
                order.append((batch / fastest, batch, depth, False))
            if routed_fetch and need > 0 and p.cost.routed_share(step.tokens) <= ROUTED_FETCH_MAX_SHARE:
                # The whole-layer bound does not hold here: bounded by the all-resident step.
                order.append((batch / p.cost.resident_step_time(step).total_s, batch, depth, True))
    order.sort(key=lambda x: (-x[0], x[1], x[2], x[3]))
    # The `top_k` best candidates, best first; pruning compares against the k-th.
    kept: list[Candidate] = []
    solved = 0

    def rate(c: Candidate) -> float:
        return c.batch / c.step_time_s

    def threshold() -> float:
        return rate(kept[-1]) if len(kept) >= top_k else 0.0

    def keep(cand: Candidate | None) -> None:
        if cand is None or (limit is not None and cand.step_time_s > limit) or not p.spans_fit(cand.tiers, cand.depth):
            return
        if len(kept) < top_k or rate(cand) > threshold() * (1 + 1e-12):
            kept.append(cand)
            kept.sort(key=lambda c: -rate(c))
            del kept[top_k:]

    # Pass 1: every candidate's LP bound and best rounding (cheap); the roundings are real plans.
    seen_resident: set[int] = set()
    uncertified: list[tuple[Relaxation, _Problem]] = []
    for bound, batch, depth, routed in order:
        if kept and bound <= threshold() * (1 + 1e-12):
            break
        kv = p.kv_bytes(batch)
        if p.mem.fixed_bytes + kv + p.expert_memory_lower_bound(depth) > budget_bytes:
            continue
        if _resident_fits(p, batch):
            if batch in seen_resident:  # depth does not matter when nothing is paged
                continue
            seen_resident.add(batch)
            tiers = [TierCounts(m.num_experts, 0, 0)] * m.num_moe_layers
            keep(Candidate(batch, 0, tiers, p.cost.step_time(tiers, p.step(batch), 0).total_s, 0, "all resident"))
            continue
        if not paging:
            continue
        solved += 1
        relaxed = problems[routed].relax(batch, depth, threshold())
        if relaxed is None:
            continue
        keep(relaxed.rounding)
        if not relaxed.certified(mip_gap):
            uncertified.append((relaxed, problems[routed]))
    # Pass 2: a MILP only where an LP bound (per slot count, the tighter model) could beat the
    # k-th best plan by more than the gap, best bound first, asking only for placements that beat it.
    bounds = sorted(((r.batch / bound_s, r.batch, r.depth, slots, i)
                     for i, (r, _) in enumerate(uncertified) for slots, bound_s in r.bounds_s.items()),
                    key=lambda x: x[:3] + (-1 if x[3] is None else x[3], x[4]))
    # In waves of up to MILP_WAVE, each wave's MILPs on different placement models and asked to
    # beat the same k-th best plan, solved MILP_THREADS at a time (HiGHS runs outside the GIL):
    # the answer does not depend on the machine or on which finishes first, only the wall time does.
    def live(entry) -> bool:
        return not (len(kept) >= top_k and entry[0] <= threshold() * (1 + mip_gap))

    queue = list(reversed(bounds))
    with ThreadPoolExecutor(max_workers=MILP_THREADS) as pool:
        while queue and live(queue[0]):
            wave, keys = [], set()
            for entry in list(queue):
                if len(wave) == MILP_WAVE or not live(entry):
                    break
                key = _model_key(entry, uncertified)
                if key not in keys:
                    keys.add(key)
                    wave.append(entry)
                    queue.remove(entry)
            beat = threshold()
            for cand in pool.map(lambda e: uncertified[e[4]][1].milp(e[1], e[2], beat, e[3]),
                                 wave):
                keep(cand)
    if not kept:
        raise p.infeasible(min(prefetch_depths))
    elapsed = time.perf_counter() - started
    inputs = PlanInputs.record(reserve_bytes=reserve, max_num_seqs=max_num_seqs, prefetch_depths=list(prefetch_depths),
                               mip_gap=mip_gap, milp_node_limit=MILP_NODE_LIMIT, requests=requests,
                               host_compressed=host_compressed, fused_max_rows=FUSED_MOE_MAX_ROWS,
                               routed_fetch=routed_fetch)
    return [_make_plan(problems[c.routed], c, objective, limit, solved, elapsed, inputs) for c in kept]


def _model_key(entry: tuple, uncertified: list) -> tuple:
    """The placement model a pass-2 entry re-solves: its problem and (batch, depth)."""
    _, batch, depth, _, i = entry
    return id(uncertified[i][1]), batch, depth


def _widest_span(tiers: list[TierCounts], depth: int) -> int:
    """Rows of the widest fused-MoE call the executor's arena would give this placement: per
    group of layers around a buffer that has a paged layer, the buffer and the group's paged
    layers' resident stacks (what ArenaLayout lays out: tests/test_planner.py holds the two
    equal), without building the layout for each of the thousands of roundings a plan prices."""
    slots = max(t.paged for t in tiers)
    if not slots:
        return 0
    widest = 0
    for group in _span_groups(len(tiers), depth + 1):
        paged = [tiers[i].resident for i in group if tiers[i].paged]
        if paged:
            widest = max(widest, slots + sum(paged))
    return widest


@functools.lru_cache(maxsize=64)
def _span_groups(num_layers: int, buffers: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(group) for group in all_span_groups(num_layers, buffers))


def _make_plan(p: _Problem, best: Candidate, objective: str, limit: float | None, solved: int,
               elapsed: float, inputs: PlanInputs) -> Plan:
    m, mem = p.model, p.mem
    layers = []
    popularity = p.cost.popularity
    for position, (layer, t) in enumerate(zip(m.moe_layers, best.tiers)):
        # Hottest first: resident, then compressed (decoded whole), and the coldest on the host.
        # Without measured popularity any order is as hot as another: by id.
        ids = popularity.order(position) if popularity is not None else list(range(m.num_experts))
        on_gpu = t.resident + t.compressed
        layers.append(LayerPlan(layer, ids[:t.resident], ids[t.resident:on_gpu],
                                ids[on_gpu + t.host_compressed:], expert_order=ids,
                                host_compressed=ids[on_gpu:on_gpu + t.host_compressed]))
    memory = mem.breakdown(best.tiers, best.depth, 0)
    kv = p.budget - memory.gpu_total_bytes
    memory = replace(memory, kv_cache_bytes=kv)
    status = best.status + (f"; the {MILP_SAFETY_TIME_LIMIT_S:g} s safety time limit was hit {p.safety_hits} time(s)"
                            if p.safety_hits else "")
    return Plan(model=m.name, model_hash=m.content_hash(), gpu=p.profile.hardware.name,
                hardware_hash=p.profile.hardware.content_hash(), budget_bytes=p.budget,
                host_budget_bytes=p.host_budget, objective=objective, workload=p.workload, layers=layers,
                prefetch_depth=best.depth, staging_slots=(best.depth + 1) * best.staging_slots,
                max_num_seqs=best.batch, kv_cache_bytes=kv, memory=memory,
                predicted=_prediction(p, best.batch, best.tiers, best.depth), baselines=baselines(p),
                solver_status=status, solve_time_s=elapsed, candidates_solved=solved, tpot_limit_s=limit,
                inputs=inputs, routed_fetch=best.routed, tensor_parallel=p.profile.parallel.tensor_parallel,
                expert_parallel=p.profile.parallel.expert_shards)
