"""One allocation for the resident experts of paged layers and the staging buffers, so that a
paged layer runs as ONE fused-MoE kernel call, bit-exact with plain vLLM.

A fused-MoE kernel reads expert e at `w13 + e * stride`: every expert of a call must sit in one
tensor. A paged layer's experts sit in two places (its resident stack and its staging
buffer), so both are carved from one arena and the layer runs on the span of rows that covers
them, with its expert ids remapped to rows (`FusedWeights.row_of`). One call keeps vLLM's
per-(token, k) products and its single top-k sum unchanged, where one call per tier would add
partial sums (a second rounding when top-k > 2).

Rows are laid out as `planner.arena_layout.ArenaLayout` says (the planner checks the same
layout against vLLM's limit on a call's rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from executor.tiers import ExpertLayout
from fluxmoe.names import Tier
from planner.arena_layout import ArenaLayout

__all__ = ["ArenaLayout", "ExpertArena", "FusedWeights"]


@dataclass(frozen=True)
class FusedWeights:
    """One paged layer as one kernel call: a span of arena rows, and expert id -> row in it."""

    w13: torch.Tensor  # [rows, 2I/tp, H]
    w2: torch.Tensor  # [rows, H, I/tp]
    row_of: torch.Tensor  # [E] int32 on the device (the dtype of vLLM's top-k ids)
    rows_host: tuple[int, ...]  # the same, on the host

    def experts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(w13, w2) per expert id, read through the remap (what the kernel call reads)."""
        return [(self.w13[r], self.w2[r]) for r in self.rows_host]

    @property
    def rows(self) -> int:
        return len(self.w13)


class ExpertArena:
    """The arena's tensors: resident rows of paged layers and the staging buffers."""

    def __init__(self, tiers: list[list[Tier]], buffers: int, slots: int, layout: ExpertLayout,
                 device: torch.device | str):
        self.device = torch.device(device)
        self.tiers, self.slots, self.layout = [list(t) for t in tiers], slots, layout  # swaps edit them
        self.plan = ArenaLayout.of(tiers, buffers, slots)
        self.w13 = torch.empty(self.plan.rows, *layout.w13_shape, dtype=torch.bfloat16, device=self.device)
        self.w2 = torch.empty(self.plan.rows, *layout.w2_shape, dtype=torch.bfloat16, device=self.device)

    @property
    def nbytes(self) -> int:
        return (self.w13.numel() + self.w2.numel()) * 2

    def is_paged(self, layer: int) -> bool:
        return layer in self.plan.span

    def _rows(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13[start:start + n], self.w2[start:start + n]

    def resident(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a paged layer's resident experts go (in expert id order)."""
        n = sum(t is Tier.RESIDENT for t in self.tiers[layer])
        return self._rows(self.plan.resident_start[layer], n)

    def buffer(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows(self.plan.buffer_start[b], self.slots)

    def fused(self, layer: int, staged_ids: list[int]) -> FusedWeights:
        """The span a paged layer's kernel call reads; `staged_ids` in slot order."""
        lo, hi = self.plan.span[layer]
        buffers = len(self.plan.buffer_start)
        row_of = [-1] * len(self.tiers[layer])
        resident_ids = [e for e, t in enumerate(self.tiers[layer]) if t is Tier.RESIDENT]
        for i, e in enumerate(resident_ids):
            row_of[e] = self.plan.resident_start[layer] + i - lo
        for slot, e in enumerate(staged_ids):
            row_of[e] = self.plan.buffer_start[layer % buffers] + slot - lo
        rows = torch.tensor(row_of, dtype=torch.int32, device=self.device)
        return FusedWeights(self.w13[lo:hi], self.w2[lo:hi], rows, tuple(row_of))
