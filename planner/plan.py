"""`Plan`: what the planner decides and what the simulator and executor consume.

Per MoE layer, which experts are resident, compressed or on the host; the staging pool and
prefetch depth; the KV cache and batch size; the budget it was made for; what it predicts;
and the model and hardware profile it belongs to (hashes), so a plan cannot silently run on
another model. Round-trips through JSON and is validated on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fluxmoe.errors import ConfigError
from fluxmoe.serde import dump_json, load_json

PLAN_SCHEMA_VERSION = 1
Tier = Literal["resident", "compressed", "host"]


@dataclass
class LayerPlan:
    """Expert ids of one MoE layer in each tier."""

    layer: int
    resident: list[int]
    compressed: list[int]
    host: list[int]

    def tier_of(self, expert: int) -> Tier:
        if expert in self.resident:
            return "resident"
        return "compressed" if expert in self.compressed else "host"


@dataclass
class WorkloadShape:
    """The request shape a plan is optimized for (mean prompt and output tokens)."""

    prompt_tokens: int = 512
    output_tokens: int = 128

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "output_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"field 'workload.{name}': must be >= 1, got {getattr(self, name)!r}")


@dataclass
class MemoryBreakdown:
    """Where the GPU budget goes, in bytes; the parts add up to at most the budget."""

    non_expert_bytes: int
    resident_expert_bytes: int
    compressed_expert_bytes: int
    staging_bytes: int
    kv_cache_bytes: int
    reserve_bytes: int
    host_expert_bytes: int = 0

    @property
    def gpu_total_bytes(self) -> int:
        return (self.non_expert_bytes + self.resident_expert_bytes + self.compressed_expert_bytes
                + self.staging_bytes + self.kv_cache_bytes + self.reserve_bytes)


@dataclass
class Prediction:
    """What the cost model expects of a configuration at its batch size."""

    batch_size: int
    step_time_s: float
    output_tokens_per_s: float
    tokens_per_s: float
    gpu_busy_s: float = 0.0
    link_busy_s: float = 0.0
    stall_s: float = 0.0


@dataclass
class BaselinePrediction:
    """A baseline users compare against (plain vLLM, vLLM with CPU offload) at its best batch."""

    name: str
    feasible: bool
    prediction: Prediction | None = None
    offload_bytes: int = 0
    note: str = ""


@dataclass
class SimulatedFigures:
    """What the simulator measured when it replayed a workload against a plan."""

    workload: str
    output_tokens_per_s: float
    tokens_per_s: float
    ttft_p50_s: float
    tpot_p50_s: float
    preemptions: int
    candidates_simulated: int


@dataclass
class Plan:
    """A residency plan for one model on one GPU under one memory budget."""

    model: str
    model_hash: str
    gpu: str
    hardware_hash: str
    budget_bytes: int
    host_budget_bytes: int
    objective: Literal["throughput", "throughput_under_latency"]
    workload: WorkloadShape
    layers: list[LayerPlan]
    prefetch_depth: int
    staging_slots: int
    max_num_seqs: int
    kv_cache_bytes: int
    memory: MemoryBreakdown
    predicted: Prediction
    baselines: list[BaselinePrediction] = field(default_factory=list)
    solver_status: str = "Optimal"
    solve_time_s: float = 0.0
    candidates_solved: int = 0
    tpot_limit_s: float | None = None
    simulated: SimulatedFigures | None = None
    schema_version: int = PLAN_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != PLAN_SCHEMA_VERSION:
            raise ConfigError(f"field 'schema_version': expected {PLAN_SCHEMA_VERSION}, got {self.schema_version!r}")
        for name in ("budget_bytes", "max_num_seqs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"field '{name}': must be > 0, got {getattr(self, name)!r}")
        if self.prefetch_depth < 0 or self.staging_slots < 0 or self.kv_cache_bytes < 0:
            raise ConfigError(f"fields 'prefetch_depth', 'staging_slots', 'kv_cache_bytes': must be >= 0, got "
                              f"{self.prefetch_depth!r}, {self.staging_slots!r}, {self.kv_cache_bytes!r}")
        for i, lp in enumerate(self.layers):
            ids = lp.resident + lp.compressed + lp.host
            if len(ids) != len(set(ids)):
                raise ConfigError(f"field 'layers[{i}]': an expert is in two tiers: {sorted(ids)!r}")

    # counts per tier, in MoE-layer order
    def tier_counts(self):
        from planner.cost_model import TierCounts

        return [TierCounts(len(lp.resident), len(lp.compressed), len(lp.host)) for lp in self.layers]

    def baseline(self, name: str) -> BaselinePrediction | None:
        return next((b for b in self.baselines if b.name == name), None)

    def check_matches(self, profile) -> None:
        """Refuse a plan made for another model (shapes differ) than `profile`."""
        if self.model_hash != profile.model.content_hash():
            raise ConfigError(f"plan was made for model {self.model!r} (hash {self.model_hash}), "
                              f"not {profile.model.name!r} (hash {profile.model.content_hash()})")
        experts = profile.model.num_experts
        if len(self.layers) != profile.model.num_moe_layers or any(
                sorted(lp.resident + lp.compressed + lp.host) != list(range(experts)) for lp in self.layers):
            raise ConfigError(f"plan's layers do not place each of the {experts} experts of each of the "
                              f"{profile.model.num_moe_layers} MoE layers exactly once")

    def save(self, path: str | Path) -> None:
        dump_json(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return load_json(cls, path)
