"""`Workload`: requests with arrival times and prompt/output lengths.

Synthetic (fixed lengths or lognormal lengths; offline, Poisson or gamma arrivals) or a
replayed trace: a CSV of (timestamp, input tokens, output tokens) such as Azure's LLM
inference traces, replayed relative to its first row.
"""

from __future__ import annotations

import csv
import datetime
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxmoe.errors import ConfigError


@dataclass(frozen=True)
class Request:
    id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Lengths:
    """Token lengths: fixed (cv = 0) or lognormal with this mean and coefficient of variation."""

    mean: float
    cv: float = 0.0

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.mean < 1:
            raise ConfigError(f"lengths: mean must be >= 1 token, got {self.mean!r}")
        if self.cv <= 0:
            return np.full(n, round(self.mean), dtype=np.int64)
        sigma2 = math.log(1 + self.cv ** 2)
        draws = rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2), n)
        return np.maximum(1, np.round(draws)).astype(np.int64)


@dataclass
class Workload:
    """A list of requests, sorted by arrival."""

    name: str
    requests: list[Request]

    def __post_init__(self) -> None:
        self.requests.sort(key=lambda r: (r.arrival_s, r.id))
        for r in self.requests:
            if r.prompt_tokens < 1 or r.output_tokens < 1:
                raise ConfigError(f"workload {self.name!r}: request {r.id} needs >= 1 prompt and output token, "
                                  f"got {r.prompt_tokens} and {r.output_tokens}")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def mean_prompt_tokens(self) -> float:
        return float(np.mean([r.prompt_tokens for r in self.requests]))

    @property
    def mean_output_tokens(self) -> float:
        return float(np.mean([r.output_tokens for r in self.requests]))

    def shape(self):
        """The mean request shape, what the planner optimizes for."""
        from planner.plan import WorkloadShape

        return WorkloadShape(max(1, round(self.mean_prompt_tokens)), max(1, round(self.mean_output_tokens)))

    def check_fits(self, max_context: int) -> None:
        """Refuse requests longer than the model's context window."""
        longest = max(self.requests, key=lambda r: r.prompt_tokens + r.output_tokens, default=None)
        if longest and longest.prompt_tokens + longest.output_tokens > max_context:
            raise ConfigError(f"workload {self.name!r}: request {longest.id} needs "
                              f"{longest.prompt_tokens + longest.output_tokens} tokens of context, more than the "
                              f"model's {max_context}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def synthetic(cls, n: int, prompt: Lengths | int, output: Lengths | int, *, rate: float | None = None,
                  arrivals: str = "poisson", cv: float = 1.0, seed: int = 0) -> "Workload":
        """n requests; rate None means offline (all at t=0); arrivals 'poisson' or 'gamma' (with cv)."""
        if n < 1:
            raise ConfigError(f"workload: n must be >= 1, got {n!r}")
        rng = np.random.default_rng(seed)
        prompt = prompt if isinstance(prompt, Lengths) else Lengths(prompt)
        output = output if isinstance(output, Lengths) else Lengths(output)
        if rate is None:
            times = np.zeros(n)
        elif rate <= 0:
            raise ConfigError(f"workload: rate must be > 0 requests/s, got {rate!r}")
        elif arrivals == "poisson":
            times = np.cumsum(rng.exponential(1 / rate, n))
        elif arrivals == "gamma":
            if cv <= 0:
                raise ConfigError(f"workload: gamma arrivals need cv > 0, got {cv!r}")
            shape = 1 / cv ** 2
            times = np.cumsum(rng.gamma(shape, 1 / (rate * shape), n))
        else:
            raise ConfigError(f"workload: arrivals must be 'poisson' or 'gamma', got {arrivals!r}")
        ps, os_ = prompt.sample(n, rng), output.sample(n, rng)
        kind = "offline" if rate is None else f"{arrivals}@{rate:g}/s"
        return cls(f"{kind} n={n} prompt={prompt.mean:g} output={output.mean:g}",
                   [Request(i, float(times[i]), int(ps[i]), int(os_[i])) for i in range(n)])

    @classmethod
    def from_trace(cls, path: str | Path, *, limit: int | None = None, time_scale: float = 1.0,
                   offline: bool = False) -> "Workload":
        """Replay a CSV trace: a header, then rows of timestamp, input tokens, output tokens.

        Timestamps are seconds or ISO date-times; arrivals are relative to the first row and
        divided by `time_scale` (2.0 replays twice as fast). Errors name the line and column.
        """
        path = Path(path)
        try:
            handle = path.open(newline="")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        requests, t0 = [], None
        with handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or len(header) < 3:
                raise ConfigError(f"{path}: line 1: expected a header with 3 columns "
                                  f"(timestamp, input tokens, output tokens), got {header!r}")
            for line, row in enumerate(reader, start=2):
                if limit is not None and len(requests) >= limit:
                    break
                if not row:
                    continue
                if len(row) < 3:
                    raise ConfigError(f"{path}: line {line}: expected 3 columns, got {len(row)}: {row!r}")
                t = _parse_time(row[0], path, line)
                prompt = _parse_count(row[1], path, line, 2, header[1])
                output = _parse_count(row[2], path, line, 3, header[2])
                t0 = t if t0 is None else t0
                if t < t0:
                    raise ConfigError(f"{path}: line {line}, column 1: timestamp {row[0]!r} is before the first row's")
                requests.append(Request(len(requests), 0.0 if offline else (t - t0) / time_scale, prompt, output))
        if not requests:
            raise ConfigError(f"{path}: no requests in the trace")
        return cls(f"trace {path.name} n={len(requests)}" + (" offline" if offline else ""), requests)


def _parse_time(text: str, path: Path, line: int) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        # Azure traces carry 7 fractional digits; Python reads at most 6.
        if "." in text and len(text.split(".")[-1]) > 6:
            text = text[: text.index(".") + 7]
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ConfigError(f"{path}: line {line}, column 1: cannot read timestamp {text!r} "
                          f"(seconds or an ISO date-time)") from None


def _parse_count(text: str, path: Path, line: int, column: int, name: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"{path}: line {line}, column {column} ({name}): expected a whole number of tokens, "
                          f"got {text!r}") from None
    if value < 1:
        raise ConfigError(f"{path}: line {line}, column {column} ({name}): expected >= 1 token, got {value}")
    return value
