"""The staging pool: stacked expert slots carved once at start-up, reused layer after layer.

`depth + 1` buffers, each `slots` experts deep and shaped like vLLM's stacked weights
(`w13 [slots, 2I/tp, H]`, `w2 [slots, H, I/tp]`), so a fused-MoE kernel reads a buffer as it
reads a layer's own weights. Layer l uses buffer l % (depth + 1); before a buffer is
rewritten for layer l, the side streams wait for the event with which layer l - depth - 1
released it. Nothing is allocated on the hot path.
"""

from __future__ import annotations

import torch

from executor.tiers import ExpertLayout


class StagingPool:
    def __init__(self, buffers: int, slots: int, layout: ExpertLayout, device: torch.device):
        if buffers < 1 or slots < 0:
            raise ValueError(f"staging pool needs >= 1 buffer and >= 0 slots, got {buffers}, {slots}")
        self.buffers, self.slots, self.layout = buffers, slots, layout
        self.w13 = torch.empty(buffers, slots, *layout.w13_shape, dtype=torch.bfloat16, device=device)
        self.w2 = torch.empty(buffers, slots, *layout.w2_shape, dtype=torch.bfloat16, device=device)
        self.released: list = [None] * buffers  # per buffer: event after which it may be rewritten
        self.holder: list[int | None] = [None] * buffers  # the layer whose experts a buffer holds now

    @property
    def nbytes(self) -> int:
        return (self.w13.numel() + self.w2.numel()) * 2

    def buffer_of(self, layer_index: int) -> int:
        return layer_index % self.buffers

    def buffer(self, b: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n` slots (all by default) of buffer `b` as stacked (w13, w2)."""
        n = self.slots if n is None else n
        if not 0 <= n <= self.slots:
            raise IndexError(f"{n} staging slots asked of a buffer of {self.slots}")
        return self.w13[b, :n], self.w2[b, :n]
