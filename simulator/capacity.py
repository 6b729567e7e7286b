"""Capacity answers: the highest arrival rate a system sustains under a latency SLO (goodput).

Replaying a workload faster than a system serves it measures a queue draining, not a capacity.
`max_rate` bisects the Poisson arrival rate (the workload's request lengths, a fixed seed) for
the highest rate at which the simulated latency percentiles stay within the SLO. The requests
must outnumber what the system can hold at once several times over (`steady_requests`):
with fewer, every request is admitted on arrival, no queue can form, and any rate would pass.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fluxmoe.errors import ConfigError
from simulator.engine import SimulationResult
from simulator.workload import Request, Workload

_SLO_KEYS = {"ttft_p50": ("ttft_s", "p50"), "ttft_p99": ("ttft_s", "p99"),
             "tpot_p50": ("tpot_s", "p50"), "tpot_p99": ("tpot_s", "p99")}
QUEUE_FACTOR = 3  # requests per sequence the system can hold at once


@dataclass(frozen=True)
class SLO:
    """Latency limits in seconds, keyed like "ttft_p99"."""

    limits: dict[str, float]

    def met_by(self, result: SimulationResult) -> bool:
        for key, limit in self.limits.items():
            field, percentile = _SLO_KEYS[key]
            if not getattr(getattr(result, field), percentile) <= limit:  # NaN fails too
                return False
        return True

    def __str__(self) -> str:
        return ", ".join(f"{key} <= {limit * 1e3:g} ms" for key, limit in self.limits.items())


def parse_slo(spec: str) -> SLO:
    """'ttft_p99=2s,tpot_p99=200ms' -> SLO."""
    limits = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        if key not in _SLO_KEYS:
            raise ConfigError(f"--slo: unknown limit {key!r} (known: {', '.join(_SLO_KEYS)})")
        match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(ms|s)", value.strip())
        if not match or float(match.group(1)) <= 0:
            raise ConfigError(f"--slo: {key}={value!r}: expected a time > 0 like 200ms or 2s")
        limits[key] = float(match.group(1)) / (1e3 if match.group(2) == "ms" else 1)
    if not limits:
        raise ConfigError(f"--slo: no limits in {spec!r} (e.g. ttft_p99=2s,tpot_p99=200ms)")
    return SLO(limits)


def steady_requests(workload: Workload, concurrency: int) -> Workload:
    """The workload's request lengths, repeated in order until there are QUEUE_FACTOR x
    `concurrency` requests (at least the workload's own)."""
    n = max(len(workload), QUEUE_FACTOR * concurrency)
    base = workload.requests
    return Workload(f"{workload.name} x{n / len(base):.3g}",
                    [Request(i, 0.0, base[i % len(base)].prompt_tokens, base[i % len(base)].output_tokens)
                     for i in range(n)])


def at_rate(workload: Workload, rate: float, seed: int = 0) -> Workload:
    """The same requests arriving as a Poisson process of `rate` requests/s."""
    times = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, len(workload)))
    return Workload(f"{workload.name} at poisson@{rate:.3g}/s",
                    [Request(r.id, float(t), r.prompt_tokens, r.output_tokens)
                     for r, t in zip(workload.requests, times)])


@dataclass(frozen=True)
class Capacity:
    rate: float  # requests/s: the highest found that meets the SLO (0: not even the lowest)
    result: SimulationResult | None  # the simulation at that rate
    tried: int


def max_rate(meets: Callable[[float], SimulationResult | None], *, low: float = 0.01, high: float = 1000.0,
             rel_tol: float = 0.05) -> Capacity:
    """Bisect (in log space) for the highest rate at which `meets(rate)` returns a result
    (None: the SLO is missed). Assumes that missing it at one rate means missing it above."""
    tried = 0

    def check(rate: float) -> SimulationResult | None:
        nonlocal tried
        tried += 1
        return meets(rate)

    best = check(low)
    if best is None:
        return Capacity(0.0, None, tried)
    top = check(high)
    if top is not None:
        return Capacity(high, top, tried)
    while high / low > 1 + rel_tol:
        mid = math.sqrt(low * high)
        result = check(mid)
        if result is None:
            high = mid
        else:
            low, best = mid, result
    return Capacity(low, best, tried)


def system_max_rate(run: Callable[[Workload], SimulationResult | None], workload: Workload, slo: SLO,
                    concurrency: int, **search) -> Capacity:
    """A system's highest Poisson rate under `slo` on `workload`'s lengths (made steady)."""
    steady = steady_requests(workload, concurrency)

    def meets(rate: float) -> SimulationResult | None:
        result = run(at_rate(steady, rate))
        return result if result is not None and slo.met_by(result) else None

    return max_rate(meets, **search)
