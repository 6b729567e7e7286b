"""The staging pool: fixed slots carved once at start-up, reused layer after layer.

Slots are grouped in `depth + 1` buffers of `slots_per_buffer` experts each; layer l uses
buffer l % (depth + 1). Before a buffer is written for layer l, the side stream waits on the
event that layer l - depth - 1 finished computing with it: reuse is ordered on the GPU, and
nothing is allocated on the hot path.
"""

from __future__ import annotations

import torch


class StagingPool:
    def __init__(self, buffers: int, slots_per_buffer: int, expert_numel: int, device: torch.device):
        self.buffers, self.slots_per_buffer = buffers, slots_per_buffer
        self.storage = torch.empty(max(1, buffers * slots_per_buffer) * expert_numel, dtype=torch.bfloat16,
                                   device=device)  # one allocation, at start-up
        self.expert_numel = expert_numel
        self.released: list = [None] * buffers  # per buffer: event after which it may be rewritten

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * 2

    def buffer_of(self, layer_index: int) -> int:
        return layer_index % self.buffers

    def slot(self, buffer: int, j: int) -> torch.Tensor:
        if not 0 <= j < self.slots_per_buffer:
            raise IndexError(f"staging slot {j} out of {self.slots_per_buffer} per buffer")
        start = (buffer * self.slots_per_buffer + j) * self.expert_numel
        return self.storage[start:start + self.expert_numel]
