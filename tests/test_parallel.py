"""Several GPUs (issue #15): one rank's shard of a model, worked out by hand from Mixtral-8x7B's
config; the cost model's collectives and expert-parallel routing against hand sums; per-rank
plans within each GPU's budget; the plan's parallelism checked where vLLM loads it."""

import json
import math
from pathlib import Path

import pytest

import profiles
from fluxmoe.errors import ConfigError, UnknownNameError
from planner import optimize
from planner.cost_model import CostModel, StepShape, TierCounts
from planner.plan import WorkloadShape
from profiles import Interconnect, Parallelism, Profile
from profiles.parallel import kv_share, load_interconnect, shard_model

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
MIXTRAL = profiles.load_model("mixtral-8x7b")  # h 4096, I 14336, 32 layers, 8 experts top-2, 8 KV heads of 128


def test_tensor_parallel_cuts_every_weight_and_the_kv_heads_in_two():
    tp = profiles.load("mixtral-8x7b", "h200x2").model
    assert tp.expert_intermediate_size == 7168 and tp.num_experts == 8
    assert tp.expert_params == 3 * 4096 * 7168 == MIXTRAL.expert_params // 2
    assert tp.kv_bytes_per_token_layer == {"full": 2 * 4 * 128 * 2}  # 4 of the 8 KV heads
    # q and o 4096 x 4096, k and v 4096 x 1024, two norms of 4096: cut in two, norms and all.
    assert tp.attention_params == [(2 * 4096 * 4096 + 2 * 4096 * 1024 + 2 * 4096) // 2] * 32
    assert tp.vocab_size == 16000 and tp.kv_heads == 4 and tp.attention_width == 2048
    assert tp.router_params == MIXTRAL.router_params  # the router is whole on each rank
    assert tp.content_hash() != MIXTRAL.content_hash()


def test_expert_parallel_gives_each_rank_whole_experts_and_keeps_the_router():
    ep = profiles.load("mixtral-8x7b", "h200x2", expert_parallel=True).model
    assert (ep.num_experts, ep.experts_per_token, ep.expert_intermediate_size) == (4, 2, 14336)
    assert ep.expert_bytes == MIXTRAL.expert_bytes
    assert ep.total_experts * ep.expert_bytes == MIXTRAL.total_experts * MIXTRAL.expert_bytes // 2
    # The router (4096 x 8 per layer) is counted whole: 4096 x 4 in the layers, 4096 x 4 x 32 beside.
    assert ep.other_params == 4096 + 4096 * 4 * 32
    assert ep.kv_bytes_per_token_layer == {"full": 2048}  # attention is tensor parallel under EP too


def test_kv_heads_replicate_where_ranks_outnumber_them_and_mla_is_whole_on_every_rank():
    qwen = profiles.load_model("qwen3-next-80b-a3b")  # 2 KV heads of 256
    assert kv_share(qwen, 2) == 1 / 2 and kv_share(qwen, 4) == 1 / 2 and kv_share(qwen, 8) == 1 / 2
    assert shard_model(qwen, 4).kv_bytes_per_token_layer == {"full": 2 * 1 * 256 * 2}
    assert shard_model(qwen, 4).linear_state_bytes_per_layer == math.ceil(qwen.linear_state_bytes_per_layer / 4)
    with pytest.raises(ConfigError, match="its 4 KV heads neither split over nor replicate evenly across 3"):
        shard_model(profiles.load_model("qwen3-30b-a3b"), 3)
    deepseek = profiles.load_model("deepseek-v2-lite")
    assert shard_model(deepseek, 2).kv_bytes_per_token_layer == deepseek.kv_bytes_per_token_layer


def test_splits_that_vllm_cannot_make_are_refused_by_field():
    with pytest.raises(ConfigError, match="expert parallel: 8 experts do not split into 8 equal groups of at least "
                                          "the 2"):
        shard_model(MIXTRAL, 8, expert_parallel=True)
    with pytest.raises(ConfigError, match="expert_intermediate_size 14336 does not split into 3"):
        shard_model(MIXTRAL, 3)
    with pytest.raises(ConfigError, match="field 'expert_parallel': needs tensor_parallel >= 2"):
        Parallelism(1, expert_parallel=True)
    with pytest.raises(ConfigError, match="field 'interconnect': 2 GPUs need an interconnect profile for 2 GPUs, "
                                          "got none"):
        Parallelism(2)
    with pytest.raises(ConfigError, match="field 'tensor_parallel': must be >= 1, got 0"):
        Parallelism(0)
    with pytest.raises(ConfigError, match="expert_parallel: needs several GPUs"):
        profiles.load("mixtral-8x7b", "h200", expert_parallel=True)
    with pytest.raises(UnknownNameError, match="no interconnect profile for 'h200x4'"):
        profiles.load("mixtral-8x7b", "h200x4")


def test_the_shipped_h200_pair_is_the_nccl_measurement_and_a_datasheet_ring_adds_up():
    measured = json.loads((ROOT / "bench/results/nccl_profile_h200x2_2026-11-24.json").read_text())
    pair = load_interconnect("h200x2")
    assert pair == Interconnect.from_nccl_profile(measured, "h200x2")
    assert pair.all_reduce_s(1 << 20) == pytest.approx(0.04203999936580658e-3)  # a measured point, in seconds
    assert pair.h2d_share == pytest.approx(54.44592041566878 / 55.4709674639383)  # the slower GPU's, together
    ring = Interconnect.datasheet("x", 4, link_gbps=50, latency_s=1e-5, source="test")
    assert ring.all_reduce_s(1 << 30) == pytest.approx(1e-5 + 1.5 * (1 << 30) / 50e9)  # 2 (n-1)/n of it
    assert ring.all_to_all_s(1 << 30) == pytest.approx(1e-5 + 0.75 * (1 << 30) / 50e9)


def test_tensor_parallel_adds_two_all_reduces_a_layer_and_the_embedding_and_logits_to_a_step():
    """Against the same shard costed as if on one GPU: the difference is the collectives alone."""
    tp = profiles.load("mixtral-8x7b", "h200x2")
    alone = Profile(tp.model, tp.hardware)
    step = StepShape(tokens=128, sequences=96, context_tokens=600)
    ic = tp.parallel.interconnect
    hidden = 128 * 4096 * 2  # 1 MiB: a measured point
    extra = 2 * 32 * ic.all_reduce_s(hidden) + ic.all_reduce_s(hidden) + ic.all_to_all_s(96 * 32000 * 2)
    assert extra == pytest.approx(65 * 0.04203999936580658e-3 + ic.all_to_all_s(6_144_000))
    ours, theirs = CostModel(tp), CostModel(alone)
    theirs.expert_ffn_s = ours.expert_ffn_s  # the same experts' times (their source is the next test's)
    assert ours.resident_step_time(step).total_s - theirs.resident_step_time(step).total_s == pytest.approx(extra)
    assert ours.layer_compute_s(step)[0] - theirs.layer_compute_s(step)[0] == pytest.approx(2 * ic.all_reduce_s(hidden))


def test_a_tensor_parallel_cut_of_a_measured_expert_takes_its_share_of_the_measured_time():
    """The H200 profile measures Qwen3-Next's 2048 x 512 experts, not the 2048 x 256 cuts."""
    one, two = CostModel(profiles.load("qwen3-next-80b-a3b", "h200")), CostModel(profiles.load("qwen3-next-80b-a3b",
                                                                                              "h200x2"))
    assert "2048x256" not in two.hw.expert_ffn_s
    for tokens in (1, 4, 64, 512):
        assert two.expert_ffn_s(tokens) == pytest.approx(one.expert_ffn_s(tokens) / 2)


def test_expert_parallel_runs_a_layer_at_its_busiest_ranks_pace():
    ep = CostModel(profiles.load("mixtral-8x7b", "h200x2", expert_parallel=True))
    one = CostModel(profiles.load("mixtral-8x7b", "h200"))
    # Uniform routing, 3 tokens: each expert is picked with odds 2/8 per token; a rank holds 4.
    assert ep.active_experts(3) == pytest.approx(4 * (1 - 0.75**3))
    assert ep.routed_pairs(3) == pytest.approx(3)  # 3 tokens x top-2 over 2 ranks
    assert one.active_experts(3) == pytest.approx(8 * (1 - 0.75**3)) and one.routed_pairs(3) == 6
    step = StepShape(tokens=3, sequences=3, context_tokens=600)
    experts_s = 4 * (1 - 0.75**3) * ep.expert_ffn_s(3 / (4 * (1 - 0.75**3)))
    no_experts = CostModel(profiles.load("mixtral-8x7b", "h200x2", expert_parallel=True))
    no_experts.expert_ffn_s = lambda tokens: 0.0
    assert ep.layer_compute_s(step)[5] - no_experts.layer_compute_s(step)[5] == pytest.approx(experts_s)
    # A steep skew: one expert takes nearly every token's first pick, so its rank is the busiest.
    skewed = CostModel(profiles.load("mixtral-8x7b", "h200x2", expert_parallel=True), routing_skew=8)
    active, routed = skewed.busiest_rank(100)
    assert 100 <= routed <= 200 and routed > 100 * 2 / 2 and 1 <= active <= 4
    assert skewed.busiest_rank(100) == (active, routed)  # the same placements every time


def test_a_plan_per_rank_keeps_within_each_gpus_budget_and_holds_that_ranks_experts():
    budget = 46 * GiB
    for expert_parallel in (False, True):
        profile = profiles.load("qwen3-next-80b-a3b", "h200x2", expert_parallel=expert_parallel)
        plan = optimize(profile, budget, workload=WorkloadShape(512, 128))
        assert plan.budget_bytes == budget and plan.memory.gpu_total_bytes <= budget
        assert (plan.tensor_parallel, plan.expert_parallel) == (2, 2 if expert_parallel else 1)
        assert plan.memory.non_expert_bytes == profile.model.non_expert_bytes
        assert all(lp.num_experts == (256 if expert_parallel else 512) for lp in plan.layers)
        # Each of the rank's experts is in one tier; they are half the bytes of the model's 48 x 512.
        m = profile.model
        assert sum(t.resident + t.paged for t in plan.tier_counts()) == m.total_experts
        assert m.total_experts * m.expert_bytes == 48 * 512 * 3 * 2048 * 512 * 2 // 2
        assert plan.memory.host_expert_bytes <= profile.hardware.host_pinned_bytes  # its half of the host
        plan.check_matches(profile)
        with pytest.raises(ConfigError, match="plan is for tensor_parallel=2, .*; the profile is for 1 and 1"):
            plan.check_matches(profiles.load("qwen3-next-80b-a3b", "h200"))


def test_one_gpu_is_untouched_by_the_split():
    profile = profiles.load("mixtral-8x7b", "h200")
    assert profile.parallel == Parallelism() and profile.model == MIXTRAL
    assert profile.hardware == profiles.load_gpu("h200")
    step = StepShape(tokens=64, sequences=64, context_tokens=576)
    tiers = [TierCounts(4, 2, 2)] * 32
    assert CostModel(profile).step_time(tiers, step, 1) == CostModel(Profile(MIXTRAL, profile.hardware)).step_time(
        tiers, step, 1)


def test_vllm_checks_a_tensor_parallel_plan_against_its_own_split(tmp_path):
    from fluxmoe.serve import vllm_parallelism
    from fluxmoe.vllm_plugin.runtime import check_plan_for_model

    tiny = ROOT / "models" / "mixtral-tiny"
    config = json.loads((tiny / "config.json").read_text())
    plan = optimize(profiles.load(tiny, "h200x2"), 3 * GiB, workload=WorkloadShape(64, 16))
    check_plan_for_model(plan, config, tensor_parallel=2)
    with pytest.raises(ConfigError, match="plan is for tensor_parallel=2, expert_parallel=1; vLLM runs 1"):
        check_plan_for_model(plan, config)
    with pytest.raises(ConfigError, match="vLLM runs 2 with expert parallel"):
        check_plan_for_model(plan, config, tensor_parallel=2, expert_parallel=True)
    assert vllm_parallelism(["-tp", "2", "--enable-expert-parallel"]) == (2, True)
    assert vllm_parallelism(["--tensor-parallel-size=4", "--port", "8000"]) == (4, False)
    assert vllm_parallelism(["--port", "8000"]) == (1, False)
    with pytest.raises(ConfigError, match="--tensor-parallel-size: expected a whole number >= 1, got 'two'"):
        vllm_parallelism(["-tp", "two"])


def test_serve_plans_for_the_split_vllm_is_told_to_run(tmp_path):
    from fluxmoe.cli import _workload, build_parser, make_plan
    from fluxmoe.serve import prepare

    tiny = ROOT / "models" / "mixtral-tiny"
    args = build_parser().parse_args(["serve", "--model", str(tiny), "--gpu-budget", "3GiB", "--no-verify",
                                      "--save-plan", str(tmp_path / "p.json")])
    launch = prepare(args, ["--tensor-parallel-size", "2"], lambda p: make_plan(args, p, _workload(args)))
    assert launch.plan.tensor_parallel == 2 and launch.plan.gpu == "h200x2"
    assert launch.argv[-2:] == ["--tensor-parallel-size", "2"]  # passed through to vLLM
    args.plan, args.budget = str(tmp_path / "p.json"), None
    with pytest.raises(ConfigError, match="plan is for tensor_parallel=2"):
        prepare(args, [], lambda p: None)


def test_each_rank_pages_its_cut_of_a_tensor_parallel_plan_and_the_ranks_add_up_to_the_layer():
    """The plugin's runtime on each of two ranks, CPU reference path: a TP=2 plan with experts in
    every tier pages each rank's cut of the experts (vLLM's per-partition layout: gate and up rows
    and down columns of its half of the intermediate dimension) bit-exact, and the ranks' outputs,
    added as the all-reduce adds them, give the whole layer's to bf16 rounding."""
    import torch

    from bench.vllm_identity import variants
    from executor.moe_layer import moe_layer, random_stack, reference_forward
    from executor.tiers import ExpertLayout
    from fluxmoe.vllm_plugin.runtime import PagingRuntime

    tiny = ROOT / "models" / "mixtral-tiny"
    spec = profiles.load_model(tiny)
    plan = variants(optimize(profiles.load(tiny, "h200x2"), 3 * GiB, workload=WorkloadShape(64, 16)))["per_expert_d2"]
    assert plan.tensor_parallel == 2
    hidden, inter, k = 64, 96, spec.experts_per_token
    routers, stacks = random_stack(spec.num_moe_layers, hidden, inter, spec.num_experts, torch.device("cpu"), seed=5)
    stacks = [(w13 * 5, w2 * 5) for w13, w2 in stacks]  # experts that move the residual by ~1, not ~0.01
    half = inter // 2

    def cut(w13, w2, rank):
        rows = list(range(rank * half, (rank + 1) * half))
        return (torch.cat([w13[:, rows], w13[:, [inter + r for r in rows]]], dim=1).contiguous(),
                w2[:, :, rank * half:(rank + 1) * half].contiguous())

    cuts = [[cut(w13, w2, rank) for w13, w2 in stacks] for rank in (0, 1)]
    runtimes = [PagingRuntime(plan, ExpertLayout(hidden, half), torch.device("cpu")) for _ in (0, 1)]
    for runtime, rank_stacks in zip(runtimes, cuts):
        for layer, (w13, w2) in zip(runtime.moe_layers, rank_stacks):
            runtime.place(layer, w13, w2) if runtime.is_paged(layer) else runtime.keep_resident(layer, w13, w2)
    x0 = torch.randn(5, hidden, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    x, want = x0, x0
    for i, router in enumerate(routers):
        outs = []
        for runtime in runtimes:
            weights = runtime.pager.before_layer(i)
            outs.append(moe_layer(x, router, weights.fused.experts() if weights.fused else weights.experts, k))
            runtime.pager.after_layer(i)
        direct = [moe_layer(want, router, list(zip(*cuts[rank][i])), k) for rank in (0, 1)]
        assert all(torch.equal(a, b) for a, b in zip(outs, direct))  # each rank's cut, paged bit-exact
        x = outs[0] + outs[1] - x  # each output carries the residual once: the all-reduce's sum
        want = direct[0] + direct[1] - want
    for runtime in runtimes:
        runtime.pager.end_step()
    assert torch.equal(x, want)
    whole = reference_forward(x0, routers, stacks, k)
    moved, moved_whole = (x.float() - x0.float()), (whole.float() - x0.float())
    assert moved_whole.abs().max() > 1  # the experts' share, far above bf16 rounding of the residual
    assert (moved - moved_whole).abs().max() < 0.1  # (one rank's share alone is off by 1.3)
