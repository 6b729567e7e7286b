"""Adaptive residency against fixed plans under skewed, drifting routing: same GPU, same run.

Per shape, a stand-in stack of the model's expert shapes (Qwen3-Next: 8 layers of 512 experts,
top-10; Mixtral-8x7B: 8 layers of 8, top-2) decodes one sequence (one token a step). Each
router's logits carry a bias (-alpha ln rank over a per-layer permutation of the experts), so
routing is skewed; halfway the permutations change (drift). Every plan keeps R experts per
layer resident and the rest on the host, fetched routed-only (executor/routed_fetch.py):
- fixed: resident = the first R ids (a plan made before start knows no popularity);
- oracle: resident = the first half's R hottest (the best fixed plan for the first half);
- adaptive: starts as "fixed"; the pager counts picks on the GPU, and every window the
  Replanner (planner/replan.py) reads them without a sync and, where it acts, the resident-host
  swaps it lists are made between steps, spread so that serving slows by at most 10%
  (planner/moves.py). The swap time is measured on the first swap and fed back.
Per run: step time and experts moved over PCIe per step, per window (plotted), and at the end
one step checked bit-exact against the all-resident stack. "Memory at equal throughput": the
fewest resident experts with which the adaptive run matches the fixed run's throughput at R0.
Run on the GPU machine: FLUXMOE_COMMIT=<sha> python3 bench/adaptive_residency.py [shape ...];
plot a result: python bench/adaptive_residency.py --plot RESULT.json OUT.png
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import planner  # noqa: E402
import profiles  # noqa: E402
from bench.device_info import write_result  # noqa: E402
from executor.moe_layer import random_stack  # noqa: E402
from executor.pager import ExpertPager  # noqa: E402
from executor.routed_stack import fused_step, routed_moe  # noqa: E402
from executor.tiers import ExpertLayout  # noqa: E402
from fluxmoe.names import Tier  # noqa: E402
from planner.plan import LayerPlan  # noqa: E402
from planner.replan import ReplanPolicy, Replanner, predicted_step_s  # noqa: E402
from profiles.feedback import RuntimeFeedback  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "qwen3-next-80b-a3b": dict(folder="models/qwen3-next-80b-a3b-8layers", budget="14GiB", hidden=2048,
                               intermediate=512, experts=512, top_k=10, residents=(128, 96, 64, 48, 32),
                               steps=3000, window=150, alpha=1.0),
    "mixtral-8x7b": dict(folder="models/mixtral-8x7b-8layers", budget="30GiB", hidden=4096, intermediate=14336,
                         experts=8, top_k=2, residents=(4, 3, 2), steps=400, window=25, alpha=1.0),
}
MAX_SLOWDOWN = 0.1
dev = torch.device("cuda")


def biases(layers: int, experts: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """Per layer, -alpha ln(rank) over a random permutation of the experts."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        rank = torch.empty(experts)
        rank[torch.randperm(experts, generator=gen)] = torch.arange(1, experts + 1, dtype=torch.float)
        out.append((-alpha * rank.log()).to(dev))
    return out


def norm(x):
    """RMS-normalized, as a model normalizes each layer's input (random weights would blow the
    residual stream up layer after layer, Mixtral's wide experts to inf by the seventh)."""
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def route(x, router, bias, k):
    probs = F.softmax((x @ router.T).float() + bias, dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    return ids, (weights / weights.sum(-1, keepdim=True)).to(x.dtype)


def step(pager: ExpertPager, x, routers, bias, k):
    def route_layer(layer, x):
        x = norm(x)
        return (x, *route(x, routers[layer], bias[layer], k))

    return fused_step(pager, x, route_layer)


def reference(x, routers, stacks, bias, k):
    for l, (router, (w13, w2)) in enumerate(zip(routers, stacks)):
        x = norm(x)
        ids, gates = route(x, router, bias[l], k)
        x = routed_moe(x, ids, gates, w13, w2)
    return x


def popularity_of(xs, routers, stacks, bias, k) -> list[list[float]]:
    """Per layer, each expert's share of picks over the tokens `xs`, through the whole stack."""
    out = []
    x = torch.cat(xs)
    for l, (router, (w13, w2)) in enumerate(zip(routers, stacks)):
        x = norm(x)
        ids, gates = route(x, router, bias[l], k)
        out.append((torch.bincount(ids.flatten(), minlength=len(bias[l])).float() / len(x)).tolist())
        x = routed_moe(x, ids, gates, w13, w2)
    return out


def hottest(shares: list[list[float]], n: int) -> list[list[int]]:
    """Per layer, the n experts with the largest shares (the oracle's residents)."""
    return [sorted(range(len(row)), key=lambda e: -row[e])[:n] for row in shares]


def plan_for(base, residents: list[list[int]], experts: int):
    """`base` with these residents per layer and every other expert on the host, routed-only."""
    layers = [LayerPlan(lp.layer, list(res), [], [e for e in range(experts) if e not in res],
                        expert_order=list(range(experts))) for lp, res in zip(sorted(base.layers, key=lambda p: p.layer),
                                                                              residents)]
    slots = max(lp.paged for lp in layers)
    return dataclasses.replace(base, layers=layers, prefetch_depth=1, staging_slots=2 * slots, routed_fetch=True,
                               max_num_seqs=1)


def run(name, cfg, mode, R, routers, stacks, phases, base, profile, xs, shares):
    """One run: `phases` = (bias, bias after the drift); returns its per-window record."""
    E, K, L = cfg["experts"], cfg["top_k"], len(routers)
    layout = ExpertLayout(cfg["hidden"], cfg["intermediate"])
    if mode == "oracle":
        residents = hottest(shares[0], R)
    else:
        residents = [list(range(R)) for _ in range(L)]
    tiers = [[Tier.RESIDENT if e in set(res) else Tier.HOST for e in range(E)] for res in residents]
    started = time.perf_counter()
    pager = ExpertPager.build(stacks, tiers, layout, 1, dev, fused=True, routed_fetch=True, count_routes=True)
    build_s = time.perf_counter() - started
    plan = plan_for(base, residents, E)
    position = {layer: i for i, layer in enumerate(profile.model.moe_layers)}  # model layer -> pager's index
    loop = Replanner(profile, plan, ReplanPolicy(min_gain=0.05, patience=2, cooldown=2,
                                                 min_tokens=cfg["window"] // 2, smoothing=0.5))
    expert_bytes = 3 * cfg["hidden"] * cfg["intermediate"] * 2
    swap_s = 2 * expert_bytes / 50e9  # until the first swap is timed
    steps, window = cfg["steps"], cfg["window"]
    # Each step is one CUDA-graph replay, as vLLM runs decode steps: an eager Python loop spends
    # about 7 ms a step launching kernels, which hides what paging costs. Swaps between replays
    # update the maps the graph reads in place; the drift overwrites the captured biases.
    static_x, bias = xs[0].clone(), [b.clone() for b in phases[0]]
    step(pager, static_x, routers, bias, K)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(pager, static_x, routers, bias, K)
    for counter in [pager.route_counter.counts, pager.route_counter.tokens] + [
            c for f in pager.fetchers if f is not None for c in (f.moved, f.routed, f.hits)]:
        counter.zero_()  # the warm-up step's counts (in place: the graph holds these tensors)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    swaps_at = [0] * steps
    moved_at_window = []
    decisions = []
    for s in range(steps):
        if s == steps // 2:
            for captured, drifted in zip(bias, phases[1]):
                captured.copy_(drifted)
        todo = loop.next_swaps()
        for i, sw in enumerate(todo):
            if swap_s == 2 * expert_bytes / 50e9 and i == 0:  # time the first swap
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                pager.swap(position[sw.layer], sw.into_gpu, sw.out_of_gpu)
                b.record()
                b.synchronize()
                swap_s = a.elapsed_time(b) / 1e3
            else:
                pager.swap(position[sw.layer], sw.into_gpu, sw.out_of_gpu)
        swaps_at[s] = len(todo)
        start, end = events[s]
        static_x.copy_(xs[s % len(xs)])
        start.record()
        graph.replay()
        end.record()
        if (s + 1) % window == 0:
            moved_at_window.append(pager.routed_counters()["moved"])  # a sync, once a window
            if mode == "adaptive" and not loop.changing:
                counts, tokens = pager.route_counter.read()
                feedback = RuntimeFeedback(s + 1, tokens[0], counts, mean_batch=1)
                decision = loop.consider(feedback)
                decisions.append(dict(step=s + 1, act=decision.act, gain=round(decision.gain, 4),
                                      swaps=len(decision.swaps), reason=decision.reason))
                if decision.act:
                    recent = [events[i][0].elapsed_time(events[i][1]) / 1e3 for i in range(s + 1 - window // 2, s + 1)]
                    loop.begin_change(decision, sum(recent) / len(recent), swap_s, MAX_SLOWDOWN)
    torch.cuda.synchronize()
    del graph
    step_ms = [a.elapsed_time(b) for a, b in events]
    x = xs[0]
    exact = torch.equal(step(pager, x, routers, phases[1], K), reference(x, routers, stacks, phases[1], K))
    windows = []
    for w in range(steps // window):
        part = step_ms[w * window:(w + 1) * window]
        moved = moved_at_window[w] - (moved_at_window[w - 1] if w else 0)
        windows.append(dict(step=(w + 1) * window, step_ms=sum(part) / len(part), experts_moved_per_step=moved / window,
                            swaps=sum(swaps_at[w * window:(w + 1) * window])))
    half = steps // 2

    def mean(lo, hi):
        return sum(step_ms[lo:hi]) / (hi - lo)

    out = dict(mode=mode, resident=R, resident_bytes=R * L * expert_bytes, build_s=build_s, bit_exact=exact,
               tokens_per_s=steps / (sum(step_ms) / 1e3), phase1_late_ms=mean(half // 2, half),
               phase2_late_ms=mean(half + half // 2, steps), swaps=sum(swaps_at), swap_ms=swap_s * 1e3,
               windows=windows, decisions=decisions,
               predicted_step_ms=predicted_step_s(profile, loop.plan, loop.popularity, 1) * 1e3
               if loop.popularity is not None else None)
    del pager
    gc.collect()
    torch.cuda.empty_cache()
    for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):  # pinned blocks back to the OS:
        if hasattr(torch._C, name):  # seven runs of 20+ GB would not fit the host otherwise
            getattr(torch._C, name)()
            break
    return out


def run_shape(name: str) -> dict:
    cfg = SHAPES[name]
    profile = profiles.Profile(profiles.load_model(ROOT / cfg["folder"]), profiles.load_gpu("h200"))
    m = profile.model
    L = m.num_moe_layers
    base = planner.optimize(profile, cfg["budget"], max_num_seqs=1)
    routers, stacks = random_stack(L, cfg["hidden"], cfg["intermediate"], cfg["experts"], dev, seed=0)
    phases = (biases(L, cfg["experts"], cfg["alpha"], 1), biases(L, cfg["experts"], cfg["alpha"], 2))
    xs = [torch.randn(1, cfg["hidden"], device=dev, dtype=torch.bfloat16) for _ in range(64)]
    shares = [popularity_of(xs, routers, stacks, bias, cfg["top_k"]) for bias in phases]  # what the steps route
    R0 = cfg["residents"][0]
    args = (routers, stacks, phases, base, profile, xs, shares)
    runs = [run(name, cfg, mode, R0, *args) for mode in ("fixed", "oracle")]
    runs += [run(name, cfg, "adaptive", R, *args) for R in cfg["residents"]]
    fixed = runs[0]["tokens_per_s"]
    matching = [r for r in runs if r["mode"] == "adaptive" and r["tokens_per_s"] >= fixed]
    least = min(matching, key=lambda r: r["resident"]) if matching else None
    oracle = runs[1]["tokens_per_s"]
    matching_oracle = [r for r in runs if r["mode"] == "adaptive" and r["tokens_per_s"] >= oracle]
    least_oracle = min(matching_oracle, key=lambda r: r["resident"]) if matching_oracle else None
    return dict(layers=L, experts=cfg["experts"], top_k=cfg["top_k"], steps=cfg["steps"], window=cfg["window"],
                expert_bytes=3 * cfg["hidden"] * cfg["intermediate"] * 2, phase_shares=shares,
                runs=runs, fixed_tokens_per_s=fixed, oracle_tokens_per_s=oracle,
                adaptive_resident_at_oracle_throughput=least_oracle["resident"] if least_oracle else None,
                adaptive_resident_at_equal_throughput=least["resident"] if least else None,
                reclaimed_bytes=(runs[0]["resident_bytes"] - least["resident_bytes"]) if least else 0,
                reclaimed_bytes_full_model=((runs[0]["resident_bytes"] - least["resident_bytes"])
                                            * profiles.load_model(name).num_moe_layers // L) if least else 0)


def plot(results: dict, path: Path) -> Path:
    """Per shape: decode rate and host experts moved per step, window by window, of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    for row, (name, res) in zip(axes, results.items()):
        for run in res["runs"]:
            steps = [w["step"] for w in run["windows"]]
            label = f"{run['mode']} R={run['resident']}"
            style = dict(lw=2.2 if run["mode"] != "adaptive" else 1.2, ls="--" if run["mode"] == "oracle" else "-")
            row[0].plot(steps, [1e3 / w["step_ms"] for w in run["windows"]], label=label, **style)
            row[1].plot(steps, [w["experts_moved_per_step"] for w in run["windows"]], label=label, **style)
        for ax, what in zip(row, ("tokens/s (one sequence)", "host experts moved per step")):
            ax.axvline(res["steps"] // 2, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("decode step")
            ax.set_ylabel(what)
            ax.set_title(f"{name}, {res['layers']} layers of {res['experts']} experts (drift at the dotted line)",
                         fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    if sys.argv[1:2] == ["--plot"]:  # python3 bench/adaptive_residency.py --plot RESULT.json OUT.png
        print(plot(json.loads(Path(sys.argv[2]).read_text())["shapes"], Path(sys.argv[3])))
        return
    names = sys.argv[1:] or list(SHAPES)
    results = {name: run_shape(name) for name in names}
    path = write_result("adaptive_residency_h200", {"shapes": results, "max_slowdown": MAX_SLOWDOWN})
    print(f"wrote {path}")
    print(f"{'shape':20} {'mode':9} {'R':>4} {'tok/s':>8} {'ph1 ms':>8} {'ph2 ms':>8} {'swaps':>6} {'exact':>6}")
    for name, res in results.items():
        for r in res["runs"]:
            print(f"{name:20} {r['mode']:9} {r['resident']:4d} {r['tokens_per_s']:8.1f} {r['phase1_late_ms']:8.3f} "
                  f"{r['phase2_late_ms']:8.3f} {r['swaps']:6d} {str(r['bit_exact']):>6}")
        print(f"{name}: adaptive matches fixed R={res['runs'][0]['resident']} with R="
              f"{res['adaptive_resident_at_equal_throughput']}: {res['reclaimed_bytes'] / 2**30:.2f} GiB reclaimed "
              f"in the stand-in, {res['reclaimed_bytes_full_model'] / 2**30:.2f} GiB at full depth")


if __name__ == "__main__":
    main()
