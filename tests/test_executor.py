"""The paging executor's logic on the CPU: placement, slot reuse, ordering, bit-exact results."""

import pytest
import torch

import planner
from executor.moe_layer import random_stack, reference_forward
from executor.pager import ExpertPager
from executor.paged_stack import PagedMoEStack
from executor.staging import StagingPool
from executor.tiers import ExpertLayout, LayerTiers
from fluxmoe.errors import ConfigError
from profiles import Profile
from tests.conftest import tiny_gpu, tiny_model

H, I, E, K, LAYERS = 32, 48, 4, 2, 4
CPU = torch.device("cpu")
MIXED = [["resident", "compressed", "host", "host"], ["host"] * E, ["compressed"] * E,
         ["host", "resident", "resident", "compressed"]]
# every tier, host-compressed among them, in each layer's own mix
ALL_TIERS = [["host-compressed", "compressed", "host", "resident"], ["host-compressed"] * E,
             ["resident", "host-compressed", "host-compressed", "compressed"], ["host", "host-compressed", "host", "host"]]


@pytest.fixture
def one_expert_chunks(monkeypatch):
    """Host-compressed chunks of one expert each, so every layer has several and the two
    landing slots are reused within a layer and across layers."""
    import executor.tiers

    monkeypatch.setattr(executor.tiers, "HOST_CHUNK_BYTES", 1)


@pytest.fixture(scope="module")
def stack():
    return random_stack(LAYERS, H, I, E, CPU, seed=1)


@pytest.mark.parametrize("cpu_order", ["lazy", "eager"])
@pytest.mark.parametrize("tiers,depth", [
    ([["resident"] * E] * LAYERS, 0),
    ([["host"] * E] * LAYERS, 0),
    ([["host"] * E] * LAYERS, 1),
    ([["compressed"] * E] * LAYERS, 2),
    (MIXED, 0), (MIXED, 1), (MIXED, 2),
    ([["host-compressed"] * E] * LAYERS, 1), (ALL_TIERS, 0), (ALL_TIERS, 2),
])
def test_paged_forward_equals_plain_torch_bit_for_bit(stack, tiers, depth, cpu_order):
    routers, stacks = stack
    x = torch.randn(5, H, dtype=torch.bfloat16)
    paged = PagedMoEStack(routers, stacks, tiers, K, depth, CPU, cpu_order=cpu_order)
    expected = reference_forward(x, routers, stacks, K)
    assert torch.equal(paged.forward(x), expected)
    assert torch.equal(paged.forward(x), expected)  # buffers reused within and across steps


def test_a_layer_that_skips_its_wait_reads_stale_slots(stack, monkeypatch):
    """Lazy CPU order: side-stream work runs only when waited on, so a missing wait fails on CPU."""
    routers, stacks = stack
    x = torch.randn(5, H, dtype=torch.bfloat16)
    paged = PagedMoEStack(routers, stacks, MIXED, K, 1, CPU, cpu_order="lazy")
    paged.pager.pool.zero_()
    monkeypatch.setattr(paged.pager.streams, "wait", lambda stream, event: None)
    assert not torch.equal(paged.forward(x), reference_forward(x, routers, stacks, K))


def test_a_buffer_is_not_rewritten_before_its_layer_releases_it(stack):
    routers, stacks = stack
    pager = PagedMoEStack(routers, stacks, [["host"] * E] * LAYERS, K, 1, CPU).pager
    pager.before_layer(0)  # issues layers 0 and 1 (buffers 0 and 1)
    with pytest.raises(RuntimeError, match="still held by layer 0"):
        pager.prefetch(2)  # buffer 0 again, before layer 0 released it
    pager.after_layer(0)
    pager.before_layer(1)
    assert 2 in pager._pending


def test_eager_order_exposes_a_rewrite_that_ignores_the_release(stack, monkeypatch):
    """Eager CPU order: side work runs at launch, so issuing into a buffer whose layer has not
    run yet corrupts that layer's result."""
    routers, stacks = stack
    x = torch.randn(5, H, dtype=torch.bfloat16)
    paged = PagedMoEStack(routers, stacks, [["host"] * E] * LAYERS, K, 0, CPU, cpu_order="eager")
    pager = paged.pager
    real_before = pager.before_layer

    def greedy_before(layer, stats=False):  # issue the next layer too early, skipping the holder check
        weights = real_before(layer, stats)
        if layer + 1 < LAYERS:
            pager.pool.holder[pager.pool.buffer_of(layer + 1)] = None
            pager.prefetch(layer + 1)
        return weights

    monkeypatch.setattr(pager, "before_layer", greedy_before)
    monkeypatch.setattr(pager, "after_layer", lambda layer: pager.pool.holder.__setitem__(0, None))
    assert not torch.equal(paged.forward(x), reference_forward(x, routers, stacks, K))


def test_staged_experts_sit_in_vllm_layout_with_their_expert_ids(stack):
    routers, stacks = stack
    pager = PagedMoEStack(routers, stacks, MIXED, K, 1, CPU).pager
    pager.before_layer(0)
    weights = pager.wait(0)
    resident, staged = weights.groups
    assert resident.expert_ids == (0,) and staged.expert_ids == (2, 3, 1)  # host first, then compressed
    assert staged.w13.shape == (3, 2 * I, H) and staged.w2.shape == (3, H, I)
    w13, w2 = stacks[0]
    for row, e in enumerate(staged.expert_ids):
        assert torch.equal(staged.w13[row], w13[e]) and torch.equal(staged.w2[row], w2[e])


def _plan(model_layers=LAYERS):
    model = tiny_model(model_layers, E)
    profile = Profile(model, tiny_gpu(1.0))
    return profile, planner.optimize(profile, 920 * 1024, reserve_bytes=16 << 10, max_num_seqs=8)


def test_experts_are_placed_as_the_plan_says_keyed_by_layer_index(stack):
    routers, stacks = stack
    profile, plan = _plan()
    assert {t for lp in plan.layers for t in lp.tiers()} == {"resident", "compressed", "host"}
    plan.layers.reverse()  # the plan's list order must not matter: layers are keyed by index
    paged = PagedMoEStack.from_plan(plan, profile, routers, stacks, CPU)
    assert paged.tiers() == [plan.layer(layer).tiers() for layer in profile.model.moe_layers]
    assert paged.pool.buffers == plan.prefetch_depth + 1
    assert paged.pool.slots == plan.slots_per_buffer and paged.pool.slots * paged.pool.buffers == plan.staging_slots


def test_a_plan_for_another_model_or_gpu_is_refused(stack):
    routers, stacks = stack
    profile, plan = _plan()
    with pytest.raises(ConfigError, match="made for model"):
        PagedMoEStack.from_plan(plan, Profile(tiny_model(LAYERS, E, top_k=1), profile.hardware), routers, stacks, CPU)
    with pytest.raises(ConfigError, match="made for GPU profile"):
        PagedMoEStack.from_plan(plan, Profile(profile.model, tiny_gpu(2.0)), routers, stacks, CPU)
    with pytest.raises(ConfigError, match="expected a planner.Plan"):
        PagedMoEStack.from_plan({"layers": []}, profile, routers, stacks, CPU)


def test_from_plan_runs_the_layers_asked_for_with_the_callers_options(stack):
    """A stack over some of the model's layers (as a benchmark stand-in does): each takes its
    own layer's tiers, the plan's slots and the model's top-k, and options pass through."""
    routers, stacks = stack
    profile, plan = _plan(model_layers=LAYERS + 2)
    layers = [1, 2, 4, 5]
    paged = PagedMoEStack.from_plan(plan, profile, routers, stacks, CPU, layers=layers, fused=True, count_routes=True)
    assert paged.tiers() == [plan.layer(layer).tiers() for layer in layers]
    assert paged.pool.slots == plan.slots_per_buffer and paged.top_k == profile.model.experts_per_token
    assert paged.fused and paged.pager.arena is not None and paged.pager.route_counter is not None
    x = torch.randn(5, H, dtype=torch.bfloat16)
    assert torch.equal(paged.forward(x), reference_forward(x, routers, stacks, profile.model.experts_per_token))


def test_a_stack_is_unfused_and_uncounted_unless_asked(stack):
    routers, stacks = stack
    paged = PagedMoEStack(routers, stacks, MIXED, K, 1, CPU)
    assert not paged.fused and paged.pager.arena is None and paged.pager.route_counter is None


def test_from_plan_may_skip_the_hardware_check(stack):
    """A plan made on one GPU profile, run on another on purpose (a stand-in GPU)."""
    routers, stacks = stack
    profile, plan = _plan()
    paged = PagedMoEStack.from_plan(plan, Profile(profile.model, tiny_gpu(2.0)), routers, stacks, CPU,
                                    check_hardware=False)
    assert paged.tiers() == [plan.layer(layer).tiers() for layer in profile.model.moe_layers]
    with pytest.raises(ConfigError, match="got dict"):
        PagedMoEStack.from_plan({"layers": []}, profile, routers, stacks, CPU)


def test_a_bad_tier_name_names_its_layer(stack):
    routers, stacks = stack
    bad = [list(t) for t in MIXED]
    bad[2][1] = "disk"
    with pytest.raises(ConfigError, match="layer 2 tier"):
        PagedMoEStack(routers, stacks, bad, K, 1, CPU)
    paged = PagedMoEStack(routers, stacks, MIXED, K, 1, CPU)
    with pytest.raises(ConfigError, match="layer 2 tier"):
        paged.resize(bad)


def test_a_resize_takes_the_slots_asked_for(stack):
    routers, stacks = stack
    paged = PagedMoEStack(routers, stacks, MIXED, K, 1, CPU)
    paged.resize(MIXED, slots=E + 1)
    assert paged.pool.slots == E + 1
    x = torch.randn(3, H, dtype=torch.bfloat16)
    assert torch.equal(paged.forward(x), reference_forward(x, routers, stacks, K))


def test_a_pool_smaller_than_the_most_paged_layer_is_refused(stack):
    routers, stacks = stack
    with pytest.raises(ConfigError, match="cannot hold the 4 paged experts"):
        PagedMoEStack(routers, stacks, [["host"] * E] * LAYERS, K, 1, CPU, slots=3)


def test_expert_weights_of_the_wrong_shape_are_refused(stack):
    _, stacks = stack
    with pytest.raises(ConfigError, match="expected w13"):
        LayerTiers(stacks[0][0][:, :-1], stacks[0][1], ["host"] * E, ExpertLayout(H, I), CPU)


def test_tensor_parallel_shards_the_intermediate_dimension():
    layout = ExpertLayout(H, I, tensor_parallel=2)
    assert layout.w13_shape == (I, H) and layout.w2_shape == (H, I // 2)
    with pytest.raises(ConfigError, match="tensor_parallel"):
        ExpertLayout(H, I, tensor_parallel=5)


def test_staging_buffers_rotate_by_layer_and_do_not_overlap():
    pool = StagingPool(buffers=3, slots=2, layout=ExpertLayout(4, 5), device=CPU)
    assert [pool.buffer_of(layer) for layer in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    starts = {pool.buffer(b)[0].data_ptr() for b in range(3)} | {pool.buffer(b)[1].data_ptr() for b in range(3)}
    assert len(starts) == 6 and pool.nbytes == 3 * 2 * 3 * 4 * 5 * 2
    with pytest.raises(IndexError):
        pool.buffer(0, 3)


def test_compressed_experts_keep_only_compressed_bytes(stack):
    routers, stacks = stack
    paged = PagedMoEStack(routers, stacks, [["compressed"] * E] * LAYERS, K, 1, CPU)
    used = paged.gpu_bytes
    assert used["resident"] == 0 and 0 < used["compressed"] < LAYERS * E * 3 * H * I * 2
    assert used["staging"] == 2 * E * 3 * H * I * 2


def test_a_layer_never_prefetched_is_an_error(stack):
    routers, stacks = stack
    pager: ExpertPager = PagedMoEStack(routers, stacks, [["host"] * E] * LAYERS, K, 0, CPU).pager
    pager.begin_step()
    with pytest.raises(RuntimeError, match="never prefetched"):
        pager.wait(1)


# ---------------------------------------------------------------- one kernel call per paged layer
@pytest.mark.parametrize("cpu_order", ["lazy", "eager"])
@pytest.mark.parametrize("tiers,depth", [([["host"] * E] * LAYERS, 1), (MIXED, 0), (MIXED, 1), (MIXED, 2),
                                         (ALL_TIERS, 1)])
def test_fused_spans_equal_plain_torch_bit_for_bit(stack, tiers, depth, cpu_order):
    """Each paged layer read as one arena span through its expert -> row remap (the vLLM path)."""
    routers, stacks = stack
    x = torch.randn(5, H, dtype=torch.bfloat16)
    paged = PagedMoEStack(routers, stacks, tiers, K, depth, CPU, cpu_order=cpu_order, fused=True)
    expected = reference_forward(x, routers, stacks, K)
    assert torch.equal(paged.forward(x), expected)
    assert torch.equal(paged.forward(x), expected)


def test_arena_rows_do_not_overlap_and_spans_cover_each_layer():
    from executor.arena import ArenaLayout
    from fluxmoe.names import parse_tier

    tiers = [[parse_tier(t) for t in layer] for layer in MIXED * 3]  # 12 layers, 3 buffers
    layout = ArenaLayout.of(tiers, buffers=3, slots=4)
    taken = set()
    for b, start in enumerate(layout.buffer_start):
        rows = set(range(start, start + 4))
        assert not rows & taken
        taken |= rows
    for layer, start in layout.resident_start.items():
        rows = set(range(start, start + sum(t.value == "resident" for t in tiers[layer])))
        assert not rows & taken
        taken |= rows
        lo, hi = layout.span[layer]
        b = layout.buffer_start[layer % 3]
        assert lo <= min(b, start) and hi >= b + 4 and rows <= set(range(lo, hi))
    assert taken == set(range(layout.rows))
    assert set(layout.span) == set(range(12))
    with_resident_layer = tiers[:2] + [[parse_tier("resident")] * E]
    assert set(ArenaLayout.of(with_resident_layer, 1, 4).span) == {0, 1}  # all-resident layers keep their stacks


def test_a_wrong_remap_gives_a_wrong_result(stack):
    routers, stacks = stack
    x = torch.randn(5, H, dtype=torch.bfloat16)
    paged = PagedMoEStack(routers, stacks, MIXED, K, 1, CPU, fused=True)
    fused = paged.pager.weights[0].fused
    rows = list(fused.rows_host)
    rows[0], rows[1] = rows[1], rows[0]
    paged.pager.weights[0] = type(paged.pager.weights[0])(paged.pager.weights[0].groups, paged.pager.weights[0].experts,
                                                          type(fused)(fused.w13, fused.w2, fused.row_of, tuple(rows)))
    assert not torch.equal(paged.forward(x), reference_forward(x, routers, stacks, K))


@pytest.mark.parametrize("cpu_order", ["lazy", "eager"])
def test_join_mid_step_keeps_results_exact(stack, cpu_order):
    """A join at every layer (as piecewise CUDA-graph captures do) orders all paging work first."""
    routers, stacks = stack
    x = torch.randn(5, H, dtype=torch.bfloat16)
    paged = PagedMoEStack(routers, stacks, MIXED, K, 2, CPU, cpu_order=cpu_order, fused=True)
    pager = paged.pager
    pager.prefetch_on_release = False
    from executor.moe_layer import moe_layer

    out = x
    for layer, router in enumerate(paged.routers):
        weights = pager.before_layer(layer)
        out = moe_layer(out, router, weights.fused.experts() if weights.fused else weights.experts, K)
        pager.after_layer(layer)
        pager.join()
        assert all(events == [] for events in pager._pending.values())
    pager.end_step()
    assert torch.equal(out, reference_forward(x, routers, stacks, K))


# ---------------------------------------------------------------- the host-compressed tier
@pytest.mark.parametrize("cpu_order", ["lazy", "eager"])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_host_compressed_chunks_through_two_landing_slots_stay_bit_exact(stack, one_expert_chunks, depth,
                                                                         cpu_order):
    routers, stacks = stack
    x = torch.randn(5, H, dtype=torch.bfloat16)
    paged = PagedMoEStack(routers, stacks, ALL_TIERS, K, depth, CPU, cpu_order=cpu_order, fused=True)
    chunks = [len(stack) for t in paged.pager.layers for stack in t.host_compressed or ()]
    assert chunks == [1, 1, 4, 4, 2, 2, 1, 1]  # one expert per chunk: w13's, then w2's, per layer
    expected = reference_forward(x, routers, stacks, K)
    assert torch.equal(paged.forward(x), expected)
    assert torch.equal(paged.forward(x), expected)


def test_a_landing_slot_rewritten_before_its_decode_corrupts_the_layer(stack, one_expert_chunks, monkeypatch):
    """Lazy CPU order: without the copy stream's wait for the slot's last decode, chunk k + 2
    lands over chunk k before chunk k is decoded."""
    routers, stacks = stack
    x = torch.randn(5, H, dtype=torch.bfloat16)
    paged = PagedMoEStack(routers, stacks, [["host-compressed"] * E] * LAYERS, K, 0, CPU, cpu_order="lazy")
    streams = paged.pager.streams
    real_wait = streams.wait
    monkeypatch.setattr(streams, "wait", lambda stream, event: None if stream is streams.copy else
                        real_wait(stream, event))
    from executor.codec import CodecError

    try:  # another chunk's bytes under this chunk's header: wrong weights, or a stream that does not parse
        assert not torch.equal(paged.forward(x), reference_forward(x, routers, stacks, K))
    except CodecError:
        pass


def test_host_compressed_experts_hold_encoded_bytes_on_the_host_and_only_landing_slots_on_the_gpu(stack):
    routers, stacks = stack
    host = PagedMoEStack(routers, stacks, [["host"] * E] * LAYERS, K, 1, CPU).pager
    packed = PagedMoEStack(routers, stacks, [["host-compressed"] * E] * LAYERS, K, 1, CPU).pager
    assert 0 < packed.host_bytes < host.host_bytes  # random weights still code their exponents
    largest = max(c.nbytes for t in packed.layers for s in t.host_compressed for c in s)
    assert packed.gpu_bytes["landing"] == 2 * -(-largest // 16) * 16
    assert host.gpu_bytes["landing"] == 0
    assert packed.gpu_bytes["staging"] == host.gpu_bytes["staging"]
    assert [t.tier_of(e).value for t in packed.layers[:1] for e in range(E)] == ["host-compressed"] * E


# ---------------------------------------------------------------- vLLM's limit on one call's rows
def test_a_span_wider_than_vllms_fused_moe_limit_is_refused_before_anything_is_allocated():
    """Qwen3-Next's shape as first planned on the H200: 48 paged layers of 512 experts, 106
    resident each, two buffers of 406 slots: the farthest layer's call would read 1,678 rows."""
    from planner.arena_layout import FUSED_MOE_MAX_ROWS, ArenaLayout

    mixed = ArenaLayout.of_counts([(106, True)] * 48, buffers=2, slots=406)
    assert mixed.widest_span[0] == 12 * 106 + 406
    with pytest.raises(ConfigError, match=r"paged MoE layer \d+ would run one fused-MoE call over 1678 expert rows"):
        mixed.check_fused_limit()
    whole = ArenaLayout.of_counts([(512, False)] * 8 + [(0, True)] * 40, buffers=2, slots=512)
    assert whole.widest_span[0] == 512 <= FUSED_MOE_MAX_ROWS
    whole.check_fused_limit()


def test_host_compressed_chunks_decode_as_they_land_not_behind_the_compressed_tier(stack):
    """Lazy CPU order: a layer's host-compressed chunks decode on their own stream, so running
    them (and so freeing their landing slots for the link) runs none of the layer's compressed
    decodes. On one decode stream they had queued behind those, and the link idled (Qwen3-Next
    on the H200: 218 ms a step against 174 once apart)."""
    routers, stacks = stack
    paged = PagedMoEStack(routers, stacks, ALL_TIERS, K, 1, CPU, cpu_order="lazy", fused=True)
    pager, streams = paged.pager, paged.pager.streams
    layer = next(i for i, t in enumerate(pager.layers) if t.compressed_ids and t.host_compressed_ids)
    pager.prefetch(layer)
    compressed_decodes = len(streams.decode.pending)
    assert compressed_decodes and streams.landed_decode.pending
    streams.landed_decode.run_until(streams.landed_decode.launched)
    assert len(streams.decode.pending) == compressed_decodes  # none of them ran
    assert not streams.landed_decode.pending
