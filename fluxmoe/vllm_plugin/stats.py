"""The pager's runtime stats as a running server reports them: read between steps without a
host sync, logged every `interval_s`, and returned as a dict for the stats endpoint (and the
closed loop that will consume it).

The pager records timing events in every step (inside CUDA graphs too) and counts its steps on
the device; `StatsReporter.poll()` runs from host hooks between steps, reads the latest step
whose events have completed (`ExpertPager.harvest`) and copies the step count to pinned host
memory without waiting for it (the count read is the one copied at the previous poll).
Free of vLLM imports, so CI tests it on the CPU.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch

from fluxmoe.vllm_plugin import LOG_NAME

INTERVAL_ENV = "FLUXMOE_STATS_INTERVAL"  # seconds between log lines; 0 turns the log line off
DEFAULT_INTERVAL_S = 30.0

log = logging.getLogger(LOG_NAME)


def interval_from_env() -> float:
    from fluxmoe.errors import ConfigError

    raw = os.environ.get(INTERVAL_ENV, str(DEFAULT_INTERVAL_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(f"{INTERVAL_ENV}: expected seconds >= 0, got {raw!r}")
    return value


def header(runtime) -> dict:
    """What every stats answer carries, timed or not."""
    return {"paged_layers": len(runtime.paged_layers), "moe_layers": len(runtime.moe_layers),
            "prefetch_depth": runtime.plan.prefetch_depth, "gpu_expert_bytes": runtime.gpu_bytes,
            "steps": 0, "timed_steps": 0, "layers": []}


class StatsReporter:
    def __init__(self, runtime, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] = log.info):
        self.runtime, self.interval_s, self.clock, self.emit = runtime, interval_s, clock, emit
        self._last = clock()
        self._steps = 0
        self._steps_host: torch.Tensor | None = None
        self._steps_copied = None  # event after the last step-count copy

    def poll(self) -> None:
        """From a host hook between steps: cheap unless a log line is due."""
        if not self.interval_s or self.clock() - self._last < self.interval_s:
            return
        self._last = self.clock()
        snap = self.snapshot()
        if snap["paged_layers"]:
            self.emit(self.line(snap))

    def snapshot(self) -> dict:
        """What the pager measured in its latest completed timed step, with the step count."""
        runtime = self.runtime
        pager = runtime._pager
        out = header(runtime)
        if pager is None or not runtime.paged_layers:
            return out
        if not _capturing():
            pager.harvest()
            self._count_steps(pager)
        stats = pager.stats
        out.update(route_counts_of(pager))
        out.update(steps=self._steps, timed_steps=stats.samples, host_expert_bytes=pager.host_bytes,
                   wait_ms=round(stats.total_wait_ms, 4), h2d_gbps=round(stats.h2d_gbps, 2),
                   decode_gbps=round(stats.decode_gbps, 2))
        out["layers"] = [{"layer": layer, "wait_ms": round(s.wait_ms, 4), "h2d_gbps": round(s.h2d_gbps, 2),
                          "decode_gbps": round(s.decode_gbps, 2)}
                         for layer, s in zip(runtime.moe_layers, stats.layers) if layer in runtime.paged_layers]
        return out

    def _count_steps(self, pager) -> None:
        steps = pager.steps
        if steps.device.type != "cuda":
            self._steps = int(steps)
            return
        if self._steps_copied is not None and self._steps_copied.query():
            self._steps = int(self._steps_host)
        if self._steps_copied is None or self._steps_copied.query():
            if self._steps_host is None:
                with torch.inference_mode(False):  # written in and out of vLLM's inference mode
                    self._steps_host = torch.zeros((), dtype=steps.dtype, pin_memory=True)
            self._steps_host.copy_(steps, non_blocking=True)
            self._steps_copied = torch.cuda.Event()
            self._steps_copied.record()

    @staticmethod
    def line(snap: dict) -> str:
        if not snap["timed_steps"]:
            return f"FluxMoE pager: {snap['steps']} steps, no timed step read yet"
        worst = max(snap["layers"], key=lambda l: l["wait_ms"])
        return (f"FluxMoE pager: {snap['steps']} steps; latest timed step: compute waited {snap['wait_ms']:.3f} ms "
                f"over {snap['paged_layers']} paged layers (most: layer {worst['layer']}, {worst['wait_ms']:.3f} ms), "
                f"H2D {snap['h2d_gbps']:.1f} GB/s, decode {snap['decode_gbps']:.1f} GB/s")


def route_counts_of(pager) -> dict:
    """Each expert's picks per MoE layer and the tokens counted, as of the previous read (no wait;
    nothing inside a CUDA-graph capture)."""
    if pager is None or pager.route_counter is None or _capturing():
        return {}
    counts, tokens = pager.route_counter.read()
    return {"routed_tokens": tokens[0] if tokens else 0, "route_counts": counts}


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
