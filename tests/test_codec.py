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


@pytest.mark.parametrize("cut", [0, 3, 20, 40, -1, -500])
def test_truncated_stream_is_refused(stream, cut):
    with pytest.raises(CodecError, match="shorter than|ends inside|truncated"):
        EncodedTensor.from_bytes(stream[:cut])


def test_trailing_bytes_are_refused(stream):
    with pytest.raises(CodecError, match="trailing bytes"):
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
    with pytest.raises(CodecError, match="CRC-32"):
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
