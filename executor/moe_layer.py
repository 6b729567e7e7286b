"""A standalone MoE layer stack in plain torch: router, top-k, experts, residual.

Every expert runs on all tokens of the step, weighted by its gate (zero where the router
did not pick it): shapes stay static, so a decode step can be captured in a CUDA graph, and
at decode batch sizes the cost is the weight read either way. The same function serves the
plain-torch reference and the paged executor, so their difference is the paging alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_layer(x: torch.Tensor, router: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor]],
              top_k: int) -> torch.Tensor:
    """x [T, h]; router [E, h]; experts: (w13 [2i, h], w2 [h, i]) per expert. Returns [T, h]."""
    probs = F.softmax((x @ router.T).float(), dim=-1)  # [T, E]
    weights, ids = probs.topk(top_k, dim=-1)  # [T, k]
    gates = torch.zeros_like(probs).scatter(1, ids, weights / weights.sum(-1, keepdim=True)).to(x.dtype)  # [T, E]
    out = x.clone()
    for e, (w13, w2) in enumerate(experts):
        i = w2.shape[1]
        gate_up = x @ w13.T  # [T, 2i]
        act = F.silu(gate_up[:, :i]) * gate_up[:, i:]  # [T, i]
        out += gates[:, e:e + 1] * (act @ w2.T)  # [T, h]
    return out


def random_stack(layers: int, hidden: int, intermediate: int, experts: int, device: torch.device,
                 seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Routers [E, h] and flat bf16 experts (3*h*i each) with trained-like scales."""
    gen = torch.Generator(device=device).manual_seed(seed)
    routers = [torch.randn(experts, hidden, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
               for _ in range(layers)]
    flat = [[(torch.randn(3 * hidden * intermediate, generator=gen, device=device) * 0.02).to(torch.bfloat16)
             for _ in range(experts)] for _ in range(layers)]
    return routers, flat


def random_stack_for(spec, layers: int | None = None, device: torch.device | str = "cpu", seed: int = 0):
    """A stack with the expert shape of a ModelSpec (its first `layers` MoE layers)."""
    n = spec.num_moe_layers if layers is None else layers
    return random_stack(n, spec.hidden_size, spec.expert_intermediate_size, spec.num_experts, torch.device(device),
                        seed)


def reference_forward(x: torch.Tensor, routers, experts, hidden: int, intermediate: int, top_k: int) -> torch.Tensor:
    """The stack with every expert resident, in plain torch."""
    from executor.tiers import ExpertShape

    shape = ExpertShape(hidden, intermediate)
    for router, layer in zip(routers, experts):
        x = moe_layer(x, router, [shape.views(flat) for flat in layer], top_k)
    return x
