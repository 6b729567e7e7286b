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
    def offline(self) -> bool:
        """Every request there at t=0: a batch job, as vLLM's offline `LLM` class runs one."""
        return all(r.arrival_s == 0 for r in self.requests)

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
        if limit is not None and limit < 1:
            raise ConfigError(f"trace {path}: limit must be >= 1 request, got {limit!r}")
        if not time_scale > 0 or time_scale == float("inf"):
            raise ConfigError(f"trace {path}: scale must be a finite number > 0, got {time_scale!r}")
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a CSV trace")
        try:
            handle = path.open(newline="", encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        with handle:
            try:
                requests = cls._read_trace(handle, path, limit, time_scale, offline)
            except (UnicodeDecodeError, csv.Error) as e:
                raise ConfigError(f"{path}: not a text CSV trace (a binary file?): {type(e).__name__}") from None
        if not requests:
            raise ConfigError(f"{path}: no requests in the trace")
        return cls(f"trace {path.name} n={len(requests)}" + (" offline" if offline else ""), requests)

    @staticmethod
    def _read_trace(handle, path: Path, limit: int | None, time_scale: float, offline: bool):
        requests, t0 = [], None
        if "\0" in handle.read(4096):
            raise ConfigError(f"{path}: a binary file, not a text CSV trace")
        handle.seek(0)
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
        return requests


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


WORKLOAD_HELP = ("fixed:n=256,prompt=512,output=128[,rate=R,seed=S] | "
                 "poisson:n=..,rate=..,prompt=..,output=..[,cv_len=..,seed=..] | "
                 "gamma:n=..,rate=..,cv=..,prompt=..,output=..[,seed=..] | trace:PATH[,limit=N,scale=X,offline=1]")


def _spec_options(parts: list[str], spec: str) -> dict[str, str]:
    out = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"workload {spec!r}: expected key=value, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def _number(kv: dict[str, str], key: str, default, kind, spec: str, minimum: float | None = None,
            above: float | None = None):
    if key not in kv:
        return default
    text = kv.pop(key)
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"workload {spec!r}: {key} must be a{'' if kind is int else ' real'} number"
                          f"{' (whole)' if kind is int else ''}, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"workload {spec!r}: {key} must be finite, got {text!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"workload {spec!r}: {key} must be >= {minimum:g}, got {text!r}")
    if above is not None and value <= above:
        raise ConfigError(f"workload {spec!r}: {key} must be > {above:g}, got {text!r}")
    return value


def parse_workload(spec: str) -> Workload:
    """A workload from a short spec string (see WORKLOAD_HELP); errors name the option and value."""
    kind, _, rest = spec.partition(":")
    if kind == "trace":
        path, *opts = rest.split(",")
        if not path.strip():
            raise ConfigError(f"workload {spec!r}: trace needs a path, e.g. trace:requests.csv")
        kv = _spec_options(opts, spec)
        limit = _number(kv, "limit", None, int, spec, minimum=1)
        scale = _number(kv, "scale", 1.0, float, spec, above=0)
        offline = kv.pop("offline", "0")
        if offline not in ("0", "1"):
            raise ConfigError(f"workload {spec!r}: offline must be 0 or 1, got {offline!r}")
        if kv:
            raise ConfigError(f"workload {spec!r}: unknown option(s) {', '.join(kv)}; trace takes limit, scale, offline")
        return Workload.from_trace(path.strip(), limit=limit, time_scale=scale, offline=offline == "1")
    if kind not in ("fixed", "poisson", "gamma"):
        raise ConfigError(f"workload: unknown kind {kind!r} in {spec!r}; expected {WORKLOAD_HELP}")
    kv = _spec_options(rest.split(",") if rest else [], spec)
    n = _number(kv, "n", 256, int, spec, minimum=1)
    cv_len = _number(kv, "cv_len", 0.0, float, spec, minimum=0)
    prompt = Lengths(_number(kv, "prompt", 512.0, float, spec, minimum=1), cv_len)
    output = Lengths(_number(kv, "output", 128.0, float, spec, minimum=1), cv_len)
    rate = _number(kv, "rate", None, float, spec, above=0)
    cv = _number(kv, "cv", 1.0, float, spec, above=0)
    seed = _number(kv, "seed", 0, int, spec, minimum=0)
    if kv:
        raise ConfigError(f"workload {spec!r}: unknown option(s) {', '.join(kv)}")
    if kind != "fixed" and rate is None:
        raise ConfigError(f"workload {spec!r}: {kind} arrivals need rate=<requests per second>")
    return Workload.synthetic(n, prompt, output, rate=rate, arrivals="gamma" if kind == "gamma" else "poisson", cv=cv,
                              seed=seed)
