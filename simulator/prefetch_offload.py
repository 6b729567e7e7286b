"""vLLM's prefetch offloader (vLLM 0.26 `offload_backend="prefetch"`), as the simulator plays it.

Of every `group` decoder layers, the last `offloaded` keep their expert weights in pinned host
memory (`offload_params=w13_weight,w2_weight`). `step` static GPU buffers hold offloaded layers
in turn (offloaded layer j uses buffer j % step). When offloaded layer j finishes its forward,
the copy of offloaded layer j + step (circularly, into the same buffer) is issued on one copy
stream, and a layer waits for its own copy before it runs
(vllm/model_executor/offloader/prefetch.py). So each offloaded layer's whole experts cross
the link every step, in order, overlapping only the compute of the layers between its
buffer's previous user and itself: with consecutive offloaded layers and step 1, none.

That is FluxMoE's paged execution with every expert of an offloaded layer in the bf16 host
tier, buffers of a whole layer, and per-layer release distances instead of one depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import simpy

from fluxmoe.errors import ConfigError
from planner.cost_model import CostModel, StepShape, TierCounts
from planner.memory import MemoryModel
from profiles.model_spec import ModelSpec
from simulator.execution import PagedExecution


@dataclass(frozen=True)
class PrefetchOffload:
    """One setting of the offloader: `offloaded` of every `group` layers, `step` buffers."""

    group: int
    offloaded: int
    step: int

    def __post_init__(self) -> None:
        if not (self.group >= 1 and 1 <= self.offloaded <= self.group and self.step >= 1):
            raise ConfigError(f"prefetch offload: need group >= 1, 1 <= offloaded <= group and step >= 1, "
                              f"got {self.label}")

    @classmethod
    def parse(cls, text: str) -> "PrefetchOffload":
        """"GROUP/OFFLOADED/STEP", e.g. "8/7/1" (as bench/e2e.py names its runs)."""
        try:
            group, offloaded, step = (int(x) for x in text.split("/"))
        except ValueError:
            raise ConfigError(f"prefetch offload: expected GROUP/OFFLOADED/STEP such as 8/7/1, got {text!r}") from None
        return cls(group, offloaded, step)

    @property
    def label(self) -> str:
        return f"{self.group}/{self.offloaded}/{self.step}"

    def layers(self, model: ModelSpec) -> list[int]:
        """Offloaded decoder layers: the last `offloaded` of each group (by decoder index), those with experts."""
        return [layer for layer in model.moe_layers if layer % self.group >= self.group - self.offloaded]

    def tiers(self, model: ModelSpec) -> list[TierCounts]:
        """Per MoE layer: every expert on the host (offloaded) or resident."""
        offloaded, E = set(self.layers(model)), model.num_experts
        return [TierCounts(0, 0, E) if layer in offloaded else TierCounts(E, 0, 0) for layer in model.moe_layers]

    def release_after(self, model: ModelSpec) -> list[int]:
        """Per decoder layer: how many layers before it the layer whose finish issues its copy is
        (the offloaded layer `step` before it, circularly; a whole step where that is itself)."""
        L, offloaded = model.num_layers, self.layers(model)
        release = [L] * L
        for j, layer in enumerate(offloaded):
            issuer = offloaded[(j - self.step) % len(offloaded)]
            release[layer] = (layer - issuer) % L or L
        return release

    def buffer_bytes(self, model: ModelSpec) -> int:
        """The static buffer pool: `step` buffers of one offloaded layer's experts each (vLLM 0.26's
        StaticBufferPool, slot_capacity = prefetch_step)."""
        return self.step * model.num_experts * model.expert_bytes

    def gpu_bytes(self, memory: MemoryModel) -> float:
        """GPU bytes before KV: fixed part, resident layers' experts and `step` layers' buffers
        (a placement's staging at depth step - 1, one whole layer a buffer)."""
        return memory.placement_bytes(self.tiers(memory.model), self.step - 1)

    def kv_cache_bytes(self, memory: MemoryModel, budget: int) -> int:
        """KV left in `budget` once the buffers are counted too: what this setting can run within
        the budget (a user lowers --gpu-memory-utilization by the buffers to stay in it)."""
        return int(budget - self.gpu_bytes(memory))

    def vllm_kv_cache_bytes(self, memory: MemoryModel, budget: int) -> int:
        """The KV cache vLLM 0.26 sizes at --gpu-memory-utilization = budget: its memory profile
        does not see the static buffers (allocated after it measures the weights), so they come
        on top of the budget. Seen on the H200: the 8-layer stand-in at 15.53 GiB logged 3.75 GiB
        of weights and a 2.82 GB buffer pool, and peaked at 17.89 GiB
        (bench/results/e2e_a40_standin_2026-11-24.json, prefetch_8_7_1)."""
        return int(budget - memory.fixed_bytes - memory.expert_gpu_bytes(self.tiers(memory.model)))

    def host_bytes(self, model: ModelSpec) -> int:
        return len(self.layers(model)) * model.num_experts * model.expert_bytes

    def execution(self, env: simpy.Environment, cost: CostModel) -> PagedExecution:
        """The offloader's steps on SimPy resources: paged execution with its layers, buffers and
        release distances."""
        m = cost.model
        return PagedExecution(env, cost, self.tiers(m), self.step - 1, release_after=self.release_after(m))

    def steady_step_s(self, cost: CostModel, step: StepShape) -> float:
        """One step of `step`'s shape once the copies run in their steady rhythm (the third of
        three played out), to rank settings before simulating any."""
        env = simpy.Environment()
        execution = self.execution(env, cost)
        ends: list[float] = []

        def steps():
            for _ in range(3):
                yield from execution.run_step(step)
                ends.append(env.now)

        env.process(steps())
        env.run()
        return ends[2] - ends[1]
