"""Where one MoE layer's experts live, in the stacked layout vLLM's fused-MoE kernels read.

vLLM keeps a layer's experts as `w13_weight[E, 2I/tp, H]` (gate and up projections fused) and
`w2_weight[E, H, I/tp]`. `LayerTiers` keeps the same two stacks per tier:
- resident: bf16 stacks on the GPU, never moved;
- host: pinned host stacks, copied over PCIe into the layer's staging slots (one copy per
  matrix for the whole layer);
- compressed: FXMC-encoded stacks on the GPU (chunks of at most `CODEC_CHUNK_NUMEL` elements,
  so kernel offsets stay in int32), decoded into the staging slots;
- host-compressed: FXMC-encoded chunks (about `HOST_CHUNK_BYTES` of bf16 each) in pinned host
  memory, copied over PCIe into a landing slot (executor/landing.py) and decoded from there
  into the staging slots: about 0.68 of the host tier's link bytes.
Staged experts take slots in the order host, host-compressed, compressed, so each tier lands
in one contiguous run of slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fluxmoe.errors import ConfigError
from fluxmoe.names import Tier, parse_tier, tier_among
from planner.cost_model import HOST_CHUNK_BYTES  # bf16 bytes per host-compressed chunk

CODEC_CHUNK_NUMEL = 1 << 30
# Encoding on the GPU needs about 16 bytes of temporaries per element (codes, bit planes): chunks
# of 2^26 elements keep that near 1 GiB. With 2^30 the load of Qwen3-Next-80B at 0.9 of the H200
# ran out of memory (8 GiB asked, 7.6 GiB free, with the model's tiers already in place).
ENCODE_CHUNK_NUMEL = 1 << 26


@dataclass(frozen=True)
class ExpertLayout:
    """The per-expert shapes of one rank's shard: w13 [2I/tp, H], w2 [H, I/tp]."""

    hidden: int
    intermediate: int
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1 or self.intermediate % self.tensor_parallel:
            raise ConfigError(f"tensor_parallel: must divide the expert intermediate size {self.intermediate}, "
                              f"got {self.tensor_parallel!r}")

    @property
    def shard(self) -> int:
        return self.intermediate // self.tensor_parallel

    @property
    def w13_shape(self) -> tuple[int, int]:
        return 2 * self.shard, self.hidden

    @property
    def w2_shape(self) -> tuple[int, int]:
        return self.hidden, self.shard

    @property
    def expert_numel(self) -> int:
        return 3 * self.shard * self.hidden

    def check(self, w13: torch.Tensor, w2: torch.Tensor, what: str) -> None:
        if tuple(w13.shape[1:]) != self.w13_shape or tuple(w2.shape[1:]) != self.w2_shape or len(w13) != len(w2):
            raise ConfigError(f"{what}: expected w13 [E, {self.w13_shape[0]}, {self.w13_shape[1]}] and w2 "
                              f"[E, {self.w2_shape[0]}, {self.w2_shape[1]}], got {tuple(w13.shape)} and "
                              f"{tuple(w2.shape)}")
        if w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
            raise ConfigError(f"{what}: expert weights must be bf16, got {w13.dtype} and {w2.dtype}")


def _encoded_chunks(stack: torch.Tensor, device: torch.device, max_numel: int):
    """(first expert, experts, encoded) for runs of whole experts of at most `max_numel`
    elements (at least one expert), encoded where `device` is."""
    from executor.codec import encode

    per_expert = stack[0].numel() if len(stack) else 1
    step = max(1, max_numel // per_expert)
    for first in range(0, len(stack), step):
        part = stack[first:first + step]
        yield first, len(part), encode(part.to(device))


class _CompressedStack:
    """One stacked matrix of a layer's compressed experts, FXMC-encoded in chunks of experts."""

    def __init__(self, stack: torch.Tensor, device: torch.device):
        self.chunks = []  # (first expert, experts, encoded, GPU decoder or None)
        for first, n, encoded in _encoded_chunks(stack, device, ENCODE_CHUNK_NUMEL):
            decoder = None
            if device.type == "cuda":
                from executor.codec.triton_decode import DeviceDecoder

                decoder = DeviceDecoder(encoded)  # lookup tables built once, not per call
            self.chunks.append((first, n, encoded, decoder))

    @property
    def nbytes(self) -> int:
        return sum(enc.nbytes for _, _, enc, _ in self.chunks)

    def decode_into(self, out: torch.Tensor, stream) -> None:
        """Decode every chunk into `out` (the staging slots of these experts, contiguous)."""
        for first, n, encoded, decoder in self.chunks:
            target = out[first:first + n]
            if decoder is None:  # CPU: the reference decoder
                from executor.codec import decode

                target.copy_(decode(encoded))
            else:
                decoder.decode_into(target, stream)


@dataclass
class HostChunk:
    """Experts first..first+n of one stacked matrix of the host-compressed tier, encoded, with
    the payload pinned on the host; `decoders` per landing slot (GPU only, built by the pager)."""

    first: int
    n: int
    encoded: "EncodedTensor"  # noqa: F821 (executor.codec)
    landed: dict = field(default_factory=dict)  # per landing slot: the encoded header over that slot's bytes
    decoders: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.encoded.header.payload_bytes


def encode_host_chunks(stack: torch.Tensor, device: torch.device) -> list[HostChunk]:
    """Encode a stack of experts in chunks where `device` is (the GPU encodes ~10 GB/s), and
    keep each payload in pinned host memory (plain host memory without CUDA)."""
    from executor.codec import EncodedTensor

    chunks = []
    for first, n, encoded in _encoded_chunks(stack, device, min(HOST_CHUNK_BYTES // 2, CODEC_CHUNK_NUMEL)):
        payload = torch.empty(encoded.payload.shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
        payload.copy_(encoded.payload)
        chunks.append(HostChunk(first, n, EncodedTensor(encoded.header, payload)))
    return chunks


class LayerTiers:
    """One MoE layer's experts split into the four tiers as a plan says."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, tiers: list[Tier | str], layout: ExpertLayout,
                 device: torch.device, what: str = "layer",
                 resident_into: tuple[torch.Tensor, torch.Tensor] | None = None):
        """w13/w2: the layer's full stacks, on any device (only views or copies are kept).
        resident_into: rows to put the resident experts in (an arena's), instead of new stacks."""
        layout.check(w13, w2, what)
        if len(tiers) != len(w13):
            raise ConfigError(f"{what}: {len(w13)} experts but {len(tiers)} tiers")
        self._sort_ids([parse_tier(t, f"{what} tier") for t in tiers], layout)
        pin = device.type == "cuda"

        def take(ids: list[int], into: tuple[torch.Tensor, torch.Tensor] | None = None,
                 where: torch.device = device, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.tensor(ids, dtype=torch.long, device=w13.device)
            if into is None:
                into = tuple(torch.empty((len(ids), *t.shape[1:]), dtype=t.dtype, device=where,
                                         pin_memory=pin_memory) for t in (w13, w2))
            if len(into[0]) != len(ids):
                raise ConfigError(f"{what}: {len(into[0])} rows given for {len(ids)} resident experts")
            for dst, src in zip(into, (w13, w2)):
                dst.copy_(src.index_select(0, index))
            return into

        resident = take(self.resident_ids, resident_into)
        host = take(self.host_ids, where=torch.device("cpu"), pin_memory=pin and bool(self.host_ids))
        compressed = take(self.compressed_ids, where=w13.device) if self.compressed_ids else None
        host_compressed = take(self.host_compressed_ids, where=w13.device) if self.host_compressed_ids else None
        self._adopt(resident, host, compressed, device, host_compressed)

    def _sort_ids(self, tiers: list[Tier], layout: ExpertLayout) -> None:
        self.layout, self.num_experts = layout, len(tiers)
        self.resident_ids = [e for e, t in enumerate(tiers) if t is Tier.RESIDENT]
        self.host_ids = [e for e, t in enumerate(tiers) if t is Tier.HOST]
        self.host_compressed_ids = [e for e, t in enumerate(tiers) if t is Tier.HOST_COMPRESSED]
        self.compressed_ids = [e for e, t in enumerate(tiers) if t is Tier.COMPRESSED]

    def _adopt(self, resident, host, compressed, device: torch.device, host_compressed=None) -> None:
        self.resident, self.host, self.device = resident, host, device
        start = time.perf_counter()
        self.compressed = tuple(_CompressedStack(t, device) for t in compressed) if compressed else None
        # (w13 chunks, w2 chunks) of the host-compressed experts
        self.host_compressed = (tuple(encode_host_chunks(t, device) for t in host_compressed)
                                if host_compressed else None)
        encoded = compressed or host_compressed
        if encoded and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.encode_seconds = time.perf_counter() - start if encoded else 0.0  # load time, reported

    @classmethod
    def from_parts(cls, tiers: list[Tier], layout: ExpertLayout, device: torch.device,
                   resident: tuple[torch.Tensor, torch.Tensor], host: tuple[torch.Tensor, torch.Tensor],
                   compressed: tuple[torch.Tensor, torch.Tensor] | None,
                   host_compressed: tuple[torch.Tensor, torch.Tensor] | None = None) -> "LayerTiers":
        """A layer whose experts were loaded straight into their tiers (rows in expert id order):
        resident on the GPU, host pinned; compressed and host-compressed as bf16 anywhere,
        encoded here."""
        self = cls.__new__(cls)
        self._sort_ids(tiers, layout)
        for ids, part, name in ((self.resident_ids, resident, "resident"), (self.host_ids, host, "host"),
                                (self.compressed_ids, compressed, "compressed"),
                                (self.host_compressed_ids, host_compressed, "host-compressed")):
            if ids and (part is None or len(part[0]) != len(ids)):
                raise ConfigError(f"{name} experts: {len(ids)} expected")
        self._adopt(resident, host, compressed if self.compressed_ids else None, device,
                    host_compressed if self.host_compressed_ids else None)
        return self

    @property
    def staged_ids(self) -> list[int]:
        """Experts that need a staging slot, in slot order (host, host-compressed, compressed)."""
        return self.host_ids + self.host_compressed_ids + self.compressed_ids

    def tier_of(self, expert: int) -> Tier:
        return tier_among(expert, ((Tier.RESIDENT, self.resident_ids), (Tier.HOST, self.host_ids),
                                   (Tier.HOST_COMPRESSED, self.host_compressed_ids)), Tier.COMPRESSED)

    @property
    def gpu_bytes(self) -> dict[Tier, int]:
        return {Tier.RESIDENT: sum(t.numel() * 2 for t in self.resident),
                Tier.COMPRESSED: sum(c.nbytes for c in self.compressed) if self.compressed else 0}

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * 2 for t in self.host) + self.host_compressed_bytes

    @property
    def host_compressed_bytes(self) -> int:
        """Encoded bytes of the host-compressed tier: what crosses the link for it each step."""
        return sum(c.nbytes for stack in self.host_compressed or () for c in stack)

    def host_compressed_chunks(self, w13: torch.Tensor, w2: torch.Tensor):
        """(chunk, its staging slots) for every host-compressed chunk, w13's then w2's, in the
        slots after the host ones."""
        start = len(self.host_ids)
        for stack, out in zip(self.host_compressed or (), (w13, w2)):
            for chunk in stack:
                yield chunk, out[start + chunk.first:start + chunk.first + chunk.n]

    def full_stacks(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert of the layer, bf16, in id order, on `device` (a re-plan rebuilds tiers
        from these): resident and host rows copied, compressed and host-compressed ones decoded."""
        from executor.codec import decode

        out = tuple(torch.empty((self.num_experts, *shape), dtype=torch.bfloat16, device=device)
                    for shape in (self.layout.w13_shape, self.layout.w2_shape))
        for ids, stacks in ((self.resident_ids, self.resident), (self.host_ids, self.host)):
            if ids:
                index = torch.tensor(ids, dtype=torch.long, device=device)
                for dst, src in zip(out, stacks):
                    dst.index_copy_(0, index, src.to(device))
        for ids, parts in ((self.compressed_ids, self.compressed), (self.host_compressed_ids, self.host_compressed)):
            if not ids:
                continue
            index = torch.tensor(ids, dtype=torch.long, device=device)
            for dst, part in zip(out, parts):
                chunks = part.chunks if isinstance(part, _CompressedStack) else part
                # decoded where the layer runs (host-compressed chunks too: the CPU decoder is a slow reference)
                rows = torch.cat([decode((c[2] if isinstance(c, tuple) else c.encoded).to(self.device)).to(device)
                                  for c in chunks])
                dst.index_copy_(0, index, rows)
        return out

    def copy_host_into(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Host experts into the first slots of a buffer (run on the copy stream)."""
        n = len(self.host_ids)
        w13[:n].copy_(self.host[0], non_blocking=True)
        w2[:n].copy_(self.host[1], non_blocking=True)

    def decode_compressed_into(self, w13: torch.Tensor, w2: torch.Tensor, stream) -> None:
        """Compressed experts into the slots after the host ones (run on the decode stream)."""
        start, n = len(self.host_ids) + len(self.host_compressed_ids), len(self.compressed_ids)
        self.compressed[0].decode_into(w13[start:start + n], stream)
        self.compressed[1].decode_into(w2[start:start + n], stream)
