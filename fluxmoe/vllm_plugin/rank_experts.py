"""Which of a layer's experts this rank holds under vLLM's expert parallelism, and how the
router's global expert ids reach this rank's paged experts.

vLLM gives each MoE layer an `expert_map`: global expert id -> this rank's local id, -1 for an
expert held by another rank (any placement: "linear" blocks or "round_robin"). A plan under
expert parallel is one rank's shard, its experts in local id order. The paged layer keeps
vLLM's kernel call as plain expert parallel makes it (global ids, aligned over every expert,
other ranks' blocks skipped) and only swaps vLLM's map for one that sends each local expert to
its arena row: the same tokens meet the same weights, so outputs stay bit-exact.

Free of vLLM imports, so CI tests it on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fluxmoe.errors import ConfigError


@dataclass(frozen=True)
class RankExperts:
    """One rank's experts of a layer: `local_of[g]` is global expert g's local id, or
    `num_local` (the "elsewhere" id, which route counts and routed fetches skip) for an expert
    on another rank."""

    local_of: torch.Tensor  # [global experts] int64, on the device the router's ids are on
    global_of: tuple[int, ...]  # [local experts]: the global id of each local expert

    @classmethod
    def from_expert_map(cls, expert_map: torch.Tensor, device: torch.device | str | None = None) -> "RankExperts":
        """From vLLM's map (global -> local, -1 elsewhere), checked to be a one-to-one cover of 0..n-1."""
        mapping = [int(v) for v in expert_map.tolist()]
        local = sorted(v for v in mapping if v >= 0)
        if not local or local != list(range(len(local))) or any(v < -1 for v in mapping):
            raise ConfigError(f"expert_map: expected each of local experts 0..n-1 exactly once and -1 elsewhere, "
                              f"got {mapping}")
        n = len(local)
        global_of = [0] * n
        for g, v in enumerate(mapping):
            if v >= 0:
                global_of[v] = g
        local_of = torch.tensor([v if v >= 0 else n for v in mapping], dtype=torch.int64,
                                device=device if device is not None else expert_map.device)
        return cls(local_of, tuple(global_of))

    @property
    def num_local(self) -> int:
        return len(self.global_of)

    @property
    def num_global(self) -> int:
        return int(self.local_of.shape[0])

    def local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """The router's [tokens, k] global ids as local ids, `num_local` where another rank holds the expert."""
        return self.local_of[topk_ids.long()]

    def kernel_map(self, row_of: torch.Tensor) -> torch.Tensor:
        """vLLM's `expert_map` argument for one call over an arena span: global id -> the row of
        the local expert in the span (`row_of`, [local experts] int32), -1 for other ranks'.
        On the device, so CUDA graphs see rows that swaps change in place."""
        elsewhere = torch.full((1,), -1, dtype=row_of.dtype, device=row_of.device)
        return torch.cat((row_of, elsewhere))[self.local_of]

    def check_count(self, local_experts: int, where: str) -> None:
        if local_experts != self.num_local:
            raise ConfigError(f"{where}: the plan's shard has {local_experts} experts per layer; vLLM gives this "
                              f"rank {self.num_local} of {self.num_global} (placement or expert count differs)")
