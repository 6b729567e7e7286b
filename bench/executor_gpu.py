"""The paging executor on the GPU, one table: a Mixtral-8x7B-shaped stack (4 layers, 8 experts
of 4096 x 14336, top-2), a decode step of 32 tokens.

1. Host tier: H2D bandwidth while expert GEMMs run beside it, against the pinned peak
   measured alone in the same run.
2. Paging overhead: everything resident through the executor against plain torch (eager,
   and as CUDA graph replays).
3. Step time with experts on host / compressed / mixed against the cost model's prediction
   from the measured H200 profile.
Run on the GPU machine: FLUXMOE_COMMIT=<sha> python3 bench/executor_gpu.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.device_info import write_result  # noqa: E402
from executor.moe_layer import random_stack, reference_forward  # noqa: E402
from executor.paged_stack import PagedMoEStack  # noqa: E402
from planner.cost_model import CostModel, StepShape, TierCounts  # noqa: E402
from profiles import Profile, load_gpu  # noqa: E402
from profiles.model_spec import ModelSpec  # noqa: E402

LAYERS, H, I, E, K, T = 4, 4096, 14336, 8, 2, 32
dev = torch.device("cuda")


def ms(fn, rep=1000) -> float:
    return triton.testing.do_bench(fn, warmup=100, rep=rep, return_mode="median")


def host_tier_share(stacks) -> dict:
    """Pinned H2D of one layer's experts alone, then beside a stream of expert GEMMs."""
    host = torch.cat([t.reshape(-1).cpu() for t in stacks[0]]).pin_memory()
    dst = torch.empty_like(host, device=dev)
    copy = torch.cuda.Stream()

    def h2d():
        with torch.cuda.stream(copy):
            dst.copy_(host, non_blocking=True)
        torch.cuda.current_stream().wait_stream(copy)

    alone = ms(h2d, rep=500)
    w13, w2 = stacks[1][0][0], stacks[1][1][0]
    x = torch.randn(256, H, device=dev, dtype=torch.bfloat16)
    gemm = lambda: (torch.nn.functional.silu((x @ w13.T)[:, :I]) @ w2.T)  # noqa: E731
    gemm_ms = ms(gemm, rep=200)
    spins = int(alone / gemm_ms * 1.5) + 1  # GEMMs spanning the whole copy
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        for _ in range(spins):
            gemm()
        with torch.cuda.stream(copy):
            start.record(copy)
            dst.copy_(host, non_blocking=True)
            end.record(copy)
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    beside = sorted(times)[len(times) // 2]
    nbytes = host.numel() * 2
    return dict(bytes=nbytes, alone_gbps=nbytes / alone / 1e6, beside_gemm_gbps=nbytes / beside / 1e6,
                share=alone / beside)


def graph_ms(fn, x) -> float | str:
    try:
        fn(x)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn(x)
        g.replay()
        torch.cuda.synchronize()
        if not torch.equal(out, fn(x)):
            return "replay differs from eager"
        return ms(g.replay)
    except Exception as e:  # report why a path cannot be captured, keep the run going
        return f"capture failed: {type(e).__name__}: {str(e)[:160]}"


def stack_spec() -> ModelSpec:
    """The benchmark stack as a ModelSpec: MoE layers with a router and nothing else."""
    return ModelSpec(name="mixtral-8x7b-4-layer-stack", family="mixtral", hidden_size=H, num_layers=LAYERS,
                     vocab_size=1, tie_word_embeddings=True, max_context=4096, num_experts=E, experts_per_token=K,
                     expert_intermediate_size=I, expert_has_bias=False, moe_layers=list(range(LAYERS)),
                     shared_ffn_params=[0] * LAYERS, attention=["full"] * LAYERS, attention_params=[0] * LAYERS,
                     kv_bytes_per_token_layer={"full": 0})


def main() -> None:
    torch.manual_seed(0)
    routers, stacks = random_stack(LAYERS, H, I, E, dev)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    reference = reference_forward(x, routers, stacks, K)
    plain = lambda inp: reference_forward(inp, routers, stacks, K)  # noqa: E731
    results = {"host_tier": host_tier_share(stacks)}

    resident = PagedMoEStack(routers, stacks, [["resident"] * E] * LAYERS, K, 1, dev)
    assert torch.equal(resident.forward(x), reference)
    t_plain, t_paged = ms(lambda: plain(x)), ms(lambda: resident.forward(x))
    t_plain_again = ms(lambda: plain(x))
    g_plain, g_paged = graph_ms(plain, x), graph_ms(resident.forward, x)
    results["overhead"] = dict(plain_ms=(t_plain + t_plain_again) / 2, paged_ms=t_paged,
                               plain_spread=abs(t_plain - t_plain_again) / t_plain,
                               graph_plain_ms=g_plain, graph_paged_ms=g_paged)
    del resident

    hw = load_gpu("h200")
    cost = CostModel(Profile(stack_spec(), hw))
    step = StepShape(T, T, 1)
    cases = {"host": ["host"] * E, "compressed": ["compressed"] * E,
             "mixed": ["resident"] * 4 + ["compressed"] * 2 + ["host"] * 2}
    results["cases"] = {}
    for name, tiers in cases.items():
        paged = PagedMoEStack(routers, stacks, [tiers] * LAYERS, K, 1, dev)
        paged.forward(x)  # compile the decoder before the step whose stats we keep
        out = paged.forward(x, stats=True)
        assert torch.equal(out, reference), name
        measured = ms(lambda: paged.forward(x), rep=1500)
        counts = TierCounts(tiers.count("resident"), tiers.count("compressed"), tiers.count("host"))
        predicted_s = cost.step_time([counts] * LAYERS, step, 1).total_s - cost.fixed_s(step)
        graph = graph_ms(paged.forward, x)
        results["cases"][name] = dict(
            measured_ms=measured, predicted_ms=predicted_s * 1e3, error=measured / (predicted_s * 1e3) - 1,
            per_layer_measured_ms=measured / LAYERS, wait_ms=paged.stats.total_wait_ms,
            h2d_gbps=paged.stats.h2d_gbps, decode_gbps=[round(s.decode_gbps) for s in paged.stats.layers],
            gpu_bytes=paged.gpu_bytes, graph_ms=graph)
        del paged
        torch.cuda.empty_cache()

    path = write_result("executor_h200", results)
    print(json.dumps(results, indent=1, default=str)[:3000])
    ht, ov = results["host_tier"], results["overhead"]
    print(f"\nresults: {path}")
    print(f"host tier: H2D alone {ht['alone_gbps']:.1f} GB/s, beside expert GEMMs {ht['beside_gemm_gbps']:.1f} GB/s "
          f"-> {ht['share']:.1%} of peak")
    print(f"overhead (all resident): plain {ov['plain_ms']:.3f} ms, executor {ov['paged_ms']:.3f} ms "
          f"-> {ov['paged_ms'] / ov['plain_ms'] - 1:+.2%} (plain spread {ov['plain_spread']:.2%}); "
          f"graphs: {ov['graph_plain_ms']} vs {ov['graph_paged_ms']}")
    print(f"{'case':11s} {'measured ms':>12s} {'predicted ms':>13s} {'error':>7s} {'wait ms':>8s} {'H2D GB/s':>9s}")
    for name, c in results["cases"].items():
        print(f"{name:11s} {c['measured_ms']:12.2f} {c['predicted_ms']:13.2f} {c['error']:7.1%} {c['wait_ms']:8.2f} "
              f"{c['h2d_gbps']:9.1f}")


if __name__ == "__main__":
    main()
