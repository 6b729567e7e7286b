"""CUDA streams and events, with a CPU stand-in that runs everything in order.

The executor issues work on three streams (compute, host copies, decode) and orders it with
events, never with host syncs. On the CPU the same calls run synchronously and events are
inert, so the placement, slot reuse and bit-exactness logic is tested in CI.
"""

from __future__ import annotations

import contextlib

import torch


class Streams:
    """The compute stream (the caller's current one) and two side streams for paging."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.copy = torch.cuda.Stream(device)
            self.decode = torch.cuda.Stream(device)
        else:
            self.compute = self.copy = self.decode = None

    def record(self, stream, timing: bool = False):
        """An event recorded on `stream` now (None on the CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=timing)
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        """Make `stream` wait on the GPU for `event` (no host sync)."""
        if self.cuda and event is not None:
            stream.wait_event(event)

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()
