"""Small decode run for compute-sanitizer (memcheck): every bf16 pattern and odd sizes.

compute-sanitizer --tool memcheck python3 bench/codec_sanitize.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from executor.codec import decode, encode  # noqa: E402
from executor.codec.triton_decode import DeviceDecoder  # noqa: E402

inputs = [torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16),
          (torch.randn(4097) * torch.logspace(-30, 30, 4097, base=2.0)).to(torch.bfloat16),
          torch.tensor([0.5], dtype=torch.bfloat16)]
for x in inputs:
    for block in (128, 4096):
        enc = encode(x, block=block)
        out = torch.empty(x.shape, dtype=torch.bfloat16, device="cuda")
        DeviceDecoder(enc).decode_into(out)
        torch.cuda.synchronize()
        assert torch.equal(out.cpu().view(torch.int16), decode(enc).view(torch.int16))
print("sanitize run: all decodes bit-exact")
