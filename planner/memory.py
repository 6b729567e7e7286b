"""The one GPU memory model: every byte the planner, the simulator and the vLLM plugin count.

A FluxMoE configuration holds on the GPU: the non-expert weights, its resident experts (bf16),
its compressed experts (FXMC, `compressed_ratio` of bf16), a staging pool of
`(depth + 1) x slots` experts (and landing slots if any expert is host-compressed), a reserve (vLLM's activations, CUDA graphs, memory outside torch) and the
KV cache, which gets whatever is left. A baseline (plain vLLM, vLLM + CPU offload) holds its
weights less what it offloads, the same reserve, and KV for the rest; vLLM admits requests by
free KV up to its `max_num_seqs`, so that is the baselines' batch limit everywhere.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

from fluxmoe.names import System
from fluxmoe.units import GiB
from planner.cost_model import TierCounts, host_chunk_bf16_bytes

VLLM_MAX_NUM_SEQS = 1024  # vLLM's default on large GPUs; KV decides admission below it

LANDING_SLOTS = 2  # the host-compressed tier's landing slots on the GPU (executor/landing.py)

# What vLLM 0.26 holds on the GPU besides weights and KV, as its start-up log on the H200 itemizes
# it. Peak activation: 3.5 GiB for Mixtral's shape at the 16,384 batched tokens of its offline
# engine on a GPU this large (logged alike by FluxMoE at 46 GiB of the full model,
# bench/results/vllm_mixtral_2026-11-24.json, and by vLLM's prefetch offloader on the 8-layer
# stand-in, bench/results/e2e_a40_standin_2026-11-25.json). Outside torch: 0.27 GiB (the
# stand-in's log; FluxMoE's plugin run logged 0.43). CUDA graphs grow with the layers captured:
# 0.29 GiB logged for 8 layers, and 0.61 for Mixtral's 32 (plain vLLM at 0.9 of the H200: the
# 4.38 GiB it kept beside weights and KV, less the other two; step_times_2026-11-25.json), so
# 0.183 GiB + 0.0133 GiB a layer. The activation peak is measured per model family and scaled
# to other shapes of the family (and to families not measured, from Mixtral's) by the width of
# a token's activations (`activation_width`). Qwen3-Next's (8-layer stand-in at 14 GiB, its log
# in the run of bench/results/e2e_qwen3_next_small_batch_standin_spread_2026-11-24.json): 2.54
# GiB, where Mixtral's scaled by width had said 0.80 and a plan that trusted it left vLLM no KV.
VLLM_NON_TORCH_BYTES = int(0.27 * GiB)
VLLM_CUDA_GRAPH_BYTES = (int(0.183 * GiB), int(0.0133 * GiB))  # fixed, per decoder layer
MEASURED_ACTIVATIONS = {  # family: (peak activation bytes, activation_width)
    "mixtral": (int(3.5 * GiB), 2 * 3 * 14336 + 4 * 4096),  # Mixtral-8x7B
    "qwen3_next": (int(2.54 * GiB), 10 * 3 * 512 + 4 * 2048),  # Qwen3-Next-80B-A3B
}


def activation_width(model) -> int:
    """Elements per batched token that dominate vLLM's activation peak: the routed experts'
    gate, up and down activations for each of the top-k, and a few hidden-size buffers."""
    return model.experts_per_token * 3 * model.expert_intermediate_size + 4 * model.hidden_size


def vllm_reserve_bytes(model) -> int:
    """vLLM's own GPU memory beyond weights and KV for `model` (see the constants above)."""
    measured, width = MEASURED_ACTIVATIONS.get(model.family, MEASURED_ACTIVATIONS["mixtral"])
    activation = measured * activation_width(model) / width
    graphs = VLLM_CUDA_GRAPH_BYTES[0] + VLLM_CUDA_GRAPH_BYTES[1] * model.num_layers
    return int(VLLM_NON_TORCH_BYTES + graphs + activation)


@dataclass(frozen=True)
class BaselineFootprint:
    """How a baseline uses a budget: what it offloads, its KV cache and its batch limit."""

    system: System
    offload_bytes: int
    kv_cache_bytes: int
    max_num_seqs: int = VLLM_MAX_NUM_SEQS


@dataclass(frozen=True)
class MemoryModel:
    """GPU bytes of one model under one codec ratio and reserve."""

    model: object  # profiles.ModelSpec
    compressed_ratio: float
    reserve_bytes: int

    @classmethod
    def of(cls, profile, reserve_bytes: int | None = None) -> "MemoryModel":
        """reserve_bytes: None for vLLM's own (`vllm_reserve_bytes`)."""
        reserve = vllm_reserve_bytes(profile.model) if reserve_bytes is None else reserve_bytes
        return cls(profile.model, profile.hardware.codec.compressed_ratio, reserve)

    # ------------------------------------------------------------------ parts
    # Cached: the planner evaluates hundreds of thousands of placements against these.
    @functools.cached_property
    def expert_bytes(self) -> int:
        return self.model.expert_bytes

    @functools.cached_property
    def compressed_expert_bytes(self) -> float:
        return self.model.expert_bytes * self.compressed_ratio

    @functools.cached_property
    def fixed_bytes(self) -> int:
        """Held whatever the placement: non-expert weights and the reserve."""
        return self.model.non_expert_bytes + self.reserve_bytes

    @property
    def all_experts_bytes(self) -> int:
        return self.model.total_experts * self.model.expert_bytes

    def kv_per_sequence(self, context_tokens: int) -> int:
        return self.model.kv_bytes_per_sequence(context_tokens)

    def staging_bytes(self, depth: int, slots_per_buffer: int) -> int:
        return (depth + 1) * slots_per_buffer * self.expert_bytes

    @functools.cached_property
    def landing_bytes(self) -> int:
        """The host-compressed tier's landing slots: the largest chunk at the codec's ratio, per slot."""
        return math.ceil(LANDING_SLOTS * host_chunk_bf16_bytes(self.expert_bytes, self.model.num_experts)
                         * self.compressed_ratio)

    def expert_gpu_bytes(self, tiers: Sequence[TierCounts]) -> float:
        """Resident and compressed experts (compressed as the codec's mean ratio)."""
        return (sum(t.resident for t in tiers) * self.expert_bytes
                + sum(t.compressed for t in tiers) * self.compressed_expert_bytes)

    def host_bytes(self, tiers: Sequence[TierCounts]) -> float:
        return (sum(t.host for t in tiers) * self.expert_bytes
                + sum(t.host_compressed for t in tiers) * self.compressed_expert_bytes)

    def paging_bytes(self, tiers: Sequence[TierCounts], depth: int) -> int:
        """The staging pool, and the landing slots where any expert is host-compressed."""
        slots = max((t.paged for t in tiers), default=0)
        landing = self.landing_bytes if any(t.host_compressed for t in tiers) else 0
        return self.staging_bytes(depth, slots) + landing

    def placement_bytes(self, tiers: Sequence[TierCounts], depth: int) -> float:
        """GPU bytes of a placement before KV: fixed part, experts, staging and landing (the sums
        of `expert_gpu_bytes` and `paging_bytes` in one pass: the planner prices thousands of
        roundings a plan)."""
        resident = compressed = slots = 0
        host_compressed = False
        for t in tiers:
            resident += t.resident
            compressed += t.compressed
            slots = max(slots, t.compressed + t.host + t.host_compressed)
            host_compressed = host_compressed or t.host_compressed > 0
        experts = resident * self.expert_bytes + compressed * self.compressed_expert_bytes
        return (self.fixed_bytes + experts
                + (self.staging_bytes(depth, slots) + (self.landing_bytes if host_compressed else 0)))

    def breakdown(self, tiers: Sequence[TierCounts], depth: int, kv_bytes: int):
        """Where a placement's GPU bytes go, with `kv_bytes` of KV, as a plan reports it."""
        from planner.plan import MemoryBreakdown

        return MemoryBreakdown(
            non_expert_bytes=self.model.non_expert_bytes,
            resident_expert_bytes=sum(t.resident for t in tiers) * self.expert_bytes,
            compressed_expert_bytes=math.ceil(sum(t.compressed for t in tiers) * self.compressed_expert_bytes),
            staging_bytes=self.paging_bytes(tiers, depth), kv_cache_bytes=kv_bytes, reserve_bytes=self.reserve_bytes,
            host_expert_bytes=math.ceil(self.host_bytes(tiers)))

    def kv_left(self, budget: int, tiers: Sequence[TierCounts], depth: int) -> int:
        """KV cache bytes a placement leaves in `budget` (negative: it does not fit)."""
        return math.floor(budget - self.placement_bytes(tiers, depth))

    def fits(self, budget: int, host_budget: int, tiers: Sequence[TierCounts], depth: int, kv_bytes: int) -> bool:
        return self.kv_left(budget, tiers, depth) >= kv_bytes and self.host_bytes(tiers) <= host_budget

    def least_expert_bytes(self, depth: int) -> int:
        """No placement at this depth holds fewer expert bytes on the GPU (all on host, staged)."""
        return min(self.model.total_experts, (depth + 1) * self.model.num_experts) * self.expert_bytes

    # ------------------------------------------------------------------ baselines
    def resident_kv(self, budget: int) -> int:
        """Plain vLLM: KV left after every weight and the reserve (negative: it does not fit)."""
        return budget - self.fixed_bytes - self.all_experts_bytes

    def offload_for_kv(self, budget: int, kv_bytes: int) -> int:
        """vLLM + CPU offload: expert bytes to offload to leave `kv_bytes` of KV."""
        return max(0, self.fixed_bytes + self.all_experts_bytes + kv_bytes - budget)

    def uva_offloaded_bytes(self, requested: int) -> int:
        """What vLLM's UVA offloader moves to the host for `cpu_offload_gb` = `requested` bytes of
        expert weights: whole parameters, layer by layer from the first, each MoE layer's stacked
        gate/up matrix (2/3 of its experts' bytes) and then its down matrix, until it has moved at
        least `requested` (vllm/model_executor/offloader/uva.py checks before each parameter). On
        the H200 the runs' KV sizes moved by exactly these steps: 16 GiB asked of the 8-layer
        Mixtral moved 17.5."""
        if requested <= 0:
            return 0
        layer = self.model.num_experts * self.expert_bytes
        gate_up = layer * 2 // 3
        whole, rest = divmod(requested, layer)
        if whole >= self.model.num_moe_layers:
            return self.model.num_moe_layers * layer
        return whole * layer + (0 if rest == 0 else gate_up if rest <= gate_up else layer)

    def baseline(self, system: System, budget: int, offload_bytes: int = 0) -> BaselineFootprint:
        """A baseline's footprint in `budget`: KV is what its weights leave. offload_bytes: what
        is asked of vLLM + CPU offload; the footprint holds what vLLM really moves."""
        moved = self.uva_offloaded_bytes(offload_bytes) if system is System.VLLM_OFFLOAD else 0
        return BaselineFootprint(System(system), moved, self.resident_kv(budget) + moved)
