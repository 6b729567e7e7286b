"""Encoder and pure-torch reference decoder for the FXMC format (see format.py). Runs on CPU.

The reference decoder is the specification the Triton kernel is tested against bit for bit.
"""

from __future__ import annotations

import torch

from executor.codec.format import (DEFAULT_BLOCK, PRIMARY_WIDTHS, SECONDARY_WIDTHS, CodecError, CodecHeader,
                                   EncodedTensor, block_escape_offsets, pack_planes, unpack_codes,
                                   unpack_planes)


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 -> (exponent byte, sign<<7 | mantissa byte), both int32 [numel]."""
    bits = t.contiguous().view(torch.int16).reshape(-1).to(torch.int32) & 0xFFFF
    return (bits >> 7) & 0xFF, ((bits >> 8) & 0x80) | (bits & 0x7F)


def _pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """int codes -> LSB-first bitstream of `width` bits each, plus one byte of padding."""
    shifts = torch.arange(width, dtype=torch.int32, device=codes.device)
    bits = ((codes.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)  # [count * width]
    nbytes = -(-bits.numel() // 8) + 1
    bits = torch.cat([bits, bits.new_zeros(nbytes * 8 - bits.numel())]).view(nbytes, 8)  # [bytes, 8]
    weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device))
    return (bits.to(torch.int32) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def choose_code(histogram: torch.Tensor, numel: int) -> tuple[int, int, list[int]]:
    # Sizes counted in bits of codes; the tables' few bytes are the same order for every choice.
    """Widths (k1, k2) minimizing size for this exponent histogram, and exponents by frequency."""
    order = [int(e) for e in torch.argsort(histogram, descending=True, stable=True)]
    counts = [int(histogram[e]) for e in order]
    best = None
    for k1 in PRIMARY_WIDTHS:
        n1 = (1 << k1) - 1
        escaped1 = numel - sum(counts[:n1])
        for k2 in SECONDARY_WIDTHS:
            n2 = (1 << k2) - 1
            escaped2 = escaped1 - sum(counts[n1:n1 + n2])
            bits = numel * k1 + escaped1 * k2 + escaped2 * 8
            if best is None or bits < best[0]:
                best = (bits, k1, k2)
    return best[1], best[2], order


def choose_block(numel: int, k1: int) -> int:
    """The block size (elements) that wastes least: padding of the last block's bit planes
    against 8 bytes of escape offsets per block. Large tensors get DEFAULT_BLOCK."""
    def waste(block: int) -> float:
        blocks = -(-numel // block)
        return blocks * 8 + (blocks * block - numel) * k1 / 8
    return min((DEFAULT_BLOCK >> i for i in range(5)), key=lambda b: (waste(b), -b))


def encode(t: torch.Tensor, block: int | None = None) -> EncodedTensor:
    """Losslessly compress a bf16 tensor (any shape, any bit patterns) on the device it is on.

    block: elements per GPU block (a power of two >= 128); None picks it by size (<= DEFAULT_BLOCK)."""
    if t.dtype != torch.bfloat16:
        raise CodecError(f"the codec compresses bf16 tensors, got {t.dtype}")
    t = t.detach()
    dev = t.device
    exponent, signmant = split_bf16(t)
    numel = exponent.numel()
    k1, k2, order = choose_code(torch.bincount(exponent, minlength=256), numel)
    block = block or choose_block(numel, k1)
    n1, n2 = (1 << k1) - 1, (1 << k2) - 1
    table1, table2 = order[:n1], order[n1:n1 + n2]
    # Per exponent value: its primary code, and its secondary code if it escapes.
    primary_of = torch.full((256,), n1, dtype=torch.int32, device=dev)
    primary_of[table1] = torch.arange(n1, dtype=torch.int32, device=dev)
    secondary_of = torch.full((256,), n2, dtype=torch.int32, device=dev)
    secondary_of[table2] = torch.arange(n2, dtype=torch.int32, device=dev)

    primary = primary_of[exponent]  # [numel]
    esc1 = primary == n1
    secondary = secondary_of[exponent[esc1]]  # [n_secondary]
    esc2 = torch.zeros(numel, dtype=torch.bool, device=dev)
    esc2[esc1] = secondary == n2
    raw = exponent[esc2].to(torch.uint8)

    offsets = block_escape_offsets(esc1, esc2, block).to(torch.int32)  # [blocks + 1, 2]

    header = CodecHeader(k1, k2, block, tuple(t.shape), tuple(table1), tuple(table2), int(esc1.sum()),
                         int(esc2.sum()))
    sections = {"block_offsets": offsets.reshape(-1).view(torch.uint8), "signmant": signmant.to(torch.uint8),
                "primary": pack_planes(primary, k1, block), "secondary": _pack_codes(secondary, k2), "raw": raw}
    payload = torch.zeros(header.payload_bytes, dtype=torch.uint8, device=dev)
    for name, start in header.section_starts().items():
        payload[start:start + sections[name].numel()] = sections[name]
    return EncodedTensor(header, payload)


def decode(enc: EncodedTensor) -> torch.Tensor:
    """Reference decoder: the exact bf16 tensor `encode` was given (on the payload's device)."""
    h, s = enc.header, enc.sections()
    device = enc.payload.device
    n1, n2 = (1 << h.k1) - 1, (1 << h.k2) - 1
    table1 = torch.tensor(h.table1 + (0,), dtype=torch.int32, device=device)
    table2 = torch.tensor(h.table2 + (0,), dtype=torch.int32, device=device)
    primary = unpack_planes(s["primary"], h.numel, h.k1, h.block)
    exponent = table1[primary]
    esc1 = primary == n1
    secondary = unpack_codes(s["secondary"], h.n_secondary, h.k2)
    if int(esc1.sum()) != secondary.numel():
        raise CodecError(f"primary codes escape {int(esc1.sum())} elements, the stream holds {secondary.numel()}")
    second_exp = table2[secondary]
    esc2 = secondary == n2
    if int(esc2.sum()) != h.n_raw:
        raise CodecError(f"secondary codes escape {int(esc2.sum())} elements, the stream holds {h.n_raw}")
    second_exp[esc2] = s["raw"].to(torch.int32)
    exponent[esc1] = second_exp
    signmant = s["signmant"].to(torch.int32)
    bits = ((signmant & 0x80) << 8) | (exponent << 7) | (signmant & 0x7F)
    return bits.to(torch.int16).view(torch.bfloat16).reshape(h.shape)
