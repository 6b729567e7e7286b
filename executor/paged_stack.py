"""The paging executor for an MoE layer stack: experts placed in tiers as a Plan says,
materialized into the staging pool `prefetch_depth` layers ahead, compute ordered by events.

forward(x), per step:
- fork the side streams from the compute stream (this also orders slot reuse across steps
  and makes the step capturable in a CUDA graph);
- issue layers 0..depth: host experts copy on the copy stream, compressed ones decode on the
  decode stream, each into its buffer's slots;
- for each layer: the compute stream waits for that layer's events (on the GPU), runs the
  layer, records that the buffer is free, and the next layer that uses the buffer is issued
  behind that event.
Stats (optional, off during graph capture) time the waits and the transfers with events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from executor.moe_layer import moe_layer
from executor.staging import StagingPool
from executor.streams import Streams
from executor.tiers import ExpertShape, PagedTensor, make_expert


@dataclass
class LayerStats:
    """What one layer measured in the last step with stats on."""

    wait_ms: float = 0.0  # compute waited for weights
    h2d_bytes: int = 0
    h2d_ms: float = 0.0
    decode_bytes: int = 0  # bf16 output bytes
    decode_ms: float = 0.0

    @property
    def h2d_gbps(self) -> float:
        return self.h2d_bytes / self.h2d_ms / 1e6 if self.h2d_ms else 0.0

    @property
    def decode_gbps(self) -> float:
        return self.decode_bytes / self.decode_ms / 1e6 if self.decode_ms else 0.0


@dataclass
class RuntimeStats:
    """Runtime feedback the planner can read: per layer, waits and achieved bandwidths."""

    layers: list[LayerStats] = field(default_factory=list)

    @property
    def total_wait_ms(self) -> float:
        return sum(s.wait_ms for s in self.layers)

    @property
    def h2d_gbps(self) -> float:
        ms = sum(s.h2d_ms for s in self.layers)
        return sum(s.h2d_bytes for s in self.layers) / ms / 1e6 if ms else 0.0


class PagedMoEStack:
    def __init__(self, routers: list[torch.Tensor], experts: list[list[torch.Tensor]], tiers: list[list[str]],
                 hidden: int, intermediate: int, top_k: int, prefetch_depth: int, device: torch.device | str):
        """tiers[l][e] in {"resident", "compressed", "host"} (a Plan's layers give them)."""
        self.device = torch.device(device)
        self.shape = ExpertShape(hidden, intermediate)
        self.top_k, self.depth = top_k, prefetch_depth
        self.routers = [r.to(self.device) for r in routers]
        self.experts: list[list[PagedTensor]] = [
            [make_expert(flat, tier, self.device) for flat, tier in zip(layer, layer_tiers)]
            for layer, layer_tiers in zip(experts, tiers)]
        self.paged_per_layer = [sum(e.needs_slot for e in layer) for layer in self.experts]
        self.pool = StagingPool(prefetch_depth + 1, max(self.paged_per_layer, default=0), self.shape.numel,
                                self.device)
        # Resident experts never move: their views are made once, here, not every step.
        self.resident_views = [[self.shape.views(e.flat) if not e.needs_slot else None for e in layer]
                               for layer in self.experts]
        self.streams = Streams(self.device)
        self.stats = RuntimeStats([LayerStats() for _ in self.experts])

    @classmethod
    def from_plan(cls, plan, routers, experts, hidden, intermediate, top_k, device):
        tiers = [[lp.tier_of(e) for e in range(len(layer))] for lp, layer in zip(plan.layers, experts)]
        return cls(routers, experts, tiers, hidden, intermediate, top_k, plan.prefetch_depth, device)

    def _issue(self, layer: int, timed: bool):
        if not self.paged_per_layer[layer]:  # nothing to bring in
            return self.resident_views[layer], [], {}
        s, pool = self.streams, self.pool
        buffer = pool.buffer_of(layer)
        for side in (s.copy, s.decode):
            s.wait(side, pool.released[buffer])
        marks = {}
        if timed:
            marks = {"h2d": s.record(s.copy, True), "decode": s.record(s.decode, True)}
        views, events, j = [], [], 0
        h2d_bytes = decode_bytes = 0
        for expert, resident_view in zip(self.experts[layer], self.resident_views[layer]):
            if resident_view is not None:
                views.append(resident_view)
                continue
            slot = pool.slot(buffer, j)
            j += 1
            if expert.tier == "host":
                h2d_bytes += slot.numel() * 2
            else:
                decode_bytes += slot.numel() * 2
            flat, event = expert.materialize(slot, s)
            views.append(self.shape.views(flat))
            if event is not None:
                events.append(event)
        if timed:
            marks["h2d_end"], marks["decode_end"] = s.record(s.copy, True), s.record(s.decode, True)
            marks["bytes"] = (h2d_bytes, decode_bytes)
        return views, events, marks

    def forward(self, x: torch.Tensor, stats: bool = False) -> torch.Tensor:
        if not any(self.paged_per_layer):  # everything resident: nothing to order
            for router, views in zip(self.routers, self.resident_views):
                x = moe_layer(x, router, views, self.top_k)
            return x
        s = self.streams
        if s.cuda:
            s.compute = torch.cuda.current_stream(self.device)  # the caller's (or a graph capture's) stream
        start = s.record(s.compute)
        for side in (s.copy, s.decode):
            s.wait(side, start)
        self.pool.released = [None] * self.pool.buffers  # `start` orders reuse across steps
        L = len(self.experts)
        pending = {layer: self._issue(layer, stats) for layer in range(min(self.depth + 1, L))}
        waits = []
        for layer in range(L):
            views, events, marks = pending.pop(layer)
            before = s.record(s.compute, True) if stats else None
            for event in events:
                s.wait(s.compute, event)
            after = s.record(s.compute, True) if stats else None
            x = moe_layer(x, self.routers[layer], views, self.top_k)  # on the compute (current) stream
            if self.paged_per_layer[layer]:
                self.pool.released[self.pool.buffer_of(layer)] = s.record(s.compute)
            waits.append((before, after, marks))
            if layer + self.depth + 1 < L:
                pending[layer + self.depth + 1] = self._issue(layer + self.depth + 1, stats)
        if stats and s.cuda:
            torch.cuda.synchronize(self.device)  # stats are read after the step, off the hot path
            for layer_stats, (before, after, marks) in zip(self.stats.layers, waits):
                layer_stats.wait_ms = before.elapsed_time(after)
                if not marks:  # nothing paged in this layer
                    layer_stats.h2d_bytes = layer_stats.decode_bytes = 0
                    layer_stats.h2d_ms = layer_stats.decode_ms = 0.0
                    continue
                layer_stats.h2d_bytes, layer_stats.decode_bytes = marks["bytes"]
                layer_stats.h2d_ms = marks["h2d"].elapsed_time(marks["h2d_end"])
                layer_stats.decode_ms = marks["decode"].elapsed_time(marks["decode_end"])
        return x

    @property
    def gpu_bytes(self) -> dict[str, int]:
        """GPU memory by use: resident and compressed experts, staging pool."""
        out = {"resident": 0, "compressed": 0, "staging": self.pool.nbytes}
        for layer in self.experts:
            for expert in layer:
                if expert.tier in out:
                    out[expert.tier] += expert.nbytes
        return out
