"""Lossless bf16 expert codec: the FXMC format, its CPU encoder and reference decoder, and a
Triton decoder that writes into a caller-given staging buffer (imported lazily: needs CUDA)."""

from executor.codec.format import CodecError, CodecHeader, EncodedTensor
from executor.codec.reference import decode, encode

__all__ = ["CodecError", "CodecHeader", "EncodedTensor", "decode", "encode", "decode_into"]


def decode_into(enc: EncodedTensor, out, stream=None):
    """Decode on the GPU into `out` (a preallocated bf16 CUDA tensor) on `stream`. See triton_decode."""
    from executor.codec.triton_decode import decode_into as _decode_into

    return _decode_into(enc, out, stream)
