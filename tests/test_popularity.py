"""Routing-aware residency: measured per-expert popularity in the cost model and the planner."""

import itertools
import random

import pytest

import planner
from fluxmoe.errors import ConfigError
from planner.cost_model import CostModel, StepShape, TierCounts
from planner.memory import MemoryModel
from planner.popularity import ExpertPopularity, uniform
from planner.search import BATCH_GRID, PREFETCH_DEPTHS, ROUTED_FETCH_MAX_SHARE
from profiles import Profile
from tests.conftest import tiny_gpu, tiny_model

RESERVE = 16 << 10


def test_the_chords_are_exact_at_their_breakpoints_and_never_below_between():
    """Against the expected routed count of the h coldest experts, summed by hand for every h."""
    rng = random.Random(3)
    E, k = 40, 4
    raw = [rng.random() ** 3 for _ in range(E)]
    pop = ExpertPopularity([[k * r / sum(raw) for r in raw]])
    for tokens in (1, 7, 64):
        cold = sorted((1 - (1 - p) ** tokens for p in pop.picks[0]))
        lines = pop.routed_chords(0, tokens)
        for h in range(E + 1):
            exact = sum(cold[:h])
            assert pop.expected_routed(0, pop.coldest(0, h), tokens) == pytest.approx(exact, abs=1e-12)
            chord = max(a * h + b for a, b in lines)
            assert chord >= exact - 1e-9
        at = {0, E}
        assert all(max(a * h + b for a, b in lines) == pytest.approx(sum(cold[:h]), abs=1e-9) for h in at)
        assert max(max(a * h + b for a, b in lines) - sum(cold[:h]) for h in range(E + 1)) < 0.05 * sum(cold)


def test_counts_become_shares_and_bad_counts_are_refused():
    pop = ExpertPopularity.from_counts([[3, 1, 0, 4], [2, 2, 2, 2]], tokens=4, experts_per_token=2)
    assert pop.picks[0] == [0.75, 0.25, 0.0, 1.0] and pop.tokens == 4
    assert pop.order(0) == [3, 0, 1, 2] and pop.coldest(0, 2) == [1, 2]
    with pytest.raises(ConfigError, match=r"counts\[1\]: 7 picks, but 4 tokens pick 2 experts each \(8\)"):
        ExpertPopularity.from_counts([[3, 1, 0, 4], [2, 2, 2, 1]], tokens=4, experts_per_token=2)
    with pytest.raises(ConfigError, match=r"field 'picks\[0\]': a share must be in \[0, 1\], got 1.5"):
        ExpertPopularity([[1.5, 0.5]])
    with pytest.raises(ConfigError, match=r"field 'picks\[1\]': 3 experts, layer 0 has 2"):
        ExpertPopularity([[0.5, 0.5], [0.3, 0.3, 0.4]])
    with pytest.raises(ConfigError, match="tokens: counts need at least one token, got 0"):
        ExpertPopularity.from_counts([[0, 0]], tokens=0, experts_per_token=1)
    assert uniform(2, 4, 2).distance(pop) == pytest.approx(
        (sum(abs(0.5 - p) for p in pop.picks[0]) / 4 + 0) / 2)


def test_uniform_popularity_costs_what_uniform_routing_does():
    profile = Profile(tiny_model(3, 8, 2), tiny_gpu())
    flat = uniform(3, 8, 2)
    plain, measured = CostModel(profile), CostModel(profile, popularity=flat)
    tiers = [TierCounts(3, 1, 4), TierCounts(8, 0, 0), TierCounts(2, 0, 6)]
    for tokens in (1, 3, 20):
        step = StepShape(tokens, tokens, 100)
        assert measured.active_experts(tokens) == pytest.approx(plain.active_experts(tokens), rel=1e-12)
        for routed in (False, True):
            assert measured.step_time(tiers, step, 1, routed).total_s == pytest.approx(
                plain.step_time(tiers, step, 1, routed).total_s, rel=1e-12)


def test_which_experts_sit_on_the_host_prices_routed_fetch():
    """One token, top-1, shares 0.7/0.2/0.1/0: the two host experts' routed odds, by hand."""
    profile = Profile(tiny_model(1, 4, 1), tiny_gpu())
    pop = ExpertPopularity([[0.7, 0.2, 0.1, 0.0]])
    cost = CostModel(profile, popularity=pop)
    step = StepShape(1, 1, 10)
    tiers = [TierCounts(2, 0, 2)]
    x = cost.routed_s_per_expert
    assert cost.layer_routed_s(tiers[0], step) == pytest.approx(0.1 * x)  # the coldest: ids 2 and 3
    assert cost.layer_routed_s(tiers[0], step, 0, [0, 1]) == pytest.approx(0.9 * x)
    hot = cost.step_time(tiers, step, 1, True, host_ids=[[0, 1]]).total_s
    assert hot - cost.step_time(tiers, step, 1, True).total_s == pytest.approx(0.8 * x)


SHORT_PROMPTS = planner.WorkloadShape(64, 1024)  # steps of about one token per sequence


def brute_force_best(profile: Profile, pop: ExpertPopularity, budget: int, max_num_seqs: int) -> float:
    """Best output tokens/s over every assignment of expert ids to three tiers per layer, both
    fetch modes (routed where the planner offers it), every depth and batch."""
    m = profile.model
    cost, E = CostModel(profile, popularity=pop), m.num_experts
    wl = SHORT_PROMPTS
    mem = MemoryModel.of(profile, RESERVE)
    kv = m.kv_bytes_per_sequence(wl.prompt_tokens + wl.output_tokens)
    layer_options = [list(itertools.product(range(3), repeat=E)) for _ in range(m.num_moe_layers)]
    best = 0.0
    for assignment in itertools.product(*layer_options):
        tiers = [TierCounts(a.count(0), a.count(1), a.count(2)) for a in assignment]
        host_ids = [[e for e, t in enumerate(a) if t == 2] for a in assignment]
        for depth in PREFETCH_DEPTHS:
            for batch in (b for b in BATCH_GRID if b <= max_num_seqs):
                if mem.placement_bytes(tiers, depth) + batch * kv > budget:
                    continue
                step = planner.StepShape.steady_decode(batch, wl.prompt_tokens, wl.output_tokens)
                modes = [False] + ([True] if any(t.host for t in tiers)
                                   and cost.routed_share(step.tokens) <= ROUTED_FETCH_MAX_SHARE else [])
                for routed in modes:
                    best = max(best, batch / cost.step_time(tiers, step, depth, routed, host_ids).total_s)
    return best


@pytest.mark.parametrize("shares,budget_kib,seqs,routed", [
    ([[0.6, 0.3, 0.1, 0.0], [0.05, 0.05, 0.1, 0.8]], 440, 1, True),
    ([[0.6, 0.3, 0.1, 0.0], [0.05, 0.05, 0.1, 0.8]], 500, 2, True),
    ([[0.6, 0.3, 0.1, 0.0], [0.05, 0.05, 0.1, 0.8]], 680, 2, False),
    ([[0.25] * 4, [0.4, 0.4, 0.1, 0.1]], 470, 2, None),
])
def test_the_plan_is_the_best_assignment_of_expert_ids_to_tiers(shares, budget_kib, seqs, routed):
    """Brute force over which experts go where (not only how many): the planner's plan is as
    fast and keeps each layer's coldest experts on the host."""
    profile = Profile(tiny_model(2, 4, 1), tiny_gpu(0.3))
    pop = ExpertPopularity(shares)
    budget = budget_kib * 1024
    plan = planner.optimize(profile, budget, reserve_bytes=RESERVE, max_num_seqs=seqs, mip_gap=0,
                            host_compressed=False, popularity=pop, workload=SHORT_PROMPTS)
    assert plan.predicted.output_tokens_per_s == pytest.approx(brute_force_best(profile, pop, budget, seqs), rel=1e-9)
    for i, lp in enumerate(plan.layers):
        assert lp.expert_order == pop.order(i)
        assert sorted(lp.host) == sorted(pop.coldest(i, len(lp.host)))
    if routed is not None:
        assert plan.routed_fetch is routed


def test_measured_skew_turns_into_a_faster_routed_plan():
    """Qwen3-Next on the H200 at 60 GiB, 16 sequences: with a Zipf(1) popularity measured over
    experts in a shuffled order, the plan fetches routed-only with the coldest experts on the
    host, and predicts over twice the rate of the plan made for uniform routing."""
    import profiles

    profile = profiles.load("qwen3-next-80b-a3b", gpu="h200")
    m = profile.model
    rng = random.Random(0)
    orders = [rng.sample(range(m.num_experts), m.num_experts) for _ in range(m.num_moe_layers)]
    pop = ExpertPopularity.zipf(m.num_moe_layers, m.num_experts, m.experts_per_token, 1.0, orders)
    flat = planner.optimize(profile, "60GiB", max_num_seqs=16)
    skewed = planner.optimize(profile, "60GiB", max_num_seqs=16, popularity=pop)
    assert skewed.routed_fetch and skewed.predicted.output_tokens_per_s > 2 * flat.predicted.output_tokens_per_s
    assert all(set(lp.host) == set(orders[i][len(orders[i]) - len(lp.host):]) for i, lp in enumerate(skewed.layers))
    with pytest.raises(ConfigError, match="popularity: covers 1 layers of 512 experts, model 'qwen3-next-80b-a3b' "
                                          "has 48 MoE layers of 512"):
        planner.optimize(profile, "60GiB", popularity=ExpertPopularity([[10 / 512] * 512]))
