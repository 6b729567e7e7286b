"""How long a step takes, played out event by event on SimPy resources.

`PagedExecution` runs a FluxMoE plan: the GPU works through the layers in order (compute plus
the decode of compressed experts), while a link process streams host experts over PCIe,
layer after layer and step after step, at most `prefetch_depth` layers ahead: the transfer
for (global) layer g may start once layer g - depth - 1 has finished computing and freed its
staging buffer. Compute of a layer with host experts waits for its transfer. Runs of layers
that nobody waits on are merged into one timeout, which keeps 10,000-request runs fast.

`ResidentExecution` (plain vLLM) and `OffloadExecution` (vLLM's UVA CPU offload: offloaded
bytes cross PCIe inside the kernels, not overlapped) are the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import simpy

from planner.cost_model import CostModel, StepShape, TierCounts


@dataclass
class BusyTime:
    """Seconds each resource was busy, and seconds compute waited for weights."""

    gpu_s: float = 0.0
    decode_s: float = 0.0
    link_s: float = 0.0
    stall_s: float = 0.0
    experts_moved: float = 0.0  # routed-only fetch: expected host experts moved, summed over steps


class ResidentExecution:
    """Every expert resident: a step is the layers' compute plus the fixed per-step cost."""

    def __init__(self, env: simpy.Environment, cost: CostModel):
        self.env, self.cost, self.busy = env, cost, BusyTime()

    def _extra_s(self, step: StepShape) -> float:
        return 0.0

    def run_step(self, step: StepShape):
        gpu = sum(self.cost.layer_compute_s(step)) + self.cost.fixed_s(step)
        extra = self._extra_s(step)
        self.busy.gpu_s += gpu
        self.busy.link_s += extra
        self.busy.stall_s += extra
        yield self.env.timeout(gpu + extra)


class OffloadExecution(ResidentExecution):
    """vLLM with `cpu_offload_gb`: kernels read offloaded weights over PCIe, once per token tile."""

    def __init__(self, env: simpy.Environment, cost: CostModel, offload_bytes: float):
        super().__init__(env, cost)
        self.offload_bytes = offload_bytes

    def _extra_s(self, step: StepShape) -> float:
        return self.cost.offload_step_time(step, self.offload_bytes).link_s


class PagedExecution:
    """A FluxMoE plan: GPU and PCIe link as SimPy resources, prefetch bounded by depth."""

    def __init__(self, env: simpy.Environment, cost: CostModel, tiers: list[TierCounts], prefetch_depth: int,
                 routed_fetch: bool = False, host_ids: list[list[int]] | None = None,
                 release_after: list[int] | None = None):
        """routed_fetch: each layer's routed host experts cross the link after its router, in
        the layer's own time (a share of them that depends on the step's tokens). host_ids: per
        MoE layer, which experts are on the host (priced by their own popularity, where known).
        release_after: per layer, how many layers before it must have finished computing before
        its transfer may start (default depth + 1 for every layer: FluxMoE's staging buffers;
        vLLM's prefetch offloader frees its buffers at other distances)."""
        self.env, self.cost = env, cost
        self.busy = BusyTime()
        m = cost.model
        self.num_layers = m.num_layers
        self.transfer_s = [0.0] * m.num_layers
        self.decode_s = [0.0] * m.num_layers  # a layer's decodes: they may run while its transfer is under way
        self.routed = [None] * m.num_layers  # per layer: its TierCounts where host experts are fetched routed-only
        self.position = {layer: i for i, layer in enumerate(m.moe_layers)}
        self.host_ids = [list(ids) for ids in host_ids] if host_ids is not None else None
        for layer, t in zip(m.moe_layers, tiers):
            self.transfer_s[layer] = cost.layer_transfer_s(t, routed_fetch)
            self.decode_s[layer] = cost.layer_decode_s(t)
            if routed_fetch and t.host:
                self.routed[layer] = t
        L = self.num_layers
        self.release = list(release_after) if release_after is not None else [prefetch_depth + 1] * L
        # A layer must end its own timeout if a later transfer waits for it to finish.
        watched = [False] * L
        for layer in range(L):
            if self.transfer_s[layer] > 0:
                watched[(layer - self.release[layer]) % L] = True
        self._segments = self._split(watched)
        self.link = simpy.Resource(env, capacity=1)
        self.finished = -1  # global index of the last layer whose compute finished
        self._finish_waiters: dict[int, simpy.Event] = {}
        self._ready: dict[int, simpy.Event] = {}
        self.next_layer = 0  # global index of the next layer to compute
        if any(self.transfer_s):
            env.process(self._stream())

    def _split(self, watched: list[bool]) -> list[list[int]]:
        """Consecutive layers in segments: a segment ends at a watched layer or before a host layer."""
        segments, current = [], []
        for layer in range(self.num_layers):
            if (self.transfer_s[layer] > 0 or self.routed[layer] is not None) and current:
                segments.append(current)
                current = []
            current.append(layer)
            if watched[layer]:
                segments.append(current)
                current = []
        if current:
            segments.append(current)
        return segments

    def _finished_event(self, g: int) -> simpy.Event:
        event = self.env.event()
        if g <= self.finished:
            event.succeed()
        else:
            self._finish_waiters[g] = event
        return event

    def _ready_event(self, g: int) -> simpy.Event:
        if g not in self._ready:
            self._ready[g] = self.env.event()
        return self._ready[g]

    def _stream(self):
        """The PCIe link: host experts of each layer, in order, each once its buffer is free."""
        g = 0
        while True:
            seconds = self.transfer_s[g % self.num_layers]
            if seconds > 0:
                yield self._finished_event(g - self.release[g % self.num_layers])
                with self.link.request() as slot:
                    yield slot
                    yield self.env.timeout(seconds)
                self.busy.link_s += seconds
                self._ready_event(g).succeed()
            g += 1

    def _mark_finished(self, g: int) -> None:
        self.finished = g
        for key in [k for k in self._finish_waiters if k <= g]:
            self._finish_waiters.pop(key).succeed()

    def swap(self, layer: int, into_gpu: int, out_of_gpu: int) -> None:
        """Model layer `layer`: host expert `into_gpu` became resident, `out_of_gpu` went to the host."""
        ids = self.host_ids[self.position[layer]]
        ids[ids.index(into_gpu)] = out_of_gpu

    def run_step(self, step: StepShape):
        compute = self.cost.layer_compute_s(step)
        base = self.next_layer
        for segment in self._segments:
            first = segment[0]
            early = 0.0  # the first layer's decodes, run while its transfer is under way
            if self.transfer_s[first] > 0:
                ready = self._ready_event(base + first)
                if not ready.triggered:
                    waited_from, early = self.env.now, self.decode_s[first]
                    yield ready & self.env.timeout(early)
                    self.busy.stall_s += self.env.now - waited_from - early
                del self._ready[base + first]
            if self.routed[first] is not None:  # the link after the router, shared with the stream
                position = self.position[first]
                ids = self.host_ids[position] if self.host_ids is not None else None
                fetch = self.cost.layer_routed_s(self.routed[first], step, position, ids)
                self.busy.experts_moved += fetch / self.cost.routed_s_per_expert
                waited_from = self.env.now
                with self.link.request() as slot:
                    yield slot
                    yield self.env.timeout(fetch)
                self.busy.link_s += fetch
                self.busy.stall_s += self.env.now - waited_from
            seconds = sum(compute[layer] + self.decode_s[layer] for layer in segment) - early
            yield self.env.timeout(seconds)
            self.busy.gpu_s += seconds + early
            self.busy.decode_s += sum(self.decode_s[layer] for layer in segment)
            self._mark_finished(base + segment[-1])
        self.next_layer = base + self.num_layers
        fixed = self.cost.fixed_s(step)
        self.busy.gpu_s += fixed
        yield self.env.timeout(fixed)
