"""Triton decoder for FXMC streams: writes bf16 into a caller-given buffer on a caller's stream.

One program per format block, viewed as rows of 32 elements ([block / 32, 32]):
- sign+mantissa bytes: one vector load (sections are 16-byte aligned);
- primary codes: k1 bit-plane words per row, expanded by shifts; a row's escapes are the AND
  of its plane words, and an escape's rank is the block's stored offset, plus the escapes
  of earlier rows (a scan over block/32 counts), plus a popcount of the bits below it;
- escaped elements gather their secondary code (a 16-bit window) and look it up;
- only blocks that hold raw exponents (their offsets differ from the next block's) rank and
  gather those.
Every gather is also masked against the header's counts, so even a corrupted payload that
slipped past validation cannot read out of bounds.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from executor.codec.format import CodecError, EncodedTensor

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: no libdevice


@triton.jit
def _popc(x, HW_POPC: tl.constexpr):
    """Set bits of each int32: the POPC instruction on a GPU, SWAR arithmetic in the interpreter."""
    if HW_POPC:
        return libdevice.popc(x)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24) & 0xFF


@triton.jit
def _rank_in_block(word, below, HW_POPC: tl.constexpr):
    """Per element of a [rows, 32] block: how many set bits of its row's word come before it,
    plus all set bits of earlier rows. word: [rows] escape bits, below: [32] masks."""
    count = _popc(word, HW_POPC)  # [rows]
    before_row = tl.cumsum(count, axis=0) - count  # [rows]
    return before_row[:, None] + _popc(word[:, None] & below[None, :], HW_POPC)  # [rows, 32]


@triton.jit
def _fxmc_decode(payload_ptr, words_ptr, tables_ptr, out_ptr,
                 signmant_at, primary_word_at, secondary_at, raw_at,
                 numel, n_secondary, n_raw,
                 K1: tl.constexpr, K2: tl.constexpr, BLOCK: tl.constexpr, HW_POPC: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, 32)
    idx = pid.to(tl.int64) * BLOCK + rows[:, None] * 32 + cols[None, :]  # [ROWS, 32] element index
    live = idx < numel
    signmant = tl.load(payload_ptr + signmant_at + idx, mask=live, other=0).to(tl.int32)

    # Primary codes from bit planes; escapes (all-ones codes) are the AND of the planes.
    code = tl.zeros([ROWS, 32], dtype=tl.int32)
    escape_word = tl.full([ROWS], -1, dtype=tl.int32)
    for p in tl.static_range(K1):
        plane = tl.load(words_ptr + primary_word_at + (pid * K1 + p) * ROWS + rows)  # [ROWS]
        code |= ((plane[:, None] >> cols[None, :]) & 1) << p
        escape_word &= plane
    N1: tl.constexpr = (1 << K1) - 1
    if N1 <= 3:  # a short select chain beats a gather
        exponent = tl.zeros([ROWS, 32], dtype=tl.int32) + tl.load(tables_ptr)
        for i in tl.static_range(1, N1):
            exponent = tl.where(code == i, tl.load(tables_ptr + i), exponent)
    else:
        exponent = tl.load(tables_ptr + code)
    below = ((1 << cols.to(tl.uint32)) - 1).to(tl.int32)  # [32] bits below each column
    esc1 = (((escape_word[:, None] >> cols[None, :]) & 1) != 0) & live

    # Secondary codes of escaped elements, found by rank.
    ESC2: tl.constexpr = (1 << K2) - 1
    pos1 = tl.load(words_ptr + 2 * pid) + _rank_in_block(escape_word, below, HW_POPC)
    ok1 = esc1 & (pos1 < n_secondary)
    bit2 = pos1.to(tl.int64) * K2
    lo2 = tl.load(payload_ptr + secondary_at + (bit2 >> 3), mask=ok1, other=0).to(tl.int32)
    hi2 = tl.load(payload_ptr + secondary_at + (bit2 >> 3) + 1, mask=ok1, other=0).to(tl.int32)
    code2 = ((lo2 | (hi2 << 8)) >> (bit2 & 7).to(tl.int32)) & ESC2
    second = tl.load(tables_ptr + 16 + code2, mask=ok1, other=0)

    raw_first = tl.load(words_ptr + 2 * pid + 1)
    if tl.load(words_ptr + 2 * pid + 3) > raw_first:  # this block holds raw exponents (rare)
        esc2 = ok1 & (code2 == ESC2)
        raw_word = tl.sum(esc2.to(tl.int32) << cols[None, :], axis=1)  # [ROWS] distinct bits: sum == or
        pos2 = raw_first + _rank_in_block(raw_word, below, HW_POPC)
        raw = tl.load(payload_ptr + raw_at + pos2, mask=esc2 & (pos2 < n_raw), other=0).to(tl.int32)
        second = tl.where(esc2, raw, second)

    exponent = tl.where(esc1, second, exponent)
    bits = ((signmant & 0x80) << 8) | (exponent << 7) | (signmant & 0x7F)
    tl.store(out_ptr + idx, bits.to(tl.int16), mask=live)


@contextlib.contextmanager
def _nothing():
    yield


class DeviceDecoder:
    """An encoded tensor made ready for repeated GPU decodes: everything allocated up front."""

    def __init__(self, enc: EncodedTensor, device: torch.device | str = "cuda"):
        self.enc = enc if enc.payload.device.type == "cuda" or INTERPRETED else enc.to(device)
        h = self.enc.header
        tables = torch.zeros(32, dtype=torch.int32)
        tables[:len(h.table1)] = torch.tensor(h.table1, dtype=torch.int32)
        tables[16:16 + len(h.table2)] = torch.tensor(h.table2, dtype=torch.int32)
        self.tables = tables.to(self.enc.payload.device)
        self.starts = h.section_starts()
        self.words = self.enc.payload.view(torch.int32)  # payload length is a multiple of 16

    def decode_into(self, out: torch.Tensor, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Decode into `out` (bf16, contiguous, on this GPU, numel as encoded); returns `out`."""
        h = self.enc.header
        if out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() != h.numel:
            raise CodecError(f"output must be a contiguous bf16 tensor of {h.numel} elements, got "
                             f"{out.dtype} {tuple(out.shape)}")
        if out.device != self.enc.payload.device and not INTERPRETED:
            raise CodecError(f"output is on {out.device}, the stream on {self.enc.payload.device}")
        if h.numel == 0:
            return out
        s = self.starts
        with torch.cuda.stream(stream or torch.cuda.current_stream(out.device)) if not INTERPRETED else _nothing():
            _fxmc_decode[(h.num_blocks,)](
                self.enc.payload, self.words, self.tables, out.view(torch.int16),
                s["signmant"], s["primary"] // 4, s["secondary"], s["raw"], h.numel, h.n_secondary, h.n_raw,
                K1=h.k1, K2=h.k2, BLOCK=h.block, HW_POPC=not INTERPRETED, num_warps=4)
        return out


def decode_into(enc: EncodedTensor | DeviceDecoder, out: torch.Tensor,
                stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Decode `enc` into the preallocated bf16 `out` on `stream` (prepare a DeviceDecoder once
    to keep the hot path free of allocations)."""
    decoder = enc if isinstance(enc, DeviceDecoder) else DeviceDecoder(enc, out.device)
    return decoder.decode_into(out, stream)
