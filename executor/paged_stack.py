"""A standalone harness over the pager: a stack of MoE layers (router, top-k, experts) whose
experts sit in the tiers a Plan gives, run layer by layer as a serving engine would drive it.

Used by the tests and the GPU benchmarks; inside vLLM the plugin drives the same
`ExpertPager` from vLLM's own layer loop.
"""

from __future__ import annotations

import torch

from executor.moe_layer import moe_layer
from executor.pager import ExpertPager, RuntimeStats
from executor.streams import CpuOrder
from executor.tiers import ExpertLayout
from fluxmoe.errors import ConfigError
from fluxmoe.names import Tier, parse_tier


class PagedMoEStack:
    def __init__(self, routers: list[torch.Tensor], stacks: list[tuple[torch.Tensor, torch.Tensor]],
                 tiers: list[list[Tier | str]], top_k: int, prefetch_depth: int, device: torch.device | str,
                 slots: int | None = None, cpu_order: CpuOrder = "lazy", fused: bool = False,
                 routed_fetch: bool = False, count_routes: bool = False):
        """stacks[l] = (w13 [E, 2I, H], w2 [E, H, I]); tiers[l][e] the tier of expert e of layer l.
        fused: run each paged layer through its arena span and remap, as the vLLM plugin does.
        routed_fetch: host experts move only when a token routes to them (after the router).
        count_routes: count each expert's picks on the device (pager.route_counter)."""
        if not (len(routers) == len(stacks) == len(tiers)):
            raise ConfigError(f"routers, expert stacks and tiers disagree on the number of layers: "
                              f"{len(routers)}, {len(stacks)}, {len(tiers)}")
        self.device = torch.device(device)
        self.top_k = top_k
        w13, w2 = stacks[0]
        layout = ExpertLayout(w13.shape[2], w2.shape[2])
        self.routers = [r.to(self.device) for r in routers]
        self.fused = fused
        tiers = _parse_tiers(tiers)
        self.pager = ExpertPager.build(stacks, tiers, layout, prefetch_depth, self.device, slots=slots, fused=fused,
                                       cpu_order=cpu_order, routed_fetch=routed_fetch, count_routes=count_routes)

    @classmethod
    def from_plan(cls, plan, profile, routers, stacks, device, layers: list[int] | None = None,
                  check_hardware: bool = True, **options) -> "PagedMoEStack":
        """The stack placed as `plan` says. `layers`: which model layers `stacks` holds (default:
        every MoE layer of the model, in order); the plan must be for `profile`."""
        from planner.plan import Plan

        if not isinstance(plan, Plan):
            raise ConfigError(f"plan: expected a planner.Plan, got {type(plan).__name__}")
        plan.check_matches(profile, check_hardware=check_hardware)
        layers = profile.model.moe_layers if layers is None else layers
        tiers = [plan.layer(layer).tiers() for layer in layers]
        return cls(routers, stacks, tiers, profile.model.experts_per_token, plan.prefetch_depth, device,
                   slots=plan.slots_per_buffer, **{"routed_fetch": plan.routed_fetch, **options})

    @property
    def stats(self) -> RuntimeStats:
        return self.pager.stats

    @property
    def pool(self):
        return self.pager.pool

    @property
    def gpu_bytes(self) -> dict[str, int]:
        return self.pager.gpu_bytes

    def tiers(self) -> list[list[Tier]]:
        return [[t.tier_of(e) for e in range(t.num_experts)] for t in self.pager.layers]

    def forward(self, x: torch.Tensor, stats: bool = False) -> torch.Tensor:
        pager = self.pager
        for layer, router in enumerate(self.routers):
            weights = pager.before_layer(layer, stats)
            experts = weights.fused.experts() if self.fused and weights.fused else weights.experts
            x = moe_layer(x, router, experts, self.top_k,  # on the compute (current) stream
                          on_route=lambda ids, layer=layer: self._routed(layer, ids))
            pager.after_layer(layer)
        pager.end_step()
        return x

    def resize(self, tiers: list[list[Tier | str]], prefetch_depth: int | None = None,
               slots: int | None = None) -> None:
        """Between steps: the same experts in other tiers (a plan for another budget), GPU
        memory given back or taken (ExpertPager.rebuild)."""
        tiers = _parse_tiers(tiers)
        self.pager = self.pager.rebuild(tiers, prefetch_depth, slots)

    def _routed(self, layer: int, topk_ids: torch.Tensor) -> None:
        self.pager.count_routes(layer, topk_ids)
        self.pager.fetch_routed(layer, topk_ids)


def _parse_tiers(tiers: list[list[Tier | str]]) -> list[list[Tier]]:
    return [[parse_tier(t, f"layer {i} tier") for t in layer] for i, layer in enumerate(tiers)]
