"""The staging pool: stacked expert slots carved once at start-up, reused layer after layer.

`depth + 1` buffers, each `slots` experts deep and shaped like vLLM's stacked weights
(`w13 [slots, 2I/tp, H]`, `w2 [slots, H, I/tp]`), so a fused-MoE kernel reads a buffer as it
reads a layer's own weights. Layer l uses buffer l % (depth + 1); before a buffer is
rewritten for layer l, the side streams wait for the event with which layer l - depth - 1
released it. Nothing is allocated on the hot path. The buffers are either allocated here or
carved from an `ExpertArena` (executor/arena.py), which places them beside resident experts.
"""

from __future__ import annotations

import torch

from executor.tiers import ExpertLayout


class StagingPool:
    def __init__(self, buffers: int, slots: int, layout: ExpertLayout, device: torch.device,
                 storage: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """storage: per buffer, (w13 [slots, ...], w2 [slots, ...]) carved elsewhere."""
        if buffers < 1 or slots < 0:
            raise ValueError(f"staging pool needs >= 1 buffer and >= 0 slots, got {buffers}, {slots}")
        self.buffers, self.slots, self.layout = buffers, slots, layout
        if storage is None:
            w13 = torch.empty(buffers, slots, *layout.w13_shape, dtype=torch.bfloat16, device=device)
            w2 = torch.empty(buffers, slots, *layout.w2_shape, dtype=torch.bfloat16, device=device)
            storage = [(w13[b], w2[b]) for b in range(buffers)]
        if len(storage) != buffers or any(len(a) != slots or len(b) != slots for a, b in storage):
            raise ValueError(f"staging storage: expected {buffers} buffers of {slots} slots")
        self.storage = storage
        self.released: list = [None] * buffers  # per buffer: event after which it may be rewritten
        self.holder: list[int | None] = [None] * buffers  # the layer whose experts a buffer holds now

    @property
    def nbytes(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.storage) * 2

    def zero_(self) -> None:
        for a, b in self.storage:
            a.zero_()
            b.zero_()

    def buffer_of(self, layer_index: int) -> int:
        return layer_index % self.buffers

    def buffer(self, b: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n` slots (all by default) of buffer `b` as stacked (w13, w2)."""
        n = self.slots if n is None else n
        if not 0 <= n <= self.slots:
            raise IndexError(f"{n} staging slots asked of a buffer of {self.slots}")
        return self.storage[b][0][:n], self.storage[b][1][:n]
