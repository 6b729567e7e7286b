"""Triton decoder for FXMC streams: writes bf16 into a caller-given buffer on a caller's stream.

Each thread decodes rows of 8 elements, four lanes at a time, with per-tensor lookup tables
built once (DeviceDecoder):
- LUT1[the 4 lanes' primary-code bits from each plane] -> their 4 exponent bytes (0 where a
  lane escapes);
- LUT2[escape nibble, the next 4 secondary codes] -> the escaped lanes' exponent bytes and
  which lanes are raw. A row's escaped elements have consecutive ranks, so its secondary
  codes are one bit run starting at the block's offset plus a scan of earlier rows' counts;
- raw exponents of a row are consecutive bytes too: a 64-bit window, deposited into the raw
  lanes by a byte permute (PRMT) whose selector LUT3[raw nibble] gives;
- the output bytes are interleaved from the sign+mantissa word and the exponent word by two
  more PRMTs and leave as one 16-byte store per row.
Under Triton's CPU interpreter (no PTX) the permutes and popcounts are emulated. Every load
is masked against the header's counts, so even a corrupted payload that slipped past
validation cannot read out of bounds.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from executor.codec.format import CodecError, EncodedTensor

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: no PTX


@triton.jit
def _popc(x, HW: tl.constexpr):
    """Set bits of each int32: the POPC instruction on a GPU, SWAR arithmetic otherwise."""
    if HW:
        return libdevice.popc(x)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24) & 0xFF


@triton.jit
def _prmt(a, b, selector, HW: tl.constexpr):
    """Byte permute: result byte i is byte (selector nibble i) of the 8 bytes b:a (PTX prmt)."""
    if HW:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, selector],
                                         dtype=tl.int32, is_pure=True, pack=1)
    selector = selector + tl.zeros(a.shape, dtype=tl.int32)
    both = (a.to(tl.uint32, bitcast=True).to(tl.uint64)
            | (b.to(tl.uint32, bitcast=True).to(tl.uint64) << 32))
    out = tl.zeros(a.shape, dtype=tl.int32)
    for i in tl.static_range(4):
        s = ((selector >> (4 * i)) & 7).to(tl.uint64)
        out |= ((both >> (8 * s)) & 0xFF).to(tl.int32) << (8 * i)
    return out


@triton.jit
def _fxmc_decode(payload_ptr, words_ptr, lut1_ptr, lut2_ptr, lut3_ptr, out_ptr,
                 signmant_word_at, primary_at, secondary_word_at, raw_word_at, total_words,
                 numel, n_secondary, n_raw,
                 K1: tl.constexpr, K2: tl.constexpr, BLOCK: tl.constexpr, HW: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // 8
    CODES: tl.constexpr = (1 << (4 * K2)) - 1  # bits of four secondary codes
    pid = tl.program_id(0)
    local = tl.arange(0, ROWS)
    row = pid.to(tl.int64) * ROWS + local  # [ROWS] global row: elements 8*row .. 8*row+7
    live = row * 8 < numel

    sm_lo, sm_hi = tl.split(tl.load(words_ptr + signmant_word_at + row[:, None] * 2 + tl.arange(0, 2)[None, :],
                                    mask=live[:, None], other=0))  # [ROWS] sign+mantissa of lanes 0-3, 4-7

    # Primary planes (one byte each per row); escapes are the AND of the planes.
    plane_at = payload_ptr + primary_at + pid * K1 * ROWS + local
    p0 = tl.load(plane_at).to(tl.int32)
    escape = p0
    p1 = tl.zeros([ROWS], dtype=tl.int32)
    p2 = tl.zeros([ROWS], dtype=tl.int32)
    if K1 > 1:
        p1 = tl.load(plane_at + ROWS).to(tl.int32)
        escape &= p1
    if K1 > 2:
        p2 = tl.load(plane_at + 2 * ROWS).to(tl.int32)
        escape &= p2
    escape = tl.where(live, escape, 0)

    # The row's secondary codes: one bit run from the row's first escape rank.
    count = _popc(escape, HW)
    first = tl.load(words_ptr + 2 * pid) + tl.cumsum(count, axis=0) - count  # [ROWS]
    bit = first.to(tl.int64) * K2
    word = secondary_word_at + (bit >> 5)
    has = (count > 0) & (first < n_secondary) & (word + 1 < total_words)
    w0 = tl.load(words_ptr + word, mask=has, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    w1 = tl.load(words_ptr + word + 1, mask=has, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    run = (w0 | (w1 << 32)) >> (bit & 31).to(tl.uint64)  # [ROWS] codes, LSB first

    # Exponents, four lanes at a time; raw lanes stay 0 for now.
    n_lo = escape & 0xF
    n_hi = (escape >> 4) & 0xF
    idx1_lo = (p0 & 0xF) | ((p1 & 0xF) << 4) | ((p2 & 0xF) << 8)
    idx1_hi = ((p0 >> 4) & 0xF) | (((p1 >> 4) & 0xF) << 4) | (((p2 >> 4) & 0xF) << 8)
    v_lo = tl.load(lut2_ptr + (n_lo | ((run & CODES).to(tl.int32) << 4)))
    run_hi = run >> (_popc(n_lo, HW) * K2).to(tl.uint64)
    v_hi = tl.load(lut2_ptr + (n_hi | ((run_hi & CODES).to(tl.int32) << 4)))
    e_lo = tl.load(lut1_ptr + idx1_lo) | (v_lo & 0xFFFFFFFF).to(tl.int32)
    e_hi = tl.load(lut1_ptr + idx1_hi) | (v_hi & 0xFFFFFFFF).to(tl.int32)
    raw_lo = ((v_lo >> 32) & 0xF).to(tl.int32)
    raw_hi = ((v_hi >> 32) & 0xF).to(tl.int32)

    # Raw exponents: the row's are consecutive bytes from its first raw rank; deposit by PRMT.
    raw_count = _popc(raw_lo | (raw_hi << 4), HW)
    raw_first = tl.load(words_ptr + 2 * pid + 1) + tl.cumsum(raw_count, axis=0) - raw_count
    has_raw = (raw_count > 0) & (raw_first < n_raw)
    q = raw_word_at + (raw_first >> 2)
    ok = has_raw & (q + 2 < total_words)
    a = tl.load(words_ptr + q, mask=ok, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    b = tl.load(words_ptr + q + 1, mask=ok, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    c = tl.load(words_ptr + q + 2, mask=ok, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    shift = ((raw_first & 3) * 8).to(tl.uint64)
    window = ((a | (b << 32)) >> shift) | tl.where(shift > 0, c << (64 - shift), 0)  # 8 raw bytes
    raw_word_lo = (window & 0xFFFFFFFF).to(tl.int32)
    raw_word_hi = ((window >> (8 * _popc(raw_lo, HW)).to(tl.uint64)) & 0xFFFFFFFF).to(tl.int32)
    e_lo |= _prmt(raw_word_lo, tl.zeros([ROWS], dtype=tl.int32), tl.load(lut3_ptr + raw_lo), HW)
    e_hi |= _prmt(raw_word_hi, tl.zeros([ROWS], dtype=tl.int32), tl.load(lut3_ptr + raw_hi), HW)

    SIGNS: tl.constexpr = -0x7F7F7F80  # 0x80808080 as an int32: the sign bit of each byte
    # bf16 = sign | exponent << 7 | mantissa: low bytes L = mantissa | exponent bit 0 << 7,
    # high bytes H = sign | exponent >> 1; then interleave L and H bytes.
    low_lo = (sm_lo & 0x7F7F7F7F) | ((e_lo & 0x01010101) << 7)
    high_lo = (sm_lo & SIGNS) | ((e_lo >> 1) & 0x7F7F7F7F)
    low_hi = (sm_hi & 0x7F7F7F7F) | ((e_hi & 0x01010101) << 7)
    high_hi = (sm_hi & SIGNS) | ((e_hi >> 1) & 0x7F7F7F7F)
    o0 = _prmt(low_lo, high_lo, 0x5140, HW)
    o1 = _prmt(low_lo, high_lo, 0x7362, HW)
    o2 = _prmt(low_hi, high_hi, 0x5140, HW)
    o3 = _prmt(low_hi, high_hi, 0x7362, HW)

    words = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), [ROWS, 4])  # [ROWS, 4], element order
    full = (row * 8 + 8) <= numel
    out_words = out_ptr.to(tl.pointer_type(tl.int32))
    tl.store(out_words + row[:, None] * 4 + tl.arange(0, 4)[None, :], words, mask=full[:, None])
    if (pid + 1) * BLOCK > numel:  # the last block may end inside a row: store that row singly
        tail = live & ~full
        for i in tl.static_range(8):
            if i // 2 == 0:
                w = o0
            elif i // 2 == 1:
                w = o1
            elif i // 2 == 2:
                w = o2
            else:
                w = o3
            tl.store(out_ptr + row * 8 + i, ((w >> (16 * (i % 2))) & 0xFFFF).to(tl.int16),
                     mask=tail & (row * 8 + i < numel))


def _lanes(nibble: torch.Tensor) -> torch.Tensor:
    """[n] -> [n, 4] bits of each nibble, lane 0 first."""
    return (nibble.unsqueeze(1) >> torch.arange(4)) & 1


def build_luts(k1: int, k2: int, table1: tuple[int, ...], table2: tuple[int, ...]):
    """The decoder's lookup tables for one header (CPU tensors; see the module docstring)."""
    esc1, esc2 = (1 << k1) - 1, (1 << k2) - 1
    # LUT1: index = nibble of plane 0 | plane 1 << 4 | plane 2 << 8 -> 4 exponent bytes.
    idx = torch.arange(1 << (4 * k1))
    codes = sum(_lanes((idx >> (4 * p)) & 0xF) << p for p in range(k1))  # [n, 4]
    t1 = torch.tensor(list(table1) + [0], dtype=torch.int64)
    lut1 = (torch.where(codes == esc1, 0, t1[codes]) << (8 * torch.arange(4))).sum(1).to(torch.int32)
    # LUT2: index = escape nibble | next four secondary codes << 4 -> exponent bytes | raw lanes << 32.
    idx = torch.arange(16 << (4 * k2))
    nib, run = idx & 0xF, idx >> 4
    esc = _lanes(nib).bool()  # [n, 4]
    rank = torch.cumsum(esc.long(), 1) - esc.long()  # escapes before each lane
    code = (run.unsqueeze(1) >> (k2 * rank)) & esc2
    raw = esc & (code == esc2)
    t2 = torch.tensor(list(table2) + [0], dtype=torch.int64)
    exps = torch.where(esc & ~raw, t2[code], 0)
    lut2 = (exps << (8 * torch.arange(4))).sum(1) | ((raw.long() << torch.arange(4)).sum(1) << 32)
    # LUT3: raw nibble -> PRMT selector placing consecutive raw bytes into the raw lanes (4: zero).
    nib = torch.arange(16)
    isr = _lanes(nib).bool()
    r = torch.cumsum(isr.long(), 1) - isr.long()
    lut3 = (torch.where(isr, r, 4) << (4 * torch.arange(4))).sum(1).to(torch.int32)
    return lut1, lut2, lut3


_luts: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def device_luts(h, device: torch.device):
    """The lookup tables for a header's widths and tables on `device`, shared by every decoder
    that needs the same ones (up to 0.5 MB each; a host tier has a decoder per chunk and slot)."""
    key = (h.k1, h.k2, h.table1, h.table2, str(device))
    if key not in _luts:
        _luts[key] = tuple(t.to(device) for t in build_luts(h.k1, h.k2, h.table1, h.table2))
    return _luts[key]


class DeviceDecoder:
    """An encoded tensor made ready for repeated GPU decodes: everything allocated up front."""

    def __init__(self, enc: EncodedTensor, device: torch.device | str = "cuda", num_warps: int | None = None):
        # Two warps per 2048-element block measured best on the H200 (bench/codec_ablate.py).
        self.num_warps = num_warps or max(2, enc.header.block // 1024)
        self.enc = enc if enc.payload.device.type == "cuda" or INTERPRETED else enc.to(device)
        h = self.enc.header
        where = self.enc.payload.device
        self.lut1, self.lut2, self.lut3 = device_luts(h, where)
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
        with torch.cuda.stream(stream or torch.cuda.current_stream(out.device)) if not INTERPRETED else contextlib.nullcontext():
            _fxmc_decode[(h.num_blocks,)](
                self.enc.payload, self.words, self.lut1, self.lut2, self.lut3, out.view(-1).view(torch.int16),
                s["signmant"] // 4, s["primary"], s["secondary"] // 4, s["raw"] // 4, self.words.numel(),
                h.numel, h.n_secondary, h.n_raw,
                K1=h.k1, K2=h.k2, BLOCK=h.block, HW=not INTERPRETED, num_warps=self.num_warps)
        return out


def decode_into(enc: EncodedTensor | DeviceDecoder, out: torch.Tensor,
                stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Decode `enc` into the preallocated bf16 `out` on `stream` (prepare a DeviceDecoder once
    to keep the hot path free of allocations)."""
    decoder = enc if isinstance(enc, DeviceDecoder) else DeviceDecoder(enc, out.device)
    return decoder.decode_into(out, stream)
