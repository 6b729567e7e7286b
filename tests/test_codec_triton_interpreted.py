"""The Triton decoder's logic on the CPU, through Triton's interpreter (when Triton is installed).

The GPU tests (test_codec_gpu.py) run the compiled kernel; this runs the same kernel source
under TRITON_INTERPRET=1 in a subprocess, so CI without a GPU still checks it bit for bit.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from executor.codec import decode, encode
    from executor.codec.triton_decode import DeviceDecoder
    gen = torch.Generator().manual_seed(5)
    cases = [torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16),
             (torch.randn(10_007, generator=gen) * 0.02).to(torch.bfloat16),
             (torch.randn(9_999, generator=gen) * torch.logspace(-30, 30, 9_999, base=2.0)).to(torch.bfloat16),
             torch.tensor([1.5], dtype=torch.bfloat16)]
    for x in cases:
        for block in (None, 128, 4096):
            enc = encode(x, block=block)
            out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16)
            DeviceDecoder(enc).decode_into(out)
            assert torch.equal(out.view(torch.int16), decode(enc).view(torch.int16)), (x.numel(), block)
    print("interpreted decoder: bit-exact")
""")


def test_triton_kernel_under_the_interpreter_is_bit_exact():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "bit-exact" in run.stdout
