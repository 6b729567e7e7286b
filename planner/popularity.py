"""How often each expert is picked, per MoE layer: measured from the router's top-k ids at run
time (the executor counts them on the GPU), or assumed (uniform, or a Zipf skew).

With routed-only fetch a host expert crosses the link only in steps whose tokens pick it, so
which experts sit on the host matters, not only how many: the coldest ones should. For a step
of T tokens, expert e (picked by a share p_e of tokens) is routed with odds 1 - (1 - p_e)^T,
and a layer whose h coldest experts are on the host moves, on average, the sum of their odds.
That sum is convex in h (each added expert is at least as hot as the last), so the planner's
LP takes it exactly at a few breakpoints and as their chords in between (`routed_chords`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fluxmoe.errors import ConfigError

# Host counts where the LP takes a layer's expected routed experts exactly (chords in between).
CHORD_POINTS = 16


@dataclass
class ExpertPopularity:
    """Per MoE layer (in model order), the share of tokens whose top-k picks each expert; a
    layer's shares add up to the model's experts per token."""

    picks: list[list[float]]
    tokens: int = 0  # tokens the shares were counted over (0: assumed, not measured)
    _order: list[list[int]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.picks:
            raise ConfigError("field 'picks': needs one list of shares per MoE layer, got none")
        width = len(self.picks[0])
        for i, layer in enumerate(self.picks):
            if len(layer) != width:
                raise ConfigError(f"field 'picks[{i}]': {len(layer)} experts, layer 0 has {width}")
            bad = next((p for p in layer if not 0 <= p <= 1), None)
            if bad is not None:
                raise ConfigError(f"field 'picks[{i}]': a share must be in [0, 1], got {bad!r}")
        if self.tokens < 0:
            raise ConfigError(f"field 'tokens': must be >= 0, got {self.tokens!r}")
        self._order = [sorted(range(width), key=lambda e, s=layer: (-s[e], e)) for layer in self.picks]

    @classmethod
    def from_counts(cls, counts, tokens: int, experts_per_token: int) -> "ExpertPopularity":
        """From per-layer pick counts over `tokens` tokens (each token picks `experts_per_token`)."""
        if tokens <= 0:
            raise ConfigError(f"tokens: counts need at least one token, got {tokens!r}")
        rows = [[float(c) for c in layer] for layer in counts]
        for i, layer in enumerate(rows):
            if abs(sum(layer) - tokens * experts_per_token) > 0.5:
                raise ConfigError(f"counts[{i}]: {sum(layer):g} picks, but {tokens} tokens pick "
                                  f"{experts_per_token} experts each ({tokens * experts_per_token})")
        return cls([[c / tokens for c in layer] for layer in rows], tokens)

    @classmethod
    def zipf(cls, num_layers: int, num_experts: int, experts_per_token: int, skew: float,
             orders: list[list[int]] | None = None) -> "ExpertPopularity":
        """Zipf shares with exponent `skew` (0: uniform); `orders[l]` lists layer l's experts
        hottest first (default: by id)."""
        weights = [rank ** -skew for rank in range(1, num_experts + 1)]
        total = sum(weights)
        shares = [min(1.0, experts_per_token * w / total) for w in weights]
        picks = []
        for layer in range(num_layers):
            order = orders[layer] if orders else list(range(num_experts))
            row = [0.0] * num_experts
            for rank, e in enumerate(order):
                row[e] = shares[rank]
            picks.append(row)
        return cls(picks)

    @property
    def num_layers(self) -> int:
        return len(self.picks)

    @property
    def num_experts(self) -> int:
        return len(self.picks[0])

    def order(self, layer: int) -> list[int]:
        """Layer `layer`'s experts (position among MoE layers), hottest first; ties by id."""
        return list(self._order[layer])

    def routed_odds(self, layer: int, expert: int, tokens: float) -> float:
        """The odds that a step of `tokens` tokens routes at least one token to `expert`."""
        return 1 - (1 - self.picks[layer][expert]) ** tokens

    def expected_routed(self, layer: int, host_ids, tokens: float) -> float:
        """Expected experts among `host_ids` that a step of `tokens` tokens routes to."""
        return sum(self.routed_odds(layer, e, tokens) for e in host_ids)

    def coldest(self, layer: int, n: int) -> list[int]:
        return self._order[layer][len(self._order[layer]) - n:] if n > 0 else []

    def active_experts(self, tokens: float) -> float:
        """Expected experts a step of `tokens` tokens routes to, averaged over layers."""
        return sum(self.expected_routed(l, range(self.num_experts), tokens) for l in range(self.num_layers)) \
            / self.num_layers

    def routed_chords(self, layer: int, tokens: float, points: int = CHORD_POINTS) -> list[tuple[float, float]]:
        """(slope, intercept) of lines whose maximum over h is the expected routed experts of the
        h coldest (exact at the breakpoints, above it in between: the function is convex)."""
        E = self.num_experts
        cold = [self.routed_odds(layer, e, tokens) for e in reversed(self._order[layer])]
        prefix = [0.0]
        for odds in cold:
            prefix.append(prefix[-1] + odds)
        marks = sorted({0, E} | {round(E * (i / points) ** 2) for i in range(1, points)})
        lines = []
        for a, b in zip(marks, marks[1:]):
            slope = (prefix[b] - prefix[a]) / (b - a)
            lines.append((slope, prefix[a] - slope * a))
        return lines

    def distance(self, other: "ExpertPopularity") -> float:
        """Total variation between the two, averaged over layers (0: same shares; at most 1)."""
        if (self.num_layers, self.num_experts) != (other.num_layers, other.num_experts):
            raise ConfigError("popularity: the two cover different layers or experts")
        k = max(sum(self.picks[0]), 1e-12)
        return sum(sum(abs(a - b) for a, b in zip(x, y)) / (2 * k) for x, y in zip(self.picks, other.picks)) \
            / self.num_layers


def uniform(num_layers: int, num_experts: int, experts_per_token: int) -> ExpertPopularity:
    return ExpertPopularity.zipf(num_layers, num_experts, experts_per_token, 0.0)

