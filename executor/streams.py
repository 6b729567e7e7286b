"""CUDA streams and events for paging, with a CPU stand-in that keeps ordering bugs visible.

The executor launches paging work on side streams (host copies, decodes) and orders it
against the compute stream with events, never with host syncs. On the CPU there are no
streams, so the stand-in decides when side-stream work runs:
- "lazy" (the default): work runs only when some stream waits on its event. Compute that
  forgets to wait for its weights reads a stale slot, and the result is wrong.
- "eager": work runs the moment it is launched. A slot rewritten before the layer that used
  it has released it corrupts that layer's result.
Tests run both, so a missing wait or an early reuse fails in CI, not only on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

CpuOrder = Literal["lazy", "eager"]


@dataclass
class CpuEvent:
    """A point in a CPU stand-in stream: everything launched on it up to `seq`."""

    stream: "CpuStream"
    seq: int


@dataclass
class CpuStream:
    name: str
    pending: list[tuple[int, Callable[[], None]]] = field(default_factory=list)
    launched: int = 0

    def run_until(self, seq: int) -> None:
        while self.pending and self.pending[0][0] <= seq:
            _, work = self.pending.pop(0)
            work()


class Streams:
    """The compute stream (the caller's current one) and three side streams for paging: host
    copies, decodes of the compressed tier, and decodes of host-compressed chunks as they land.
    The last two are apart so that a layer's landing slots free as each chunk lands: on one
    decode stream the chunks queued behind the layer's compressed decode, and the link idled
    (Qwen3-Next-80B on the H200: 218 ms a step where the link alone needs 154)."""

    def __init__(self, device: torch.device, cpu_order: CpuOrder = "lazy"):
        if cpu_order not in ("lazy", "eager"):
            raise ValueError(f"cpu_order: expected 'lazy' or 'eager', got {cpu_order!r}")
        self.device = device
        self.cuda = device.type == "cuda"
        self.cpu_order = cpu_order
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.copy = torch.cuda.Stream(device)
            self.decode = torch.cuda.Stream(device)
            self.landed_decode = torch.cuda.Stream(device)
        else:
            self.compute, self.copy = CpuStream("compute"), CpuStream("copy")
            self.decode, self.landed_decode = CpuStream("decode"), CpuStream("landed_decode")

    @property
    def sides(self) -> tuple:
        return self.copy, self.decode, self.landed_decode

    def follow_caller(self) -> None:
        """Take the caller's current stream (or a graph capture's) as the compute stream."""
        if self.cuda:
            self.compute = torch.cuda.current_stream(self.device)

    def launch(self, stream, work: Callable[[], None]):
        """Run `work` on `stream`; the event after it (CPU: when it runs depends on the order)."""
        if self.cuda:
            with torch.cuda.stream(stream):
                work()
            return self.record(stream)
        stream.launched += 1
        if self.cpu_order == "eager" or stream is self.compute:
            work()
        else:
            stream.pending.append((stream.launched, work))
        return CpuEvent(stream, stream.launched)

    def record(self, stream, timing: bool = False):
        """An event at the current end of `stream`."""
        if not self.cuda:
            return CpuEvent(stream, stream.launched)
        event = torch.cuda.Event(enable_timing=timing)
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        """Make `stream` wait for `event` on the device (no host sync); None waits for nothing."""
        if event is None:
            return
        if self.cuda:
            stream.wait_event(event)
        else:
            event.stream.run_until(event.seq)

    def drop_pending(self) -> None:
        """CPU: forget side-stream work that nobody waited for (its results were never read)."""
        if not self.cuda:
            for stream in self.sides:
                stream.pending.clear()
