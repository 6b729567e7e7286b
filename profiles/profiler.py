"""Measure a GPU into a `HardwareProfile` with `measured` provenance.

What it measures, each timed with CUDA events (median of repeats, after warm-up):
- pinned host-to-device and device-to-host bandwidth against transfer size;
- device-to-device copy bandwidth (the HBM rate, read + write) and a large bf16 matmul;
- the FXMC codec: decode rate (bf16 output bytes/s) and size ratio on trained-like weights;
- decode attention (SDPA, grouped-query) over a grid of batch x context, as the GB/s of KV
  it reads against the KV bytes a step reads (what drives decode attention in every model);
- the expert FFN (gate, up, SiLU, down) against tokens per expert, for every shipped model's
  expert shape: vLLM's fused-MoE kernel where vLLM is installed (else batched matmuls), every
  expert of a layer at once, divided by their number (a lone expert measures launch overhead);
- the dense projections of the shipped models (cuBLAS) over a grid of tokens: the share of
  the matmul peak they reach where compute-bound (`dense_gemm_efficiency`).
`build_profile` turns those measurements into a profile (pure, tested on the CPU);
`python -m profiles.profiler --gpu-name h200` runs it all on a GPU and writes
profiles/gpus/<name>-measured.json, which `profiles.load` then prefers over the datasheet.
- where vLLM is installed, causal prefill attention (its FlashAttention, paged) against the
  prompt length, as the share of the matmul peak it reaches (`prefill_attention_efficiency`).
The engine's per-step overhead is not measured here; see the profile's provenance.
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fluxmoe.errors import ConfigError, FluxMoEError
from fluxmoe.serde import dump_json
from profiles.hardware import CodecRates, Curve, HardwareProfile, Provenance
from profiles.registry import GPUS_DIR, list_models, load_gpu, load_model

TRANSFER_SIZES = [1 << k for k in range(16, 31, 2)]  # 64 KiB .. 1 GiB
EXPERT_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
TOOL_VERSION = "fluxmoe-profiler 1"


@dataclass
class Measurements:
    """Raw figures from one profiling run."""

    device: str
    gpu_memory_bytes: int
    host_memory_bytes: int
    h2d_gbps: dict[int, float]
    d2h_gbps: dict[int, float]
    copy_gbps: float  # read + write
    matmul_tflops: float
    codec_decode_gbps: float
    codec_ratio: float
    expert_ffn_s: dict[str, dict[int, float]] = field(default_factory=dict)  # "h x i" -> tokens -> s
    attention_kv_gbps: dict[int, float] = field(default_factory=dict)  # KV bytes read -> GB/s
    dense_gemm_efficiency: float = 1.0  # share of matmul_tflops that dense projections reach
    prefill_attention_efficiency: dict[int, float] = field(default_factory=dict)  # prompt tokens -> share
    ffn_kernel: str = "torch"  # what timed the expert FFN tables (`measure_expert_ffn`)


def dense_gemm_efficiency(rows: list[dict], peak_tflops: float) -> float:
    """The median share of `peak_tflops` (a square 8192^3 matmul's) that the dense projections
    of `measure_dense_gemms` reach where they are compute-bound: 1,024 tokens or more through
    matrices of at least 2048 x 2048 (on the H200, 0.79-0.99, median 0.865)."""
    shares = [2 * r["tokens"] * r["k"] * r["n"] / r["s"] / (peak_tflops * 1e12) for r in rows
              if r["tokens"] >= 1024 and r["k"] * r["n"] >= 2048 * 2048]
    if not shares:
        raise ValueError("dense_gemm_efficiency: no compute-bound row (>= 1,024 tokens, >= 2048 x 2048)")
    return statistics.median(shares)


def prefill_attention_efficiency(rows: list[dict], peak_tflops: float) -> dict[int, float]:
    """Per prompt length, the median over attention shapes of the share of `peak_tflops` that
    causal prefill reaches (the prefill rows of `measure_attention`; on the H200 with vLLM's
    FlashAttention, 0.13 at 128 tokens to 0.71 at 4,096)."""
    shares: dict[int, list[float]] = {}
    for r in rows:
        if r["phase"] == "prefill":
            shares.setdefault(r["context"], []).append(r["flops"] / r["s"] / (peak_tflops * 1e12))
    return {length: statistics.median(v) for length, v in sorted(shares.items())}


def _curve(points: dict) -> Curve:
    """A measured table {size or tokens: value} as a curve in log size."""
    return Curve(sorted(points), [points[k] for k in sorted(points)], log_x=True)


def build_profile(name: str, m: Measurements, base: HardwareProfile | None = None) -> HardwareProfile:
    """A measured profile; what is not measured comes from `base` (the datasheet profile)."""
    ffn = {shape: _curve(points) for shape, points in m.expert_ffn_s.items()}
    fields = dict(
        name=name, gpu_memory_bytes=m.gpu_memory_bytes, hbm_gbps=m.copy_gbps, bf16_tflops=m.matmul_tflops,
        h2d_gbps=_curve(m.h2d_gbps), d2h_gbps=_curve(m.d2h_gbps),
        codec=CodecRates(m.codec_decode_gbps, m.codec_ratio), host_pinned_bytes=m.host_memory_bytes,
        # The copy rate is achieved already; dense GEMMs reach a measured share of the matmul peak.
        gemm_efficiency=m.dense_gemm_efficiency, memory_efficiency=1.0, expert_ffn_s=ffn,
        attention_kv_gbps=_curve(m.attention_kv_gbps) if m.attention_kv_gbps else None,
        prefill_attention_efficiency=(_curve(m.prefill_attention_efficiency) if m.prefill_attention_efficiency
                                      else None),
        provenance=Provenance("measured", "fluxmoe profiler: PCIe curves, D2D copy, bf16 matmul, codec, expert "
                              f"FFN tables ({m.ffn_kernel} kernel), dense-GEMM share of the matmul peak and "
                              "decode-attention KV bandwidth measured; prefill attention "
                              + ("measured (vLLM's FlashAttention); " if m.prefill_attention_efficiency
                                 else "is roofline; ")
                              + "step overhead and host memory from the datasheet profile",
                              device=m.device, date=datetime.date.today().isoformat(), tool_version=TOOL_VERSION))
    if base is not None:
        # Host capacity belongs to the serving host, not to the machine that was profiled.
        fields["host_pinned_bytes"] = base.host_pinned_bytes
        return dataclasses.replace(base, **fields)
    return HardwareProfile(**fields)


def _ms(fn, reps: int = 20) -> float:  # pragma: no cover - needs a GPU
    """Median CUDA-event milliseconds of `fn` after one warm-up call."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def vllm_fused_experts():  # pragma: no cover - needs vLLM
    """vLLM's Triton fused-MoE call, where vLLM is installed (what it serves bf16 experts with)."""
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    except ImportError:
        return None
    return fused_experts


def balanced_routing(tokens_per_expert: int, experts: int, top_k: int):
    """Top-k expert ids per token (an int array, tokens x k) that give every expert
    `tokens_per_expert` tokens (a few one more where E t is not a multiple of k): token m
    picks experts m k, m k + 1, ... m k + k - 1, mod E, so the picks walk the experts in turn."""
    import numpy as np

    tokens = -(-tokens_per_expert * experts // top_k)
    return np.add.outer(np.arange(tokens) * top_k, np.arange(top_k)) % experts


def torch_experts_ffn(x, w13, w2):  # pragma: no cover - timed on a GPU
    """n experts' FFNs as batched torch matmuls: x [n, t, h], w13 [n, h, 2i] (gate and up,
    fused), w2 [n, i, h]; the shipped profile's expert FFN tables time this."""
    import torch

    i = w2.shape[1]
    gate_up = torch.bmm(x, w13)  # [n, t, 2i]
    act = torch.nn.functional.silu(gate_up[..., :i]) * gate_up[..., i:]  # [n, t, i]
    return torch.bmm(act, w2)  # [n, t, h]


def _graph_ms(fn, reps: int = 20) -> float:  # pragma: no cover - needs a GPU
    """Median milliseconds of `fn` replayed from a CUDA graph, as vLLM runs decode steps: the
    kernels alone, without the launch gaps an event-timed eager call also pays."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture (Triton compiles here)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _ms(graph.replay, reps)


def _graph_call_ms(fns, calls: int = 20, reps: int = 10) -> float:  # pragma: no cover - needs a GPU
    """Median milliseconds of one call among `calls` captured back to back in one CUDA graph,
    cycling through `fns` (the same kernel on different buffers, so that the H200's 50 MB L2
    does not serve a call what the call before it read): a kernel as it runs inside vLLM's step
    graphs, without a graph launch per call (one call per replay measured a 10-17 us floor
    that vLLM's steps do not pay per kernel)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    return _ms(graph.replay, reps) / calls


def _copies(nbytes: int, spread: int = 256 << 20, most: int = 20) -> int:
    """Buffers to cycle through so that consecutive calls read `spread` bytes apart."""
    return max(1, min(most, -(-spread // max(nbytes, 1))))


def measure_expert_ffn(expert_shapes: list[tuple[int, int, int]], kernel: str = "torch",
                       top_k: int = 2) -> dict[str, dict[int, float]]:  # pragma: no cover - needs a GPU
    """Seconds of one expert's FFN against its tokens, for each (hidden, intermediate, experts).
    kernel "torch": batched torch matmuls (gate, up, SiLU, down), event-timed, as the shipped
    H200 profile was measured; "vllm": vLLM's Triton fused-MoE kernel over every expert of a
    layer at once, routing balanced (`balanced_routing`), 20 calls inside one CUDA graph as a
    vLLM step runs it (`_graph_call_ms`; timed eagerly it measured 7-42% above torch at 1-64
    tokens per expert, launch gaps included, and 5% above at 4,096; bench/NOTES.md, session
    10); both divided by the experts."""
    import torch
    from tqdm import tqdm

    if kernel not in ("torch", "vllm"):
        raise ConfigError(f"kernel: expected 'torch' or 'vllm', got {kernel!r}")
    fused = vllm_fused_experts() if kernel == "vllm" else None
    if kernel == "vllm" and fused is None:
        raise ConfigError("kernel 'vllm': vLLM is not installed here")
    dev = torch.device("cuda")
    ffn: dict[str, dict[int, float]] = {}
    for h, i, experts in tqdm(expert_shapes, desc="expert FFN shapes"):
        n = max(1, min(experts, (2 << 30) // (3 * h * i * 2))) if fused is None else experts
        points = {}
        if fused is not None:
            w1 = torch.randn(n, 2 * i, h, device=dev, dtype=torch.bfloat16) * 0.02
            w2 = torch.randn(n, h, i, device=dev, dtype=torch.bfloat16) * 0.02
            k = min(top_k, n)
            for t in EXPERT_TOKENS:
                ids = torch.from_numpy(balanced_routing(t, n, k)).to(dev, torch.int32)
                if ids.shape[0] * k * (h + 2 * i) * 2 > 8 << 30:
                    continue  # activations past 8 GiB: the table's last point stands for larger t
                x = torch.randn(ids.shape[0], h, device=dev, dtype=torch.bfloat16)
                weights = torch.full(ids.shape, 1 / k, device=dev, dtype=torch.float32)
                points[t] = _graph_call_ms([lambda: fused(x, w1, w2, weights, ids)]) / 1e3 / n
                del x, ids, weights
        else:
            w13 = torch.randn(n, h, 2 * i, device=dev, dtype=torch.bfloat16) * 0.02  # gate and up, fused
            w2 = torch.randn(n, i, h, device=dev, dtype=torch.bfloat16) * 0.02
            for t in EXPERT_TOKENS:
                if n * t * (h + 2 * i) * 2 > 8 << 30:
                    continue  # activations past 8 GiB: the table's last point stands for larger t
                x = torch.randn(n, t, h, device=dev, dtype=torch.bfloat16)
                points[t] = _ms(lambda: torch_experts_ffn(x, w13, w2)) / 1e3 / n
                del x
            del w13
        ffn[f"{h}x{i}"] = points
        del w2
        torch.cuda.empty_cache()
    return ffn


def remeasure_expert_ffn(gpu_name: str, out: str | Path | None = None,
                         kernel: str = "torch") -> Path:  # pragma: no cover - needs a GPU
    """Re-measure only the expert FFN tables of `gpu_name`'s measured profile with `kernel`
    (see `measure_expert_ffn`), keeping every other figure; the provenance says so."""
    from fluxmoe.serde import load_json

    path = GPUS_DIR / f"{gpu_name}-measured.json"
    profile = load_json(HardwareProfile, path)
    ffn = measure_expert_ffn(shipped_expert_shapes(), kernel)
    how = "vLLM's Triton fused-MoE kernel in a CUDA graph" if kernel == "vllm" else "batched torch matmuls"
    source = (profile.provenance.source.split("; expert FFN tables re-measured")[0]
              + f"; expert FFN tables re-measured {datetime.date.today().isoformat()} with {how}")
    updated = dataclasses.replace(profile, expert_ffn_s={shape: _curve(points) for shape, points in ffn.items()},
                                  provenance=dataclasses.replace(profile.provenance, source=source))
    target = Path(out or path)
    dump_json(updated, target)
    return target


def measure(expert_shapes: list[tuple[int, int, int]]) -> Measurements:  # pragma: no cover - needs a GPU
    import os

    import torch
    from tqdm import tqdm

    if not torch.cuda.is_available():
        raise FluxMoEError("the profiler measures a GPU, and torch sees no CUDA device here")
    from executor.codec import encode
    from executor.codec.triton_decode import DeviceDecoder

    ms = _ms
    dev = torch.device("cuda")
    h2d, d2h = {}, {}
    host = torch.empty(max(TRANSFER_SIZES), dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(max(TRANSFER_SIZES), dtype=torch.uint8, device=dev)
    for size in tqdm(TRANSFER_SIZES, desc="PCIe"):
        h2d[size] = size / ms(lambda: gpu[:size].copy_(host[:size], non_blocking=True)) / 1e6
        d2h[size] = size / ms(lambda: host[:size].copy_(gpu[:size], non_blocking=True)) / 1e6
    del host, gpu
    src = torch.randn(1 << 30, device=dev, dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 2 / ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    matmul_tflops = 2 * 8192 ** 3 / ms(lambda: a @ a) / 1e9
    del a
    weights = (torch.randn(256 << 20, device=dev) * 0.02).to(torch.bfloat16)
    decoder = DeviceDecoder(encode(weights))
    out = torch.empty_like(weights)
    codec_gbps = 2 * weights.numel() / ms(lambda: decoder.decode_into(out)) / 1e6
    codec_ratio = decoder.enc.ratio
    assert torch.equal(out.view(torch.int16), weights.view(torch.int16))
    del weights, decoder, out
    ffn_kernel = "vllm" if vllm_fused_experts() is not None else "torch"  # what serving runs, where installed
    ffn = measure_expert_ffn(expert_shapes, ffn_kernel)
    gemm_efficiency = dense_gemm_efficiency(measure_dense_gemms(), matmul_tflops)
    prefill = (prefill_attention_efficiency(measure_attention("vllm"), matmul_tflops) if ffn_kernel == "vllm"
               else {})  # vLLM's FlashAttention is what serving runs; without vLLM, prefill stays a roofline
    attention: dict[int, float] = {}
    heads, kv_heads, head_dim = 32, 8, 128  # Mixtral's; the curve is in KV bytes, so it transfers
    for batch in tqdm((1, 8, 32, 128), desc="decode attention"):
        for context in (256, 1024, 4096, 16384):
            if batch * context * kv_heads * head_dim * 2 * 2 > 8 << 30:
                continue
            q = torch.randn(batch, heads, 1, head_dim, device=dev, dtype=torch.bfloat16)
            k = torch.randn(batch, kv_heads, context, head_dim, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            kv_bytes = 2 * k.numel() * 2
            attention[kv_bytes] = kv_bytes / ms(sdpa) / 1e6
            del q, k, v
    props = torch.cuda.get_device_properties(0)
    host_bytes = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)
    return Measurements(props.name, props.total_memory, host_bytes, h2d, d2h, copy_gbps, matmul_tflops, codec_gbps,
                        codec_ratio, ffn, attention, gemm_efficiency, prefill, ffn_kernel)


def shipped_expert_shapes() -> list[tuple[int, int, int]]:
    """(hidden, intermediate, most experts per layer) of every shipped model's experts."""
    shapes: dict[tuple[int, int], int] = {}
    for spec in map(load_model, list_models()):
        key = (spec.hidden_size, spec.expert_intermediate_size)
        shapes[key] = max(shapes.get(key, 0), spec.num_experts)
    return sorted((h, i, e) for (h, i), e in shapes.items())


def run(gpu_name: str, out: str | Path | None = None) -> Path:  # pragma: no cover - needs a GPU
    """Measure this GPU into a hardware profile named `gpu_name`; the datasheet profile of that
    name, if we ship one, fills what is not measured. Returns the file written."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("fluxmoe profile measures a CUDA GPU, and none is visible here")
    m = measure(shipped_expert_shapes())
    try:
        base = load_gpu(gpu_name, measured=False)
    except FluxMoEError:
        base = None
    profile = build_profile(gpu_name, m, base)
    path = Path(out or GPUS_DIR / f"{gpu_name}-measured.json")
    dump_json(profile, path)
    print(f"\n{m.device}: H2D {max(m.h2d_gbps.values()):.1f} GB/s, D2H {max(m.d2h_gbps.values()):.1f} GB/s, "
          f"D2D copy {m.copy_gbps:.0f} GB/s, bf16 matmul {m.matmul_tflops:.0f} TFLOP/s, codec decode "
          f"{m.codec_decode_gbps:.0f} GB/s at ratio {m.codec_ratio:.3f}; {len(m.expert_ffn_s)} expert shapes")
    return path


# Dense projections of the shipped models, (name, in features, out features): what a layer's
# attention block (or linear-attention block), shared expert and router, and the LM head run
# through cuBLAS (vLLM's unquantized linear layers call torch's F.linear).
DENSE_SHAPES = [
    ("mixtral qkv", 4096, 6144), ("mixtral o", 4096, 4096), ("mixtral router", 4096, 8),
    ("mixtral lm head", 4096, 32000),
    ("qwen3-next attention qkv+gate", 2048, 9216), ("qwen3-next attention o", 4096, 2048),
    ("qwen3-next linear in", 2048, 12288), ("qwen3-next linear out", 4096, 2048),
    ("qwen3-next shared gate+up", 2048, 1024), ("qwen3-next shared down", 512, 2048),
    ("qwen3-next router", 2048, 512), ("qwen3-next lm head", 2048, 151936),
]
GEMM_TOKENS = [1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
# (name, query heads, KV heads, head dim, block tokens) of vLLM's paged KV for the shipped models.
ATTENTION_SHAPES = [("mixtral", 32, 8, 128, 16), ("qwen3-next", 16, 2, 256, 544)]
DECODE_BATCHES = [1, 8, 32, 64, 128, 256]
DECODE_CONTEXTS = [128, 512, 1024, 2048, 4096]
PREFILL_LENGTHS = [128, 256, 512, 1024, 2048, 4096]
PREFILL_TOKENS = 16384  # a chunk as vLLM's offline engine batches it on a large GPU


def measure_dense_gemms(shapes=DENSE_SHAPES, tokens=GEMM_TOKENS) -> list[dict]:  # pragma: no cover - needs a GPU
    """Seconds of y = x W^T (F.linear, bf16) for each shape and token count, inside a CUDA
    graph as vLLM's steps run them (`_graph_call_ms`)."""
    import torch
    from tqdm import tqdm

    dev, rows = torch.device("cuda"), []
    for name, k, n in tqdm(shapes, desc="dense GEMMs"):
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(_copies(n * k * 2))]
        for m in tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            calls = [lambda w=w: torch.matmul(x, w.t(), out=out) for w in ws]
            rows.append(dict(name=name, k=k, n=n, tokens=m, s=_graph_call_ms(calls) / 1e3))
            del x, out
        del ws
    torch.cuda.empty_cache()
    return rows


def _paged_kv(torch, seqs: int, context: int, kv_heads: int, head_dim: int, block: int, dev):
    """A paged K and V cache holding `seqs` sequences of `context` tokens in shuffled blocks,
    and the block table that finds them (vLLM's layout: blocks x block tokens x heads x dim)."""
    per_seq = -(-context // block)
    blocks = seqs * per_seq
    k = torch.randn(blocks, block, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.randperm(blocks, device=dev, dtype=torch.int32).view(seqs, per_seq)
    return k, v, table


def measure_attention(kernel: str = "vllm") -> list[dict]:  # pragma: no cover - needs a GPU
    """Seconds of one layer's attention, decode (batch x context, one query token each) and
    causal prefill (`PREFILL_TOKENS` of prompts of each length), for each shape of
    `ATTENTION_SHAPES`: kernel "vllm" is vLLM's FlashAttention over the paged cache (what its
    FLASH_ATTN backend calls); "sdpa" is torch's SDPA over contiguous K and V, decode only (how
    the profile's decode curve was first measured). Each inside a CUDA graph (`_graph_call_ms`)."""
    import torch
    from tqdm import tqdm

    dev, rows = torch.device("cuda"), []
    if kernel == "vllm":
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        fa_version = 3 if torch.cuda.get_device_capability()[0] == 9 else 2  # what vLLM's backend picks
    elif kernel != "sdpa":
        raise ConfigError(f"kernel: expected 'vllm' or 'sdpa', got {kernel!r}")
    for name, heads, kv_heads, head_dim, block in ATTENTION_SHAPES:
        kv_token = 2 * kv_heads * head_dim * 2  # K and V, bf16
        cases = [("decode", b, c) for b in DECODE_BATCHES for c in DECODE_CONTEXTS]
        if kernel == "vllm":
            cases += [("prefill", PREFILL_TOKENS // length, length) for length in PREFILL_LENGTHS]
        for phase, seqs, context in tqdm(cases, desc=f"{kernel} attention, {name}"):
            if seqs * context * kv_token > 8 << 30:
                continue
            q_len = 1 if phase == "decode" else context
            calls = []
            for _ in range(_copies(seqs * context * kv_token)):
                q = torch.randn(seqs * q_len, heads, head_dim, device=dev, dtype=torch.bfloat16)
                if kernel == "vllm":
                    k, v, table = _paged_kv(torch, seqs, context, kv_heads, head_dim, block, dev)
                    cu_q = torch.arange(0, seqs + 1, device=dev, dtype=torch.int32) * q_len
                    used = torch.full((seqs,), context, device=dev, dtype=torch.int32)
                    calls.append(lambda q=q, k=k, v=v, table=table, cu_q=cu_q, used=used, out=torch.empty_like(q):
                                 flash_attn_varlen_func(q, k, v, max_seqlen_q=q_len, cu_seqlens_q=cu_q,
                                                        max_seqlen_k=context, seqused_k=used,
                                                        softmax_scale=head_dim ** -0.5, causal=True,
                                                        block_table=table, out=out, fa_version=fa_version))
                else:
                    q = q.view(seqs, heads, 1, head_dim)
                    k = torch.randn(seqs, kv_heads, context, head_dim, device=dev, dtype=torch.bfloat16)
                    calls.append(lambda q=q, k=k, v=torch.randn_like(k):
                                 torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            seconds = _graph_call_ms(calls) / 1e3
            flops = 4 * heads * head_dim * seqs * (q_len * context - q_len * (q_len - 1) / 2)  # causal
            label = kernel if kernel == "sdpa" else f"vllm fa{fa_version}"
            rows.append(dict(shape=name, kernel=label, phase=phase, seqs=seqs, context=context, s=seconds,
                             kv_bytes=seqs * context * kv_token, flops=flops))
            del calls, q, k
            torch.cuda.empty_cache()
    return rows
