"""The Triton decoder against the CPU reference, bit for bit (run on the GPU machine)."""

import pytest
import torch

from executor.codec import decode, encode
from tests.test_codec import all_bf16_patterns, same_bits

pytestmark = pytest.mark.gpu


def _inputs():
    gen = torch.Generator().manual_seed(3)
    yield "all-patterns", all_bf16_patterns()
    yield "gaussian-odd", (torch.randn(1_000_003, generator=gen) * 0.02).to(torch.bfloat16)
    yield "wide-spread", (torch.randn(77_777, generator=gen) * torch.logspace(-40, 40, 77_777, base=2.0)).to(torch.bfloat16)
    yield "tiny", torch.tensor([1.5, -0.0, float("nan")], dtype=torch.bfloat16)
    yield "matrix", (torch.randn(333, 517, generator=gen) * 3).to(torch.bfloat16)


@pytest.mark.parametrize("name,x", list(_inputs()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("block", [128, 4096])
def test_triton_decode_equals_cpu_reference(name, x, block):
    from executor.codec.triton_decode import DeviceDecoder

    enc = encode(x, block=block)
    reference = decode(enc)
    out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device="cuda")  # poisoned
    stream = torch.cuda.Stream()
    DeviceDecoder(enc).decode_into(out, stream)
    stream.synchronize()
    assert same_bits(out.cpu(), reference) and same_bits(out.cpu(), x)


def test_gpu_encode_matches_cpu_encode():
    x = (torch.randn(300_001) * 0.1).to(torch.bfloat16)
    cpu, gpu = encode(x), encode(x.cuda())
    assert cpu.header == gpu.header and torch.equal(cpu.payload, gpu.payload.cpu())


def test_decode_into_allocates_nothing_per_call():
    from executor.codec.triton_decode import DeviceDecoder

    x = (torch.randn(1 << 20) * 0.02).to(torch.bfloat16)
    decoder = DeviceDecoder(encode(x))
    out = torch.empty_like(x, device="cuda")
    decoder.decode_into(out)  # compile and warm up
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(10):
        decoder.decode_into(out)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert same_bits(out.cpu(), x)
