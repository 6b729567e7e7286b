"""A GPU budget that shrinks by about 8 GiB and grows back while a sequence decodes, against
fresh starts at each budget: same GPU, same run, one table.

Mixtral-8x7B's expert shapes, 8 layers (a stand-in), one sequence, each step a CUDA-graph
replay, host experts fetched routed-only. Phase A keeps 4 experts per layer resident, phase B
none (every expert on the host: the arena drops 32 resident rows and gains 8 staging rows),
phase C 4 again. Between phases the pager is rebuilt between steps (ExpertPager.rebuild: every
expert read back to the host, the GPU memory freed, the new tiers built) and the step graph
captured again. Per phase: the median step time against a pager built fresh at that budget
in the same process, the free memory the driver reports (torch.cuda.mem_get_info), and every
step's output checked bit-exact against the all-resident stack. The pause of each rebuild is
reported: no step fails or changes, but the sequence waits for it.
Run on the GPU machine: FLUXMOE_COMMIT=<sha> python3 bench/budget_resize.py
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.adaptive_residency import reference, step  # noqa: E402
from bench.device_info import write_result  # noqa: E402
from executor.moe_layer import random_stack  # noqa: E402
from executor.pager import ExpertPager  # noqa: E402
from executor.tiers import ExpertLayout  # noqa: E402
from fluxmoe.names import Tier  # noqa: E402

L, H, I, E, K = 8, 4096, 14336, 8, 2
STEPS = 60
dev = torch.device("cuda")


def tiers_with(resident: int) -> list[list[Tier]]:
    return [[Tier.RESIDENT if e < resident else Tier.HOST for e in range(E)] for _ in range(L)]


def free_bytes() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def decode(pager: ExpertPager, routers, stacks, bias, xs) -> dict:
    """STEPS graph replays; median step ms; every output against the all-resident stack."""
    static_x = xs[0].clone()
    step(pager, static_x, routers, bias, K)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(pager, static_x, routers, bias, K)
    times, exact = [], True
    for s in range(STEPS):
        static_x.copy_(xs[s % len(xs)])
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        exact &= torch.equal(out, reference(xs[s % len(xs)], routers, stacks, bias, K))
    del graph
    return dict(step_ms=statistics.median(times[5:]), bit_exact=exact)


def main() -> None:
    routers, stacks = random_stack(L, H, I, E, dev, seed=0)
    bias = [torch.zeros(E, device=dev) for _ in range(L)]
    xs = [torch.randn(1, H, device=dev, dtype=torch.bfloat16) for _ in range(16)]
    layout = ExpertLayout(H, I)
    build = dict(fused=True, routed_fetch=True, count_routes=True)
    fresh = {}
    for resident in (4, 0):
        pager = ExpertPager.build(stacks, tiers_with(resident), layout, 1, dev, **build)
        fresh[resident] = decode(pager, routers, stacks, bias, xs) | dict(gpu_bytes=sum(pager.gpu_bytes.values()))
        del pager
        free_bytes()
    pager = ExpertPager.build(stacks, tiers_with(4), layout, 1, dev, **build)
    phases = []
    for name, resident in (("A", 4), ("B", 0), ("C", 4)):
        pause = 0.0
        if phases:
            started = time.perf_counter()
            pager = pager.rebuild(tiers_with(resident))
            torch.cuda.synchronize()
            pause = time.perf_counter() - started
        free = free_bytes()
        run = decode(pager, routers, stacks, bias, xs)
        phases.append(dict(phase=name, resident_per_layer=resident, rebuild_pause_s=pause, driver_free_bytes=free,
                           expert_gpu_bytes=sum(pager.gpu_bytes.values()), **run,
                           vs_fresh=run["step_ms"] / fresh[resident]["step_ms"]))
    a, b = phases[0], phases[1]
    result = dict(layers=L, experts=E, top_k=K, steps_per_phase=STEPS, fresh=fresh, phases=phases,
                  freed_bytes=b["driver_free_bytes"] - a["driver_free_bytes"],
                  expert_bytes_dropped=a["expert_gpu_bytes"] - b["expert_gpu_bytes"])
    path = write_result("budget_resize_h200", result)
    print(f"wrote {path}")
    print(f"{'phase':6} {'R':>3} {'step ms':>8} {'vs fresh':>9} {'free GiB':>9} {'experts GiB':>12} {'pause s':>8} exact")
    for p in phases:
        print(f"{p['phase']:6} {p['resident_per_layer']:3d} {p['step_ms']:8.2f} {p['vs_fresh']:9.3f} "
              f"{p['driver_free_bytes'] / 2**30:9.2f} {p['expert_gpu_bytes'] / 2**30:12.2f} {p['rebuild_pause_s']:8.1f} "
              f"{p['bit_exact']}")
    print(f"driver free memory rose by {result['freed_bytes'] / 2**30:.2f} GiB when the experts' GPU bytes fell by "
          f"{result['expert_bytes_dropped'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
