"""Routed-only fetch (executor/routed_fetch.py, executor/routed_stack.py) on the CPU: every mode
gives the bits of the all-resident stack, and moves exactly the experts it should."""

import pytest
import torch

from executor.moe_layer import random_stack
from executor.routed_fetch import RoutedFetch, routed_experts
from executor.routed_stack import MODES, RoutedMoEStack, route, routed_reference
from fluxmoe.errors import ConfigError

L, H, I, E, K = 4, 32, 48, 16, 2


def _stack(seed=0):
    return random_stack(L, H, I, E, torch.device("cpu"), seed)


def _picks(x, routers, stacks):
    """Per layer, the experts the reference's tokens pick, and the guess for it (the layer's
    router on the previous layer's input; none for the first), counted by hand from its routing."""
    from executor.routed_stack import routed_moe

    routed, guesses = [], [set()]
    for l, (router, (w13, w2)) in enumerate(zip(routers, stacks)):
        ids, gates = route(x, router, K)
        routed.append(set(ids.flatten().tolist()))
        if l + 1 < len(routers):
            guesses.append(set(route(x, routers[l + 1], K)[0].flatten().tolist()))
        x = routed_moe(x, ids, gates, w13, w2)
    return routed, guesses


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["lazy", "eager"])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_every_mode_gives_the_resident_stacks_bits_and_moves_what_it_should(mode, order, tokens):
    routers, stacks = _stack()
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    want = routed_reference(x, routers, stacks, K)
    stack = RoutedMoEStack(routers, stacks, K, "cpu", mode, cpu_order=order)
    for step in range(2):  # the second step reuses buffers that hold the other layers' experts
        assert torch.equal(stack.forward(x).view(torch.int16), want.view(torch.int16)), (mode, order, step)
    picks, guesses = _picks(x, routers, stacks)
    routed = sum(len(p) for p in picks)
    c = stack.counters()
    if mode == "whole":
        assert c["moved"] == 2 * L * E and c["routed"] == 0
    elif mode == "routed":
        assert c == {"moved": 2 * routed, "routed": 2 * routed, "hits": 0}
    else:  # every guess moved, then every miss, once each
        hits = sum(len(p & g) for p, g in zip(picks, guesses))
        moved = sum(len(g) + len(p - g) for p, g in zip(picks, guesses))
        assert c == {"moved": 2 * moved, "routed": 2 * routed, "hits": 2 * hits}
    if mode != "whole" and tokens == 1:
        assert c["moved"] < 2 * L * E  # one token picks K of E experts: most never cross the link


def test_the_guess_is_fetched_before_the_router_needs_it():
    """Predicted mode, lazy CPU order: the guess runs only because compute waits for it, so
    hits > 0 shows the wait is there (layers after the first, where a guess exists)."""
    routers, stacks = _stack(1)
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    stack = RoutedMoEStack(routers, stacks, K, "cpu", "predicted", cpu_order="lazy")
    stack.forward(x)
    picks, guesses = _picks(x, routers, stacks)
    assert stack.counters()["hits"] == sum(len(p & g) for p, g in zip(picks, guesses)) > 0


def test_fetch_moves_only_flagged_rows_once_per_step():
    host = torch.arange(5 * 6, dtype=torch.float32).view(5, 6).to(torch.bfloat16)
    slots = torch.zeros_like(host)
    f = RoutedFetch(host, [7, 1, 3, 0, 9], slots, 10)
    flags = torch.zeros(10, dtype=torch.bool)
    flags[[1, 9, 4]] = True  # 4 is not on the host: ignored
    f.fetch(flags)
    assert torch.equal(slots[1], host[1]) and torch.equal(slots[4], host[4])
    assert not slots[[0, 2, 3]].any()
    f.fetch_routed(flags)  # both already present: hits, nothing moved
    assert f.counters() == {"moved": 2, "routed": 2, "hits": 2}
    f.begin_step()
    f.fetch_routed(flags)
    assert f.counters() == {"moved": 4, "routed": 4, "hits": 2}


def test_routed_experts_is_the_set_of_picks():
    for dtype in (torch.int64, torch.int32):  # vLLM's top-k ids are int32
        ids = torch.tensor([[3, 1], [3, 0]], dtype=dtype)
        assert routed_experts(ids, 5).tolist() == [True, True, False, True, False]


def test_bad_input_names_what_is_wrong():
    host = torch.zeros(2, 4, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="expert_ids"):
        RoutedFetch(host, [0, 0], torch.zeros_like(host), 4)
    with pytest.raises(ConfigError, match=r"\[n, numel\]"):
        RoutedFetch(host, [0, 1], torch.zeros(3, 4, dtype=torch.bfloat16), 4)
    routers, stacks = _stack()
    with pytest.raises(ConfigError, match="mode: expected one of whole, routed, predicted, got 'all'"):
        RoutedMoEStack(routers, stacks, K, "cpu", "all")


def test_the_gather_kernel_under_tritons_interpreter_moves_only_flagged_rows():
    """The GPU kernel's source, run by Triton's interpreter on the CPU (GPU tests run it compiled)."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from executor.routed_fetch import GATHER_BLOCK, GATHER_SPLIT, _launch_gather
        # A ragged last block; and rows of more blocks than programs, so each program loops.
        for numel in (2 * GATHER_BLOCK + 37, (2 * GATHER_SPLIT + 3) * GATHER_BLOCK + 5):
            n = 5
            host = (torch.randn(n, numel, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
            slots = torch.zeros_like(host)
            flags = torch.tensor([True, False, True, False, True])
            _launch_gather(host, slots, flags)
            assert torch.equal(slots[flags].view(torch.int16), host[flags].view(torch.int16))
            assert not slots[~flags].view(torch.int16).any()
        print("gather: exact")
    """)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert run.returncode == 0 and "gather: exact" in run.stdout, run.stderr[-2000:]


def _same_eager_and_replayed(forward, x, want) -> None:
    """forward(x) equals `want` across steps (buffers reused by other layers) and as CUDA-graph replays."""
    for _ in range(3):
        assert torch.equal(forward(x), want)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = forward(x)
    for _ in range(3):
        y.zero_()
        graph.replay()
        assert torch.equal(y, want)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_on_the_gpu_eager_and_as_graph_replays(mode):
    """The UVA gather kernel and the side-stream guess on a GPU: same bits as the resident
    stack, across steps (buffers reused by other layers) and as CUDA-graph replays."""
    routers, stacks = random_stack(L, 256, 384, 64, torch.device("cuda"), 3)
    stack = RoutedMoEStack(routers, stacks, 6, "cuda", mode)
    for tokens in (1, 5, 33):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
        _same_eager_and_replayed(stack.forward, x, routed_reference(x, routers, stacks, 6))
    if mode == "predicted":
        c = stack.counters()
        assert 0 < c["hits"] <= c["routed"]


# ---------------------------------------------------------------- inside the pager (what the plugin drives)
from executor.moe_layer import reference_forward  # noqa: E402
from executor.paged_stack import PagedMoEStack  # noqa: E402

MIXES = {"host": lambda e: ["host"] * e,
         "all tiers": lambda e: (["resident", "host", "compressed", "host-compressed"] * e)[:e]}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("order", ["lazy", "eager"])
def test_the_pager_with_routed_fetch_is_bit_exact_and_moves_only_routed_host_experts(mix, depth, fused, order):
    routers, stacks = _stack(2)
    tiers = [MIXES[mix](E)] * L
    stack = PagedMoEStack(routers, stacks, tiers, K, depth, "cpu", cpu_order=order, fused=fused, routed_fetch=True)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    want = reference_forward(x, routers, stacks, K)
    for _ in range(2):
        assert torch.equal(stack.forward(x).view(torch.int16), want.view(torch.int16))
    # Routed host experts, by hand from the reference's routing (moe_layer routes as route() does).
    from executor.moe_layer import moe_layer

    routed, y = 0, x
    for router, (w13, w2), t in zip(routers, stacks, tiers):
        picked = set(route(y, router, K)[0].flatten().tolist())
        routed += sum(1 for e in picked if t[e] == "host")
        y = moe_layer(y, router, list(zip(w13, w2)), K)
    assert stack.pager.routed_counters() == {"moved": 2 * routed, "routed": 2 * routed}
    assert 0 < routed < 2 * sum(t.count("host") for t in tiers)


def test_without_the_routed_fetch_the_pager_computes_with_empty_slots():
    """Routed fetch skips the host copy ahead: a loop that never calls fetch_routed gets a wrong
    answer, so the call is what brings the experts (and the test above can fail)."""
    routers, stacks = _stack(2)
    stack = PagedMoEStack(routers, stacks, [MIXES["host"](E)] * L, K, 1, "cpu", routed_fetch=True)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    pager, y = stack.pager, x
    from executor.moe_layer import moe_layer

    for layer, router in enumerate(stack.routers):
        y = moe_layer(y, router, pager.before_layer(layer).experts, K)
        pager.after_layer(layer)
    pager.end_step()
    assert not torch.equal(y, reference_forward(x, routers, stacks, K))


@pytest.mark.gpu
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_the_pager_with_routed_fetch_on_the_gpu_eager_and_as_graph_replays(mix, depth):
    routers, stacks = random_stack(L, 256, 384, 64, torch.device("cuda"), 4)
    stack = PagedMoEStack(routers, stacks, [MIXES[mix](64)] * L, 6, depth, "cuda", fused=True, routed_fetch=True)
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    _same_eager_and_replayed(stack.forward, x, reference_forward(x, routers, stacks, 6))
    c = stack.pager.routed_counters()
    assert 0 < c["moved"] == c["routed"]


# ---------------------------------------------------------------- cost model, planner, simulator
import itertools  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402

import planner  # noqa: E402
import profiles  # noqa: E402
from planner.cost_model import CostModel, StepShape, TierCounts  # noqa: E402


def test_active_experts_against_enumeration_with_and_without_skew():
    """E(distinct experts) for T tokens, each picking each expert with probability min(1, k p_e)
    independently: enumerated over every pick pattern of a 4-expert layer, 3 tokens."""
    from profiles import Profile
    from tests.conftest import tiny_gpu, tiny_model

    for skew in (0.0, 1.0, 2.5):
        cost = CostModel(Profile(tiny_model(2, 4, 2), tiny_gpu()), routing_skew=skew)
        w = [r ** -skew for r in range(1, 5)]
        q = [min(1.0, 2 * x / sum(w)) for x in w]  # per token, P(expert e picked)
        expected = 0.0
        for pattern in itertools.product([0, 1], repeat=4 * 3):  # (expert, token) picked or not
            prob = math.prod(q[i % 4] if bit else 1 - q[i % 4] for i, bit in enumerate(pattern))
            expected += prob * sum(any(pattern[t * 4 + e] for t in range(3)) for e in range(4))
        assert cost.active_experts(3) == pytest.approx(expected, rel=1e-12)
    flat, skewed = (CostModel(profiles.load("qwen3-next-80b-a3b", gpu="h200"), routing_skew=s) for s in (0, 1.2))
    assert skewed.routed_share(16) < flat.routed_share(16)  # popular experts take more of the picks


def test_the_uniform_share_is_what_the_h200_moved():
    """bench/results/routed_fetch_h200_*.json: bytes moved against whole layers, per batch, on
    random routing, within 3% of the cost model's share."""
    import json
    from pathlib import Path

    path = sorted(Path(__file__).resolve().parent.parent.glob("bench/results/routed_fetch_h200_*.json"))[-1]
    shapes = json.loads(path.read_text())["shapes"]
    for model, shape in shapes.items():
        cost = CostModel(profiles.load(model, gpu="h200"))
        for tokens, row in shape["batches"].items():
            assert row["routed"]["bytes_vs_whole"] == pytest.approx(cost.routed_share(int(tokens)), rel=0.03)


def test_routed_step_time_by_hand():
    """Two host experts of four per layer, one token: the routed share (k/E = 1/2) of their link
    time (each expert gathered alone) sits on each layer's path, after its own compute, with
    nothing to hide it; fetched whole, each layer's two cross in one copy per matrix."""
    from profiles import Profile
    from tests.conftest import tiny_gpu, tiny_model

    cost = CostModel(Profile(tiny_model(2, 4, 2), tiny_gpu()))
    step = StepShape(1, 1, 10)
    tiers = [TierCounts(2, 0, 2)] * 2
    compute = cost.layer_compute_s(step)
    fetch = 2 * 0.5 * cost.routed_s_per_expert
    t = cost.step_time(tiers, step, 1, routed_fetch=True)
    assert t.total_s == pytest.approx(sum(compute) + 2 * fetch + cost.fixed_s(step), rel=1e-12)
    assert t.link_s == pytest.approx(2 * fetch) and t.stall_s == pytest.approx(2 * fetch)
    whole = cost.step_time(tiers, step, 1)
    assert whole.link_s == pytest.approx(4 * cost.stack_transfer_s_per_expert)


def test_the_planner_fetches_routed_only_where_nothing_else_meets_a_latency_limit():
    """Qwen3-Next at 60 GiB of the H200, 50 ms per token: no placement fetching whole layers meets
    it; fetching only the routed host experts at one sequence does (its steps route to 2% of them)."""
    from fluxmoe.errors import InfeasibleError

    profile = profiles.load("qwen3-next-80b-a3b", gpu="h200")
    options = dict(workload=planner.WorkloadShape(64, 512), objective="throughput_under_latency", tpot_limit_s=0.05)
    with pytest.raises(InfeasibleError):
        planner.optimize(profile, "60GiB", routed_fetch=False, **options)
    plan = planner.optimize(profile, "60GiB", routed_fetch=True, **options)
    assert plan.routed_fetch and plan.predicted.step_time_s <= 0.05
    assert sum(t.host for t in plan.tier_counts()) > 0
    cost = CostModel(profile)
    step = StepShape.steady_decode(plan.max_num_seqs, 64, 512)
    assert plan.predicted.step_time_s == pytest.approx(
        cost.step_time(plan.tier_counts(), step, plan.prefetch_depth, routed_fetch=True).total_s, rel=1e-12)
    # Throughput plans at large batches route to every expert: routed fetch is not picked.
    big = planner.optimize(profile, "100GiB", routed_fetch=True)
    assert not big.routed_fetch


def test_the_simulator_plays_routed_fetch_as_the_cost_model_prices_it():
    """One sequence decoding on a link-bound routed plan: every decode step takes the closed form."""
    from simulator import Workload, simulate

    profile = profiles.load("qwen3-next-80b-a3b", gpu="h200")
    plan = planner.optimize(profile, "60GiB", routed_fetch=True, workload=planner.WorkloadShape(64, 512),
                            objective="throughput_under_latency", tpot_limit_s=0.05)
    result = simulate(profile, Workload.synthetic(1, 64, 40), plan=plan)
    cost = CostModel(profile)
    measured = [r.end_s - r.start_s for r in result.timeline[5:]]
    predicted = [cost.step_time(plan.tier_counts(), StepShape(1, 1, 64 + k), plan.prefetch_depth,
                                routed_fetch=True).total_s for k in range(5, 40)]
    assert np.mean(measured) == pytest.approx(np.mean(predicted), rel=0.01)
    whole = simulate(profile, Workload.synthetic(1, 64, 40), plan=__import__("dataclasses").replace(
        plan, routed_fetch=False))
    assert whole.tpot_s.p50 > 10 * result.tpot_s.p50


def test_the_cli_plans_routed_fetch_unless_told_not_to(capsys):
    from fluxmoe.cli import main

    args = ["plan", "--model", "qwen3-next-80b-a3b", "--gpu", "h200", "--budget", "60GiB", "--prompt-tokens", "64",
            "--output-tokens", "512", "--tpot-ms", "50", "--no-verify"]
    assert main(args) == 0
    assert "host experts fetched routed-only" in capsys.readouterr().out
    assert main(args + ["--no-routed-fetch"]) == 2
    assert "no plan for qwen3-next-80b-a3b on h200 fits a budget of 60.00 GiB under a per-token limit of 50 ms" \
        in capsys.readouterr().err


def test_routing_skew_reaches_the_plan_and_the_simulator(capsys):
    """A skewed workload touches fewer experts per step: the plan records its skew, predicts a
    faster small-batch step than uniform routing, and the simulator prices the same skew."""
    import json as _json

    from fluxmoe.cli import main

    common = ["plan", "--model", "qwen3-next-80b-a3b", "--gpu", "h200", "--budget", "60GiB", "--prompt-tokens", "64",
              "--output-tokens", "512", "--tpot-ms", "50", "--no-verify", "--json"]
    assert main(common) == 0
    flat = _json.loads(capsys.readouterr().out)
    assert main(common + ["--routing-skew", "1.2"]) == 0
    skewed = _json.loads(capsys.readouterr().out)
    assert skewed["workload"]["routing_skew"] == 1.2 and flat["workload"]["routing_skew"] == 0.0
    assert skewed["predicted"]["step_time_s"] < flat["predicted"]["step_time_s"]
    with pytest.raises(SystemExit):
        main(common + ["--routing-skew", "-1"])
    assert "--routing-skew: must be a finite number >= 0, got '-1'" in capsys.readouterr().err
    from planner.plan import WorkloadShape
    from simulator import Workload, simulate
    from fluxmoe.serde import from_dict
    from planner.plan import Plan

    plan = from_dict(Plan, skewed)
    profile = profiles.load("qwen3-next-80b-a3b", gpu="h200")
    wl = Workload.synthetic(1, 64, 40)
    assert simulate(profile, wl, plan=plan).tpot_s.p50 < simulate(profile, wl, plan=plan, routing_skew=0.0).tpot_s.p50
    with pytest.raises(Exception, match="routing_skew"):
        WorkloadShape(64, 512, routing_skew=-0.5)
