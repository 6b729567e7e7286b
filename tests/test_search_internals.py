"""The planner's search heuristics one at a time, each against a hand-worked toy case.

The end-to-end tests (test_planner, test_never_worse) check what the planner answers; these
check the pieces that answer depends on cheaply (the roundings, span fixing, the move to the
host, the MILP's cutoff, the bounds' certificate and the infeasible message), so a
broken heuristic fails here in milliseconds instead of surfacing as a slightly worse plan.
"""

from collections import Counter

import pytest

import planner.search as search
from fluxmoe.errors import InfeasibleError
from planner.cost_model import TierCounts
from planner.plan import WorkloadShape
from planner.search import Candidate, Relaxation, _Problem, _widest_span
from profiles import Profile
from tests.conftest import tiny_gpu, tiny_model

RESERVE = 16 << 10
MiB = 2**20


def problem(layers: int = 2, experts: int = 4, budget: int = 10 * MiB, host: int = 4 * MiB, **options) -> _Problem:
    return _Problem(Profile(tiny_model(layers, experts), tiny_gpu()), budget, host, WorkloadShape(), RESERVE,
                    options.pop("tpot_limit_s", None), 64, **options)


def counts(tiers: list[TierCounts]) -> list[tuple[int, int, int, int]]:
    return [(t.resident, t.compressed, t.host, t.host_compressed) for t in tiers]


# ---------------------------------------------------------------- roundings of an LP solution
def test_roundings_of_an_lp_solution_by_hand():
    """Two layers of four experts; the LP's (resident, compressed, host, host-compressed):
    (1.5, 1.2, 1.3, 0) and (2.0, 0.5, 1.5, 0). Totals: compressed 1.7 -> 2, host 2.8 -> 3.
    - per layer: host ceiled (2, 2), compressed rounded (1, round(0.5) = 0) or ceiled (2, 1);
    - largest remainders of host at 3: floors (1, 1), layer 1's .5 beats layer 0's .3 -> (1, 2);
      at 4 -> (2, 2); at 5 no layer takes a second extra -> (2, 2); compressed likewise over
      what the host left (caps 4 - host);
    - evenly around the cycle: T over 2 layers is (T // 2, T - T // 2), capped by the room left."""
    p = problem()
    out = [counts(t) for t in p._roundings([(1.5, 1.2, 1.3, 0.0), (2.0, 0.5, 1.5, 0.0)], depth=1, batch=1)]
    a, b, c, d, e = (2, 1, 1, 0), (1, 2, 1, 0), (1, 1, 2, 0), (0, 2, 2, 0), (0, 1, 3, 0)
    assert out == [
        [c, (2, 0, 2, 0)], [d, c],                   # per layer: compressed rounded, then ceiled
        [a, c], [b, c], [b, c],                      # largest remainders, host 3; compressed 2, 3, 4
        [c, c], [d, c], [d, c],                      # host 4
        [c, c], [d, c], [d, c],                      # host 5 (stays at 4)
        [a, c], [a, d], [b, d],                      # evenly, host 3 = (1, 2); compressed (1, 1), (1, 2), (2, 2)
        [c, c], [c, d], [d, d],                      # host 4 = (2, 2)
        [c, e], [c, e], [d, e],                      # host 5 = (2, 3); compressed capped at (2, 1)
    ]


def test_host_compressed_totals_are_rounded_up_and_once_more():
    """With host-compressed experts in the LP (0.7 + 1.0 -> 2), every spread rounding is tried
    at that total and one above: twice as many roundings, and those totals."""
    p = problem()
    out = p._roundings([(1.5, 1.2, 0.6, 0.7), (2.0, 0.5, 0.5, 1.0)], depth=1, batch=1)
    assert len(out) == 2 + 2 * 3 * 2 * 3
    spread = out[2:]
    assert Counter(sum(t.host_compressed for t in tiers) for tiers in spread) == Counter({2: 18, 3: 18})
    assert counts(out[0]) == [(1, 1, 1, 1), (2, 0, 1, 1)]  # both host tiers ceiled per layer
    for tiers in out:
        assert all(t.resident + t.compressed + t.host + t.host_compressed == 4 and min(counts([t])[0]) >= 0
                   for t in tiers)


def test_roundings_that_do_not_fit_move_compressed_experts_to_the_host():
    p = problem(budget=0)  # nothing fits: each rounding ends with every compressed expert moved
    for tiers in p._roundings([(1.5, 1.2, 1.3, 0.0), (2.0, 0.5, 1.5, 0.0)], depth=1, batch=1):
        assert all(t.compressed == 0 for t in tiers)


# ---------------------------------------------------------------- whole-layer roundings
def test_whole_layer_roundings_by_hand():
    """Three layers of four experts, LP residents (0.5, 3, 4): 1.875 layers' worth, so 0 to 3
    whole layers, chosen where the LP leans most resident (layers 2, 1) or evenly (0; 0, 1).
    Host 2.5 -> 3 and host-compressed 0.4 -> 1, each tried at +0..2 and +0..1, spread evenly
    over the paged layers and capped by their room; the rest compressed."""
    p = problem(layers=3)
    out = p._whole_layer_roundings([(0.5, 1.1, 2.0, 0.4), (3.0, 0.5, 0.5, 0.0), (4.0, 0, 0, 0.0)], depth=0, batch=1)
    assert len(out) == 6 * 6
    seen = Counter()
    for tiers in out:
        whole = tuple(i for i, t in enumerate(tiers) if t == TierCounts(4, 0, 0, 0))
        paged = [t for t in tiers if t != TierCounts(4, 0, 0, 0)]
        assert all(t.resident == 0 for t in paged)
        hs = [t.host for t in paged]
        assert max(hs, default=0) - min(hs, default=0) <= 1  # evenly
        seen[whole, sum(hs), sum(t.host_compressed for t in paged)] += 1
    roomy = Counter({(h, hc): 1 for h in (3, 4, 5) for hc in (1, 2)})
    expected = Counter()
    for whole in [(), (2,), (0,)]:  # 8 or more experts' room: every total fits
        expected.update({(whole, h, hc): n for (h, hc), n in roomy.items()})
    for whole in [(1, 2), (0, 1)]:  # one paged layer of 4: host 3 leaves room for 1, 4 and 5 fill it
        expected.update({(whole, 3, 1): 2, (whole, 4, 0): 4})
    expected[(0, 1, 2), 0, 0] = 6
    assert seen == expected
    assert counts(out[0]) == [(0, 3, 1, 0), (0, 3, 1, 0), (0, 2, 1, 1)]  # hc 1 on the last of three


# ---------------------------------------------------------------- to the host until it fits
@pytest.mark.parametrize("host_compressed,over,expected", [
    # three tiers: ceil(over / compressed expert) moves, spread (j+1)n//2 - jn//2 over the paged layers
    (False, 50_000, [(1, 2, 1, 0), (1, 2, 1, 0)]),     # 1.45 -> 2 moves: 1 + 1
    (False, 80_000, [(1, 2, 1, 0), (1, 1, 2, 0)]),     # 2.33 -> 3 moves: 1 + 2
    # four tiers: the first host-compressed expert brings the landing slots (183,501 B) with it
    (True, 40_000, [(1, 0, 0, 3), (1, 0, 0, 3)]),      # (40,000 + 183,501) / 34,406.4 -> 7: 3 + 4, capped at 3
])
def test_compressed_experts_go_to_the_host_evenly_until_the_plan_fits(host_compressed, over, expected):
    p = problem(host_compressed=host_compressed)
    tiers = [TierCounts(1, 3, 0, 0)] * 2
    assert (p.mem.compressed_expert_bytes, p.mem.landing_bytes) == (pytest.approx(34_406.4), 183_501)
    p.budget = p.memory_bytes(tiers, 0, 1) - over
    assert counts(p._to_host_until_it_fits(tiers, [0, 1], 0, 1)) == expected


def test_a_plan_that_fits_or_has_no_paged_layer_is_left_alone():
    p = problem()
    tiers = [TierCounts(1, 3, 0, 0)] * 2
    p.budget = p.memory_bytes(tiers, 0, 1)  # exactly full
    assert p._to_host_until_it_fits(tiers, [0, 1], 0, 1) is tiers
    p.budget -= 1
    assert p._to_host_until_it_fits(tiers, [], 0, 1) is tiers
    moved = p._to_host_until_it_fits(tiers, [1], 0, 1)  # only the listed layers give up experts
    assert moved[0] == tiers[0] and moved[1].compressed < 3


def test_host_compressed_experts_already_held_bring_no_second_landing_charge():
    p = problem()
    tiers = [TierCounts(1, 3, 0, 0), TierCounts(1, 2, 0, 1)]
    p.budget = p.memory_bytes(tiers, 0, 1) - 40_000  # 1.16 compressed experts over: 2 moves, 1 + 1
    assert counts(p._to_host_until_it_fits(tiers, [0, 1], 0, 1)) == [(1, 2, 0, 1), (1, 1, 0, 2)]


# ---------------------------------------------------------------- spans: vLLM's row limit
def test_span_fixing_keeps_the_lps_whole_layers_and_fixes_the_partly_resident_that_do_not_fit(monkeypatch):
    """Four layers of 8 experts, one buffer (groups [0, 1] and [2, 3]), a row limit of 10, 3 slots.
    Group [0, 1]: residents 5 and 6; 3 + 5 fits, 3 + 5 + 6 does not: one of the two is made whole,
    the one the LP leans more toward (layer 1, 0.6). Group [2, 3]: layer 2 is all resident in the
    LP and stays so; layer 3 (3 + 2 rows) fits."""
    monkeypatch.setattr(search, "FUSED_MOE_MAX_ROWS", 10)
    p = problem(layers=4, experts=8)
    values = [(5.0, 3, 0, 0), (6.0, 2, 0, 0), (8.0, 0, 0, 0), (2.0, 6, 0, 0)]
    assert p._span_fixing(values, [0.2, 0.6, 1.0, 0.0], 3.0, depth=0) == (0, 1, 1, 0)
    # Equal leaning: more residents first, then the lower index.
    assert p._span_fixing(values, [0.5, 0.5, 1.0, 0.0], 3.0, depth=0) == (0, 1, 1, 0)
    assert p._span_fixing([(6.0, 2, 0, 0), (6.0, 2, 0, 0)] + values[2:], [0.5, 0.5, 1.0, 0.0], 3.0, 0) == (1, 0, 1, 0)
    # Exactly at the limit fits; nothing fits when the slots alone take it.
    assert p._span_fixing(values, [0.2, 0.6, 1.0, 0.0], 5.0, depth=0) == (0, 1, 1, 0)
    assert p._span_fixing(values, [0.2, 0.6, 1.0, 0.0], 11.0, depth=0) == (1, 1, 1, 1)


def test_spans_bind_only_where_a_group_could_exceed_the_row_limit(monkeypatch):
    """4 layers of 8 at depth 0: a group of two layers spans at most 8 + 2 x 7 = 22 rows."""
    p = problem(layers=4, experts=8)
    assert not p.spans_can_bind(0)
    monkeypatch.setattr(search, "FUSED_MOE_MAX_ROWS", 22)
    assert not problem(layers=4, experts=8).spans_can_bind(0)
    monkeypatch.setattr(search, "FUSED_MOE_MAX_ROWS", 21)
    q = problem(layers=4, experts=8)
    assert q.spans_can_bind(0)
    assert not q.spans_can_bind(1)  # two buffers: groups of one layer, 8 + 7 = 15 rows
    # One paged layer beside one with 7 residents: 1 slot + 7 = 8 rows fits; 7 slots + 7 = 14 does not.
    assert q.spans_fit([TierCounts(7, 1, 0), TierCounts(7, 1, 0), TierCounts(8, 0, 0), TierCounts(8, 0, 0)], 0)
    monkeypatch.setattr(search, "FUSED_MOE_MAX_ROWS", 13)
    assert not q.spans_fit([TierCounts(1, 7, 0), TierCounts(7, 1, 0), TierCounts(8, 0, 0), TierCounts(8, 0, 0)], 0)
    assert _widest_span([TierCounts(1, 7, 0), TierCounts(7, 1, 0), TierCounts(8, 0, 0), TierCounts(8, 0, 0)], 0) == 15
    assert _widest_span([TierCounts(8, 0, 0)] * 4, 0) == 0


# ---------------------------------------------------------------- the MILP: start, cutoff, status
def test_the_milp_returns_only_placements_that_beat_the_incumbent_by_the_gap():
    """560 KiB, one sequence, depth 0: the best placement pages one expert per layer (one slot)."""
    p = problem(layers=2, experts=4, budget=560 * 1024, mip_gap=0.0)
    best = p.milp(1, 0)
    assert best is not None and best.status == "MILP optimal"
    # One layer pages its expert compressed, the other to the host (a tie between the two orders).
    assert sorted(counts(best.tiers)) == [(3, 0, 1, 0), (3, 1, 0, 0)] and best.staging_slots == 1
    rate = best.batch / best.step_time_s
    # The cutoff goes to HiGHS as its objective bound, which prunes by the LP bound: an incumbent
    # out of the LP's reach (3x) ends the MILP at its root. (HiGHS may still report a solution
    # above the bound, as here below 1.5x; the search compares every answer with its incumbent.)
    assert p.milp(1, 0, incumbent_rate=rate * 3) is None
    again = p.milp(1, 0, incumbent_rate=rate * 0.98)
    assert again is not None and again.step_time_s == pytest.approx(best.step_time_s, rel=1e-9)
    other = p.milp(1, 0, slots=2)
    assert other is not None and other.staging_slots == 2 and other.step_time_s > best.step_time_s
    p.gap = 0.05
    assert p.milp(1, 0).status == "MILP optimal within 5%"


def test_the_milp_finds_placements_well_past_the_lps_rounding():
    """Qwen3-30B-A3B on the H200 at 66 GiB, 160 sequences, depth 2: the LP's rounding runs at
    ~4,540-4,600 tok/s and the MILP finds ~4,970. Given the rounding as a MIP start, HiGHS 1.16
    with presolve returned the start as optimal (4,542): the search gives no start."""
    import profiles
    from planner.memory import MemoryModel

    profile = profiles.load("qwen3-30b-a3b", gpu="h200")
    p = _Problem(profile, 66 << 30, profile.hardware.host_pinned_bytes, WorkloadShape(),
                 MemoryModel.of(profile).reserve_bytes, None, 1024)
    rate = lambda c: c.batch / c.step_time_s  # noqa: E731
    rounding, found = p.relax(160, 2).rounding, p.milp(160, 2)
    assert rate(found) > rate(rounding) * 1.05


def test_a_bound_is_certified_only_within_the_gap():
    rounding = Candidate(8, 1, [TierCounts(4, 0, 0)], 1.05, 0, "LP rounding")
    r = Relaxation(8, 1, {None: 1.2, 2: 1.0, 3: 1.1}, rounding)
    assert r.bound_s == 1.0
    assert r.certified(0.05) and not r.certified(0.049)
    assert not Relaxation(8, 1, {None: 1.0}, None).certified(1.0)


def test_relax_stops_where_the_lp_bound_cannot_beat_the_incumbent():
    p = problem(layers=2, experts=4, budget=560 * 1024)
    relaxed = p.relax(1, 0)
    assert relaxed is not None and relaxed.rounding is not None
    assert set(relaxed.bounds_s) == {1, 2, 3, 4}  # few experts: one LP per slot count that fits (0 does not)
    assert relaxed.rounding.step_time_s >= relaxed.bound_s * (1 - 1e-9)
    assert relaxed.rounding.step_time_s >= p.milp(1, 0).step_time_s * (1 - 1e-9)  # no rounding beats the MILP
    assert relaxed.rounding.status == (f"LP rounding, within {relaxed.rounding.step_time_s / relaxed.bound_s - 1:.2%}"
                                       " of its LP bound")
    # Past every slot count's bound nothing is rounded; past the slot-free LP's bound (lower: the
    # slots' integrality is what the per-slot LPs add) the candidate is dropped at once.
    assert p.relax(1, 0, incumbent_rate=1 / relaxed.bound_s * 1.01).rounding is None
    free = p._build(1, 0, integer=False, minimize_memory=False)[2] + p.cost.fixed_s(p.step(1))
    assert free < relaxed.bound_s * 0.99
    assert p.relax(1, 0, incumbent_rate=1 / free * 0.999) is not None
    assert p.relax(1, 0, incumbent_rate=1 / free * 1.001) is None


# ---------------------------------------------------------------- a running engine's KV, and no plan
def test_kv_is_per_sequence_or_the_running_engines_whole_cache():
    p = problem()
    assert p.kv_bytes(3) == 3 * p.kv_per_seq
    fixed = problem(kv_cache_bytes=4 * p.kv_per_seq)
    assert fixed.kv_bytes(1) == fixed.kv_bytes(4) == 4 * p.kv_per_seq
    assert fixed.kv_bytes(5) == float("inf")


def test_why_nothing_fits_by_hand():
    p = problem(budget=300 * 1024)
    smallest, tiers = p.smallest_budget(0)
    assert smallest == pytest.approx(p.memory_bytes(tiers, 0, 1), abs=1)
    message = str(p.infeasible(0))
    assert message.startswith("no plan for tiny-2x4 on toy fits a budget of 300.00 KiB; the smallest budget that works is ")
    for part in ("non-expert weights", "staging pool", "one sequence's KV", "reserve"):
        assert part in message
    assert "holds only" not in message
    host_bound = problem(budget=300 * 1024, host=2 * p.model.expert_bytes)
    assert "(the host budget of 96.00 KiB holds only 2 experts, so the rest stay on the GPU)" in str(
        host_bound.infeasible(0))


def test_why_nothing_meets_a_latency_limit():
    p = problem(tpot_limit_s=1e-9)
    assert "meets a per-token limit of 1e-06 ms at any budget" in str(p.infeasible(0))
    roomy = problem(budget=10 * MiB, tpot_limit_s=p.cost.resident_step_time(p.step(1)).total_s * 1.5)
    message = str(roomy.infeasible(0))
    assert message.endswith("the smallest placement fits but none meets the limit") and "under a per-token limit" in message
    with pytest.raises(InfeasibleError):
        raise roomy.infeasible(0)


# ---------------------------------------------------------------- bad options name the field and value
@pytest.mark.parametrize("options,message", [
    ({"objective": "latency"}, "objective: expected 'throughput' or 'throughput_under_latency', got 'latency'"),
    ({"objective": "throughput_under_latency"}, "tpot_limit_s: objective 'throughput_under_latency' needs a limit > 0, got None"),
    ({"objective": "throughput_under_latency", "tpot_limit_s": 0}, "needs a limit > 0, got 0"),
    ({"top_k": 0}, "top_k: must be >= 1, got 0"),
    ({"max_num_seqs": 0}, "max_num_seqs must be >= 1 and prefetch_depths >= 0, got 0, (0, 1, 2, 3)"),
    ({"prefetch_depths": ()}, "got 1024, ()"),
    ({"prefetch_depths": (1, -1)}, "got 1024, (1, -1)"),
    ({"requests": 0}, "requests: must be >= 1, got 0"),
])
def test_bad_options_are_refused_by_name(options, message):
    from fluxmoe.errors import ConfigError
    from planner.search import candidate_plans

    with pytest.raises(ConfigError) as info:
        candidate_plans(Profile(tiny_model(), tiny_gpu()), 560 * 1024, reserve_bytes=RESERVE, **options)
    assert message in str(info.value)


def test_a_milp_stopped_at_its_node_limit_says_so(monkeypatch):
    """A node limit of 1 on a MILP whose root does not close (6 layers of 32 experts, slots free)."""
    monkeypatch.setattr(search, "MILP_NODE_LIMIT", 1)
    p = problem(layers=6, experts=32, budget=4800 * 1024, host=64 * MiB, mip_gap=0.0)
    found = p.milp(1, 1)
    assert found is not None and found.status == "MILP stopped at its limit of 1 nodes"


# ---------------------------------------------------------------- the baselines a plan is compared with
def test_plain_vllm_runs_every_expert_resident_at_the_most_sequences_its_kv_holds():
    """740 KiB: KV left after every weight holds 5.275 sequences of 640 tokens, so 5 (vLLM
    admits by KV: a batch between the grid's 4 and 8)."""
    from planner.search import baselines

    p = problem(budget=740 * 1024)
    plain, _ = baselines(p)
    assert p.mem.resident_kv(p.budget) / p.kv_per_seq == pytest.approx(5.275)
    assert (plain.name, plain.feasible, plain.kv_cache_bytes) == ("vllm", True, p.mem.resident_kv(p.budget))
    expected = p.cost.resident_step_time(p.step(5))
    assert plain.prediction.batch_size == 5
    assert plain.prediction.step_time_s == pytest.approx(expected.total_s, rel=1e-12)
    assert plain.prediction.output_tokens_per_s == pytest.approx(5 / expected.total_s, rel=1e-12)
    assert plain.prediction.tokens_per_s == pytest.approx(5 / expected.total_s * (1 + 512 / 128), rel=1e-12)
    assert plain.prediction.gpu_busy_s == pytest.approx(expected.gpu_s, rel=1e-12)


def test_cpu_offload_offloads_what_its_batch_needs_and_picks_its_best_batch():
    """400 KiB: the weights alone overshoot, so every batch offloads experts to make room for its KV."""
    from planner.cost_model import BATCH_GRID
    from planner.search import baselines

    p = problem(budget=400 * 1024)
    plain, offload = baselines(p)
    assert not plain.feasible and plain.note == "the model's weights and one sequence's KV exceed the budget"
    assert (plain.prediction, plain.kv_cache_bytes) == (None, 0)
    assert (offload.name, offload.feasible, offload.note) == ("vllm_offload", True, "")
    batch = offload.prediction.batch_size
    asked = p.mem.offload_for_kv(p.budget, batch * p.kv_per_seq)
    need = p.mem.uva_offloaded_bytes(asked)  # vLLM moves whole parameters
    assert need >= asked > 0 and offload.offload_bytes == need
    assert p.mem.uva_offloaded_bytes(need) == need  # asking for what it moved moves the same
    assert offload.kv_cache_bytes == p.mem.resident_kv(p.budget) + need
    t = p.cost.offload_step_time(p.step(batch), need)
    assert offload.prediction.step_time_s == pytest.approx(t.total_s, rel=1e-12)
    assert offload.prediction.link_busy_s == pytest.approx(t.link_s, rel=1e-12)
    for other in BATCH_GRID:  # no other batch that fits the host budget does better
        ask = p.mem.offload_for_kv(p.budget, other * p.kv_per_seq)
        more = p.mem.uva_offloaded_bytes(ask)
        if other <= 1024 and ask <= p.mem.all_experts_bytes and more <= p.host_budget:
            assert other / p.cost.offload_step_time(p.step(other), more).total_s <= \
                offload.prediction.output_tokens_per_s * (1 + 1e-12)
