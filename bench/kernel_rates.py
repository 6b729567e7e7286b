#!/usr/bin/env python3
"""Dense GEMMs and attention as vLLM runs them, against the step model's roofline (issue #12).

The step model prices a layer's dense projections as a roofline (the measured bf16 peak and
HBM rate) and decode attention by a KV-read rate timed with torch's SDPA; prefill attention is
a roofline too. Plain vLLM's kernel profile (Mixtral-8x7B, 256 x (512, 128), 0.9 of the H200,
bench/results/e2e_fits_short_kernels_2026-11-25.json) had the dense GEMMs at 725 ms against
592 modelled and attention at 930 against 759. This times, in one process on the GPU:
- the bf16 peak (8192^3 matmul) and the HBM copy rate, the roofline's two rates;
- cuBLAS over the shipped models' dense shapes and a grid of token counts
  (`profiles.profiler.measure_dense_gemms`);
- vLLM's FlashAttention over a paged cache, decode (batch x context) and causal prefill, and
  SDPA decode at the same points (`profiles.profiler.measure_attention`).
Every kernel runs 20 times back to back inside one CUDA graph, timed per call. JSON to $OUT or
bench/results/kernel_rates_<date>.json (`bench.device_info.write_result`);
the table printed last is each kernel's time over the roofline's.

    FLUXMOE_COMMIT=<sha> python3 bench/kernel_rates.py      # on the GPU machine, vLLM carried
"""
from __future__ import annotations

import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def peaks() -> dict:
    """The roofline's rates, measured here as the profiler measures them."""
    import torch

    from profiles.profiler import _graph_ms, _ms

    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    tflops = 2 * 8192 ** 3 / _ms(lambda: a @ a) / 1e9
    out = torch.empty_like(a)
    tflops_graph = 2 * 8192 ** 3 / _graph_ms(lambda: torch.matmul(a, a, out=out)) / 1e9
    del a, out
    src = torch.randn(1 << 30, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    hbm = 2 * src.numel() * 2 / _ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    torch.cuda.empty_cache()
    return {"bf16_tflops": tflops, "bf16_tflops_graph": tflops_graph, "hbm_gbps": hbm}


def main() -> None:
    from bench.device_info import write_result
    from profiles.profiler import measure_attention, measure_dense_gemms

    rates = peaks()
    print(rates, flush=True)
    gemms = measure_dense_gemms()
    attention = measure_attention("vllm") + measure_attention("sdpa")
    flops_s, bytes_s = rates["bf16_tflops"] * 1e12, rates["hbm_gbps"] * 1e9
    for r in gemms:
        r["roofline_s"] = max(2 * r["tokens"] * r["k"] * r["n"] / flops_s, r["k"] * r["n"] * 2 / bytes_s)
    for r in attention:
        r["roofline_s"] = max(r["flops"] / flops_s, r["kv_bytes"] / bytes_s)
    path = write_result("kernel_rates", {
        "what": "dense GEMMs (cuBLAS) and attention (vLLM FlashAttention, paged; SDPA) against the roofline, "
                "20 calls inside one CUDA graph, per call, one process",
        "peaks": rates, "gemms": gemms, "attention": attention})
    print(f"wrote {path}\n\ndense GEMMs, time / roofline by tokens (median over shapes, min-max):")
    for m in sorted({r["tokens"] for r in gemms}):
        ratios = [r["s"] / r["roofline_s"] for r in gemms if r["tokens"] == m]
        print(f"  {m:>6} tokens: {statistics.median(ratios):5.2f}  ({min(ratios):.2f}-{max(ratios):.2f})")
    print("\nattention, time / roofline:")
    print(f"  {'shape':<11} {'kernel':<8} {'phase':<8} {'seqs':>5} {'context':>7} {'ms':>8} {'ratio':>6} "
          f"{'KV GB/s':>8}")
    for r in attention:
        print(f"  {r['shape']:<11} {r['kernel']:<8} {r['phase']:<8} {r['seqs']:>5} {r['context']:>7} "
              f"{r['s'] * 1e3:>8.3f} {r['s'] / r['roofline_s']:>6.2f} {r['kv_bytes'] / r['s'] / 1e9:>8.0f}")


if __name__ == "__main__":
    main()
