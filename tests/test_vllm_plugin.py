"""The vLLM plugin's vLLM-free parts on the CPU: the entry point, the plan check, and the
paging runtime (placing experts, checkpoint landing, one-call spans) against plain torch.
vLLM itself runs on the GPU machine (bench/vllm_identity.py)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import profiles
from bench.vllm_identity import variants, with_tiers
from executor.moe_layer import moe_layer, random_stack, reference_forward
from fluxmoe import vllm_plugin
from fluxmoe.errors import ConfigError
from fluxmoe.names import Tier
from fluxmoe.vllm_plugin.runtime import PagingRuntime, check_plan_for_model
from executor.tiers import ExpertLayout
from planner.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "mixtral-tiny"
CPU = torch.device("cpu")


def test_without_a_plan_the_entry_point_does_nothing(monkeypatch):
    monkeypatch.delenv(vllm_plugin.PLAN_ENV, raising=False)
    assert vllm_plugin.register() is None
    assert "fluxmoe.vllm_plugin.experts" not in sys.modules  # vLLM is not even imported


def test_a_missing_plan_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(vllm_plugin.PLAN_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="FLUXMOE_PLAN: no plan file"):
        vllm_plugin.register()


def test_the_entry_point_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."vllm.general_plugins"]' in text and "fluxmoe.vllm_plugin:register" in text
    assert 'vllm = ["vllm==0.26.0"]' in text


@pytest.fixture(scope="module")
def tiny_plans():
    return variants(Plan.load(ROOT / "bench" / "plans" / "mixtral-tiny.json"))


def test_a_plan_is_checked_against_the_shapes_vllm_loads(tiny_plans):
    plan = tiny_plans["host_d1"]
    config = json.loads((TINY / "config.json").read_text())
    check_plan_for_model(plan, dict(config, _name_or_path="/some/other/folder"))  # the name may differ
    with pytest.raises(ConfigError, match="other shapes"):
        check_plan_for_model(plan, dict(config, num_local_experts=16))
    with pytest.raises(ConfigError, match="tensor_parallel=1, expert_parallel=1; vLLM runs 2"):
        check_plan_for_model(plan, config, tensor_parallel=2)


def _runtime(plan, spec, seed=3):
    routers, stacks = random_stack(spec.num_moe_layers, 64, 96, spec.num_experts, CPU, seed=seed)
    return routers, stacks, PagingRuntime(plan, ExpertLayout(64, 96), CPU)


def _forward(runtime, routers, x, top_k):
    pager = runtime.pager
    for layer, router in zip(runtime.moe_layers, routers):
        i = runtime.position(layer)
        weights = pager.before_layer(i)
        x = moe_layer(x, router, weights.fused.experts() if weights.fused else weights.experts, top_k,
                      on_route=lambda ids, i=i: (pager.count_routes(i, ids), pager.fetch_routed(i, ids)))
        pager.after_layer(i)
    pager.end_step()
    return x


@pytest.mark.parametrize("variant", ["host_d1", "host_compressed_d1", "compressed_d0", "per_layer_d1", "per_expert_d2"])
@pytest.mark.parametrize("how", ["full_stacks", "checkpoint_landing"])
def test_the_runtime_pages_a_plan_bit_exact(tiny_plans, variant, how):
    """Layers placed as vLLM places them (dummy: full stacks; checkpoint: expert by expert into
    their tiers), run through their one-call spans, equal plain torch bit for bit."""
    plan = tiny_plans[variant]
    spec = profiles.load_model(TINY)
    routers, stacks, runtime = _runtime(plan, spec)
    for layer, (w13, w2) in zip(runtime.moe_layers, stacks):
        if not runtime.is_paged(layer):
            runtime.keep_resident(layer, w13, w2)
        elif how == "full_stacks":
            runtime.place(layer, w13, w2)
        else:
            landing = runtime.landing(layer)
            for e in range(len(w13)):  # as vLLM's weight loader writes one expert at a time
                (t13, t2), row = landing.target(e)
                t13[row].copy_(w13[e])
                t2[row].copy_(w2[e])
            runtime.place_landed(layer, landing)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    expected = reference_forward(x, routers, stacks, spec.experts_per_token)
    assert torch.equal(_forward(runtime, routers, x, spec.experts_per_token), expected)
    assert torch.equal(_forward(runtime, routers, x, spec.experts_per_token), expected)


def test_all_resident_layers_keep_vllms_own_tensors(tiny_plans):
    plan = tiny_plans["per_layer_d1"]  # model layer 0 is all resident
    spec = profiles.load_model(TINY)
    _, stacks, runtime = _runtime(plan, spec)
    assert not runtime.is_paged(0) and runtime.is_paged(1)
    runtime.keep_resident(0, *stacks[0])
    assert runtime.layers[0].resident[0].data_ptr() == stacks[0][0].data_ptr()
    with pytest.raises(ConfigError, match="paged in the plan"):
        runtime.keep_resident(1, *stacks[1])
    with pytest.raises(RuntimeError, match=r"MoE layers \[1, 2, 3\] were never placed"):
        runtime.pager
    with pytest.raises(ConfigError, match="model layer 9 is not an MoE layer"):
        runtime.is_paged(9)


def test_an_all_resident_plan_needs_no_arena(tiny_plans):
    plan = Plan.load(ROOT / "bench" / "plans" / "mixtral-tiny.json")
    assert all(t is Tier.RESIDENT for lp in plan.layers for t in lp.tiers())
    runtime = PagingRuntime(plan, ExpertLayout(64, 96), CPU)
    assert runtime.arena is None and not runtime.any_paged and runtime.gpu_bytes == 0


# ---------------------------------------------------------------- a budget change while serving
class _Module:
    """What the plugin binds for each MoE layer: the stacks its kernel call reads."""

    def __init__(self):
        self.w13 = self.w2 = None
        self.paged = None

    def __call__(self, w13, w2, paged):
        self.w13, self.w2, self.paged = w13, w2, paged


def _placed(plan, spec):
    routers, stacks, runtime = _runtime(plan, spec)
    modules = {}
    for layer, (w13, w2) in zip(runtime.moe_layers, stacks):
        modules[layer] = _Module()
        runtime.bind(layer, modules[layer])
        runtime.place(layer, w13, w2) if runtime.is_paged(layer) else runtime.keep_resident(layer, w13, w2)
    return routers, stacks, runtime, modules


@pytest.mark.parametrize("before,after", [("per_layer_d1", "per_expert_d2"), ("per_expert_d2", "per_layer_d1"),
                                          ("host_d1", "compressed_d0")])
def test_a_rebuild_moves_every_expert_to_the_new_tiers_with_the_same_bits(tiny_plans, before, after):
    """A budget change in a running engine: each layer's experts in the new plan's tiers, each
    module pointed at its new stacks (the arena span of a paged layer, the whole stack of an
    all-resident one), pick counts kept, and every step bit-exact before and after."""
    spec = profiles.load_model(TINY)
    routers, stacks, runtime, modules = _placed(tiny_plans[before], spec)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    k = spec.experts_per_token
    expected = reference_forward(x, routers, stacks, k)
    assert torch.equal(_forward(runtime, routers, x, k), expected)
    counted = runtime.pager.route_counter.read_now()
    answer = runtime.rebuild(tiny_plans[after])
    plan = tiny_plans[after]
    assert runtime.plan is plan and runtime.pager.depth == plan.prefetch_depth
    assert [[t.tier_of(e) for e in range(spec.num_experts)] for t in runtime.pager.layers] == \
        [plan.layer(layer).tiers() for layer in runtime.moe_layers]
    assert runtime.pager.route_counter.read_now() == counted
    for i, layer in enumerate(runtime.moe_layers):
        module, weights = modules[layer], runtime.pager.weights[i]
        if runtime.is_paged(layer):
            assert module.paged and module.w13.data_ptr() == weights.fused.w13.data_ptr()
        else:
            assert not module.paged and torch.equal(module.w13, stacks[i][0]) and torch.equal(module.w2, stacks[i][1])
    assert answer["expert_bytes_after"] == runtime.expert_bytes
    assert torch.equal(_forward(runtime, routers, x, k), expected)
    assert torch.equal(_forward(runtime, routers, x, k), expected)


def test_a_rebuild_that_does_not_fit_keeps_the_old_tiers(tiny_plans, monkeypatch):
    from executor.pager import ExpertPager

    spec = profiles.load_model(TINY)
    routers, stacks, runtime, modules = _placed(tiny_plans["per_layer_d1"], spec)
    build, calls = ExpertPager.build.__func__, []

    def tight_gpu(cls, stacks_, tiers, *args, **kwargs):
        calls.append(tiers)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (planted)")
        return build(cls, stacks_, tiers, *args, **kwargs)

    monkeypatch.setattr(ExpertPager, "build", classmethod(tight_gpu))
    with pytest.raises(ConfigError, match="do not fit on the GPU.*old ones were built again"):
        runtime.rebuild(tiny_plans["per_expert_d2"])
    assert calls[1] == [tiny_plans["per_layer_d1"].layer(layer).tiers() for layer in runtime.moe_layers]
    assert runtime.plan is tiny_plans["per_layer_d1"] and modules[runtime.moe_layers[1]].paged
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(_forward(runtime, routers, x, spec.experts_per_token),
                       reference_forward(x, routers, stacks, spec.experts_per_token))


def test_a_plan_for_other_layers_is_refused_before_anything_moves(tiny_plans):
    spec = profiles.load_model(TINY)
    _, _, runtime, _ = _placed(tiny_plans["host_d1"], spec)
    other = dataclasses.replace(tiny_plans["per_expert_d2"], layers=tiny_plans["per_expert_d2"].layers[1:])
    pager = runtime.pager
    with pytest.raises(ConfigError, match="this engine runs"):
        runtime.rebuild(other)
    assert runtime.pager is pager and runtime.layers


# ---------------------------------------------------------------- expert parallel
def _expert_map(placement: str, rank: int, ranks: int, experts: int) -> torch.Tensor:
    """vLLM 0.26's map for a rank (expert_map_manager.determine_expert_map), written out by hand."""
    mine = (range(rank * experts // ranks, (rank + 1) * experts // ranks) if placement == "linear"
            else range(rank, experts, ranks))
    out = torch.full((experts,), -1, dtype=torch.int32)
    out[list(mine)] = torch.arange(len(mine), dtype=torch.int32)
    return out


def _ep_partial(x, ids, gates, w13, w2, expert_map):
    """One rank's share of an MoE layer as vLLM's kernel computes it under expert parallel:
    each pick of an expert the map sends to row r uses stack row r; other ranks' picks add nothing."""
    out = torch.zeros_like(x)
    rows = expert_map[ids.long()]
    for row in rows.unique().tolist():
        if row < 0:
            continue
        gate = (gates * (rows == row)).sum(-1, keepdim=True).to(x.dtype)  # [T, 1]
        gate_up = x @ w13[row].T
        i = w2.shape[2]
        out += gate * ((F.silu(gate_up[:, :i]) * gate_up[:, i:]) @ w2[row].T)
    return out


@pytest.mark.parametrize("placement", ["linear", "round_robin"])
@pytest.mark.parametrize("variant", ["per_expert_d2", "host_routed_d1"])
def test_under_expert_parallel_each_rank_pages_its_experts_bit_exact(tiny_plans, placement, variant):
    """Two ranks, each paging its 4 of 8 experts through the plugin's expert-parallel path (vLLM's
    map swapped for one to arena rows, checkpoint experts landed by global id): each rank's share
    equals plain expert parallel's over its own stacks bit for bit, the shares add up to the
    whole layer, and each rank counts only its own experts' picks."""
    from fluxmoe.vllm_plugin.rank_experts import RankExperts

    spec, ranks = profiles.load_model(TINY), 2
    experts, k = spec.num_experts, spec.experts_per_token
    base = with_tiers(tiny_plans["host_d1"], {lp.layer: [Tier.RESIDENT] * (experts // ranks)
                                              for lp in tiny_plans["host_d1"].layers}, 0)
    plan = variants(base)[variant]
    routers, stacks = random_stack(spec.num_moe_layers, 64, 96, experts, CPU, seed=5)
    maps = [_expert_map(placement, r, ranks, experts) for r in range(ranks)]
    shards = [RankExperts.from_expert_map(m) for m in maps]
    runtimes = []
    for shard in shards:
        runtime = PagingRuntime(plan, ExpertLayout(64, 96), CPU)
        for layer, (w13, w2) in zip(runtime.moe_layers, stacks):
            landing = runtime.landing(layer)
            for g in range(experts):  # the checkpoint's experts by global id; other ranks' are skipped
                local = int(shard.local_of[g])
                if local < shard.num_local:
                    (t13, t2), row = landing.target(local)
                    t13[row].copy_(w13[g])
                    t2[row].copy_(w2[g])
            runtime.place_landed(layer, landing)
        runtimes.append(runtime)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    picks = torch.zeros(ranks, spec.num_moe_layers, experts // ranks, dtype=torch.int64)
    for i, router in enumerate(routers):
        probs = F.softmax((x @ router.T).float(), dim=-1)
        gates, ids = probs.topk(k, dim=-1)
        gates, ids = gates / gates.sum(-1, keepdim=True), ids.to(torch.int32)
        shares = []
        for r, (runtime, shard) in enumerate(zip(runtimes, shards)):
            pager = runtime.pager
            weights = pager.before_layer(i)
            local = shard.local_ids(ids)
            pager.count_routes(i, local)
            pager.fetch_routed(i, local)
            fused = weights.fused
            share = _ep_partial(x, ids, gates, fused.w13, fused.w2, shard.kernel_map(fused.row_of))
            w13, w2 = stacks[i]
            plain = _ep_partial(x, ids, gates, w13[list(shard.global_of)], w2[list(shard.global_of)], maps[r])
            assert torch.equal(share, plain)
            pager.after_layer(i)
            picks[r, i] = torch.bincount(local.flatten().long(), minlength=shard.num_local + 1)[:-1]
            shares.append(share)
        whole = _ep_partial(x, ids, gates, *stacks[i], torch.arange(experts, dtype=torch.int32))
        torch.testing.assert_close(shares[0].float() + shares[1].float(), whole.float(), atol=2e-2, rtol=2e-2)
        assert sum(int(p.sum()) for p in picks[:, i]) == ids.numel()  # every pick counted on one rank only
        x = x + shares[0] + shares[1]  # the FFN's all-reduce
    for r, runtime in enumerate(runtimes):
        runtime.pager.end_step()
        assert runtime.pager.route_counter.read_now()[0] == picks[r].tolist()


def test_an_expert_map_that_is_not_a_cover_is_refused():
    from fluxmoe.vllm_plugin.rank_experts import RankExperts

    with pytest.raises(ConfigError, match=r"expert_map: expected .* got \[0, -1, 0, -1\]"):
        RankExperts.from_expert_map(torch.tensor([0, -1, 0, -1]))
    shard = RankExperts.from_expert_map(torch.tensor([-1, 1, -1, 0]))
    assert shard.global_of == (3, 1) and shard.local_of.tolist() == [2, 1, 2, 0]
    assert shard.kernel_map(torch.tensor([7, 5], dtype=torch.int32)).tolist() == [-1, 5, -1, 7]
    with pytest.raises(ConfigError, match="the plan's shard has 4 experts per layer; vLLM gives this rank 2 of 4"):
        shard.check_count(4, "layers.0.mlp")
