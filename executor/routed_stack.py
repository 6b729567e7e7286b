"""A stack of MoE layers whose experts all live on the host, to measure routed-only fetch
against fetching whole layers (bench/routed_fetch.py), on the GPU and, for tests, the CPU.

Each layer stages its experts into one of two buffers of E slots (layer l uses buffer l % 2,
slot e holds expert e), one of three ways per step:
- "whole": all of layer l+1's experts copied (copy engine, one copy) while layer l runs: what
  the host tier does today;
- "routed": after layer l's router, only the experts its tokens picked, on the compute stream;
- "predicted": "routed", plus a guess at layer l+1's experts fetched on a side stream while
  layer l runs: layer l+1's router applied to layer l's input (the residual stream changes
  little from one layer to the next), so only the guess's misses wait for the link.
The experts run on the tokens' picks only (gathered per token), so a step reads from the
buffer exactly the experts the routing needs, and every mode gives the same bits.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from executor.routed_fetch import RoutedFetch, routed_experts, total_counters
from executor.streams import CpuOrder, Streams
from fluxmoe.errors import ConfigError

FetchMode = Literal["whole", "routed", "predicted"]
MODES = ("whole", "routed", "predicted")


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids [T, k] and their normalized gates [T, k] (x's dtype)."""
    probs = F.softmax((x @ router.T).float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return ids, (weights / weights.sum(-1, keepdim=True)).to(x.dtype)


def routed_moe(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor) -> torch.Tensor:
    """x + the picked experts' outputs: w13 [E, 2i, h], w2 [E, h, i] read only at `ids` [T, k]."""
    T, k = ids.shape
    i = w2.shape[2]
    flat = ids.reshape(-1)
    xs = x.repeat_interleave(k, dim=0).unsqueeze(1)  # [T*k, 1, h]
    gate_up = torch.bmm(xs, w13.index_select(0, flat).transpose(1, 2))  # [T*k, 1, 2i]
    act = F.silu(gate_up[..., :i]) * gate_up[..., i:]
    y = torch.bmm(act, w2.index_select(0, flat).transpose(1, 2)).view(T, k, -1)  # [T, k, h]
    return x + (y * gates.unsqueeze(-1)).sum(1)


def fused_step(pager, x: torch.Tensor, route_layer) -> torch.Tensor:
    """One step over an `ExpertPager` as the vLLM plugin runs it: per layer, `route_layer(l, x)`
    gives (the layer's input, top-k ids, gates); the picks are counted, the routed host experts
    fetched, and the layer's arena span read through the device-side expert -> row map (a CUDA
    graph captures the map's address, not its contents, so swaps between replays are seen)."""
    for layer in range(len(pager.layers)):
        weights = pager.before_layer(layer)
        x, ids, gates = route_layer(layer, x)
        pager.count_routes(layer, ids)
        pager.fetch_routed(layer, ids)
        x = routed_moe(x, weights.fused.row_of[ids], gates, weights.fused.w13, weights.fused.w2)
        pager.after_layer(layer)
    pager.end_step()
    return x


def routed_reference(x: torch.Tensor, routers, stacks, top_k: int) -> torch.Tensor:
    """The stack with every expert resident."""
    for router, (w13, w2) in zip(routers, stacks):
        ids, gates = route(x, router, top_k)
        x = routed_moe(x, ids, gates, w13, w2)
    return x


class RoutedMoEStack:
    def __init__(self, routers: list[torch.Tensor], stacks: list[tuple[torch.Tensor, torch.Tensor]], top_k: int,
                 device: torch.device | str, mode: FetchMode, cpu_order: CpuOrder = "lazy"):
        """stacks[l] = (w13 [E, 2I, H], w2 [E, H, I]), copied to pinned host memory here."""
        self.device, self.top_k = torch.device(device), top_k
        self.mode = mode
        self.routers = [r.to(self.device) for r in routers]
        w13, w2 = stacks[0]
        E, self.w13_shape, self.w2_shape = len(w13), tuple(w13.shape[1:]), tuple(w2.shape[1:])
        self.num_experts = E
        pin = self.device.type == "cuda"
        self.host = []
        for a, b in stacks:
            rows = torch.cat([a.reshape(E, -1), b.reshape(E, -1)], dim=1).cpu()
            self.host.append(rows.pin_memory() if pin else rows)
        numel = self.host[0].shape[1]
        self.buffers = [torch.zeros(E, numel, dtype=w13.dtype, device=self.device) for _ in range(2)]
        self.fetchers = [RoutedFetch(h, list(range(E)), self.buffers[l % 2], E) for l, h in enumerate(self.host)]
        self.streams = Streams(self.device, cpu_order)

    @property
    def mode(self) -> FetchMode:
        return self._mode

    @mode.setter
    def mode(self, mode: FetchMode) -> None:
        """May change between steps (a benchmark compares modes on one set of pinned stacks)."""
        if mode not in MODES:
            raise ConfigError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        self._mode = mode

    def _views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self.buffers[layer % 2]
        (two_i, h), (_, i) = self.w13_shape, self.w2_shape
        w13 = buf.as_strided((len(buf), two_i, h), (buf.stride(0), h, 1))
        w2 = buf.as_strided((len(buf), h, i), (buf.stride(0), i, 1), storage_offset=buf.storage_offset() + two_i * h)
        return w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, L = self.streams, len(self.routers)
        s.follow_caller()
        for f in self.fetchers:
            f.begin_step()
        start = s.record(s.compute)
        released = [start, start]  # per buffer: the compute point after which it may be rewritten
        ready = [None] * L  # per layer: its side-stream fetch is done
        if self.mode == "whole":
            ready[0] = self._copy_whole(0, start)
        for layer, router in enumerate(self.routers):
            s.wait(s.compute, ready[layer])
            ids, gates = route(x, router, self.top_k)
            if self.mode != "whole":
                self.fetchers[layer].fetch_routed(routed_experts(ids, self.num_experts))
            if layer + 1 < L and self.mode == "whole":
                ready[layer + 1] = self._copy_whole(layer + 1, released[(layer + 1) % 2])
            elif layer + 1 < L and self.mode == "predicted":
                guess, _ = route(x, self.routers[layer + 1], self.top_k)
                ready[layer + 1] = self._fetch_guess(layer + 1, routed_experts(guess, self.num_experts),
                                                     released[(layer + 1) % 2])
            x = routed_moe(x, ids, gates, *self._views(layer))
            released[layer % 2] = s.record(s.compute)
        s.drop_pending()
        return x

    def _copy_whole(self, layer: int, after) -> object:
        """Every expert of `layer` into its buffer on the copy stream, once `after` has passed."""
        s, f = self.streams, self.fetchers[layer]
        s.wait(s.copy, after)

        def copy():
            f.slots.copy_(f.host, non_blocking=True)
            f.moved += len(f.host)

        return s.launch(s.copy, copy)

    def _fetch_guess(self, layer: int, guess: torch.Tensor, after) -> object:
        """The guessed experts of `layer` on the copy stream, once `after` (the buffer's release)
        and the guess itself (computed on the compute stream) are done."""
        s = self.streams
        s.wait(s.copy, after)
        s.wait(s.copy, s.record(s.compute))
        return s.launch(s.copy, lambda: self.fetchers[layer].fetch(guess))

    def counters(self) -> dict[str, int]:
        """Experts moved, routed and already present when routed, summed over layers (a host sync)."""
        return total_counters(self.fetchers)
