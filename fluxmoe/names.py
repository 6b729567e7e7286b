"""The names users and files share: the tiers an expert can live in and the systems we compare.

String enums, so `Tier.HOST == "host"` and plans written as JSON keep plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class Tier(StrEnum):
    """Where one expert's weights live between uses."""

    RESIDENT = "resident"  # bf16 on the GPU, as vLLM holds it
    COMPRESSED = "compressed"  # FXMC on the GPU, decoded into a staging slot
    HOST = "host"  # bf16 in pinned host memory, copied over PCIe into a staging slot
    HOST_COMPRESSED = "host-compressed"  # FXMC in pinned host memory: ~0.68 of the link bytes, then a decode


class System(StrEnum):
    """A serving system in a comparison."""

    FLUXMOE = "fluxmoe"
    VLLM = "vllm"  # plain vLLM, every weight resident
    VLLM_OFFLOAD = "vllm_offload"  # vLLM with cpu_offload_gb (UVA reads over PCIe)
    VLLM_PREFETCH = "vllm_prefetch"  # vLLM's prefetch offloader (whole layers copied ahead)

    @property
    def label(self) -> str:
        return {"fluxmoe": "FluxMoE", "vllm": "vLLM", "vllm_offload": "vLLM + CPU offload",
                "vllm_prefetch": "vLLM + prefetch offload"}[self.value]


def tier_among(expert: int, groups: tuple[tuple[Tier, list[int]], ...], otherwise: Tier) -> Tier:
    """The tier whose id list holds `expert`, else `otherwise` (the one tier not listed)."""
    return next((tier for tier, ids in groups if expert in ids), otherwise)


def parse_tier(value: str, field: str = "tier") -> Tier:
    from fluxmoe.errors import ConfigError

    try:
        return Tier(value)
    except ValueError:
        raise ConfigError(f"{field}: expected one of {', '.join(t.value for t in Tier)}, got {value!r}") from None
