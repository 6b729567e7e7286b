"""Where an expert's weights live: resident bf16 on the GPU, compressed on the GPU, or pinned host.

An expert is one flat bf16 vector: its fused gate/up matrix [2i, h] then its down matrix
[h, i]. `PagedTensor` is the handle for one expert: `materialize(slot, ...)` lands the weights
in a staging slot (H2D copy on the copy stream, or GPU decode on the decode stream) and
returns the view plus the event that says it is there; resident experts return their own
storage and no event.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from executor.streams import Streams


@dataclass(frozen=True)
class ExpertShape:
    hidden: int
    intermediate: int

    @property
    def numel(self) -> int:
        return 3 * self.hidden * self.intermediate

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2i, h], w2 [h, i]) views of a flat expert."""
        h, i = self.hidden, self.intermediate
        return flat[:2 * i * h].view(2 * i, h), flat[2 * i * h:].view(h, i)


class PagedTensor:
    """One expert's weights in one tier."""

    tier = "resident"

    def __init__(self, flat: torch.Tensor):
        self.flat = flat  # [numel] bf16 on the GPU

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * 2

    @property
    def needs_slot(self) -> bool:
        return False

    def materialize(self, slot: torch.Tensor | None, streams: Streams):
        """The weights as a flat bf16 GPU tensor, and the event to wait for (None: ready now)."""
        return self.flat, None


class HostExpert(PagedTensor):
    """Pinned host memory, copied over PCIe into a staging slot."""

    tier = "host"

    def __init__(self, flat: torch.Tensor):
        pinned = flat.detach().to("cpu")
        if torch.cuda.is_available():
            pinned = pinned.pin_memory()
        super().__init__(pinned)

    @property
    def needs_slot(self) -> bool:
        return True

    def materialize(self, slot, streams):
        with streams.on(streams.copy):
            slot.copy_(self.flat, non_blocking=True)
        return slot, streams.record(streams.copy)


class CompressedExpert(PagedTensor):
    """FXMC-compressed on the GPU, decoded into a staging slot."""

    tier = "compressed"

    def __init__(self, flat: torch.Tensor, device: torch.device):
        from executor.codec import encode

        self.encoded = encode(flat.to(device))
        self.device = device
        self._decoder = None
        if device.type == "cuda":
            from executor.codec.triton_decode import DeviceDecoder

            self._decoder = DeviceDecoder(self.encoded)  # lookup tables built once, not per call
        super().__init__(flat)
        self.flat = None  # only the compressed bytes stay

    @property
    def nbytes(self) -> int:
        return self.encoded.nbytes

    @property
    def needs_slot(self) -> bool:
        return True

    def materialize(self, slot, streams):
        if self._decoder is None:  # CPU: the reference decoder
            from executor.codec import decode

            slot.copy_(decode(self.encoded).view(-1))
            return slot, None
        self._decoder.decode_into(slot, streams.decode)
        return slot, streams.record(streams.decode)


def make_expert(flat: torch.Tensor, tier: str, device: torch.device) -> PagedTensor:
    if tier == "resident":
        return PagedTensor(flat.to(device))
    if tier == "host":
        return HostExpert(flat)
    if tier == "compressed":
        return CompressedExpert(flat, device)
    raise ValueError(f"unknown tier {tier!r}")
