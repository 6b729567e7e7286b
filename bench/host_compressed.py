"""The host-compressed tier against the bf16 host tier, same GPU, same run, one table.

For a Mixtral-8x7B-shaped stack (4 layers of 8 experts, 4096 x 14336) and a Qwen3-Next-shaped
one (4 layers of 512 experts, 2048 x 512), all experts on the host in one run and all
host-compressed in the other, depth 1:
- paging alone (the pager's per-layer loop, no expert compute): effective expert bandwidth =
  bf16 expert bytes staged per second; the ratio of the two tiers (goal >= 1.35x);
- a decode step of 32 tokens through the MoE stack (bit-exact against plain torch), eager and
  as CUDA-graph replays;
- the pager's own stats: link GB/s (encoded bytes for host-compressed) and decode GB/s.
Weights are random at trained-like scale (std 0.02); the codec ratio is reported with them.
Run on the GPU machine: FLUXMOE_COMMIT=<sha> python3 bench/host_compressed.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.device_info import write_result  # noqa: E402
from executor.moe_layer import random_stack, reference_forward  # noqa: E402
from executor.paged_stack import PagedMoEStack  # noqa: E402

LAYERS, T = 4, 32
SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-next-80b-a3b": (2048, 512, 512, 10)}
TIERS = ("host", "host-compressed")
dev = torch.device("cuda")


def ms(fn, rep: int) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=rep, return_mode="median")


def paging_only(stack: PagedMoEStack) -> None:
    """One step of the pager with no expert compute: every layer staged, waited for, released."""
    pager = stack.pager
    for layer in range(len(pager.layers)):
        pager.before_layer(layer)
        pager.after_layer(layer)
    pager.end_step()


def graph_ms(fn, x) -> float:
    fn(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return ms(graph.replay, rep=1500)


def run_shape(name: str) -> dict:
    H, I, E, K = SHAPES[name]
    routers, stacks = random_stack(LAYERS, H, I, E, dev, seed=0)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    reference = reference_forward(x, routers, stacks, K)
    expert_bytes = LAYERS * E * 3 * H * I * 2
    out = {"expert_bytes_per_step": expert_bytes}
    for tier in TIERS:
        stack = PagedMoEStack(routers, stacks, [[tier] * E] * LAYERS, K, 1, dev, fused=True)
        assert torch.equal(stack.forward(x), reference), f"{name} {tier}: not bit-exact"
        stack.forward(x, stats=True)
        stats = stack.pager.stats
        alone = ms(lambda: paging_only(stack), rep=1500)
        step = ms(lambda: stack.forward(x), rep=1500)
        graph = graph_ms(stack.forward, x)
        out[tier] = dict(paging_ms=alone, step_ms=step, graph_step_ms=graph,
                         effective_gbps=expert_bytes / alone / 1e6, link_gbps=stats.h2d_gbps,
                         decode_gbps=stats.decode_gbps, host_bytes=stack.pager.host_bytes,
                         gpu_bytes=stack.pager.gpu_bytes)
        del stack
        torch.cuda.empty_cache()
    host, packed = out["host"], out["host-compressed"]
    out["codec_ratio"] = packed["host_bytes"] / host["host_bytes"]
    out["effective_bandwidth_ratio"] = packed["effective_gbps"] / host["effective_gbps"]
    out["step_speedup"] = host["step_ms"] / packed["step_ms"]
    out["graph_step_speedup"] = host["graph_step_ms"] / packed["graph_step_ms"]
    return out


def main() -> None:
    torch.manual_seed(0)
    results = {name: run_shape(name) for name in SHAPES}
    path = write_result("host_compressed_h200", {"layers": LAYERS, "tokens": T, "prefetch_depth": 1,
                                                 "shapes": results})
    print(f"results: {path}")
    print(f"{'shape':20s} {'tier':16s} {'paging ms':>10s} {'eff GB/s':>9s} {'link GB/s':>10s} {'decode GB/s':>12s} "
          f"{'step ms':>8s} {'graph ms':>9s}")
    for name, r in results.items():
        for tier in TIERS:
            c = r[tier]
            print(f"{name:20s} {tier:16s} {c['paging_ms']:10.2f} {c['effective_gbps']:9.1f} {c['link_gbps']:10.1f} "
                  f"{c['decode_gbps']:12.1f} {c['step_ms']:8.2f} {c['graph_step_ms']:9.2f}")
        print(f"{name:20s} codec ratio {r['codec_ratio']:.3f}; effective bandwidth {r['effective_bandwidth_ratio']:.2f}x "
              f"(goal >= 1.35x); decode step {r['step_speedup']:.2f}x eager, {r['graph_step_speedup']:.2f}x graphs")


if __name__ == "__main__":
    main()
