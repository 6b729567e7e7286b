"""Landing slots on the GPU for compressed expert bytes coming over PCIe.

The host-compressed tier keeps experts FXMC-encoded in pinned host memory, so the link carries
about 0.68 of the bf16 bytes. Each chunk is copied into a landing slot and decoded from there
into its staging slots. Two slots: chunk k lands in one while chunk k-1 decodes from the
other, so the link never waits for the decoder (on the H200 the decoder's rate is about 15x
the link's). Before slot s is rewritten, the copy stream waits for the event after the last
decode that read it. Everything is allocated once; chunks take slots in issue order, which is
the same in every step, so CUDA graphs replay the same addresses.
"""

from __future__ import annotations

import torch

from executor.codec.format import ALIGN, EncodedTensor
from planner.memory import LANDING_SLOTS


class LandingRing:
    def __init__(self, slot_bytes: int, device: torch.device, slots: int = LANDING_SLOTS):
        self.slot_bytes = -(-slot_bytes // ALIGN) * ALIGN
        self.slots = slots
        self.storage = torch.empty((slots, self.slot_bytes), dtype=torch.uint8, device=device)
        self.free: list = [None] * slots  # per slot: event after the last decode that read it
        self.next = 0

    @property
    def nbytes(self) -> int:
        return self.storage.numel()

    def reset(self) -> None:
        """Compute is past every decode (a new step, or a join): all slots are free, and the
        first chunk takes slot 0 again."""
        self.free = [None] * self.slots
        self.next = 0

    def take(self) -> int:
        slot = self.next
        self.next = (self.next + 1) % self.slots
        return slot

    def view(self, slot: int, encoded: EncodedTensor) -> EncodedTensor:
        """`encoded`'s header over its bytes' place in slot `slot`."""
        n = encoded.header.payload_bytes
        if n > self.slot_bytes:
            raise ValueError(f"a {n}-byte chunk does not fit a {self.slot_bytes}-byte landing slot")
        return EncodedTensor(encoded.header, self.storage[slot, :n])
