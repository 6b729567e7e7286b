"""Triton decoder for FXMC streams: writes bf16 into a caller-given buffer on a caller's stream.

Each thread decodes one row of 8 elements (a program holds block / 8 rows):
- its 8 sign+mantissa bytes arrive as two 32-bit words and its output leaves as one 16-byte
  store, both coalesced across the warp;
- its primary codes are one byte of each bit plane; its escapes are the AND of those bytes;
- escaped elements of a row have consecutive ranks, so their secondary codes are one run of
  at most 8 * k2 <= 32 bits: two 32-bit words, shifted, give them all. The row's first rank
  is the block's stored offset plus a scan of the rows' escape counts;
- only blocks holding raw exponents (the offsets' next entry tells) rank and gather those.
Every load is also masked against the header's counts, so even a corrupted payload that
slipped past validation cannot read out of bounds. The kernel takes the output as int16 and
writes whole rows as int32 words (the output must be 16-byte aligned).
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
def _bit(x, c):
    return (x >> c) & 1


@triton.jit
def _fxmc_decode(payload_ptr, words_ptr, tables_ptr, out_ptr,
                 signmant_word_at, primary_at, secondary_word_at, raw_at, total_words,
                 numel, n_secondary, n_raw,
                 K1: tl.constexpr, K2: tl.constexpr, BLOCK: tl.constexpr, HW_POPC: tl.constexpr,
                 SKIP: tl.constexpr = 0):
    # SKIP (benchmarks only, wrong output): 1 leaves out the secondary codes, 2 the row scan.
    ROWS: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    local = tl.arange(0, ROWS)
    row = pid.to(tl.int64) * ROWS + local  # [ROWS] global row: elements 8*row .. 8*row+7
    live = row * 8 < numel

    # Sign+mantissa: 8 bytes a row, as two words.
    sm_lo, sm_hi = tl.split(tl.load(words_ptr + signmant_word_at + row[:, None] * 2 + tl.arange(0, 2)[None, :],
                                    mask=live[:, None], other=0))  # [ROWS] each

    # Primary planes: one byte per plane per row; escapes are elements whose code is all ones.
    plane_at = payload_ptr + primary_at + pid * K1 * ROWS + local
    p0 = tl.load(plane_at).to(tl.int32)
    escape = p0
    p1 = tl.zeros([ROWS], dtype=tl.int32)
    p2 = tl.zeros([ROWS], dtype=tl.int32)
    p3 = tl.zeros([ROWS], dtype=tl.int32)
    if K1 > 1:
        p1 = tl.load(plane_at + ROWS).to(tl.int32)
        escape &= p1
    if K1 > 2:
        p2 = tl.load(plane_at + 2 * ROWS).to(tl.int32)
        escape &= p2
    if K1 > 3:
        p3 = tl.load(plane_at + 3 * ROWS).to(tl.int32)
        escape &= p3
    escape = tl.where(live, escape, 0)

    # The row's secondary codes: one run of bits from the row's first escape rank.
    count = _popc(escape, HW_POPC)
    if SKIP == 2:
        first = tl.load(words_ptr + 2 * pid) + count
    else:
        first = tl.load(words_ptr + 2 * pid) + tl.cumsum(count, axis=0) - count  # [ROWS]
    bit = first.to(tl.int64) * K2
    word = secondary_word_at + (bit >> 5)
    has = (count > 0) & (first < n_secondary) & (word + 1 < total_words)
    w0 = tl.load(words_ptr + word, mask=has, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    w1 = tl.load(words_ptr + word + 1, mask=has, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    run = ((w0 | (w1 << 32)) >> (bit & 31).to(tl.uint64)).to(tl.int64, bitcast=True)  # codes, LSB first

    N1: tl.constexpr = (1 << K1) - 1
    ESC2: tl.constexpr = (1 << K2) - 1
    t1_0 = tl.load(tables_ptr)
    t1_1 = tl.load(tables_ptr + 1)
    t1_2 = tl.load(tables_ptr + 2)
    rank = tl.zeros([ROWS], dtype=tl.int32)  # escapes before this element in its row
    raw_bits = tl.zeros([ROWS], dtype=tl.int32)  # which elements of the row hold raw exponents
    o0 = tl.zeros([ROWS], dtype=tl.int32)  # output words: elements (0,1), (2,3), (4,5), (6,7)
    o1 = tl.zeros([ROWS], dtype=tl.int32)
    o2 = tl.zeros([ROWS], dtype=tl.int32)
    o3 = tl.zeros([ROWS], dtype=tl.int32)
    for c in tl.static_range(8):
        code = _bit(p0, c) | (_bit(p1, c) << 1) | (_bit(p2, c) << 2) | (_bit(p3, c) << 3)
        if N1 <= 3:  # a short select chain beats a gather
            exponent = tl.where(code == 0, t1_0, tl.where(code == 1, t1_1, t1_2))
        else:
            exponent = tl.load(tables_ptr + code)
        esc = _bit(escape, c) != 0
        code2 = ((run >> (rank * K2).to(tl.int64)) & ESC2).to(tl.int32)
        ok = esc & has
        if SKIP == 1:
            second = exponent
        else:
            second = tl.load(tables_ptr + 16 + code2, mask=ok, other=0)
        raw_bits |= (ok & (code2 == ESC2)).to(tl.int32) << c
        exponent = tl.where(esc, second, exponent)
        rank += esc.to(tl.int32)
        if c < 4:
            sm = (sm_lo >> (8 * c)) & 0xFF
        else:
            sm = (sm_hi >> (8 * (c - 4))) & 0xFF
        value = (((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F)) << (16 * (c % 2))
        if c // 2 == 0:
            o0 |= value
        elif c // 2 == 1:
            o1 |= value
        elif c // 2 == 2:
            o2 |= value
        else:
            o3 |= value

    raw_first = tl.load(words_ptr + 2 * pid + 1)
    if tl.load(words_ptr + 2 * pid + 3) > raw_first:  # this block holds raw exponents
        raw_count = _popc(raw_bits, HW_POPC)
        raw_start = raw_first + tl.cumsum(raw_count, axis=0) - raw_count
        raw_rank = tl.zeros([ROWS], dtype=tl.int32)
        for c in tl.static_range(8):
            is_raw = _bit(raw_bits, c) != 0
            pos = raw_start + raw_rank
            e = tl.load(payload_ptr + raw_at + pos, mask=is_raw & (pos < n_raw), other=0).to(tl.int32)
            field = 0xFF << (16 * (c % 2) + 7)
            patch = e << (16 * (c % 2) + 7)
            if c // 2 == 0:
                o0 = tl.where(is_raw, (o0 & ~field) | patch, o0)
            elif c // 2 == 1:
                o1 = tl.where(is_raw, (o1 & ~field) | patch, o1)
            elif c // 2 == 2:
                o2 = tl.where(is_raw, (o2 & ~field) | patch, o2)
            else:
                o3 = tl.where(is_raw, (o3 & ~field) | patch, o3)
            raw_rank += is_raw.to(tl.int32)

    words = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), [ROWS, 4])  # [ROWS, 4], element order
    full = (row * 8 + 8) <= numel
    out_words = out_ptr.to(tl.pointer_type(tl.int32))
    tl.store(out_words + row[:, None] * 4 + tl.arange(0, 4)[None, :], words, mask=full[:, None])
    if (pid + 1) * BLOCK > numel:  # the last block may end inside a row: store that row singly
        tail = live & ~full
        for c in tl.static_range(8):
            if c // 2 == 0:
                w = o0
            elif c // 2 == 1:
                w = o1
            elif c // 2 == 2:
                w = o2
            else:
                w = o3
            tl.store(out_ptr + row * 8 + c, ((w >> (16 * (c % 2))) & 0xFFFF).to(tl.int16),
                     mask=tail & (row * 8 + c < numel))


@contextlib.contextmanager
def _nothing():
    yield


class DeviceDecoder:
    """An encoded tensor made ready for repeated GPU decodes: everything allocated up front."""

    def __init__(self, enc: EncodedTensor, device: torch.device | str = "cuda", num_warps: int = 8,
                 skip: int = 0):
        self.num_warps, self.skip = num_warps, skip
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
        if out.data_ptr() % 16:
            raise CodecError("output must be 16-byte aligned (a fresh allocation or a staging-pool slot)")
        if h.numel == 0:
            return out
        s = self.starts
        with torch.cuda.stream(stream or torch.cuda.current_stream(out.device)) if not INTERPRETED else _nothing():
            _fxmc_decode[(h.num_blocks,)](
                self.enc.payload, self.words, self.tables, out.view(-1).view(torch.int16),
                s["signmant"] // 4, s["primary"], s["secondary"] // 4, s["raw"], self.words.numel(),
                h.numel, h.n_secondary, h.n_raw,
                K1=h.k1, K2=h.k2, BLOCK=h.block, HW_POPC=not INTERPRETED, SKIP=self.skip,
                num_warps=self.num_warps)
        return out


def decode_into(enc: EncodedTensor | DeviceDecoder, out: torch.Tensor,
                stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Decode `enc` into the preallocated bf16 `out` on `stream` (prepare a DeviceDecoder once
    to keep the hot path free of allocations)."""
    decoder = enc if isinstance(enc, DeviceDecoder) else DeviceDecoder(enc, out.device)
    return decoder.decode_into(out, stream)
