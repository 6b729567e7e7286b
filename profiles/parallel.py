"""How a model splits over the GPUs of one host, the way vLLM 0.26 splits it.

Tensor parallel (`--tensor-parallel-size N`): each rank holds 1/N of every weight (experts cut
along the intermediate dimension, attention and dense FFNs by heads and columns, the embedding
and LM head by vocabulary) and 1/N of the KV heads, a head whole on several ranks where ranks
outnumber heads; MLA's latent KV is whole on every rank. Each layer ends its attention and its
FFN with an all-reduce of the step's hidden states.

Expert parallel (`--enable-expert-parallel`, data parallel 1): attention as above, but rank r
holds experts [r E/N, (r+1) E/N) whole (vLLM's "linear" placement) and runs them on every
token routed to them; the FFN's all-reduce adds the ranks' outputs. vLLM 0.26 uses no
all-to-all here (`use_all2all_kernels` needs data parallel > 1). The ranks meet at every
all-reduce, so a layer is as slow as its busiest rank: under EP the one that the batch routes
the most tokens to.

Everything else is per rank: `Parallelism.shard` is what one GPU holds and computes, and the
planner, simulator and memory model work on it as on one GPU; the budget is per GPU, and
each GPU pages its own experts over its own PCIe link.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from fluxmoe.errors import ConfigError, UnknownNameError
from fluxmoe.serde import dump_json, load_json
from profiles.hardware import Curve, HardwareProfile, Provenance
from profiles.model_spec import ModelSpec


@dataclass(frozen=True)
class Interconnect:
    """Collective times among `gpus` GPUs of one host: measured (bench/nccl_profile.py) or from a datasheet."""

    name: str
    gpus: int
    all_reduce_s: Curve  # one all-reduce against its message bytes
    all_to_all_s: Curve  # one all-to-all (or gather) against the bytes of the whole message
    h2d_share: float  # a GPU's pinned H2D rate while every GPU copies, over its rate alone
    provenance: Provenance

    def __post_init__(self) -> None:
        if self.gpus < 2:
            raise ConfigError(f"field 'gpus': an interconnect joins >= 2 GPUs, got {self.gpus!r}")
        if not 0 < self.h2d_share <= 1:
            raise ConfigError(f"field 'h2d_share': must be in (0, 1], got {self.h2d_share!r}")

    @classmethod
    def from_nccl_profile(cls, result: dict, name: str) -> "Interconnect":
        """From what bench/nccl_profile.py writes: per size, all-reduce and all-to-all ms; per
        GPU, pinned H2D GB/s alone and with every GPU copying."""
        rows = result["collectives"]
        size = [float(r["bytes"]) for r in rows]
        h2d = result["h2d_gbps_per_gpu"]
        share = min(1.0, min(g["together"] / g["alone"] for g in h2d))
        return cls(name, int(result["gpus"]), Curve(size, [r["all_reduce_ms"] / 1e3 for r in rows], log_x=True),
                   Curve(size, [r["all_to_all_ms"] / 1e3 for r in rows], log_x=True), share,
                   Provenance("measured", "bench/nccl_profile.py", result.get("device", ""), result.get("date", ""),
                              f"nccl {result.get('nccl', '?')}, commit {result.get('commit', '?')}"))

    @classmethod
    def datasheet(cls, name: str, gpus: int, link_gbps: float, latency_s: float, source: str) -> "Interconnect":
        """Ring collectives on a link of `link_gbps` per direction: an all-reduce moves
        2 (n-1)/n of the message through each GPU's link, an all-to-all (n-1)/n."""
        size = [float(1 << p) for p in range(12, 31, 2)]
        ring = lambda share: Curve(size, [latency_s + share * b / (link_gbps * 1e9) for b in size],  # noqa: E731
                                   log_x=True)
        return cls(name, gpus, ring(2 * (gpus - 1) / gpus), ring((gpus - 1) / gpus), 1.0,
                   Provenance("datasheet", source))


@dataclass(frozen=True)
class Parallelism:
    """How many GPUs run the model, and whether experts split whole over them (EP) or cut (TP)."""

    tensor_parallel: int = 1
    expert_parallel: bool = False
    interconnect: Interconnect | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ConfigError(f"field 'tensor_parallel': must be >= 1, got {self.tensor_parallel!r}")
        if self.expert_parallel and self.tensor_parallel == 1:
            raise ConfigError("field 'expert_parallel': needs tensor_parallel >= 2 (vLLM splits experts over "
                              "the tensor-parallel ranks), got tensor_parallel 1")
        if self.tensor_parallel > 1 and (self.interconnect is None
                                         or self.interconnect.gpus != self.tensor_parallel):
            got = "none" if self.interconnect is None else f"one for {self.interconnect.gpus} GPUs"
            raise ConfigError(f"field 'interconnect': {self.tensor_parallel} GPUs need an interconnect profile "
                              f"for {self.tensor_parallel} GPUs, got {got}")

    @property
    def expert_shards(self) -> int:
        """Ranks the experts of a layer are split among, whole (1: every rank holds a cut of each)."""
        return self.tensor_parallel if self.expert_parallel else 1

    @property
    def label(self) -> str:
        """"" on one GPU, else e.g. "x2" (tensor parallel) or "x2-ep"."""
        if self.tensor_parallel == 1:
            return ""
        return f"x{self.tensor_parallel}" + ("-ep" if self.expert_parallel else "")

    def all_reduce_s(self, nbytes: float) -> float:
        return self.interconnect.all_reduce_s(nbytes) if self.tensor_parallel > 1 and nbytes > 0 else 0.0

    def gather_s(self, nbytes: float) -> float:
        return self.interconnect.all_to_all_s(nbytes) if self.tensor_parallel > 1 and nbytes > 0 else 0.0

    def rank_hardware(self, hw: HardwareProfile) -> HardwareProfile:
        """One rank's GPU: its own PCIe link, at the rate it keeps while every GPU copies, and
        its share of the host's pinned memory."""
        if self.tensor_parallel == 1:
            return hw
        share = self.interconnect.h2d_share
        scale = lambda c: Curve(c.x, [y * share for y in c.y], c.log_x)  # noqa: E731
        return dataclasses.replace(hw, name=f"{hw.name}{self.label}", h2d_gbps=scale(hw.h2d_gbps),
                                   d2h_gbps=scale(hw.d2h_gbps),
                                   host_pinned_bytes=hw.host_pinned_bytes // self.tensor_parallel)

    def shard(self, model: ModelSpec) -> ModelSpec:
        """What one rank holds and computes of `model` (the model itself on one GPU)."""
        return shard_model(model, self.tensor_parallel, self.expert_parallel)


def shard_model(model: ModelSpec, tensor_parallel: int, expert_parallel: bool = False) -> ModelSpec:
    """What one of `tensor_parallel` ranks holds and computes of `model` (see the module's docstring)."""
    t = tensor_parallel
    if t == 1:
        return model
    where = f"{model.name} over {t} GPUs"
    changes: dict = {}
    if expert_parallel:
        if model.num_experts % t or model.num_experts // t < model.experts_per_token:
            raise ConfigError(f"{where}, expert parallel: {model.num_experts} experts do not split into {t} "
                              f"equal groups of at least the {model.experts_per_token} a token picks")
        changes["num_experts"] = model.num_experts // t
        # The router stays whole on every rank: keep its weights though the shard has fewer experts.
        lost = (model.router_params - dataclasses.replace(model, **changes).router_params) * model.num_moe_layers
        changes["other_params"] = model.other_params + lost
    elif model.expert_intermediate_size % t:
        raise ConfigError(f"{where}: expert_intermediate_size {model.expert_intermediate_size} does not "
                          f"split into {t} equal parts")
    else:
        changes["expert_intermediate_size"] = model.expert_intermediate_size // t
    share = kv_share(model, t)
    changes["kv_bytes_per_token_layer"] = {
        kind: (b if kind == "mla" else math.ceil(b * share)) for kind, b in model.kv_bytes_per_token_layer.items()}
    changes["kv_heads"] = max(1, model.kv_heads // t) if model.kv_heads else 0
    changes["linear_state_bytes_per_layer"] = math.ceil(model.linear_state_bytes_per_layer / t)
    changes["attention_params"] = [math.ceil(p / t) for p in model.attention_params]
    changes["shared_ffn_params"] = [math.ceil(p / t) for p in model.shared_ffn_params]
    changes["attention_width"] = math.ceil(model.attention_width / t)
    changes["vocab_size"] = math.ceil(model.vocab_size / t)
    return dataclasses.replace(model, **changes)


def kv_share(model: ModelSpec, tensor_parallel: int) -> float:
    """The share of a layer's KV heads one rank holds (replicated where ranks outnumber heads;
    MLA's latent KV is not split at all, which `shard_model` handles by kind)."""
    t, heads = tensor_parallel, model.kv_heads
    if not heads:
        return 1 / t
    if heads % t and t % heads:
        raise ConfigError(f"{model.name} over {t} GPUs: its {heads} KV heads neither split over nor "
                          f"replicate evenly across {t} ranks (vLLM refuses this too)")
    return max(1, heads // t) / heads


INTERCONNECTS_DIR = Path(__file__).parent / "interconnects"


def load_interconnect(name: str) -> Interconnect:
    """A shipped interconnect profile by name ("h200x2"), or a profile JSON by path."""
    path = Path(name)
    if not (path.suffix == ".json" and path.exists()):
        path = INTERCONNECTS_DIR / f"{name}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in INTERCONNECTS_DIR.glob("*.json")))
        raise UnknownNameError(f"no interconnect profile for {name!r}; known: {known} (measure one with "
                               f"`python3 bench/nccl_profile.py --gpus N` and convert it with "
                               f"Interconnect.from_nccl_profile)")
    return load_json(Interconnect, path)


def write_nccl_interconnect(result_path: str | Path, name: str) -> Path:
    """Ship a measured interconnect: bench/nccl_profile.py's JSON into profiles/interconnects/."""
    out = INTERCONNECTS_DIR / f"{name}.json"
    dump_json(Interconnect.from_nccl_profile(json.loads(Path(result_path).read_text()), name), out)
    return out
