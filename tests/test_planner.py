"""The planner: optimal under its own cost model, monotone in budget, never over budget."""

import itertools
import re
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import planner
import profiles
from fluxmoe.errors import ConfigError, InfeasibleError
from planner.cost_model import CostModel, TierCounts
from planner.search import BATCH_GRID, PREFETCH_DEPTHS
from planner.memory import MemoryModel
from profiles import Profile
from tests.conftest import tiny_gpu, tiny_model

RESERVE = 16 << 10


def brute_force_best(profile: Profile, budget: int, max_num_seqs: int, host_budget: int,
                     host_compressed: bool = True) -> float:
    """Best output tokens/s over every placement (four tiers, or three), depth and batch, checked
    by the plan's memory rule: experts, staging, landing slots where any expert is host-compressed."""
    m, cost = profile.model, CostModel(profile)
    wl = planner.WorkloadShape()
    kv = m.kv_bytes_per_sequence(wl.prompt_tokens + wl.output_tokens)
    E = m.num_experts
    per_layer = [TierCounts(r, c, h, E - r - c - h) for r in range(E + 1) for c in range(E + 1 - r)
                 for h in range(E + 1 - r - c) if host_compressed or r + c + h == E]
    landing = MemoryModel.of(profile, RESERVE).landing_bytes
    best = 0.0
    for tiers in itertools.product(per_layer, repeat=m.num_moe_layers):
        slots = max(t.paged for t in tiers)
        weights = sum(t.resident * m.expert_bytes + t.compressed * cost.compressed_expert_bytes for t in tiers)
        weights += landing if any(t.host_compressed for t in tiers) else 0
        if sum(t.host * m.expert_bytes + t.host_compressed * cost.compressed_expert_bytes for t in tiers) > host_budget:
            continue
        for depth in PREFETCH_DEPTHS:
            staging = (depth + 1) * slots * m.expert_bytes
            for batch in (b for b in BATCH_GRID if b <= max_num_seqs):
                if m.non_expert_bytes + RESERVE + weights + staging + batch * kv > budget:
                    continue
                step = planner.StepShape.steady_decode(batch, wl.prompt_tokens, wl.output_tokens)
                best = max(best, batch / cost.step_time(list(tiers), step, depth).total_s)
    return best


@pytest.mark.parametrize("layers,experts,budget_kib,pcie", [
    (2, 4, 400, 1.0), (2, 4, 450, 1.0), (2, 4, 700, 1.0), (2, 4, 1200, 1.0),
    (2, 4, 450, 0.05), (3, 3, 450, 1.0), (3, 3, 600, 0.2), (3, 3, 900, 5.0),
])
@pytest.mark.parametrize("host_compressed", [True, False])
def test_plan_equals_the_best_enumerated_placement(layers, experts, budget_kib, pcie, host_compressed):
    """The MILP over (batch, depth) candidates finds what trying every placement finds."""
    profile = Profile(tiny_model(layers, experts), tiny_gpu(pcie))
    budget, host = budget_kib * 1024, 4 * 2**20
    plan = planner.optimize(profile, budget, reserve_bytes=RESERVE, max_num_seqs=64, mip_gap=0, host_budget=host,
                            host_compressed=host_compressed)
    expected = brute_force_best(profile, budget, 64, host, host_compressed)
    assert plan.predicted.output_tokens_per_s == pytest.approx(expected, rel=1e-9)


def test_host_budget_limits_host_experts(tiny_profile):
    plan = planner.optimize(tiny_profile, 600 * 1024, reserve_bytes=RESERVE, max_num_seqs=64, mip_gap=0,
                            host_budget=2 * tiny_profile.model.expert_bytes)
    assert plan.memory.host_expert_bytes <= 2 * tiny_profile.model.expert_bytes


@settings(max_examples=25, deadline=None)
@given(low=st.integers(200, 1500), extra=st.integers(1, 1000), pcie=st.sampled_from([0.05, 0.3, 1.0, 5.0]))
def test_throughput_never_drops_when_the_budget_grows(low, extra, pcie):
    profile = Profile(tiny_model(3, 4), tiny_gpu(pcie))

    def throughput(kib: int) -> float:
        try:
            return planner.optimize(profile, kib * 1024, reserve_bytes=RESERVE, max_num_seqs=64,
                                    mip_gap=0).predicted.output_tokens_per_s
        except InfeasibleError:
            return 0.0

    assert throughput(low + extra) >= throughput(low) * (1 - 1e-9)


@settings(max_examples=25, deadline=None)
@given(budget_kib=st.integers(150, 2000), layers=st.integers(1, 4), experts=st.integers(2, 6),
       pcie=st.sampled_from([0.05, 1.0, 5.0]))
@example(budget_kib=555, layers=4, experts=2, pcie=0.05)  # every expert host-compressed (found by CI)
def test_no_plan_exceeds_its_budget(budget_kib, layers, experts, pcie):
    profile = Profile(tiny_model(layers, experts, top_k=min(2, experts)), tiny_gpu(pcie))
    try:
        plan = planner.optimize(profile, budget_kib * 1024, reserve_bytes=RESERVE, max_num_seqs=64)
    except InfeasibleError:
        return
    m, mem = profile.model, plan.memory
    assert mem.gpu_total_bytes <= plan.budget_bytes
    kv_needed = plan.max_num_seqs * m.kv_bytes_per_sequence(640)
    assert mem.kv_cache_bytes >= kv_needed
    # Every paged expert, host-compressed ones too, takes a staging slot; host-compressed ones
    # also need the landing slots they cross the link into.
    paged = max((len(lp.compressed) + len(lp.host) + len(lp.host_compressed) for lp in plan.layers), default=0)
    landing = MemoryModel.of(profile).landing_bytes if any(lp.host_compressed for lp in plan.layers) else 0
    assert mem.staging_bytes == (plan.prefetch_depth + 1) * paged * m.expert_bytes + landing
    for lp in plan.layers:  # every expert placed exactly once
        assert sorted(lp.all_ids) == list(range(m.num_experts))


def test_infeasible_budget_names_the_smallest_that_works(tiny_profile):
    with pytest.raises(InfeasibleError, match=r"smallest budget that works is ([0-9.]+) (KiB|MiB|B|GiB)") as info:
        planner.optimize(tiny_profile, 50 * 1024, reserve_bytes=RESERVE)
    # Search the smallest working budget by bisection: it must equal what the error said.
    lo, hi = 50 * 1024, 10 * 2**20
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            planner.optimize(tiny_profile, mid, reserve_bytes=RESERVE, max_num_seqs=1)
            hi = mid
        except InfeasibleError:
            lo = mid
    said = str(info.value)
    from fluxmoe.units import format_bytes_up, parse_bytes

    assert f"smallest budget that works is {format_bytes_up(hi)}" in said
    printed = re.search(r"smallest budget that works is ([0-9.]+ [KMG]?i?B)", said).group(1)
    planner.optimize(tiny_profile, parse_bytes(printed.replace(" ", "")), reserve_bytes=RESERVE, max_num_seqs=1)


def test_budget_above_gpu_memory_is_refused(tiny_profile):
    with pytest.raises(ConfigError, match="exceeds the 1.00 GiB of GPU 'toy'"):
        planner.optimize(tiny_profile, "2GiB")


def test_latency_objective_respects_the_bound():
    import profiles

    profile = profiles.load("mixtral-8x7b", gpu="h200")
    free = planner.optimize(profile, "120GiB")
    bound = free.predicted.step_time_s / 2
    capped = planner.optimize(profile, "120GiB", objective="throughput_under_latency", tpot_limit_s=bound)
    assert capped.predicted.step_time_s <= bound
    assert capped.predicted.output_tokens_per_s <= free.predicted.output_tokens_per_s
    with pytest.raises(ConfigError, match="tpot_limit_s"):
        planner.optimize(profile, "120GiB", objective="throughput_under_latency")


def test_everything_resident_when_the_model_fits():
    import profiles

    profile = profiles.load("qwen3-30b-a3b", gpu="h200")
    plan = planner.optimize(profile, "130GiB")
    assert all(not lp.compressed and not lp.host for lp in plan.layers)
    vllm = plan.baseline("vllm").prediction
    assert plan.predicted.output_tokens_per_s >= vllm.output_tokens_per_s * (1 - 1e-9)


def test_paging_beats_cpu_offload_when_memory_bound():
    import profiles

    plan = planner.optimize(profiles.load("mixtral-8x7b", gpu="a40"), "44GiB")
    assert not plan.baseline("vllm").feasible
    assert plan.predicted.output_tokens_per_s > plan.baseline("vllm_offload").prediction.output_tokens_per_s
    assert any(lp.host or lp.host_compressed for lp in plan.layers)


def test_plan_round_trips_through_json(tmp_path):
    import profiles

    plan = planner.optimize(profiles.load("deepseek-v2-lite", gpu="a40"), "20GiB")
    path = tmp_path / "plan.json"
    plan.save(path)
    assert planner.Plan.load(path) == plan
    plan.check_matches(profiles.load("deepseek-v2-lite", gpu="a40"))
    with pytest.raises(ConfigError, match="plan was made for model 'deepseek-v2-lite'"):
        plan.check_matches(profiles.load("mixtral-8x7b", gpu="a40"))


def test_malformed_plan_file_names_file_field_and_value(tmp_path):
    import json

    import profiles

    plan = planner.optimize(profiles.load("mixtral-8x7b", gpu="h200"), "60GiB")
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    data["layers"][3]["host"] = ["seven"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"plan\.json: field 'layers\[3\]\.host\[0\]': expected an integer, got 'seven'"):
        planner.Plan.load(path)
    data["layers"][3]["host"] = []
    data["max_num_seqs"] = -4
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"plan\.json: field 'max_num_seqs': must be > 0, got -4"):
        planner.Plan.load(path)


@pytest.mark.parametrize("budget_kib,pcie", [(720, 5.0), (1080, 2.0), (800, 10.0)])
def test_a_deeper_prefetch_wins_where_brute_force_says_so(budget_kib, pcie):
    """Cases where the best placement prefetches one layer ahead: the planner finds it."""
    profile = Profile(tiny_model(3, 3), tiny_gpu(pcie))
    budget, host = budget_kib * 1024, 4 * 2**20
    plan = planner.optimize(profile, budget, reserve_bytes=RESERVE, max_num_seqs=64, mip_gap=0, host_budget=host)
    assert plan.prefetch_depth >= 1
    assert plan.predicted.output_tokens_per_s == pytest.approx(brute_force_best(profile, budget, 64, host), rel=1e-9)


@pytest.mark.parametrize("pcie", [0.2, 1.0])
def test_a_binding_host_budget_gives_the_brute_force_best_under_it(pcie):
    profile = Profile(tiny_model(3, 3), tiny_gpu(pcie))
    budget, host = 600 * 1024, 3 * profile.model.expert_bytes
    plan = planner.optimize(profile, budget, reserve_bytes=RESERVE, max_num_seqs=64, mip_gap=0, host_budget=host)
    assert plan.memory.host_expert_bytes <= host
    best_under_host = brute_force_best(profile, budget, 64, host)
    assert plan.predicted.output_tokens_per_s == pytest.approx(best_under_host, rel=1e-9)
    assert brute_force_best(profile, budget, 64, 100 * profile.model.expert_bytes) > best_under_host * 1.2  # it binds


def test_no_system_runs_more_sequences_than_there_are_requests():
    import profiles

    profile = profiles.load("qwen3-next-80b-a3b", gpu="a40")
    plan = planner.optimize(profile, "44.98GiB", workload=planner.WorkloadShape(1024, 512), requests=40)
    assert plan.max_num_seqs <= 48 and plan.inputs.requests == 40  # 48: the smallest grid batch >= 40
    for baseline in plan.baselines:
        assert baseline.prediction is None or baseline.prediction.batch_size <= 40
    unlimited = planner.optimize(profile, "44.98GiB", workload=planner.WorkloadShape(1024, 512))
    assert unlimited.baseline("vllm_offload").prediction.batch_size > 40  # the cap is what binds
    with pytest.raises(ConfigError, match="requests: must be >= 1"):
        planner.optimize(profile, "44.98GiB", requests=0)


@pytest.mark.parametrize("layers,experts,budget_kib,pcie", [
    (3, 3, 500, 0.05), (3, 3, 500, 0.2), (3, 3, 500, 1.0), (3, 3, 650, 1.0),
])
def test_host_compressed_experts_where_brute_force_says_they_win(layers, experts, budget_kib, pcie, monkeypatch):
    """One expert per landing chunk, so the landing slots are small enough for the toy budgets:
    cases where the fourth tier beats the best three-tier placement, found by enumeration."""
    import planner.cost_model

    monkeypatch.setattr(planner.cost_model, "HOST_CHUNK_BYTES", 1)
    profile = Profile(tiny_model(layers, experts), tiny_gpu(pcie))
    budget, host = budget_kib * 1024, 4 * 2**20
    four, three = (brute_force_best(profile, budget, 64, host, allowed) for allowed in (True, False))
    assert four > three * 1.005
    plan = planner.optimize(profile, budget, reserve_bytes=RESERVE, max_num_seqs=64, mip_gap=0, host_budget=host)
    assert plan.predicted.output_tokens_per_s == pytest.approx(four, rel=1e-9)
    assert any(t.host_compressed for t in plan.tier_counts())


def test_plans_for_many_experts_keep_every_fused_call_within_vllms_limit():
    """Qwen3-Next-80B at 0.9 of the H200: mixing resident and paged experts in every layer gave
    spans vLLM refused on the H200; the planner's LP holds every span within the limit, and at
    least as fast as the whole-layer plans that first fixed it (5,588 output tok/s predicted for
    Qwen3-30B-A3B at 68 GiB; for Qwen3-Next at 133 GiB 2,821 under 16-token KV blocks, 2,448
    since its KV is counted in vLLM's 544-token hybrid pages, and 2,323 since its Gated-DeltaNet
    prefill and every decode on the GPU are counted, where the best plan is whole layers)."""
    import profiles
    from planner.arena_layout import FUSED_MOE_MAX_ROWS, ArenaLayout

    for model, budget, options, whole_layer_rate in [
            ("qwen3-next-80b-a3b", "125.8GiB", dict(workload=planner.WorkloadShape(512, 128), max_num_seqs=256,
                                                    requests=256), None),
            ("qwen3-next-80b-a3b", "133GiB", {}, 2323), ("qwen3-30b-a3b", "68GiB", {}, 5588)]:
        profile = profiles.load(model, gpu="h200")
        plan = planner.optimize(profile, budget, **options)
        tiers = [lp.tiers() for lp in sorted(plan.layers, key=lambda lp: lp.layer)]
        layout = ArenaLayout.of(tiers, plan.prefetch_depth + 1, plan.slots_per_buffer)
        assert 0 < layout.widest_span[0] <= FUSED_MOE_MAX_ROWS
        assert plan.inputs.fused_max_rows == FUSED_MOE_MAX_ROWS
        if whole_layer_rate:
            assert plan.predicted.output_tokens_per_s >= whole_layer_rate * 0.99
    mixtral = planner.optimize(profiles.load("mixtral-8x7b", gpu="h200"), "46GiB")
    layout = ArenaLayout.of([lp.tiers() for lp in mixtral.layers], mixtral.prefetch_depth + 1, mixtral.slots_per_buffer)
    assert layout.widest_span[0] <= FUSED_MOE_MAX_ROWS  # 8 experts: spans are short anyway


@given(st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=1, max_size=30), st.integers(1, 4),
       st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_the_lps_span_constraint_is_the_arenas_widest_span(counts, buffers, slots):
    """The planner's LP bounds each group's span by the buffer plus the group's paged layers'
    resident stacks (search.py); that must be exactly what the executor's arena lays out."""
    from planner.arena_layout import ArenaLayout, span_groups

    layout = ArenaLayout.of_counts(counts, buffers, slots)
    groups = [g for pair in span_groups(len(counts), buffers) for g in pair]
    by_groups = max((slots + sum(counts[l][0] for l in g if counts[l][1]) for g in groups
                     if any(counts[l][1] for l in g)), default=0)
    assert layout.widest_span[0] == by_groups
    assert sorted(l for g in groups for l in g) == list(range(len(counts)))


@pytest.mark.parametrize("budget_kib,pcie", [(1400, 0.2), (1900, 1.0), (2000, 0.2)])
def test_more_than_16_experts_per_layer_against_enumeration(budget_kib, pcie):
    """20 experts per layer: past SLOT_ENUMERATION_MAX_EXPERTS, so one LP per candidate with
    the slot count free, then the MILP; it must still find what trying every placement finds
    (three tiers, to keep the enumeration to seconds)."""
    profile = Profile(tiny_model(2, 20), tiny_gpu(pcie))
    budget, host = budget_kib * 1024, 4 * 2**20
    plan = planner.optimize(profile, budget, reserve_bytes=RESERVE, max_num_seqs=64, mip_gap=0, host_budget=host,
                            host_compressed=False)
    assert any(t.paged for t in plan.tier_counts())
    expected = brute_force_best(profile, budget, 64, host, host_compressed=False)
    assert plan.predicted.output_tokens_per_s == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- the solver keeps its model
def _knapsack(n: int = 12):
    import pulp

    prob = pulp.LpProblem("knapsack", pulp.LpMaximize)
    x = [pulp.LpVariable(f"x{i}", 0, 1) for i in range(n)]
    prob += pulp.lpSum((i % 5 + 1) * v for i, v in enumerate(x))
    prob += pulp.lpSum((i % 3 + 2) * v for i, v in enumerate(x)) <= 11.5
    return prob, x


@pytest.mark.parametrize("steps", [
    [("lp", None), ("milp", None), ("lp", 3), ("milp", 3), ("lp", None)],
    [("milp", 0), ("lp", 0), ("milp", None)],
])
def test_a_re_solved_model_agrees_with_a_fresh_one_after_each_change(steps):
    """The planner re-solves one built model with other bounds and integrality (planner/solver.py
    keeps HiGHS's model and warm-starts): each answer equals a fresh model's with the same changes."""
    import pulp

    from planner.solver import solver

    kept, x = _knapsack()
    model = None
    for kind, fixed in steps:
        fresh, y = _knapsack()
        for vars_ in (x, y):
            for i, v in enumerate(vars_):
                v.cat = pulp.LpInteger if kind == "milp" else pulp.LpContinuous
                v.lowBound, v.upBound = (0, 1) if fixed is None or i != fixed else (1, 1)
        kept.solve(solver(0.0, 10_000, 60.0))
        fresh.solve(solver(0.0, 10_000, 60.0))
        assert pulp.value(kept.objective) == pytest.approx(pulp.value(fresh.objective), abs=1e-9)
        assert model is None or kept.solverModel is model  # built once, re-solved
        model = kept.solverModel


def test_a_changed_model_is_built_again():
    import pulp

    from planner.solver import solver

    prob, x = _knapsack()
    prob.solve(solver(0.0, 100, 60.0))
    first, before = prob.solverModel, pulp.value(prob.objective)
    prob += x[4] + x[9] <= 0  # a new constraint on the best items: the kept HiGHS model lacks it
    prob.solve(solver(0.0, 100, 60.0))
    assert prob.solverModel is not first and pulp.value(prob.objective) < before


# ---------------------------------------------------------------- a running engine's fixed KV cache
def test_a_fixed_kv_cache_is_charged_whole_and_bounds_the_batch():
    """A budget change while serving: vLLM 0.26 keeps the KV cache it sized at start, so the
    new plan charges all of it at every batch and runs no more sequences than it holds."""
    profile = profiles.load("mixtral-8x7b", gpu="h200")
    running = planner.optimize(profile, "60GiB")
    kv_per_seq = profile.model.kv_bytes_per_sequence(running.workload.prompt_tokens + running.workload.output_tokens)
    for budget in ("52GiB", "70GiB"):
        live = planner.optimize(profile, budget, kv_cache_bytes=running.kv_cache_bytes,
                                max_num_seqs=running.max_num_seqs)
        assert live.kv_cache_bytes >= running.kv_cache_bytes and live.memory.gpu_total_bytes <= live.budget_bytes
        assert live.max_num_seqs * kv_per_seq <= running.kv_cache_bytes
    fresh, live = planner.optimize(profile, "52GiB"), planner.optimize(profile, "52GiB", kv_cache_bytes=running.kv_cache_bytes)
    assert fresh.kv_cache_bytes < running.kv_cache_bytes  # a fresh plan would have shrunk the KV cache
    assert live.memory.resident_expert_bytes + live.memory.compressed_expert_bytes <= \
        fresh.memory.resident_expert_bytes + fresh.memory.compressed_expert_bytes
    with pytest.raises(InfeasibleError, match="the running engine's KV cache"):
        planner.optimize(profile, "40GiB", kv_cache_bytes=running.kv_cache_bytes)
    with pytest.raises(ConfigError, match="kv_cache_bytes: must be >= 0, got -1"):
        planner.optimize(profile, "52GiB", kv_cache_bytes=-1)
