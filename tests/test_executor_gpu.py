"""The paging executor for real on a GPU: bit-exact against plain torch, under CUDA graphs too."""

import pytest
import torch

import profiles
from executor.moe_layer import random_stack_for, reference_forward
from executor.paged_stack import PagedMoEStack

pytestmark = pytest.mark.gpu

TIER_MIXES = {
    "resident": lambda e: ["resident"] * e,
    "host": lambda e: ["host"] * e,
    "compressed": lambda e: ["compressed"] * e,
    "mixed": lambda e: (["resident", "compressed", "host"] * e)[:e],
}


@pytest.fixture(scope="module")
def qwen_like():
    """Qwen3-30B-A3B's expert shape (2048 x 768, 128 experts), two layers."""
    spec = profiles.load_model("qwen3-30b-a3b")
    routers, experts = random_stack_for(spec, layers=2, device="cuda")
    return spec, routers, experts


@pytest.mark.parametrize("mix", list(TIER_MIXES))
@pytest.mark.parametrize("depth", [0, 1])
def test_paged_stack_equals_plain_torch_on_the_gpu(qwen_like, mix, depth):
    spec, routers, experts = qwen_like
    h, i, e, k = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts, spec.experts_per_token
    x = torch.randn(16, h, device="cuda", dtype=torch.bfloat16)
    stack = PagedMoEStack(routers, experts, [TIER_MIXES[mix](e)] * 2, h, i, k, depth, "cuda")
    expected = reference_forward(x, routers, experts, h, i, k)
    for _ in range(3):  # slots reused across steps, side streams ordered by events only
        assert torch.equal(stack.forward(x), expected)
    out = stack.forward(x, stats=True)
    assert torch.equal(out, expected)
    if mix in ("host", "mixed"):
        assert stack.stats.h2d_gbps > 1.0


@pytest.mark.parametrize("mix", ["host", "compressed", "mixed"])
def test_a_decode_step_captures_in_a_cuda_graph(qwen_like, mix):
    spec, routers, experts = qwen_like
    h, i, e, k = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts, spec.experts_per_token
    x = torch.randn(8, h, device="cuda", dtype=torch.bfloat16)
    stack = PagedMoEStack(routers, experts, [TIER_MIXES[mix](e)] * 2, h, i, k, 1, "cuda")
    stack.forward(x)  # compile kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = stack.forward(x)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, reference_forward(x, routers, experts, h, i, k))
