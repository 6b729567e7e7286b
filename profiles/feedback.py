"""`RuntimeFeedback`: what a running FluxMoE executor measured, as plain data for the planner.

Made from a stats answer (`GET /v1/fluxmoe/stats`, one worker's dict) or a standalone pager's
read-out: achieved link and decode rates and the time compute waited for weights, and the
router's picks per expert counted on the GPU since the server started. The planner turns it
into a calibrated profile and a measured expert popularity (planner/replan.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxmoe.errors import ConfigError


@dataclass
class RuntimeFeedback:
    steps: int  # engine steps counted so far
    routed_tokens: int  # tokens whose top-k picks `route_counts` holds (per layer)
    route_counts: list[list[int]]  # per paged or resident MoE layer, picks per expert since start
    h2d_gbps: float = 0.0  # achieved host-to-GPU rate of the latest timed step (0: none measured)
    decode_gbps: float = 0.0  # achieved compressed-expert decode rate (0: none measured)
    wait_ms: float = 0.0  # compute waited for weights in the latest timed step, summed over layers
    mean_batch: float | None = None  # sequences per step, where the server reports it
    kv_use: float | None = None  # share of the KV cache in use, where the server reports it

    def __post_init__(self) -> None:
        for name in ("steps", "routed_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"field '{name}': must be >= 0, got {getattr(self, name)!r}")
        for name in ("h2d_gbps", "decode_gbps", "wait_ms"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"field '{name}': must be >= 0, got {getattr(self, name)!r}")
        if self.route_counts and len({len(row) for row in self.route_counts}) != 1:
            raise ConfigError("field 'route_counts': every layer needs one count per expert")

    @classmethod
    def from_stats(cls, stats: dict) -> "RuntimeFeedback":
        """From one worker's stats answer (fluxmoe/vllm_plugin/stats.py)."""
        missing = [k for k in ("steps", "routed_tokens", "route_counts") if k not in stats]
        if missing:
            raise ConfigError(f"stats: no {', '.join(missing)} (a server started without route counting?)")
        mean_batch = stats.get("mean_batch")
        if mean_batch is None and stats["steps"] > 0 and stats["routed_tokens"] > 0:
            mean_batch = stats["routed_tokens"] / stats["steps"]  # tokens a step: sequences, in decode
        return cls(steps=stats["steps"], routed_tokens=stats["routed_tokens"], route_counts=stats["route_counts"],
                   h2d_gbps=stats.get("h2d_gbps", 0.0), decode_gbps=stats.get("decode_gbps", 0.0),
                   wait_ms=stats.get("wait_ms", 0.0), mean_batch=mean_batch, kv_use=stats.get("kv_use"))

    def since(self, earlier: "RuntimeFeedback") -> "RuntimeFeedback":
        """The counts of the window between `earlier` and this read-out (rates: this one's)."""
        if self.routed_tokens < earlier.routed_tokens or len(self.route_counts) != len(earlier.route_counts):
            raise ConfigError("feedback: `earlier` is not an earlier read-out of the same server")
        counts = [[a - b for a, b in zip(now, then)] for now, then in zip(self.route_counts, earlier.route_counts)]
        return RuntimeFeedback(self.steps - earlier.steps, self.routed_tokens - earlier.routed_tokens, counts,
                               self.h2d_gbps, self.decode_gbps, self.wait_ms, self.mean_batch, self.kv_use)
