"""Codec on the GPU: size ratio per weight source, Triton decode throughput against a
device-to-device copy of the same bytes timed in the same run, and one Mixtral-8x7B layer's
experts (2.8 GB bf16) decoded against their pinned PCIe transfer. Prints one table last.

Run on the GPU machine: FLUXMOE_COMMIT=<sha> python3 bench/codec_gpu.py
Needs .weights/trained_bf16.pt (bench/trained_weights.py) carried along.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.device_info import write_result  # noqa: E402
from executor.codec import encode  # noqa: E402
from executor.codec.triton_decode import DeviceDecoder  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent.parent / ".weights" / "trained_bf16.pt"
BENCH_ELEMENTS = 256 << 20  # 512 MiB of bf16 output: far past the 60 MB L2
MIXTRAL_LAYER = 8 * 3 * 4096 * 14336  # elements of one Mixtral-8x7B MoE layer's experts


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def tiled(tensors: list[torch.Tensor], elements: int) -> torch.Tensor:
    """The source's values repeated to `elements` on the GPU (same exponent statistics)."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).cuda()
    reps = -(-elements // flat.numel())
    return flat.repeat(reps)[:elements]


def sources() -> dict[str, list[torch.Tensor]]:
    out = torch.load(WEIGHTS) if WEIGHTS.exists() else {}
    gen = torch.Generator().manual_seed(0)
    out["gaussian-0.02"] = [(torch.randn(8 << 20, generator=gen) * 0.02).to(torch.bfloat16)]
    out["vllm-dummy-uniform-1e-3"] = [((torch.rand(8 << 20, generator=gen) * 2 - 1) * 1e-3).to(torch.bfloat16)]
    return out


def bench_source(name: str, tensors: list[torch.Tensor]) -> dict:
    ratio = sum(encode(t).nbytes for t in tensors) / sum(2 * t.numel() for t in tensors)  # per tensor
    exact = True
    for t in tensors[:8]:  # bit-exact on the real tensors themselves
        out = torch.empty(t.shape, dtype=torch.bfloat16, device="cuda")
        DeviceDecoder(encode(t)).decode_into(out)
        exact &= torch.equal(out.cpu().view(torch.int16), t.view(torch.int16))
    big = tiled(tensors, BENCH_ELEMENTS)
    enc = encode(big)
    decoder = DeviceDecoder(enc)
    out = torch.full_like(big, float("nan"))
    decoder.decode_into(out)
    exact &= torch.equal(out.view(torch.int16), big.view(torch.int16))
    copy_dst = torch.empty_like(big)
    t_copy = ms(lambda: copy_dst.copy_(big))
    decoders = {w: DeviceDecoder(enc, num_warps=w) for w in (2, 4, 8)}  # pick the best for this GPU
    by_warps = {w: ms(lambda d=d: d.decode_into(out)) for w, d in decoders.items()}
    best_warps = min(by_warps, key=by_warps.get)
    decoder = decoders[best_warps]
    t_decode = ms(lambda: decoder.decode_into(out))
    t_copy_again = ms(lambda: copy_dst.copy_(big))
    out_bytes = 2 * big.numel()
    del big, out, copy_dst, decoder, decoders
    torch.cuda.empty_cache()
    return dict(source=name, tensors=len(tensors), params=sum(t.numel() for t in tensors), ratio=ratio,
                num_warps=best_warps, decode_ms_by_warps=by_warps, k1=enc.header.k1, k2=enc.header.k2,
                bit_exact=bool(exact), decode_ms=t_decode, copy_ms=(t_copy + t_copy_again) / 2,
                copy_spread=abs(t_copy - t_copy_again) / min(t_copy, t_copy_again),
                decode_gbps=out_bytes / t_decode / 1e6, copy_gbps=out_bytes / ((t_copy + t_copy_again) / 2) / 1e6)


def bench_mixtral_layer(tensors: list[torch.Tensor]) -> dict:
    layer = tiled(tensors, MIXTRAL_LAYER)
    decoder = DeviceDecoder(encode(layer), num_warps=4)
    out = torch.empty_like(layer)
    t_decode = ms(lambda: decoder.decode_into(out))
    host = torch.empty(layer.shape, dtype=torch.bfloat16, pin_memory=True)
    host.copy_(layer.cpu())
    t_h2d = ms(lambda: out.copy_(host, non_blocking=True))
    return dict(elements=MIXTRAL_LAYER, bytes=2 * MIXTRAL_LAYER, decode_ms=t_decode, h2d_ms=t_h2d,
                h2d_gbps=2 * MIXTRAL_LAYER / t_h2d / 1e6, decode_over_h2d=t_decode / t_h2d,
                compressed_ratio=decoder.enc.ratio)


def main() -> None:
    torch.manual_seed(0)
    rows = [bench_source(name, tensors) for name, tensors in sources().items()]
    trained = torch.load(WEIGHTS)["minilm-ffn"] if WEIGHTS.exists() else sources()["gaussian-0.02"]
    layer = bench_mixtral_layer(trained)
    path = write_result("codec_h200", {"sources": rows, "mixtral_layer": layer})
    print(f"\nresults: {path}")
    print(f"{'source':26s} {'ratio':>6s} {'exact':>5s} {'decode GB/s':>12s} {'copy GB/s':>10s} {'decode/copy':>11s}")
    for r in rows:
        print(f"{r['source']:26s} {r['ratio']:6.4f} {str(r['bit_exact']):>5s} {r['decode_gbps']:12.0f} "
              f"{r['copy_gbps']:10.0f} {r['decode_gbps'] / r['copy_gbps']:11.1%}")
    print(f"Mixtral-8x7B layer (2.82 GB bf16, MiniLM-FFN statistics): decode {layer['decode_ms']:.2f} ms, "
          f"pinned H2D {layer['h2d_ms']:.1f} ms ({layer['h2d_gbps']:.1f} GB/s); decode/H2D = {layer['decode_over_h2d']:.3f}")


if __name__ == "__main__":
    main()
