"""A standalone MoE layer stack in plain torch: router, top-k, experts, residual.

Every expert runs on all tokens of the step, weighted by its gate (zero where the router
did not pick it): shapes stay static, so a decode step can be captured in a CUDA graph, and
at decode batch sizes the cost is the weight read either way. The same function serves the
plain-torch reference and the paged executor, so their difference is the paging alone.
Experts come stacked as vLLM stacks them: w13 [E, 2I, H] (gate then up), w2 [E, H, I].
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def moe_layer(x: torch.Tensor, router: torch.Tensor, experts: Sequence[tuple[torch.Tensor, torch.Tensor]],
              top_k: int, on_route: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """x [T, h]; router [E, h]; experts: (w13 [2i, h], w2 [h, i]) per expert id. Returns [T, h].
    on_route: called with the top-k ids [T, k] before any expert is read (routed-only fetch)."""
    probs = F.softmax((x @ router.T).float(), dim=-1)  # [T, E]
    weights, ids = probs.topk(top_k, dim=-1)  # [T, k]
    if on_route is not None:
        on_route(ids)
    gates = torch.zeros_like(probs).scatter(1, ids, weights / weights.sum(-1, keepdim=True)).to(x.dtype)  # [T, E]
    out = x.clone()
    for e, (w13, w2) in enumerate(experts):
        i = w2.shape[1]
        gate_up = x @ w13.T  # [T, 2i]
        act = F.silu(gate_up[:, :i]) * gate_up[:, i:]  # [T, i]
        out += gates[:, e:e + 1] * (act @ w2.T)  # [T, h]
    return out


def random_stack(layers: int, hidden: int, intermediate: int, experts: int, device: torch.device,
                 seed: int = 0) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Routers [E, h] and per layer stacked bf16 experts (w13, w2) with trained-like scales."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def weights(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)

    routers = [weights(experts, hidden) for _ in range(layers)]
    stacks = [(weights(experts, 2 * intermediate, hidden), weights(experts, hidden, intermediate))
              for _ in range(layers)]
    return routers, stacks


def random_stack_for(spec, layers: int | None = None, device: torch.device | str = "cpu", seed: int = 0):
    """A stack with the expert shape of a ModelSpec (its first `layers` MoE layers)."""
    n = spec.num_moe_layers if layers is None else layers
    return random_stack(n, spec.hidden_size, spec.expert_intermediate_size, spec.num_experts, torch.device(device),
                        seed)


def reference_forward(x: torch.Tensor, routers, stacks, top_k: int) -> torch.Tensor:
    """The stack with every expert resident, in plain torch."""
    for router, (w13, w2) in zip(routers, stacks):
        x = moe_layer(x, router, list(zip(w13, w2)), top_k)
    return x
