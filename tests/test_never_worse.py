"""The planner's pick, simulated, across every shipped model and GPU: never below a baseline
its plan space contains (all resident is plain vLLM; vLLM + CPU offload is beaten by paging
the same bytes; vLLM's prefetch offloader, whole layers on the host, tuned within the budget,
is paging without the choice of which experts), and never lower at a larger budget.

Offline throughput runs (all requests at t=0), the budgets spread from a tight one to the
whole GPU; `fluxmoe simulate`'s own path (`verified_optimize`, then `simulate_systems` with the
offload baseline tuned)."""

import pytest

import profiles
from fluxmoe.errors import InfeasibleError
from simulator import Workload, simulate_systems, verified_optimize

GiB = 2**30
BUDGETS = {"a40": [24, 34, 44], "a40x2": [24, 34, 44], "h200": [40, 80, 120, 139]}
MODELS = ["mixtral-8x7b", "mixtral-8x22b", "qwen3-next-80b-a3b", "qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-120b"]
WORKLOADS = {"short": Workload.synthetic(64, 512, 128), "long": Workload.synthetic(32, 4096, 512)}


def _sweep(model: str, gpu: str, workload: Workload) -> list[tuple[int, float, float | None, float | None]]:
    profile = profiles.load(model, gpu=gpu)
    rows = []
    for budget in BUDGETS[gpu]:
        try:
            plan = verified_optimize(profile, budget * GiB, workload, top_k=3)
        except InfeasibleError:
            continue
        results = simulate_systems(profile, plan, workload, keep_timeline=False)
        rows.append((budget, *(results[s].output_tokens_per_s if results[s] else None
                               for s in ("fluxmoe", "vllm", "vllm_offload", "vllm_prefetch"))))
    return rows


def _check(rows) -> None:
    assert rows, "no budget fits"
    for budget, ours, plain, offload, prefetch in rows:
        if plain is not None:
            assert ours >= plain * 0.999, f"{budget} GiB: {ours:.1f} below plain vLLM's {plain:.1f}"
        if offload is not None:
            assert ours >= offload * 0.999, f"{budget} GiB: {ours:.1f} below vLLM + CPU offload's {offload:.1f}"
        if prefetch is not None:
            assert ours >= prefetch * 0.999, f"{budget} GiB: {ours:.1f} below vLLM + prefetch offload's {prefetch:.1f}"
    flux = [r[1] for r in rows]
    assert all(b >= a * 0.999 for a, b in zip(flux, flux[1:])), f"throughput fell as the budget grew: {rows}"


# vLLM's UVA offload reads only the routed experts, in place (measured, and modelled since):
# at the tightest budgets that beats paging them, which also needs staging slots (1.1 GB per
# expert for Mixtral-8x22B). A tier that reads host experts in place is not built yet.
IN_PLACE_READS_WIN = pytest.mark.xfail(strict=True, reason="UVA's in-place routed reads beat paging at the "
                                                           "tightest budget by 2-3% (no in-place host tier yet)")
CASES = [pytest.param(m, g, marks=IN_PLACE_READS_WIN) if (m, g) == ("mixtral-8x22b", "a40")
         else (m, g) for m in MODELS for g in BUDGETS]


@pytest.mark.parametrize("model,gpu", CASES)
def test_the_pick_is_never_worse_than_a_baseline_and_never_falls_with_budget(model, gpu):
    _check(_sweep(model, gpu, WORKLOADS["short"]))


@pytest.mark.parametrize("model", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_long_prompts_where_kv_binds(model):
    """4k-token prompts: KV, not weights, limits the batch; paging must still never lose."""
    _check(_sweep(model, "h200", WORKLOADS["long"]))


def test_where_the_closed_form_ranks_paged_plans_above_all_resident():
    """Mixtral-8x7B on the H200 just past where it fits, 200 requests: the closed form puts
    paged plans ahead of the all-resident one that the simulation finds faster; the pick must
    still weigh all-resident (without it: 1,341 against plain vLLM's 2,106 tok/s at 100 GiB)."""
    workload = Workload.synthetic(200, 512, 128)
    profile = profiles.load("mixtral-8x7b", gpu="h200")
    rows = []
    for budget in (96, 100, 104, 110):
        plan = verified_optimize(profile, budget * GiB, workload, top_k=3)
        results = simulate_systems(profile, plan, workload, keep_timeline=False)
        rows.append((budget, *(results[s].output_tokens_per_s if results[s] else None
                               for s in ("fluxmoe", "vllm", "vllm_offload", "vllm_prefetch"))))
    _check(rows)
