"""Routed-only fetch against fetching whole layers, same GPU, same run, one table.

A Qwen3-Next-shaped stack (8 layers of 512 experts, 2048 x 512, top-10) and a Mixtral-8x7B-
shaped one (4 layers of 8 experts, 4096 x 14336, top-2), every expert on the host, decode steps
of 1, 4, 16 and 64 tokens (executor/routed_stack.py):
- whole: each layer's experts copied by the copy engine while the previous layer runs (the
  host tier today);
- routed: only the experts the step's tokens pick, fetched after the router by the UVA gather
  kernel;
- predicted: routed, plus a guess for the next layer (its router on the current hidden
  state) fetched on a side stream while the current layer runs; the misses after the router.
Per mode: step time (TPOT of a decode step: the stack is all the step does), expert bytes
moved over PCIe per generated token, and for "predicted" the share of routed experts that the
guess had brought (hit rate). Every mode is checked bit-exact against the all-resident stack,
and "predicted" also as a CUDA-graph replay. The gather kernel's bandwidth with every row
flagged is set against the copy engine's on the same bytes.
Weights and inputs are random (std 0.02 weights, unit-normal inputs): routing is close to
uniform, and the hit rate is that of this synthetic residual stream, not of a trained model.
Run on the GPU machine: FLUXMOE_COMMIT=<sha> python3 bench/routed_fetch.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.device_info import write_result  # noqa: E402
from executor.moe_layer import random_stack  # noqa: E402
from executor.routed_fetch import _gather  # noqa: E402
from executor.routed_stack import MODES, RoutedMoEStack, routed_reference  # noqa: E402

SHAPES = {"qwen3-next-80b-a3b": (8, 2048, 512, 512, 10), "mixtral-8x7b": (4, 4096, 14336, 8, 2)}
BATCHES = (1, 4, 16, 64)
dev = torch.device("cuda")


def ms(fn, rep: int = 400) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def link_rates(stack: RoutedMoEStack) -> dict:
    """GB/s over PCIe of one layer's experts: copy engine against the gather kernel (all rows)."""
    f = stack.fetchers[0]
    everything = torch.ones(len(f.host), dtype=torch.bool, device=dev)
    nbytes = f.host.numel() * f.host.element_size()
    copy_ms = ms(lambda: f.slots.copy_(f.host, non_blocking=True))
    gather_ms = ms(lambda: _gather(f.host, f.slots, everything))
    return {"copy_engine_gbps": nbytes / copy_ms / 1e6, "gather_kernel_gbps": nbytes / gather_ms / 1e6}


def run_shape(name: str) -> dict:
    L, H, I, E, K = SHAPES[name]
    routers, stacks = random_stack(L, H, I, E, dev, seed=0)
    out = {"layers": L, "experts": E, "top_k": K, "expert_bytes": 3 * H * I * 2, "batches": {}}
    stack = RoutedMoEStack(routers, stacks, K, dev, "whole")  # one set of pinned stacks, every mode
    out["link"] = link_rates(stack)
    for T in BATCHES:
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        want = routed_reference(x, routers, stacks, K)
        row = {}
        for mode in MODES:
            stack.mode = mode
            assert torch.equal(stack.forward(x), want), f"{name} {mode} T={T}: not bit-exact"
            before = stack.counters()
            steps = 20
            for _ in range(steps):
                stack.forward(x)
            after = stack.counters()
            moved, routed, hits = (after[k] - before[k] for k in ("moved", "routed", "hits"))
            step = ms(lambda: stack.forward(x))
            row[mode] = dict(step_ms=step, bytes_per_token=moved * out["expert_bytes"] / steps / T,
                             experts_moved_per_step=moved / steps,
                             hit_rate=hits / routed if routed else None)
        if T in (1, 16):  # the predicted mode as a CUDA-graph replay: same bits
            stack.mode = "predicted"
            stack.forward(x)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = stack.forward(x)
            graph.replay()
            assert torch.equal(y, want), f"{name} predicted T={T}: graph replay not bit-exact"
            row["predicted"]["graph_step_ms"] = ms(graph.replay)
        whole = row["whole"]
        for mode in ("routed", "predicted"):
            row[mode]["step_vs_whole"] = row[mode]["step_ms"] / whole["step_ms"]
            row[mode]["bytes_vs_whole"] = row[mode]["bytes_per_token"] / whole["bytes_per_token"]
        out["batches"][T] = row
    del stack
    torch.cuda.empty_cache()
    return out


def main() -> None:
    results = {name: run_shape(name) for name in SHAPES}
    path = write_result("routed_fetch_h200", {"shapes": results})
    print(f"wrote {path}")
    for name, r in results.items():
        link = r["link"]
        print(f"\n{name}: {r['layers']} layers x {r['experts']} experts, top-{r['top_k']}; link: copy engine "
              f"{link['copy_engine_gbps']:.1f} GB/s, gather kernel {link['gather_kernel_gbps']:.1f} GB/s")
        print(f"{'T':>3} {'mode':>10} {'step ms':>9} {'MB/token':>9} {'step/whole':>10} {'bytes/whole':>11} {'hit':>6}")
        for T, row in r["batches"].items():
            for mode in MODES:
                m = row[mode]
                hit = f"{m['hit_rate']:.2f}" if m["hit_rate"] is not None else "-"
                print(f"{T:>3} {mode:>10} {m['step_ms']:>9.2f} {m['bytes_per_token'] / 1e6:>9.1f} "
                      f"{m.get('step_vs_whole', 1.0):>10.3f} {m.get('bytes_vs_whole', 1.0):>11.3f} {hit:>6}")


if __name__ == "__main__":
    main()
