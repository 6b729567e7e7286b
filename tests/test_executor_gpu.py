"""The paging executor for real on a GPU: bit-exact against plain torch, under CUDA graphs too.

Four layers at depths 0-2, so staging buffers are reused within a step and across steps."""

import pytest
import torch

import profiles
from executor.moe_layer import random_stack_for, reference_forward
from executor.paged_stack import PagedMoEStack

pytestmark = pytest.mark.gpu
LAYERS = 4

TIER_MIXES = {
    "resident": lambda e: ["resident"] * e,
    "host": lambda e: ["host"] * e,
    "compressed": lambda e: ["compressed"] * e,
    "mixed": lambda e: (["resident", "compressed", "host"] * e)[:e],
    "host-compressed": lambda e: ["host-compressed"] * e,
    "all tiers": lambda e: (["resident", "compressed", "host", "host-compressed"] * e)[:e],
}


@pytest.fixture(scope="module")
def qwen_like():
    """Qwen3-30B-A3B's expert shape (2048 x 768, 128 experts), four layers."""
    spec = profiles.load_model("qwen3-30b-a3b")
    routers, stacks = random_stack_for(spec, layers=LAYERS, device="cuda")
    return spec, routers, stacks


def _paged(qwen_like, mix: str, depth: int, tokens: int):
    """The stack paged as `mix` says, an input, and plain torch's output for it."""
    spec, routers, stacks = qwen_like
    k = spec.experts_per_token
    x = torch.randn(tokens, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
    stack = PagedMoEStack(routers, stacks, [TIER_MIXES[mix](spec.num_experts)] * LAYERS, k, depth, "cuda")
    return stack, x, reference_forward(x, routers, stacks, k)


@pytest.mark.parametrize("mix", list(TIER_MIXES))
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_paged_stack_equals_plain_torch_on_the_gpu(qwen_like, mix, depth):
    stack, x, expected = _paged(qwen_like, mix, depth, tokens=16)
    for _ in range(3):  # slots reused across steps, side streams ordered by events only
        assert torch.equal(stack.forward(x), expected)
    out = stack.forward(x, stats=True)
    assert torch.equal(out, expected)
    if mix in ("host", "mixed", "host-compressed", "all tiers"):
        assert stack.stats.h2d_gbps > 1.0


@pytest.mark.parametrize("mix", ["host", "compressed", "mixed", "host-compressed", "all tiers"])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_a_decode_step_captures_in_a_cuda_graph(qwen_like, mix, depth):
    stack, x, expected = _paged(qwen_like, mix, depth, tokens=8)
    stack.forward(x)  # compile kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = stack.forward(x)
    for _ in range(2):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)


@pytest.mark.parametrize("mix", ["host", "mixed"])
def test_telemetry_times_cuda_graph_replays_without_a_sync(qwen_like, mix):
    """With telemetry, every step (graph replays included) records its timing events and counts
    itself on the device; `harvest` reads them once complete, never waiting."""
    stack, x, expected = _paged(qwen_like, mix, 1, tokens=8)
    pager = stack.pager
    pager.telemetry = True
    stack.forward(x)
    torch.cuda.synchronize()
    assert pager.harvest() and pager.stats.samples == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = stack.forward(x)
    torch.cuda.synchronize()
    pager.stats.layers[0].wait_ms = -1.0  # must be overwritten by the replay's timings
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    assert pager.harvest() and pager.stats.samples == 2
    assert int(pager.steps) == 1 + 3  # the eager step and three replays (a capture runs nothing)
    spec = qwen_like[0]
    host = sum(t == "host" for t in TIER_MIXES[mix](spec.num_experts))
    assert pager.stats.layers[0].h2d_bytes == host * pager.layout.expert_numel * 2
    assert pager.stats.layers[0].wait_ms >= 0.0
    assert pager.stats.h2d_gbps > 1.0
