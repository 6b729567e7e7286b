"""The serving simulator: closed forms, conservation, preemption, Little's law, verification."""

import itertools

import numpy as np
import pytest

import planner
import profiles
from fluxmoe.errors import ConfigError
from planner.cost_model import CostModel, StepShape, TierCounts
from planner.search import BATCH_GRID
from profiles import Profile
from simulator import Lengths, Workload, simulate, verified_optimize
from simulator.scheduler import VLLMScheduler
from simulator.workload import Request
from tests.conftest import tiny_gpu, tiny_model

GiB = 2**30


@pytest.fixture(scope="module")
def mixtral_h200():
    return profiles.load("mixtral-8x7b", gpu="h200")


def resident(profile, kv_cache_bytes, max_num_seqs, **kw):
    return dict(system="vllm", kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs, **kw)


def test_one_request_takes_one_prefill_and_output_minus_one_decodes(mixtral_h200):
    cost = CostModel(mixtral_h200)
    wl = Workload("one", [Request(0, 0.0, 100, 5)])
    result = simulate(mixtral_h200, wl, **resident(mixtral_h200, 10 * GiB, 8))
    steps = [StepShape(100, 1, 100)] + [StepShape(1, 1, 100 + i) for i in range(1, 5)]
    times = [cost.resident_step_time(s).total_s for s in steps]
    assert result.ttft_s.p50 == pytest.approx(times[0], rel=1e-9)
    assert result.e2e_s.p50 == pytest.approx(sum(times), rel=1e-9)
    assert result.output_tokens == 5 and result.steps == 5


def test_offline_fixed_batch_throughput_by_hand(mixtral_h200):
    """N requests at t=0: one step prefills all, then output-1 decode steps of N tokens."""
    cost = CostModel(mixtral_h200)
    n, prompt, output = 8, 64, 10
    wl = Workload.synthetic(n, prompt, output)
    result = simulate(mixtral_h200, wl, **resident(mixtral_h200, 10 * GiB, 16))
    total = cost.resident_step_time(StepShape(n * prompt, n, prompt)).total_s + sum(
        cost.resident_step_time(StepShape(n, n, prompt + i)).total_s for i in range(1, output))
    assert result.output_tokens_per_s == pytest.approx(n * output / total, rel=1e-9)


def _plan_in_regime(profile, regime):
    """The plan at the first budget (from 40 GiB up) whose steps are in `regime`."""
    cost = CostModel(profile)
    for gib in range(40, 131, 2):
        # without host-compressed experts, plans that page only compressed experts exist
        plan = planner.optimize(profile, f"{gib}GiB", host_compressed=regime != "no host experts")
        t = cost.step_time(plan.tier_counts(), StepShape(32, 32, 40), plan.prefetch_depth)
        paged = any(lp.paged for lp in plan.layers)
        if regime == "link-bound" and t.link_s > 10 * t.gpu_s:
            return plan
        if regime == "no host experts" and paged and t.link_s == 0:
            return plan
    raise AssertionError(f"no budget gives a {regime} plan")


@pytest.mark.parametrize("regime", ["link-bound", "no host experts"])
def test_steady_decode_steps_match_the_cost_model(mixtral_h200, regime):
    """Where the closed form is exact the event-by-event pipeline reproduces it: link-bound
    steps take sum(transfers), steps with nothing on the host sum(compute + decode). (In
    between, with a few host experts per layer, the closed form is an approximation.)"""
    plan = _plan_in_regime(mixtral_h200, regime)
    n = 32
    wl = Workload.synthetic(n, 16, 60)
    result = simulate(mixtral_h200, wl, plan=plan, max_num_batched_tokens=8192)
    middle = range(20, 50)  # decode steps after the pipeline filled; step k has context 16 + k
    measured = np.mean([result.timeline[k].end_s - result.timeline[k].start_s for k in middle])
    cost = CostModel(mixtral_h200)
    predicted = np.mean([cost.step_time(plan.tier_counts(), StepShape(n, n, 16 + k), plan.prefetch_depth).total_s
                         for k in middle])
    assert measured == pytest.approx(predicted, rel=0.02)


def test_every_request_finishes_once_and_tokens_add_up(mixtral_h200):
    plan = planner.optimize(mixtral_h200, "60GiB")
    wl = Workload.synthetic(300, Lengths(300, 1.0), Lengths(40, 1.0), rate=20.0, seed=4)
    result = simulate(mixtral_h200, wl, plan=plan)
    ids = [s.request.id for s in result.sequences]
    assert sorted(ids) == list(range(300))
    assert all(s.generated == s.request.output_tokens for s in result.sequences)
    assert result.output_tokens == sum(r.output_tokens for r in wl.requests)
    assert sum(r.tokens for r in result.timeline) >= sum(r.prompt_tokens + r.output_tokens - 1 for r in wl.requests)


def _drive(scheduler: VLLMScheduler, requests) -> None:
    for r in requests:
        scheduler.add(r)
    while scheduler.has_work:
        step = scheduler.schedule()
        assert not step.empty
        scheduler.complete(step, 0.0)


def test_preemption_happens_when_and_only_when_kv_runs_out():
    model = profiles.load_model("mixtral-8x7b")
    requests = [Request(i, 0.0, 200, 300) for i in range(16)]
    need_all = 16 * model.kv_bytes_per_sequence(500)
    ample = VLLMScheduler(model, need_all, max_num_seqs=16)
    _drive(ample, requests)
    assert ample.preemptions == 0
    tight = VLLMScheduler(model, need_all // 3, max_num_seqs=16)
    _drive(tight, requests)
    assert tight.preemptions > 0
    assert all(free < need for free, need in tight.preemption_log)  # only when the next block did not fit


def test_littles_law_in_steady_state(mixtral_h200):
    """Mean number in system = arrival rate x mean time in system, over a steady window."""
    plan = planner.optimize(mixtral_h200, "120GiB")
    rate = 6.0
    wl = Workload.synthetic(3000, Lengths(256, 0.5), Lengths(64, 0.5), rate=rate, seed=7)
    result = simulate(mixtral_h200, wl, plan=plan, keep_timeline=False)
    arrive = np.array([s.request.arrival_s for s in result.sequences])
    leave = np.array([s.finish_s for s in result.sequences])
    t0, t1 = 0.2 * arrive.max(), 0.8 * arrive.max()
    grid = np.linspace(t0, t1, 4001)
    in_system = [(np.sum((arrive <= t) & (leave > t))) for t in grid]
    L = float(np.mean(in_system))
    window = (arrive >= t0) & (arrive < t1)
    lam = window.sum() / (t1 - t0)
    W = float(np.mean(leave[window] - arrive[window]))
    assert L == pytest.approx(lam * W, rel=0.05)
    # Over the whole run (empty at both ends) the engine's own time average obeys it exactly.
    end = result.makespan_s + wl.requests[0].arrival_s
    assert result.mean_in_system * end == pytest.approx(len(wl) * result.e2e_s.mean, rel=1e-6)


def test_plan_for_another_model_is_refused(mixtral_h200):
    plan = planner.optimize(profiles.load("qwen3-30b-a3b", gpu="h200"), "40GiB")
    with pytest.raises(ConfigError, match="plan was made for model 'qwen3-30b-a3b'"):
        simulate(mixtral_h200, Workload.synthetic(4, 10, 10), plan=plan)


def test_request_longer_than_context_is_refused(mixtral_h200):
    plan = planner.optimize(mixtral_h200, "120GiB")
    with pytest.raises(ConfigError, match="needs 40000 tokens of context, more than the model's 32768"):
        simulate(mixtral_h200, Workload("long", [Request(0, 0.0, 39_000, 1000)]), plan=plan)


def test_verified_planner_is_within_3_percent_of_simulating_every_placement():
    profile = Profile(tiny_model(2, 3), tiny_gpu(1.0))
    budget, reserve = 400 * 1024, 16 << 10
    wl = Workload.synthetic(40, 64, 16)
    plan = verified_optimize(profile, budget, wl, top_k=4, reserve_bytes=reserve, max_num_seqs=64, mip_gap=0)
    m, cost = profile.model, CostModel(profile)
    kv_seq = m.kv_bytes_per_sequence(80)
    best = 0.0
    per_layer = [TierCounts(r, c, 3 - r - c) for r in range(4) for c in range(4 - r)]
    for tiers in itertools.product(per_layer, repeat=2):
        for depth in (0, 1, 2, 3):
            slots = max(t.paged for t in tiers)
            weights = sum(t.resident * m.expert_bytes + t.compressed * cost.compressed_expert_bytes for t in tiers)
            kv = budget - m.non_expert_bytes - reserve - weights - (depth + 1) * slots * m.expert_bytes
            batches = [b for b in BATCH_GRID if b <= 64 and b * kv_seq <= kv]
            if not batches:
                continue
            candidate = planner.optimize(profile, budget, reserve_bytes=reserve, max_num_seqs=64, mip_gap=0)
            candidate.layers = [planner.LayerPlan(l, list(range(t.resident)), list(range(t.resident, t.resident + t.compressed)),
                                                  list(range(t.resident + t.compressed, 3))) for l, t in zip(m.moe_layers, tiers)]
            candidate.prefetch_depth, candidate.kv_cache_bytes, candidate.max_num_seqs = depth, int(kv), batches[-1]
            result = simulate(profile, wl, plan=candidate, keep_timeline=False)
            best = max(best, result.output_tokens_per_s)
    assert plan.simulated.output_tokens_per_s >= 0.97 * best


def test_malformed_trace_names_line_and_column(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,10,5\n1.0,ten,5\n")
    with pytest.raises(ConfigError, match=r"trace\.csv: line 3, column 2 \(ContextTokens\): expected a whole number"):
        Workload.from_trace(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,10,5\n")
    with pytest.raises(ConfigError, match="line 2, column 1: cannot read timestamp 'yesterday'"):
        Workload.from_trace(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,10\n")
    with pytest.raises(ConfigError, match="line 2: expected 3 columns"):
        Workload.from_trace(path)


def test_azure_trace_replays_relative_to_its_first_row():
    """The first 200 rows of Azure's 2023 code trace (CC BY 4.0), shipped for tests."""
    from pathlib import Path

    trace = Path(__file__).resolve().parent.parent / "simulator" / "traces" / "azure_llm_2023_code_head.csv"
    wl = Workload.from_trace(trace)
    assert wl.requests[0].arrival_s == 0.0
    assert wl.requests[1].arrival_s == pytest.approx(0.052, abs=1e-6)
    assert (wl.requests[0].prompt_tokens, wl.requests[0].output_tokens) == (4808, 10)


def test_vllm_offload_is_tuned_like_a_user_would():
    """The offload baseline reported is the best of its settings, from the least offload that
    holds the longest request to all the host budget takes, the planner's own included."""
    import planner
    import profiles
    from fluxmoe.names import System
    from planner.memory import MemoryModel
    from simulator.compare import baseline_config, offload_settings, simulate_systems
    from simulator.engine import simulate
    from simulator.workload import parse_workload

    profile = profiles.load("mixtral-8x7b", gpu="h200")
    workload = parse_workload("fixed:n=48,prompt=512,output=64")
    plan = planner.optimize(profile, "46GiB", workload=workload.shape())
    settings = offload_settings(profile, plan, workload)
    assert baseline_config(plan, System.VLLM_OFFLOAD) in settings and len(settings) >= 5
    mem = MemoryModel.of(profile)
    assert min(s["kv_cache_bytes"] for s in settings) >= mem.kv_per_sequence(576)
    assert max(s["offload_bytes"] for s in settings) <= min(plan.host_budget_bytes, mem.all_experts_bytes)
    each = [simulate(profile, workload, system="vllm_offload", keep_timeline=False, **s).output_tokens_per_s
            for s in settings]
    tuned = simulate_systems(profile, plan, workload, systems=[System.VLLM_OFFLOAD],
                             keep_timeline=False)[System.VLLM_OFFLOAD]
    assert tuned.output_tokens_per_s == max(each)
    assert tuned.setting["offload_bytes"] == settings[each.index(max(each))]["offload_bytes"]


def test_the_verified_pick_is_never_worse_than_plain_vllm_when_kv_binds():
    """Long prompts at the full H200: KV, not weights, limits the batch. An all-resident plan
    with vLLM's own admission is plain vLLM, so the pick simulates at least as fast."""
    import profiles
    from fluxmoe.names import System
    from simulator.compare import simulate_systems, verified_optimize
    from simulator.workload import parse_workload

    profile = profiles.load("mixtral-8x7b", gpu="h200")
    workload = parse_workload("fixed:n=160,prompt=4096,output=256")
    plan = verified_optimize(profile, "139.8GiB", workload)
    results = simulate_systems(profile, plan, workload, systems=[System.FLUXMOE, System.VLLM], keep_timeline=False)
    assert results[System.FLUXMOE].output_tokens_per_s >= results[System.VLLM].output_tokens_per_s


def _paged_steps(tiers, depth, steps=12, pcie=0.05):
    """PagedExecution alone on a toy model: `steps` equal steps; (step times, busy, env)."""
    import simpy

    from planner.cost_model import CostModel, StepShape
    from profiles import Profile
    from simulator.execution import PagedExecution
    from tests.conftest import tiny_gpu, tiny_model

    cost = CostModel(Profile(tiny_model(len(tiers), 4), tiny_gpu(pcie)))
    env = simpy.Environment()
    execution = PagedExecution(env, cost, tiers, depth)
    step, times = StepShape(8, 8, 100), []

    def run():
        for _ in range(steps):
            start = env.now
            yield env.process(execution.run_step(step))
            times.append(env.now - start)

    env.process(run())
    env.run()
    return times, execution, cost, step


def test_paged_execution_by_hand_serial_at_depth_0_one_link_and_every_second_accounted():
    from planner.cost_model import TierCounts

    tiers = [TierCounts(1, 1, 2), TierCounts(0, 2, 2), TierCounts(2, 0, 2)]
    times, ex, cost, step = _paged_steps(tiers, depth=0)
    compute = cost.layer_compute_s(step)
    transfer = [cost.layer_transfer_s(t) for t in tiers]
    decode = [cost.layer_decode_s(t) for t in tiers]
    # Depth 0: a layer's experts start crossing once the layer before it has finished, and its
    # decodes run beside them, so a step is each layer's transfer or decodes (the longer), then
    # its compute, in turn; the first layer's transfer starts when the last layer ends, under
    # the step's fixed part (which is shorter).
    assert transfer[0] > cost.fixed_s(step)
    assert any(d > 0 for d in decode)
    serial = sum(max(t, d) for t, d in zip(transfer, decode)) + sum(compute)
    assert times[-1] == pytest.approx(serial, rel=1e-9)
    n = len(times)
    assert ex.busy.gpu_s == pytest.approx(n * (sum(compute) + sum(decode) + cost.fixed_s(step)), rel=1e-9)
    assert ex.busy.decode_s == pytest.approx(n * sum(decode), rel=1e-9)
    assert ex.busy.gpu_s + ex.busy.stall_s == pytest.approx(sum(times), rel=1e-9)  # the GPU computes or waits
    assert n * sum(transfer) <= ex.busy.link_s * (1 + 1e-9) <= (n + 1) * sum(transfer)
    # Depth 2, link-bound: the one link carries the layers one after another, all the time.
    deep, *_ = _paged_steps(tiers, depth=2)
    assert deep[-1] == pytest.approx(sum(transfer), rel=1e-9) and deep[-1] < serial
