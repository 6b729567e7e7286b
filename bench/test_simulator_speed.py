"""pytest-benchmark: 10,000 requests simulated. Goal <= 10 s on 2 cores.

Run: pytest bench/test_simulator_speed.py --benchmark-enable
"""

import pytest

import planner
import profiles
from simulator import Lengths, Workload, simulate


@pytest.mark.parametrize("model,gpu,budget", [
    ("mixtral-8x7b", "h200", "46GiB"),  # paged: host experts on every layer, the event-heavy case
    ("qwen3-next-80b-a3b", "a40", "44GiB"),
    ("mixtral-8x7b", "h200", "130GiB"),  # everything resident
])
def test_simulate_10000_requests(benchmark, model, gpu, budget):
    profile = profiles.load(model, gpu=gpu)
    plan = planner.optimize(profile, budget)
    workload = Workload.synthetic(10_000, Lengths(1024, 1.0), Lengths(128, 1.0), rate=1000.0, seed=0)
    result = benchmark.pedantic(simulate, args=(profile, workload), kwargs=dict(plan=plan, keep_timeline=False),
                                rounds=1, iterations=1)
    assert result.requests == 10_000
    benchmark.extra_info.update(steps=result.steps, output_tokens_per_s=result.output_tokens_per_s)
