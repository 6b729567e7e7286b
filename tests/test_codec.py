"""The lossless bf16 codec: every bit pattern survives, malformed streams are refused."""

import dataclasses
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from executor.codec import CodecError, EncodedTensor, decode, encode
from executor.codec.format import CodecHeader


def all_bf16_patterns() -> torch.Tensor:
    """Every 16-bit pattern once: NaN payloads, +-inf, subnormals, -0 included."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("block", [128, 4096])
def test_every_bf16_bit_pattern_round_trips(block):
    x = all_bf16_patterns()
    enc = EncodedTensor.from_bytes(encode(x, block=block).to_bytes())
    assert same_bits(decode(enc), x)


def test_special_values_keep_their_bits():
    nan_payloads = torch.tensor([0x7FC1, 0xFFFF, 0x7F81, 0x0001, 0x8001, 0x8000, 0x7F80, 0xFF80],
                                dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert same_bits(decode(encode(nan_payloads)), nan_payloads)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 37), min_size=0, max_size=4), scale=st.sampled_from([1e-3, 0.02, 1.0, 1e4]),
       seed=st.integers(0, 2**31 - 1), block=st.sampled_from([128, 256, 4096]))
def test_random_tensors_of_odd_shapes_round_trip(shape, scale, seed, block):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)
    enc = encode(x, block=block)
    assert same_bits(decode(EncodedTensor.from_bytes(enc.to_bytes())), x)


def test_trained_like_weights_compress_below_070():
    """Gaussian weights (the exponent statistics of trained matrices) code near their entropy."""
    x = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    assert encode(x).ratio < 0.70


def test_escape_levels_are_all_exercised():
    """Wide exponent spread: primary, secondary and raw exponents all occur and decode."""
    x = (torch.randn(50_000, generator=torch.Generator().manual_seed(1))
         * torch.logspace(-30, 30, 50_000, base=2.0)).to(torch.bfloat16)
    enc = encode(x)
    assert enc.header.n_secondary > 0 and enc.header.n_raw > 0
    assert same_bits(decode(enc), x)


def test_block_offsets_count_each_blocks_escapes_by_hand():
    """Row i of `block_offsets` holds the secondary and raw escapes before block i: counted here
    from the exponents and the header's tables, which is what a GPU block reads to find its own."""
    x = (torch.randn(50_000, generator=torch.Generator().manual_seed(1))
         * torch.logspace(-30, 30, 50_000, base=2.0)).to(torch.bfloat16)
    enc = encode(x, block=1024)
    h = enc.header
    exponent = ((x.view(torch.int16).to(torch.int32) >> 7) & 0xFF).tolist()
    escaped = [e not in h.table1 for e in exponent]
    raw = [esc and e not in h.table2 for esc, e in zip(escaped, exponent)]
    expected = [[0, 0]]
    for b in range(h.num_blocks):
        part = slice(b * h.block, (b + 1) * h.block)
        expected.append([expected[-1][0] + sum(escaped[part]), expected[-1][1] + sum(raw[part])])
    assert enc.sections()["block_offsets"].tolist() == expected
    assert expected[-1] == [h.n_secondary, h.n_raw] and h.num_blocks > 40


def test_non_bf16_input_is_refused():
    with pytest.raises(CodecError, match="bf16"):
        encode(torch.zeros(4, dtype=torch.float16))


# ---------------------------------------------------------------- adversarial streams
@pytest.fixture
def stream() -> bytes:
    x = (torch.randn(10_000, generator=torch.Generator().manual_seed(2)) * 0.5).to(torch.bfloat16)
    return encode(x, block=1024).to_bytes()


def _with_crc(header: CodecHeader, payload: bytes) -> bytes:
    return dataclasses.replace(header, crc32=zlib.crc32(payload)).to_bytes() + payload


@pytest.mark.parametrize("cut,match", [
    (0, "shorter than"), (3, "shorter than"), (CodecHeader._FIXED.size - 1, "shorter than"),
    (CodecHeader._FIXED.size, "ends inside"), (40, "ends inside"), (-1, r"\(truncated\)"), (-500, r"\(truncated\)"),
])
def test_truncated_stream_is_refused(stream, cut, match):
    with pytest.raises(CodecError, match=match):
        EncodedTensor.from_bytes(stream[:cut])


def test_trailing_bytes_are_refused(stream):
    with pytest.raises(CodecError, match=r"\(trailing bytes\)"):
        EncodedTensor.from_bytes(stream + b"\0")


def test_wrong_magic_is_refused(stream):
    with pytest.raises(CodecError, match="not an FXMC stream"):
        EncodedTensor.from_bytes(b"GGUF" + stream[4:])


@pytest.mark.parametrize("field,value,match", [
    ("version", 7, "unsupported FXMC version"),
    ("k1", 5, "invalid code widths"),
    ("block", 1000, "invalid block size"),
    ("n_secondary", 10**9, "escape counts out of range|payload is"),
    ("shape", (10_001,), "payload is"),
])
def test_wrong_header_fields_are_refused(stream, field, value, match):
    header, start = CodecHeader.from_bytes(stream)
    bad = dataclasses.replace(header, **{field: value})
    with pytest.raises(CodecError, match=match):
        EncodedTensor.from_bytes(bad.to_bytes() + stream[start:])


def test_flipped_payload_bit_fails_the_crc(stream):
    data = bytearray(stream)
    data[-10] ^= 0x10
    with pytest.raises(CodecError, match="payload CRC-32 does not match the header"):
        EncodedTensor.from_bytes(bytes(data))


def test_corrupted_escape_offsets_are_refused_even_with_a_valid_crc(stream):
    """An attacker (or a bug) that fixes up the CRC still cannot make the decoder read out of bounds."""
    header, start = CodecHeader.from_bytes(stream)
    payload = bytearray(stream[start:])
    struct.pack_into("<i", payload, 8, 2**30)  # block 1's offset into the secondary stream
    with pytest.raises(CodecError, match="block escape offsets"):
        EncodedTensor.from_bytes(_with_crc(header, bytes(payload)))


def test_wrong_escape_count_is_refused_even_with_a_valid_crc(stream):
    header, start = CodecHeader.from_bytes(stream)
    bad = dataclasses.replace(header, n_raw=header.n_raw + 1)
    payload = stream[start:] + b"\0" * (bad.payload_bytes - header.payload_bytes)
    assert len(payload) == bad.payload_bytes
    with pytest.raises(CodecError, match="secondary codes escape"):
        EncodedTensor.from_bytes(_with_crc(bad, payload))


# ---------------------------------------------------------------- header fields at their limits
def _header(**fields) -> CodecHeader:
    base = dict(k1=2, k2=2, block=128, shape=(256,), table1=(120, 121, 122), table2=(1, 2, 3), n_secondary=32,
                n_raw=0)
    return CodecHeader(**{**base, **fields})


@pytest.mark.parametrize("fields", [
    dict(block=128), dict(block=1 << 16), dict(shape=(2,) * 8), dict(shape=(0, 5), n_secondary=0),
    dict(table1=(0, 255, 7)), dict(n_secondary=256, n_raw=256),
])
def test_header_fields_at_their_limits_are_accepted_and_parse_back(fields):
    header = _header(**fields)
    header.validate()
    data = header.to_bytes()
    assert CodecHeader.from_bytes(data) == (header, len(data))  # a header alone, nothing past it


@pytest.mark.parametrize("fields,match", [
    (dict(block=64), "invalid block size"), (dict(block=1 << 17), "invalid block size"),
    (dict(block=384), "invalid block size"),
    (dict(shape=(1,) * 9), "invalid shape"), (dict(shape=(-1, 4)), "invalid shape"),
    (dict(table1=(1, 2)), "table sizes"), (dict(table2=(1, 2, 3, 4)), "table sizes"),
    (dict(table1=(1, 2, 256)), "outside 0..255"), (dict(table2=(256, 0, 0)), "outside 0..255"),
    (dict(n_secondary=257), "escape counts"), (dict(n_raw=33), "escape counts"),
])
def test_header_fields_past_their_limits_are_refused(fields, match):
    with pytest.raises(CodecError, match=match):
        _header(**fields).validate()


def test_a_serialized_rank_past_eight_is_refused_before_reading_dims():
    data = bytearray(_header(shape=(2,) * 8).to_bytes())
    struct.pack_into("<B", data, 12, 9)  # ndim, after magic, version, k1, k2, block
    with pytest.raises(CodecError, match="invalid shape rank 9"):
        CodecHeader.from_bytes(bytes(data))


@pytest.mark.parametrize("field", ["k1", "k2"])
def test_a_header_with_a_bad_width_is_refused_for_its_width_not_its_length(field):
    """An unknown width has no table size: the header ends after the other table, and the
    error names the width, not a truncated header."""
    header = dataclasses.replace(_header(), **{field: 7}, **{("table1" if field == "k1" else "table2"): ()})
    with pytest.raises(CodecError, match="invalid code widths"):
        CodecHeader.from_bytes(header.to_bytes())


def test_payload_layout_by_hand():
    """k1 = k2 = 2, block 128, 256 elements, 32 secondary codes: offsets (2 blocks + 1) x 8 = 24
    bytes at 0; sign-mantissa 256 at 32; primary 2 x 2 x 128 / 8 = 64 at 288; secondary 32 x 2 / 8
    + 8 = 16 at 352; raw at 368; payload 368 + 0 + 16 = 384."""
    header = _header()
    assert header.section_sizes() == {"block_offsets": 24, "signmant": 256, "primary": 64, "secondary": 16, "raw": 0}
    assert header.section_starts() == {"block_offsets": 0, "signmant": 32, "primary": 288, "secondary": 352,
                                       "raw": 368}
    assert header.payload_bytes == 384


def test_a_payload_of_the_wrong_dtype_or_rank_is_refused():
    header = _header()
    with pytest.raises(CodecError, match="1-d uint8"):
        EncodedTensor(header, torch.zeros(header.payload_bytes, dtype=torch.int8))
    with pytest.raises(CodecError, match="1-d uint8"):
        EncodedTensor(header, torch.zeros(1, header.payload_bytes, dtype=torch.uint8))
