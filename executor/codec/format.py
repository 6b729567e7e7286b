"""The FXMC format: one bf16 tensor, losslessly compressed by coding its exponents.

bf16 is sign (1 bit), exponent (8), mantissa (7). Trained weights use few exponents (about
2.6 bits of entropy), while sign and mantissa are close to random. So:

- `block_offsets`: per block of `block` elements, int32 pairs (escapes before the block in
  `secondary`, in `raw`), plus one pair of totals; so each GPU block finds its escapes from
  its offset and a prefix count inside the block.
- `signmant`: one byte per element, sign << 7 | mantissa, stored raw.
- `primary`: a k1-bit code per element (k1 in 1..3), as bit planes: for each block, k1
  planes of `block` bits (bit p of every element's code), LSB-first. Codes 0 .. 2^k1 - 2
  index `table1` (the most frequent exponents); the last code (all ones) escapes. Planes let
  the GPU read codes as whole 32-bit words and find escapes as the AND of the planes.
- `secondary`: a k2-bit code (k2 in 2..3) per escaped element, in element order; codes
  0 .. 2^k2 - 2 index `table2`, the last escapes again.
- `raw`: one exponent byte per doubly escaped element, in element order.

In `secondary`, code i of width k sits at bit i*k; the section carries 8 bytes of padding so
a 64-bit window read at any code never leaves it.
Every section starts on a 16-byte boundary so the GPU can use vector loads. Decoding is a
fixed number of loads, shifts and lookups per element: fixed-rate where it matters. The encoder picks (k1, k2) and the tables from the exponent
histogram to minimize size (3-bit codes matter: they bring conv nets to 0.70). Widths stop
at 3: wider ones gained under 0.1% on every weight source measured, and the GPU decoder's
lookup tables grow with 2^(4 k).

Serialized: a little-endian header (magic, version, widths, block, shape, tables, counts,
CRC-32 of the payload), then the sections in the order above. Every length is checked
against the header before anything reads the payload.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import dataclass

import torch

from fluxmoe.errors import FluxMoEError

MAGIC = b"FXMC"
VERSION = 1
PRIMARY_WIDTHS = (1, 2, 3)
SECONDARY_WIDTHS = (2, 3)
DEFAULT_BLOCK = 2048  # measured best on H200 (bench/codec_ablate.py)
ALIGN = 16  # section alignment in the payload, bytes


class CodecError(FluxMoEError, ValueError):
    """A compressed stream that is truncated, corrupted or not of this format."""


@dataclass(frozen=True)
class CodecHeader:
    """Everything needed to size and read the payload of one encoded tensor."""

    k1: int
    k2: int
    block: int
    shape: tuple[int, ...]
    table1: tuple[int, ...]
    table2: tuple[int, ...]
    n_secondary: int  # elements escaped past the primary code
    n_raw: int  # elements escaped past the secondary code
    crc32: int = 0
    version: int = VERSION

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.block)

    def section_sizes(self) -> dict[str, int]:
        """Bytes of each payload section, in payload order."""
        return {
            "block_offsets": (self.num_blocks + 1) * 8,
            "signmant": self.numel,
            "primary": self.num_blocks * self.k1 * self.block // 8,
            "secondary": -(-self.n_secondary * self.k2 // 8) + 8,  # + a 64-bit read window
            "raw": self.n_raw,
        }

    def section_starts(self) -> dict[str, int]:
        """Byte offset of each section in the payload: each on a 16-byte boundary."""
        starts, at = {}, 0
        for name, size in self.section_sizes().items():
            starts[name] = at
            at = -(-(at + size) // ALIGN) * ALIGN
        return starts

    @property
    def payload_bytes(self) -> int:
        # 16 bytes past the raw exponents: the GPU reads a row's raw bytes as a 12-byte window.
        return -(-(self.section_starts()["raw"] + self.n_raw + 16) // ALIGN) * ALIGN

    def validate(self) -> None:
        """Refuse headers whose fields cannot describe a valid stream."""
        if self.version != VERSION:
            raise CodecError(f"unsupported FXMC version {self.version} (this reader knows {VERSION})")
        if self.k1 not in PRIMARY_WIDTHS or self.k2 not in SECONDARY_WIDTHS:
            raise CodecError(f"invalid code widths k1={self.k1}, k2={self.k2} (allowed {PRIMARY_WIDTHS}, {SECONDARY_WIDTHS})")
        if self.block < 128 or self.block & (self.block - 1) or self.block > 1 << 16:
            raise CodecError(f"invalid block size {self.block} (a power of two in [128, 65536])")
        if any(d < 0 for d in self.shape) or len(self.shape) > 8:
            raise CodecError(f"invalid shape {self.shape}")
        if len(self.table1) != (1 << self.k1) - 1 or len(self.table2) != (1 << self.k2) - 1:
            raise CodecError(f"table sizes {len(self.table1)}, {len(self.table2)} do not match widths {self.k1}, {self.k2}")
        if any(not 0 <= e <= 255 for e in self.table1 + self.table2):
            raise CodecError("exponent tables hold values outside 0..255")
        if not 0 <= self.n_raw <= self.n_secondary <= self.numel:
            raise CodecError(f"escape counts out of range: {self.n_secondary} secondary, {self.n_raw} raw, "
                             f"{self.numel} elements")

    # ---------------------------------------------------------------- bytes
    _FIXED = struct.Struct("<4sHBBIBQQI")  # magic, version, k1, k2, block, ndim, n_secondary, n_raw, crc32

    def to_bytes(self) -> bytes:
        fixed = self._FIXED.pack(MAGIC, self.version, self.k1, self.k2, self.block, len(self.shape),
                                 self.n_secondary, self.n_raw, self.crc32)
        dims = struct.pack(f"<{len(self.shape)}Q", *self.shape)
        return fixed + dims + bytes(self.table1) + bytes(self.table2)

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple["CodecHeader", int]:
        """Parse and validate a header; returns it and the offset where the payload starts."""
        if len(data) < cls._FIXED.size:
            raise CodecError(f"stream of {len(data)} bytes is shorter than the {cls._FIXED.size}-byte header")
        magic, version, k1, k2, block, ndim, n_sec, n_raw, crc = cls._FIXED.unpack_from(data)
        if magic != MAGIC:
            raise CodecError(f"not an FXMC stream (magic {magic!r}, expected {MAGIC!r})")
        if ndim > 8:
            raise CodecError(f"invalid shape rank {ndim}")
        k1_ok, k2_ok = k1 in PRIMARY_WIDTHS, k2 in SECONDARY_WIDTHS
        n1, n2 = ((1 << k1) - 1 if k1_ok else 0), ((1 << k2) - 1 if k2_ok else 0)
        end = cls._FIXED.size + 8 * ndim + n1 + n2
        if len(data) < end:
            raise CodecError(f"stream of {len(data)} bytes ends inside its {end}-byte header")
        shape = struct.unpack_from(f"<{ndim}Q", data, cls._FIXED.size)
        tables = data[cls._FIXED.size + 8 * ndim:end]
        header = cls(k1, k2, block, tuple(shape), tuple(tables[:n1]), tuple(tables[n1:n1 + n2]), n_sec, n_raw,
                     crc, version)
        header.validate()
        return header, end


@dataclass
class EncodedTensor:
    """An encoded bf16 tensor: header plus one uint8 payload (on CPU or GPU)."""

    header: CodecHeader
    payload: torch.Tensor  # uint8 [payload_bytes]

    def __post_init__(self) -> None:
        self.header.validate()
        if self.payload.dtype != torch.uint8 or self.payload.dim() != 1:
            raise CodecError(f"payload must be a 1-d uint8 tensor, got {self.payload.dtype} {tuple(self.payload.shape)}")
        if self.payload.numel() != self.header.payload_bytes:
            raise CodecError(f"payload has {self.payload.numel()} bytes, header needs {self.header.payload_bytes}")

    def sections(self) -> dict[str, torch.Tensor]:
        """Views of the payload, one per section (no copies); block offsets as int32 [blocks + 1, 2]."""
        starts, sizes = self.header.section_starts(), self.header.section_sizes()
        out = {name: self.payload[starts[name]:starts[name] + sizes[name]] for name in sizes}
        out["block_offsets"] = out["block_offsets"].view(torch.int32).view(-1, 2)
        return out

    @property
    def nbytes(self) -> int:
        return len(self.header.to_bytes()) + self.header.payload_bytes

    @property
    def ratio(self) -> float:
        """Compressed size over bf16 size."""
        return self.nbytes / max(1, 2 * self.header.numel)

    def to(self, device: torch.device | str) -> "EncodedTensor":
        return EncodedTensor(self.header, self.payload.to(device))

    def to_bytes(self) -> bytes:
        """Header (with the payload's CRC-32) and payload, ready to store or send."""
        payload = self.payload.cpu().numpy().tobytes()
        return dataclasses.replace(self.header, crc32=zlib.crc32(payload)).to_bytes() + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncodedTensor":
        """Parse and fully validate a serialized stream (lengths, CRC, escape offsets)."""
        header, start = CodecHeader.from_bytes(data)
        available = len(data) - start
        if available != header.payload_bytes:
            raise CodecError(f"payload is {available} bytes but the header describes {header.payload_bytes} "
                             f"({'truncated' if available < header.payload_bytes else 'trailing bytes'})")
        payload = data[start:]
        if zlib.crc32(payload) != header.crc32:
            raise CodecError("payload CRC-32 does not match the header: the stream is corrupted")
        enc = cls(header, torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        check_escape_offsets(enc)
        return enc


def unpack_planes(planes: torch.Tensor, numel: int, width: int, block: int) -> torch.Tensor:
    """Primary codes from per-block bit planes (uint8 [blocks * width * block / 8]) as int32 [numel]."""
    bits = (planes.to(torch.int32).view(-1, width, block // 8, 1)
            >> torch.arange(8, dtype=torch.int32, device=planes.device)) & 1  # [blocks, width, block/8, 8]
    weights = (1 << torch.arange(width, dtype=torch.int32, device=planes.device)).view(1, width, 1)
    codes = (bits.reshape(-1, width, block) * weights).sum(dim=1, dtype=torch.int32)  # [blocks, block]
    return codes.reshape(-1)[:numel]


def pack_planes(codes: torch.Tensor, width: int, block: int) -> torch.Tensor:
    """int32 codes [numel] -> per-block bit planes, uint8 [blocks * width * block / 8]."""
    blocks = -(-codes.numel() // block)
    padded = torch.nn.functional.pad(codes, (0, blocks * block - codes.numel())).view(blocks, 1, block // 8, 8)
    shifts = torch.arange(width, dtype=torch.int32, device=codes.device).view(1, width, 1, 1)
    bits = (padded >> shifts) & 1  # [blocks, width, block/8, 8]
    weights = 1 << torch.arange(8, dtype=torch.int32, device=codes.device)
    return (bits * weights).sum(dim=3, dtype=torch.int32).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """`count` codes of `width` bits from an LSB-first bitstream (padded by a byte), as int32."""
    bit = torch.arange(count, dtype=torch.int64, device=packed.device) * width  # [count]
    lo = packed[bit >> 3].to(torch.int32)
    hi = packed[(bit >> 3) + 1].to(torch.int32)
    return ((lo | (hi << 8)) >> (bit & 7).to(torch.int32)) & ((1 << width) - 1)


def check_escape_offsets(enc: EncodedTensor) -> None:
    """The block offsets must equal the escape counts the code streams imply (else OOB reads)."""
    h, s = enc.header, enc.sections()
    primary = unpack_planes(s["primary"], h.numel, h.k1, h.block)
    esc1 = primary == (1 << h.k1) - 1
    if int(esc1.sum()) != h.n_secondary:
        raise CodecError(f"primary codes escape {int(esc1.sum())} elements, header says {h.n_secondary}")
    secondary = unpack_codes(s["secondary"], h.n_secondary, h.k2)
    esc2_of_secondary = secondary == (1 << h.k2) - 1
    if int(esc2_of_secondary.sum()) != h.n_raw:
        raise CodecError(f"secondary codes escape {int(esc2_of_secondary.sum())} elements, header says {h.n_raw}")
    esc2 = torch.zeros(h.numel, dtype=torch.bool, device=esc1.device)
    esc2[esc1] = esc2_of_secondary
    offsets = s["block_offsets"].to(torch.int64)
    expected = block_escape_offsets(esc1, esc2, h.block)
    if not torch.equal(offsets, expected):
        raise CodecError("block escape offsets do not match the code streams: the stream is corrupted")


def block_escape_offsets(esc1: torch.Tensor, esc2: torch.Tensor, block: int) -> torch.Tensor:
    """int64 [blocks + 1, 2]: escapes to the secondary and raw streams before each block
    starts, then the totals."""
    blocks = -(-esc1.numel() // block)
    pad = blocks * block - esc1.numel()
    per_block = torch.stack([torch.nn.functional.pad(e.to(torch.int64), (0, pad)).view(blocks, block).sum(1)
                             for e in (esc1, esc2)], dim=1)  # [blocks, 2]
    return torch.cat([per_block.new_zeros(1, 2), torch.cumsum(per_block, 0)])
