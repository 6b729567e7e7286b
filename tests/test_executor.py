"""The paging executor's logic on the CPU: placement, slot reuse, bit-exact materialization."""

import pytest
import torch

import planner
from executor.moe_layer import random_stack, reference_forward
from executor.paged_stack import PagedMoEStack
from executor.staging import StagingPool
from tests.conftest import tiny_gpu, tiny_model

H, I, E, K, LAYERS = 32, 48, 4, 2, 3
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stack():
    return random_stack(LAYERS, H, I, E, CPU, seed=1)


@pytest.mark.parametrize("tiers,depth", [
    ([["resident"] * E] * LAYERS, 0),
    ([["host"] * E] * LAYERS, 1),
    ([["compressed"] * E] * LAYERS, 2),
    ([["resident", "compressed", "host", "host"], ["host", "host", "host", "host"], ["compressed"] * E], 1),
])
def test_paged_forward_equals_plain_torch_bit_for_bit(stack, tiers, depth):
    routers, experts = stack
    x = torch.randn(5, H, dtype=torch.bfloat16)
    paged = PagedMoEStack(routers, experts, tiers, H, I, K, depth, CPU)
    expected = reference_forward(x, routers, experts, H, I, K)
    assert torch.equal(paged.forward(x), expected)
    assert torch.equal(paged.forward(x), expected)  # slots reused on a second step


def test_experts_are_placed_as_the_plan_says(stack):
    routers, experts = stack
    from profiles import Profile

    model = tiny_model(LAYERS, E)
    plan = planner.optimize(Profile(model, tiny_gpu(1.0)), 700 * 1024, reserve_bytes=16 << 10, max_num_seqs=8)
    assert {lp.tier_of(i) for lp in plan.layers for i in range(E)} == {"resident", "compressed", "host"}
    paged = PagedMoEStack.from_plan(plan, routers, experts, H, I, K, CPU)
    for lp, layer in zip(plan.layers, paged.experts):
        assert [e.tier for e in layer] == [lp.tier_of(i) for i in range(E)]
    most_paged = max(len(lp.compressed) + len(lp.host) for lp in plan.layers)
    assert paged.pool.buffers == plan.prefetch_depth + 1 and paged.pool.slots_per_buffer == most_paged


def test_staging_buffers_rotate_by_layer_and_slots_do_not_overlap():
    pool = StagingPool(buffers=3, slots_per_buffer=2, expert_numel=10, device=CPU)
    assert [pool.buffer_of(layer) for layer in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    starts = {pool.slot(b, j).data_ptr() for b in range(3) for j in range(2)}
    assert len(starts) == 6 and pool.storage.numel() == 60
    with pytest.raises(IndexError):
        pool.slot(0, 2)


def test_compressed_experts_keep_only_compressed_bytes(stack):
    routers, experts = stack
    paged = PagedMoEStack(routers, experts, [["compressed"] * E] * LAYERS, H, I, K, 1, CPU)
    used = paged.gpu_bytes
    assert used["resident"] == 0 and 0 < used["compressed"] < LAYERS * E * 3 * H * I * 2
    assert used["staging"] == 2 * E * 3 * H * I * 2
