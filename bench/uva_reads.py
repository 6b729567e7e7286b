#!/usr/bin/env python3
"""How vLLM's fused-MoE kernel reads UVA-offloaded experts, by tokens in the step (issue #12).

vLLM's `cpu_offload_gb` leaves expert weights in pinned host memory and its Triton fused-MoE
kernel reads them over PCIe. The step model prices that as the routed experts' bytes, read
once per block of `offload_tile_tokens` tokens an expert gets, at UVA_READ_SHARE of the copy
engine's rate. The 8-layer Mixtral at 13 GiB offloaded (bench/results/e2e_a40_standin_steps_*)
ran its decode steps of 97-111 sequences at 0.42-0.49 s and those of 112-160 at 0.28-0.35,
where the model has 0.28 for both: vLLM picks its kernel config by the step's tokens (the
nearest key of its tuned table), and smaller tiles read host memory more often or slower.

This times, in one process on the GPU, for each shipped shape (Mixtral-8x7B, Qwen3-Next-80B)
and a grid of tokens per step: vLLM's `fused_experts` over one layer's experts with the
weights on the GPU and with the same weights as UVA views of pinned host memory (as vLLM's
offloader makes them), routing random top-k (uniform), inside CUDA graphs; and the copy
engine's rate on a 1 GiB pinned copy. The figure kept is `reads`: the UVA call's extra time
over the experts its tokens routed to, in units of those experts' bytes at UVA_READ_SHARE of
the copy rate, which is what `CostModel.offload_rereads` stands for. JSON to $OUT or
bench/results/uva_reads_<date>.json; the table printed last.

    FLUXMOE_COMMIT=<sha> python3 bench/uva_reads.py      # on the GPU machine, vLLM carried
"""
from __future__ import annotations

import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-next-80b-a3b": (2048, 512, 512, 10)}
TOKENS = (1, 4, 16, 32, 48, 64, 80, 96, 104, 112, 120, 128, 160, 192, 256, 384, 512, 1024, 2048, 4096, 16384)
ROUTINGS = 3  # random routings per point, each its own graph


def copy_gbps(torch, nbytes: int = 1 << 30) -> float:
    """The copy engine's host-to-device rate on one large pinned copy (the profile's h2d at 1 GiB)."""
    from profiles.profiler import _ms

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / _ms(lambda: dev.copy_(host, non_blocking=True), reps=10) / 1e6


def measure(shapes=SHAPES, tokens=TOKENS) -> dict:  # pragma: no cover - needs a GPU and vLLM
    import torch
    from tqdm import tqdm
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

    from planner.cost_model import UVA_READ_SHARE
    from profiles.profiler import _graph_call_ms

    dev = torch.device("cuda")
    rate = copy_gbps(torch)
    rows = []
    for name, (h, i, experts, k) in shapes.items():
        w1 = torch.randn(experts, 2 * i, h, device=dev, dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(experts, h, i, device=dev, dtype=torch.bfloat16) * 0.02
        w1_uva = get_accelerator_view_from_cpu_tensor(w1.cpu().pin_memory())
        w2_uva = get_accelerator_view_from_cpu_tensor(w2.cpu().pin_memory())
        expert_bytes = (w1[0].numel() + w2[0].numel()) * 2
        gen = torch.Generator(device=dev).manual_seed(0)
        for m in tqdm(tokens, desc=name):
            gpu_ms, uva_ms, touched = [], [], []
            for _ in range(ROUTINGS):
                logits = torch.randn(m, experts, device=dev, generator=gen)
                weights, ids = torch.softmax(logits, -1).topk(k, dim=-1)
                ids = ids.to(torch.int32)
                x = torch.randn(m, h, device=dev, dtype=torch.bfloat16, generator=gen)
                gpu_ms.append(_graph_call_ms([lambda: fused_experts(x, w1, w2, weights, ids)], calls=4, reps=5))
                uva_ms.append(_graph_call_ms([lambda: fused_experts(x, w1_uva, w2_uva, weights, ids)], calls=2,
                                             reps=3))
                touched.append(int(ids.unique().numel()))
            gpu_s, uva_s = statistics.mean(gpu_ms) / 1e3, statistics.mean(uva_ms) / 1e3
            routed_bytes = statistics.mean(touched) * expert_bytes
            reads = (uva_s - gpu_s) * rate * 1e9 * UVA_READ_SHARE / routed_bytes
            rows.append(dict(model=name, hidden=h, intermediate=i, experts=experts, top_k=k, tokens=m,
                             experts_routed=statistics.mean(touched), gpu_s=gpu_s, uva_s=uva_s, reads=reads))
        del w1, w2, w1_uva, w2_uva
        torch.cuda.empty_cache()
    return dict(copy_gbps=rate, uva_read_share=UVA_READ_SHARE, rows=rows)


def main() -> None:  # pragma: no cover - needs a GPU and vLLM
    from bench.device_info import write_result

    result = measure()
    path = write_result("uva_reads", {"what": "vLLM fused_experts over one layer, weights on the GPU and as UVA "
                                              "views of pinned host memory, random top-k routing, CUDA graphs",
                                      **result})
    print(f"\ncopy engine {result['copy_gbps']:.1f} GB/s; {path}")
    print(f"{'model':<20} {'tokens':>6} {'routed':>7} {'gpu ms':>8} {'uva ms':>9} {'reads':>6}")
    for r in result["rows"]:
        print(f"{r['model']:<20} {r['tokens']:>6} {r['experts_routed']:>7.1f} {r['gpu_s'] * 1e3:>8.3f} "
              f"{r['uva_s'] * 1e3:>9.2f} {r['reads']:>6.2f}")


if __name__ == "__main__":
    main()
