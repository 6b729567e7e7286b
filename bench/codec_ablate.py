"""Decoder time against block size and warps, beside a copy of the same bytes. One table. Device only.
(v3 of the kernel also had switches that left stages out; see bench/NOTES.md for what they showed.)"""

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from executor.codec import encode  # noqa: E402
from executor.codec.triton_decode import DeviceDecoder  # noqa: E402

N = 256 << 20
x = (torch.randn(N, device="cuda") * 0.02).to(torch.bfloat16)
out = torch.empty_like(x)
dst = torch.empty_like(x)
ms = lambda f: triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median")  # noqa: E731
t_copy = ms(lambda: dst.copy_(x))
rows = []
for block in (1024, 2048, 4096, 8192):
    enc = encode(x, block=block)
    for warps in (2, 4, 8):
        d = DeviceDecoder(enc, num_warps=warps)
        rows.append((block, warps, ms(lambda: d.decode_into(out))))
    del enc
print(f"copy {t_copy:.3f} ms = {2 * N / t_copy / 1e6:.0f} GB/s of output")
print("block warps   ms   GB/s  share")
for block, warps, t in rows:
    print(f"{block:5d} {warps:5d} {t:6.3f} {2 * N / t / 1e6:6.0f} {t_copy / t:6.1%}")
