"""Per-expert pick counts, counted on the GPU from the router's top-k ids.

One `[layers, experts]` int64 tensor on the device, added to after each router with a scatter
(no host sync, CUDA-graph capturable: the ids' shape is fixed within a captured graph, and so
is the token count added beside them). `read()` copies the counts to pinned host memory
without waiting and returns the copy made at the previous read, so a poll between steps never
stalls the GPU. Under vLLM, padded batches route their padding tokens too: the counts cover
what the experts computed, padding included.
"""

from __future__ import annotations

import torch


class RouteCounter:
    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str):
        self.device = torch.device(device)
        with torch.inference_mode(False):  # made inside vLLM's inference mode, updated in and out of it
            # One spare column: picks of other ranks' experts land there and are never read.
            self.counts = torch.zeros(num_layers, num_experts + 1, dtype=torch.int64, device=self.device)
            self.tokens = torch.zeros(num_layers, dtype=torch.int64, device=self.device)
        self._host: tuple[torch.Tensor, torch.Tensor] | None = None
        self._copied = None  # event after the last copy to the host
        self._last = ([[0] * num_experts for _ in range(num_layers)], [0] * num_layers)

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count layer `layer`'s picks ([tokens, k] expert ids, any integer dtype; `num_experts`
        for another rank's expert)."""
        flat = topk_ids.reshape(-1).long()
        self.counts[layer].scatter_add_(0, flat, torch.ones_like(flat))
        self.tokens[layer] += topk_ids.shape[0]

    def read(self) -> tuple[list[list[int]], list[int]]:
        """(counts per layer and expert, tokens per layer) as of the previous read's copy (on the
        CPU: now). Never waits for the GPU."""
        if self.device.type != "cuda":
            return self.read_now()
        if self._copied is not None and self._copied.query():
            self._last = _listed(*self._host)
        if self._copied is None or self._copied.query():
            if self._host is None:
                with torch.inference_mode(False):
                    self._host = (torch.zeros_like(self.counts, device="cpu").pin_memory(),
                                  torch.zeros_like(self.tokens, device="cpu").pin_memory())
            self._host[0].copy_(self.counts, non_blocking=True)
            self._host[1].copy_(self.tokens, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return self._last

    def carry_over(self, old: "RouteCounter") -> None:
        """Continue `old`'s counts (a rebuilt pager): on the device, and the host copy that the
        next `read()` returns, so reads never go backwards across a rebuild."""
        self.counts.copy_(old.counts)
        self.tokens.copy_(old.tokens)
        self._last = old._last
        if old._copied is not None:  # a rebuild waits for the GPU anyway: take the copy in flight
            old._copied.synchronize()
            self._last = _listed(*old._host)

    def read_now(self) -> tuple[list[list[int]], list[int]]:
        """The counts as of now (a host sync: for harnesses and tests)."""
        return _listed(self.counts, self.tokens)


def _listed(counts: torch.Tensor, tokens: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    return counts[:, :-1].tolist(), tokens.tolist()  # without the spare column
