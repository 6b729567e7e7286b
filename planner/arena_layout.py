"""Where the arena puts its rows (pure bookkeeping, no tensors), and vLLM's limit on them.

A paged layer runs as one fused-MoE call over the span of arena rows that covers its resident
stack and its staging buffer (executor/arena.py). Rows are laid out buffer by buffer: the
layers that use buffer b are split into two fixed groups by position, the first group's
resident stacks placed before the buffer and the second's after, so each span stays short (the
kernel's block alignment pads per row of the span). A layer with no paged expert takes no
rows. Because the groups do not depend on the placement, the widest span of a group is its
buffer plus the sum of its resident stacks: linear in the placement, so the planner's LP holds
every span within what vLLM's kernels take.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxmoe.errors import ConfigError
from fluxmoe.names import Tier

# vLLM 0.26's moe_align_block_size pads a call's expert count to a multiple of 32 and needs it
# below 1024 (csrc/moe/moe_align_sum_kernels.cu); seen on the H200 with Qwen3-Next-80B's
# 512-expert layers, 106 of them resident, 24 layers to a buffer: a 1,678-row span.
FUSED_MOE_MAX_ROWS = 992


def span_groups(num_layers: int, buffers: int) -> list[tuple[list[int], list[int]]]:
    """Per buffer b, the layers (in execution order, layer l uses buffer l % buffers) whose
    resident stacks go before it and those that go after it: the first half of its layers and the rest."""
    out = []
    for b in range(buffers):
        members = list(range(b, num_layers, buffers))
        half = len(members) // 2
        out.append((members[:half], members[half:]))
    return out


def all_span_groups(num_layers: int, buffers: int) -> list[list[int]]:
    """Every group of `span_groups`, before and after each buffer: a paged layer's call spans
    its buffer and at most its own group's resident stacks."""
    return [group for pair in span_groups(num_layers, buffers) for group in pair]


@dataclass(frozen=True)
class ArenaLayout:
    """Row ranges of the arena (pure bookkeeping, no tensors)."""

    rows: int
    buffer_start: tuple[int, ...]
    resident_start: dict[int, int]  # paged layer -> first row of its resident stack
    span: dict[int, tuple[int, int]]  # paged layer -> [lo, hi) rows its kernel call reads

    @classmethod
    def of(cls, tiers: list[list[Tier]], buffers: int, slots: int) -> "ArenaLayout":
        """tiers[l][e] for every layer in execution order; layer l uses buffer l % buffers."""
        counts = [(sum(x is Tier.RESIDENT for x in t), any(x is not Tier.RESIDENT for x in t)) for t in tiers]
        return cls.of_counts(counts, buffers, slots)

    @classmethod
    def of_counts(cls, counts: list[tuple[int, bool]], buffers: int, slots: int) -> "ArenaLayout":
        """(resident experts, paged?) for every layer in execution order."""
        paged = [l for l, (_, is_paged) in enumerate(counts) if is_paged]
        resident = {l: counts[l][0] if counts[l][1] else 0 for l in range(len(counts))}
        rows, buffer_start, resident_start = 0, [], {}
        for before, after in span_groups(len(counts), buffers):
            for l in before:
                resident_start[l], rows = rows, rows + resident[l]
            buffer_start.append(rows)
            rows += slots
            for l in after:
                resident_start[l], rows = rows, rows + resident[l]
        span = {}
        for l in paged:
            b = buffer_start[l % buffers]
            r = resident_start[l]
            span[l] = (min(b, r), max(b + slots, r + resident[l]))
        return cls(rows, tuple(buffer_start), resident_start, span)

    @property
    def widest_span(self) -> tuple[int, int]:
        """(rows, layer) of the paged layer whose kernel call reads the most rows; (0, -1) if none."""
        return max(((hi - lo, l) for l, (lo, hi) in self.span.items()), default=(0, -1))

    def check_fused_limit(self, what: str = "plan") -> None:
        """Refuse a layout with a call wider than vLLM's fused-MoE kernels take."""
        rows, layer = self.widest_span
        if rows > FUSED_MOE_MAX_ROWS:
            raise ConfigError(f"{what}: paged MoE layer {layer} would run one fused-MoE call over {rows} expert rows "
                              f"(its resident rows, the other layers' between them and its staging buffer); vLLM "
                              f"0.26 takes at most {FUSED_MOE_MAX_ROWS}: plan again with this version of fluxmoe, "
                              f"which keeps resident experts in whole layers when a model needs it")
