"""Triton decoder for FXMC streams: writes bf16 into a caller-given buffer on a caller's stream.

One program per format block (4096 elements): load the sign+mantissa bytes and primary codes,
rank the escapes with an in-block prefix sum from the block's stored offset, fetch their
secondary codes (and raw exponents, a second prefix sum), look exponents up in the two
tables and write the 16-bit patterns. Every gather is masked against the header's counts, so
even a corrupted payload that slipped past validation cannot read out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from executor.codec.format import CodecError, EncodedTensor


@triton.jit
def _fxmc_decode(payload_ptr, offsets_ptr, tables_ptr, out_ptr,
                 signmant_at, primary_at, secondary_at, raw_at,
                 numel, n_secondary, n_raw,
                 K1: tl.constexpr, K2: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] element index
    live = offs < numel
    signmant = tl.load(payload_ptr + signmant_at + offs, mask=live, other=0).to(tl.int32)

    # Code i of width K sits at bit i*K of its section: read the 16-bit window there.
    ESC1: tl.constexpr = (1 << K1) - 1
    bit1 = offs * K1
    lo1 = tl.load(payload_ptr + primary_at + (bit1 >> 3), mask=live, other=0).to(tl.int32)
    hi1 = tl.load(payload_ptr + primary_at + (bit1 >> 3) + 1, mask=live, other=0).to(tl.int32)
    code1 = ((lo1 | (hi1 << 8)) >> (bit1 & 7).to(tl.int32)) & ESC1
    esc1 = live & (code1 == ESC1)
    exp1 = tl.load(tables_ptr + code1)  # table1 padded to 2^K1 entries

    # Escapes of this block, ranked: the block's offset plus an exclusive prefix sum.
    ESC2: tl.constexpr = (1 << K2) - 1
    pos1 = tl.load(offsets_ptr + 2 * pid) + tl.cumsum(esc1.to(tl.int32), axis=0) - 1
    ok1 = esc1 & (pos1 < n_secondary)
    bit2 = pos1.to(tl.int64) * K2
    lo2 = tl.load(payload_ptr + secondary_at + (bit2 >> 3), mask=ok1, other=0).to(tl.int32)
    hi2 = tl.load(payload_ptr + secondary_at + (bit2 >> 3) + 1, mask=ok1, other=0).to(tl.int32)
    code2 = ((lo2 | (hi2 << 8)) >> (bit2 & 7).to(tl.int32)) & ESC2
    exp2 = tl.load(tables_ptr + 16 + code2, mask=ok1, other=0)  # table2 padded to 2^K2 entries
    esc2 = ok1 & (code2 == ESC2)
    pos2 = tl.load(offsets_ptr + 2 * pid + 1) + tl.cumsum(esc2.to(tl.int32), axis=0) - 1
    raw = tl.load(payload_ptr + raw_at + pos2, mask=esc2 & (pos2 < n_raw), other=0).to(tl.int32)

    exponent = tl.where(esc1, tl.where(esc2, raw, exp2), exp1)
    bits = ((signmant & 0x80) << 8) | (exponent << 7) | (signmant & 0x7F)
    tl.store(out_ptr + offs, bits.to(tl.int16), mask=live)


class DeviceDecoder:
    """An encoded tensor made ready for repeated GPU decodes: everything allocated up front."""

    def __init__(self, enc: EncodedTensor, device: torch.device | str = "cuda"):
        self.enc = enc if enc.payload.device.type == "cuda" else enc.to(device)
        h = self.enc.header
        tables = torch.zeros(32, dtype=torch.int32)
        tables[:len(h.table1)] = torch.tensor(h.table1, dtype=torch.int32)
        tables[16:16 + len(h.table2)] = torch.tensor(h.table2, dtype=torch.int32)
        self.tables = tables.to(self.enc.payload.device)
        sizes = h.section_sizes()
        names = list(sizes)
        starts = {name: sum(sizes[n] for n in names[:i]) for i, name in enumerate(names)}
        self.starts = starts
        self.offsets = self.enc.payload[:sizes["block_offsets"]].view(torch.int32) if h.num_blocks else self.tables

    def decode_into(self, out: torch.Tensor, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Decode into `out` (bf16, contiguous, on this GPU, numel as encoded); returns `out`."""
        h = self.enc.header
        if out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() != h.numel:
            raise CodecError(f"output must be a contiguous bf16 tensor of {h.numel} elements, got "
                             f"{out.dtype} {tuple(out.shape)}")
        if out.device != self.enc.payload.device:
            raise CodecError(f"output is on {out.device}, the stream on {self.enc.payload.device}")
        if h.numel == 0:
            return out
        s = self.starts
        with torch.cuda.stream(stream or torch.cuda.current_stream(out.device)):
            _fxmc_decode[(h.num_blocks,)](
                self.enc.payload, self.offsets, self.tables, out.view(torch.int16),
                s["signmant"], s["primary"], s["secondary"], s["raw"], h.numel, h.n_secondary, h.n_raw,
                K1=h.k1, K2=h.k2, BLOCK=h.block, num_warps=8)
        return out


def decode_into(enc: EncodedTensor | DeviceDecoder, out: torch.Tensor,
                stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Decode `enc` into the preallocated bf16 `out` on `stream` (prepare a DeviceDecoder once
    to keep the hot path free of allocations)."""
    decoder = enc if isinstance(enc, DeviceDecoder) else DeviceDecoder(enc, out.device)
    return decoder.decode_into(out, stream)
