"""The paging state of one vLLM worker process: a plan's tiers, the arena, each MoE layer's
experts as they are loaded, and the pager once every layer is in place.

Free of vLLM imports, so CI tests it on the CPU; `fluxmoe.vllm_plugin.experts` wires it into
vLLM's layers. Model layers are keyed by their index in the model (as plans key them); the
pager sees the MoE layers in execution order.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from executor.arena import ArenaLayout, ExpertArena
from executor.pager import ExpertPager
from executor.tiers import ExpertLayout, LayerTiers
from fluxmoe.errors import ConfigError
from fluxmoe.names import Tier
from fluxmoe.units import format_bytes
from fluxmoe.vllm_plugin import LOG_NAME

log = logging.getLogger(LOG_NAME)


@dataclass
class Landing:
    """Where a paged layer's experts are written while a checkpoint loads (rows in expert id
    order within each tier): resident rows in the arena, host rows pinned, compressed and
    host-compressed rows as bf16 in host memory until they are encoded."""

    tiers: list[Tier]
    resident: tuple[torch.Tensor, torch.Tensor]
    host: tuple[torch.Tensor, torch.Tensor]
    compressed: tuple[torch.Tensor, torch.Tensor]
    host_compressed: tuple[torch.Tensor, torch.Tensor]

    def target(self, expert: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """The (w13, w2) stacks that hold `expert`, and its row in them."""
        tier = self.tiers[expert]
        row = sum(t is tier for t in self.tiers[:expert])
        part = {Tier.RESIDENT: self.resident, Tier.HOST: self.host, Tier.COMPRESSED: self.compressed,
                Tier.HOST_COMPRESSED: self.host_compressed}[tier]
        return part, row


def check_plan_for_model(plan, hf_config: dict, tensor_parallel: int = 1, expert_parallel: bool = False) -> None:
    """Refuse a plan made for other model shapes (the name may differ) or another parallelism.
    Under tensor or expert parallel a plan holds one rank's shard: its hash is the shard's."""
    from profiles.hf_config import spec_from_hf_config
    from profiles.parallel import shard_model

    plan.check_parallelism(tensor_parallel, tensor_parallel if expert_parallel else 1,
                           f"vLLM runs {tensor_parallel}{' with expert parallel' if expert_parallel else ''}")
    spec = dataclasses.replace(shard_model(spec_from_hf_config(hf_config), tensor_parallel, expert_parallel),
                               name=plan.model)
    if spec.content_hash() != plan.model_hash:
        raise ConfigError(f"plan was made for model {plan.model!r} (hash {plan.model_hash}); the model vLLM "
                          f"loads has other shapes (hash {spec.content_hash()} under that name): "
                          f"plan again for this model")


class PagingRuntime:
    def __init__(self, plan, layout: ExpertLayout, device: torch.device | str, stats_interval_s: float | None = None):
        """stats_interval_s: time every step and report (a log line every that many seconds,
        0 for none, and `self.reporter.snapshot()`); None: no stats."""
        from fluxmoe.vllm_plugin.stats import StatsReporter

        self.plan, self.layout, self.device = plan, layout, torch.device(device)
        self.reporter = StatsReporter(self, stats_interval_s) if stats_interval_s is not None else None
        self.moe_layers = sorted(lp.layer for lp in plan.layers)
        self.index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._take_layout(plan)  # checked before any allocation
        self.arena = (ExpertArena(self.tiers, self.buffers, self.slots, layout, self.device)
                      if self.paged_layers else None)
        self.layers: list[LayerTiers | None] = [None] * len(self.moe_layers)
        self._pager: ExpertPager | None = None
        self.bindings: dict[int, Callable[[torch.Tensor | None, torch.Tensor | None, bool], None]] = {}
        self.checksums: dict[int, tuple[float, float]] = {}  # model layer -> sums of the placed stacks

    def _take_layout(self, plan) -> None:
        """`plan`'s tiers per MoE layer, paged layers, buffers and slots per buffer, after checking
        that no layer's one kernel call would take more rows than vLLM's kernels take."""
        tiers = [plan.layer(layer).tiers() for layer in self.moe_layers]
        paged = {layer for layer, t in zip(self.moe_layers, tiers) if any(x is not Tier.RESIDENT for x in t)}
        buffers, slots = plan.prefetch_depth + 1, plan.slots_per_buffer if paged else 0
        if paged:
            ArenaLayout.of(tiers, buffers, slots).check_fused_limit(f"plan for {plan.model}")
        self.tiers, self.paged_layers, self.buffers, self.slots = tiers, paged, buffers, slots

    # ------------------------------------------------------------------ which layer is what
    def position(self, layer: int) -> int:
        """Where model layer `layer` runs among the MoE layers (the pager's index)."""
        if layer not in self.index:
            raise ConfigError(f"model layer {layer} is not an MoE layer of the plan (MoE layers "
                              f"{self.moe_layers[0]}..{self.moe_layers[-1]})")
        return self.index[layer]

    def is_paged(self, layer: int) -> bool:
        self.position(layer)
        return layer in self.paged_layers

    @property
    def any_paged(self) -> bool:
        return bool(self.paged_layers)

    # ------------------------------------------------------------------ placing experts
    def landing(self, layer: int, pin_memory: bool = True) -> Landing:
        """Per-tier destinations for a checkpoint's experts of a paged layer."""
        i = self.position(layer)
        tiers = self.tiers[i]

        def host_stack(n: int, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(torch.empty((n, *shape), dtype=torch.bfloat16, pin_memory=pin)
                         for shape in (self.layout.w13_shape, self.layout.w2_shape))

        pin = pin_memory and self.device.type == "cuda"
        return Landing(tiers, self.arena.resident(i), host_stack(tiers.count(Tier.HOST), pin),
                       host_stack(tiers.count(Tier.COMPRESSED), False),
                       host_stack(tiers.count(Tier.HOST_COMPRESSED), False))

    def place_landed(self, layer: int, landing: Landing) -> None:
        i = self.position(layer)
        self._set(i, LayerTiers.from_parts(self.tiers[i], self.layout, self.device, landing.resident, landing.host,
                                           landing.compressed, landing.host_compressed))

    def place(self, layer: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """A paged layer's full stacks (any device): split into its tiers, copies kept."""
        i = self.position(layer)
        self.checksums[layer] = (float(w13.double().sum()), float(w2.double().sum()))
        self._set(i, LayerTiers(w13, w2, self.tiers[i], self.layout, self.device, what=f"layer {layer}",
                                resident_into=self.arena.resident(i) if layer in self.paged_layers else None))

    def keep_resident(self, layer: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """An all-resident layer keeps the stacks it has (vLLM's own parameters): no copy."""
        i = self.position(layer)
        if layer in self.paged_layers:
            raise ConfigError(f"model layer {layer} is paged in the plan, not all resident")
        empty = tuple(torch.empty((0, *t.shape[1:]), dtype=t.dtype) for t in (w13, w2))
        self._set(i, LayerTiers.from_parts(self.tiers[i], self.layout, self.device, (w13, w2), empty, None))

    @property
    def encode_seconds(self) -> float:
        """Time spent encoding compressed experts at load (on the GPU), all layers."""
        return sum(t.encode_seconds for t in self.layers if t is not None)

    def _set(self, i: int, tiers: LayerTiers) -> None:
        if self._pager is not None:
            raise RuntimeError("the pager is already running: layers cannot be placed again")
        self.layers[i] = tiers

    # ------------------------------------------------------------------ running
    @property
    def ready(self) -> bool:
        return all(t is not None for t in self.layers)

    @property
    def pager(self) -> ExpertPager:
        """Built on first use, once every MoE layer is in place."""
        if self._pager is None:
            missing = [self.moe_layers[i] for i, t in enumerate(self.layers) if t is None]
            if missing:
                raise RuntimeError(f"MoE layers {missing} were never placed: the pager cannot start")
            self._pager = ExpertPager(self.layers, self.plan.prefetch_depth, self.device, slots=self.slots,
                                      arena=self.arena, telemetry=self.reporter is not None,
                                      routed_fetch=self.plan.routed_fetch, count_routes=True)
            compressed = sum(len(t.compressed_ids) + len(t.host_compressed_ids) for t in self.layers)
            if compressed:
                log.info("FluxMoE: %d compressed and host-compressed experts were encoded at load in %.1f s",
                         compressed, self.encode_seconds)
        return self._pager

    def bind(self, layer: int, rebind: Callable[[torch.Tensor | None, torch.Tensor | None, bool], None]) -> None:
        """`rebind(w13, w2, paged)` points model layer `layer`'s module at the stacks its kernel
        reads (vLLM's parameters: the whole stack, or the arena span of a paged layer); None, None
        drops them. A rebuild calls it, since it moves every expert."""
        self.bindings[self.position(layer)] = rebind

    def rebuild(self, plan) -> dict:
        """Between steps, with CUDA graphs off (they hold the arena's addresses): the same experts
        in the tiers of `plan`, a plan for another budget made for this engine (the KV cache stays
        as vLLM sized it: `Replanner.rebudget(live=True)`). Every expert is read back (on the GPU
        where it has room, see `ExpertPager.rebuild`), the GPU memory of the old tiers given back
        to the driver, the new tiers built and each module pointed at its new stacks. Where the
        new tiers do not fit, the old ones are built again and the error says so. Returns the expert bytes before and after and the seconds."""
        from executor.pager import RebuildError

        if sorted(lp.layer for lp in plan.layers) != self.moe_layers or plan.model != self.plan.model:
            raise ConfigError(f"plan: made for {plan.model!r} with MoE layers {sorted(lp.layer for lp in plan.layers)}"
                              f", this engine runs {self.plan.model!r} with {self.moe_layers}")
        started, before, old = time.perf_counter(), self.expert_bytes, self.plan
        pager = self.pager
        self._take_layout(plan)  # refused before anything moves
        for rebind in self.bindings.values():  # the modules' references to the old stacks go first
            rebind(None, None, False)
        self.layers, self.arena = [], None
        try:
            new, error = pager.rebuild(self.tiers, plan.prefetch_depth, self.slots or None, fused=True), None
        except RebuildError as e:
            new, error, plan = e.pager, e, old
            self._take_layout(plan)
        self._adopt(plan, new)
        if error is not None:
            raise ConfigError(f"plan for {format_bytes(plan.budget_bytes)}: {error}")
        return {"expert_bytes_before": before, "expert_bytes_after": self.expert_bytes,
                "seconds": round(time.perf_counter() - started, 3), **new.rebuild_seconds}

    def _adopt(self, plan, pager: ExpertPager) -> None:
        """Run `pager` (built for `plan`, whose layout is taken) and point each module at its stacks."""
        self.plan, self._pager, self.layers, self.arena = plan, pager, list(pager.layers), pager.arena
        for i, rebind in self.bindings.items():
            if self.moe_layers[i] in self.paged_layers:
                fused = pager.weights[i].fused
                rebind(fused.w13, fused.w2, True)
            else:
                rebind(*pager.layers[i].resident, False)

    def swap(self, swaps) -> int:
        """Between steps (vLLM runs worker calls there): resident-host swaps in place, each
        (model layer, expert into the GPU, expert out of it); the plan follows. Returns how many."""
        from planner.moves import Swap, apply_swaps

        swaps = [s if isinstance(s, Swap) else Swap(*s) for s in swaps]
        plan = apply_swaps(self.plan, swaps)  # refuses a swap whose experts are not where it says
        for swap in swaps:
            self.pager.swap(self.position(swap.layer), swap.into_gpu, swap.out_of_gpu)
        self.plan = plan
        return len(swaps)

    def stats(self) -> dict:
        """The pager's latest stats (see `StatsReporter.snapshot`); empty layers if not timed."""
        if self.reporter is None:
            from fluxmoe.vllm_plugin.stats import header, route_counts_of

            return {**header(self), "stats": "off", **route_counts_of(self._pager)}
        return self.reporter.snapshot()

    @property
    def gpu_bytes(self) -> int:
        """GPU bytes held for experts by this runtime (arena and compressed stacks; all-resident
        layers keep vLLM's own parameters and are not counted here)."""
        compressed = sum(t.gpu_bytes[Tier.COMPRESSED] for t in self.layers if t is not None)
        landing = self._pager.landing.nbytes if self._pager is not None and self._pager.landing is not None else 0
        return (self.arena.nbytes if self.arena is not None else 0) + compressed + landing

    @property
    def expert_bytes(self) -> int:
        """GPU bytes of every expert this engine holds: `gpu_bytes` plus all-resident layers' stacks."""
        whole = sum(sum(x.numel() * x.element_size() for x in t.resident)
                    for layer, t in zip(self.moe_layers, self.layers) if t is not None and layer not in self.paged_layers)
        return self.gpu_bytes + whole


_current: PagingRuntime | None = None


def current_runtime() -> PagingRuntime | None:
    """This process's runtime (one per vLLM worker), or None where no plan runs."""
    return _current


def set_current_runtime(runtime: PagingRuntime | None) -> None:
    global _current
    _current = runtime
