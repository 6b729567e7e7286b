"""`HardwareProfile`: what one GPU (and its host link) can do, from a datasheet or measured.

Curves are piecewise-linear tables, interpolated in log(size) for transfers and linearly in
tokens for expert FFNs; where a measured table is missing the cost model falls back to a
roofline on the peak rates times an efficiency. Provenance says which kind each profile is.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Literal

from fluxmoe.errors import ConfigError
from fluxmoe.serde import to_dict

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Provenance:
    """Where the numbers came from: a datasheet, or a measurement (device, date, tool version)."""

    kind: Literal["datasheet", "measured"]
    source: str
    device: str = ""
    date: str = ""
    tool_version: str = ""


@dataclass(frozen=True)
class Curve:
    """A monotone table y(x); between points linear (optionally in log x), clamped at the ends."""

    x: list[float]
    y: list[float]
    log_x: bool = False

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y) or not self.x:
            raise ConfigError(f"curve: x and y need the same, non-zero length, got {len(self.x)} and {len(self.y)}")
        if any(b <= a for a, b in zip(self.x, self.x[1:])):
            raise ConfigError(f"curve: x must increase strictly, got {self.x!r}")
        if self.log_x and self.x[0] <= 0:
            raise ConfigError(f"curve: x must be > 0 on a log axis, got {self.x[0]!r}")

    def __call__(self, x: float) -> float:
        xs, ys = self.x, self.y
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, x)
        x0, x1 = xs[i - 1], xs[i]
        if self.log_x:
            x, x0, x1 = math.log(x), math.log(x0), math.log(x1)
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class CodecRates:
    """The lossless expert codec on this GPU: bf16 output bytes decoded per second, size ratio."""

    decode_gbps: float
    compressed_ratio: float

    def __post_init__(self) -> None:
        if self.decode_gbps <= 0:
            raise ConfigError(f"field 'codec.decode_gbps': must be > 0, got {self.decode_gbps!r}")
        if not 0 < self.compressed_ratio <= 1.2:
            raise ConfigError(f"field 'codec.compressed_ratio': must be in (0, 1.2], got {self.compressed_ratio!r}")


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU and its host link. Rates in GB/s (1e9 bytes) and TFLOP/s, times in seconds."""

    name: str
    gpu_memory_bytes: int
    hbm_gbps: float
    bf16_tflops: float
    # Pinned-host transfers: achieved GB/s against transfer size in bytes.
    h2d_gbps: Curve
    d2h_gbps: Curve
    codec: CodecRates
    host_pinned_bytes: int
    provenance: Provenance
    # Share of the peak rates that real kernels reach (roofline fallback when no table is given).
    gemm_efficiency: float = 0.7
    memory_efficiency: float = 0.8
    kernel_overhead_s: float = 4e-6
    # Fixed cost per engine step outside the layers (scheduling, sampling, launch gaps).
    step_overhead_s: float = 1.5e-3
    # Token rows per GEMM tile; vLLM's UVA offload re-reads host weights once per tile. The
    # H200 profile has 128: BLOCK_SIZE_M of vLLM 0.26's tuned fused-MoE config for Mixtral's
    # shape on the H200 at 256+ tokens, which also fits the measured UVA run (bench/calibration.json).
    offload_tile_tokens: int = 64
    # Measured expert-FFN time against tokens per expert, keyed "hidden x intermediate".
    expert_ffn_s: dict[str, Curve] = field(default_factory=dict)
    # Measured decode attention: achieved GB/s of KV read against the KV bytes a step reads.
    attention_kv_gbps: Curve | None = None
    # Measured causal prefill attention (vLLM's FlashAttention): the share of bf16_tflops it
    # reaches against the prompt length; None: prefill attention is a roofline.
    prefill_attention_efficiency: Curve | None = None
    # Measured chunked linear-attention prefill (vLLM's Gated-DeltaNet kernels): seconds per
    # prompt token and byte of one layer's recurrent state (their work grows with heads x dk x
    # dv); None: a linear layer costs its state's reads and writes alone. Set from vLLM's own
    # kernels (bench/e2e.py --kernel-profile on a hybrid model), not by `fluxmoe profile`.
    linear_prefill_s_per_token_state_byte: float | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(f"field 'schema_version': this FluxMoE reads version {SCHEMA_VERSION}, "
                              f"got {self.schema_version!r}")
        for name in ("gpu_memory_bytes", "hbm_gbps", "bf16_tflops", "host_pinned_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"field '{name}': must be > 0, got {getattr(self, name)!r}")
        for name in ("gemm_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"field '{name}': must be in (0, 1], got {getattr(self, name)!r}")

    def h2d_seconds(self, nbytes: float) -> float:
        """Time of one pinned host-to-device copy of `nbytes`."""
        return 0.0 if nbytes <= 0 else nbytes / (self.h2d_gbps(nbytes) * 1e9)

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()[:16]
