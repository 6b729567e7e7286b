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
from fluxmoe.names import Tier, tier_among
from fluxmoe.serde import dump_json, load_json

PLAN_SCHEMA_VERSION = 2


@dataclass
class LayerPlan:
    """Expert ids of one MoE layer (`layer` is the model's layer index) in each tier.

    `expert_order` lists the layer's experts hottest first by expected activation frequency
    (uniform, i.e. by id, until measured), so residency can favour hot experts."""

    layer: int
    resident: list[int]
    compressed: list[int]
    host: list[int]
    expert_order: list[int] = field(default_factory=list)
    host_compressed: list[int] = field(default_factory=list)  # FXMC in pinned host memory

    def tier_of(self, expert: int) -> Tier:
        return tier_among(expert, ((Tier.RESIDENT, self.resident), (Tier.COMPRESSED, self.compressed),
                                   (Tier.HOST_COMPRESSED, self.host_compressed)), Tier.HOST)

    @property
    def all_ids(self) -> list[int]:
        return self.resident + self.compressed + self.host + self.host_compressed

    @property
    def num_experts(self) -> int:
        return len(self.all_ids)

    @property
    def paged(self) -> int:
        return len(self.compressed) + len(self.host) + len(self.host_compressed)

    def tiers(self) -> list[Tier]:
        """The tier of each expert id, in id order."""
        return [self.tier_of(e) for e in range(self.num_experts)]


@dataclass
class PlanInputs:
    """What a plan was made from beyond model, GPU, budget and workload: enough to re-derive it."""

    reserve_bytes: int
    max_num_seqs: int
    prefetch_depths: list[int]
    mip_gap: float
    milp_node_limit: int
    versions: dict[str, str] = field(default_factory=dict)
    requests: int | None = None  # the workload's request count, where it was known: no batch exceeds it
    host_compressed: bool = False  # the host-compressed tier was allowed (plans made before it: no)
    routed_fetch: bool = False  # routed-only fetch of host experts was allowed
    fused_max_rows: int | None = None  # each paged layer's fused-MoE call held to this many rows (None: not held)

    @classmethod
    def record(cls, **settings) -> "PlanInputs":
        from importlib import metadata

        versions = {}
        for package in ("fluxmoe", "pulp", "highspy"):
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = "unknown"
        return cls(**settings, versions=versions)


@dataclass
class WorkloadShape:
    """The request shape a plan is optimized for (mean prompt and output tokens)."""

    prompt_tokens: int = 512
    output_tokens: int = 128
    routing_skew: float = 0.0  # Zipf exponent of expert popularity in a layer (0: uniform routing)

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "output_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"field 'workload.{name}': must be >= 1, got {getattr(self, name)!r}")
        if not self.routing_skew >= 0:
            raise ConfigError(f"field 'workload.routing_skew': must be >= 0, got {self.routing_skew!r}")


@dataclass
class MemoryBreakdown:
    """Where the GPU budget goes, in bytes; the parts add up to at most the budget."""

    non_expert_bytes: int
    resident_expert_bytes: int
    compressed_expert_bytes: int
    staging_bytes: int  # the staging pool, and the host-compressed tier's landing slots
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
    kv_cache_bytes: int = 0
    max_num_seqs: int = 0
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
    pcie_busy: float = 0.0  # shares of the makespan
    gpu_busy: float = 0.0
    stall_s: float = 0.0
    mean_batch: float = 0.0  # sequences per step


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
    # Several GPUs: every rank holds this plan (its own shard of each layer's experts, ids local
    # under expert parallel) in a budget of `budget_bytes` of its own (profiles/parallel.py).
    tensor_parallel: int = 1
    expert_parallel: int = 1
    weight_dtype: str = "bfloat16"
    inputs: PlanInputs | None = None
    routed_fetch: bool = False  # host experts move only when the step's tokens route to them
    schema_version: int = PLAN_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != PLAN_SCHEMA_VERSION:
            raise ConfigError(f"field 'schema_version': expected {PLAN_SCHEMA_VERSION}, got {self.schema_version!r} "
                              f"(make the plan again with this version of fluxmoe)")
        for name in ("budget_bytes", "max_num_seqs", "tensor_parallel", "expert_parallel"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"field '{name}': must be > 0, got {getattr(self, name)!r}")
        if self.expert_parallel not in (1, self.tensor_parallel):
            raise ConfigError(f"field 'expert_parallel': experts split over all {self.tensor_parallel} tensor-"
                              f"parallel ranks or none (1), got {self.expert_parallel!r}")
        if self.weight_dtype != "bfloat16":
            raise ConfigError(f"field 'weight_dtype': only 'bfloat16' is supported, got {self.weight_dtype!r}")
        for name in ("prefetch_depth", "staging_slots", "kv_cache_bytes", "host_budget_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"field '{name}': must be >= 0, got {getattr(self, name)!r}")
        if self.kv_cache_bytes > self.budget_bytes:
            raise ConfigError(f"field 'kv_cache_bytes': {self.kv_cache_bytes} exceeds the budget of "
                              f"{self.budget_bytes} bytes")
        if self.memory.gpu_total_bytes > self.budget_bytes + 1:
            raise ConfigError(f"field 'memory': its parts add up to {self.memory.gpu_total_bytes} bytes, more than "
                              f"the budget of {self.budget_bytes}")
        if self.staging_slots % (self.prefetch_depth + 1):
            raise ConfigError(f"field 'staging_slots': {self.staging_slots} is not a whole number of slots per "
                              f"each of the {self.prefetch_depth + 1} buffers (prefetch_depth + 1)")
        most = max((lp.paged for lp in self.layers), default=0)
        if self.slots_per_buffer < most:
            raise ConfigError(f"field 'staging_slots': {self.staging_slots} ({self.slots_per_buffer} per buffer) "
                              f"cannot stage the {most} paged experts of the most paged layer")
        seen = set()
        for i, lp in enumerate(self.layers):
            ids = lp.all_ids
            if len(ids) != len(set(ids)):
                raise ConfigError(f"field 'layers[{i}]': an expert is in two tiers: {sorted(ids)!r}")
            if lp.expert_order and sorted(lp.expert_order) != sorted(ids):
                raise ConfigError(f"field 'layers[{i}].expert_order': must list the layer's experts once each")
            if lp.layer in seen:
                raise ConfigError(f"field 'layers[{i}].layer': layer {lp.layer} appears twice")
            seen.add(lp.layer)

    @property
    def slots_per_buffer(self) -> int:
        """Staging slots in each of the pool's prefetch_depth + 1 buffers."""
        return self.staging_slots // (self.prefetch_depth + 1)

    def layer(self, index: int) -> LayerPlan:
        """The plan of model layer `index` (a MoE layer)."""
        for lp in self.layers:
            if lp.layer == index:
                return lp
        raise ConfigError(f"plan has no MoE layer {index}; it plans layers {[lp.layer for lp in self.layers]}")

    # counts per tier, in MoE-layer order
    def tier_counts(self):
        """TierCounts per MoE layer, in model layer order."""
        from planner.cost_model import TierCounts

        return [TierCounts(len(lp.resident), len(lp.compressed), len(lp.host), len(lp.host_compressed))
                for lp in sorted(self.layers, key=lambda lp: lp.layer)]

    def baseline(self, name: str) -> BaselinePrediction | None:
        return next((b for b in self.baselines if b.name == name), None)

    def check_parallelism(self, tensor_parallel: int, expert_shards: int, running: str) -> None:
        """Refuse to run on another split than the plan's (`running` says what runs, for the message)."""
        if (self.tensor_parallel, self.expert_parallel) != (tensor_parallel, expert_shards):
            raise ConfigError(f"plan is for tensor_parallel={self.tensor_parallel}, expert_parallel="
                              f"{self.expert_parallel}; {running}")

    def check_matches(self, profile, check_hardware: bool = True) -> None:
        """Refuse a plan made for another model or GPU than `profile`, or one it cannot hold."""
        par = profile.parallel
        self.check_parallelism(par.tensor_parallel, par.expert_shards,
                               f"the profile is for {par.tensor_parallel} and {par.expert_shards}")
        if self.model_hash != profile.model.content_hash():
            raise ConfigError(f"plan was made for model {self.model!r} (hash {self.model_hash}), "
                              f"not {profile.model.name!r} (hash {profile.model.content_hash()})")
        hw = profile.hardware
        if check_hardware and self.hardware_hash != hw.content_hash():
            raise ConfigError(f"plan was made for GPU profile {self.gpu!r} (hash {self.hardware_hash}), not "
                              f"{hw.name!r} (hash {hw.content_hash()}); plan again for this GPU")
        if self.budget_bytes > hw.gpu_memory_bytes:
            raise ConfigError(f"plan's budget of {self.budget_bytes} bytes exceeds the {hw.gpu_memory_bytes} of "
                              f"GPU {hw.name!r}")
        experts, model = profile.model.num_experts, profile.model
        if sorted(lp.layer for lp in self.layers) != sorted(model.moe_layers) or any(
                sorted(lp.all_ids) != list(range(experts)) for lp in self.layers):
            raise ConfigError(f"plan's layers do not place each of the {experts} experts of each of the "
                              f"{model.num_moe_layers} MoE layers (model layers {model.moe_layers[0]}.."
                              f"{model.moe_layers[-1]}) exactly once")
        one = model.kv_bytes_per_sequence(1)
        if self.kv_cache_bytes < one:
            raise ConfigError(f"field 'kv_cache_bytes': {self.kv_cache_bytes} bytes cannot hold even one sequence "
                              f"({one} bytes)")

    def save(self, path: str | Path) -> None:
        dump_json(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return load_json(cls, path)
