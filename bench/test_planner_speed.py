"""pytest-benchmark: planner.optimize on Qwen3-Next-80B (48 layers, 512 experts). Goal <= 1 s on 2 cores.

Run: pytest bench/test_planner_speed.py --benchmark-enable
"""

import pytest

import planner
import profiles


@pytest.mark.parametrize("gpu,budget", [("h200", "40GiB"), ("h200", "100GiB"), ("a40", "44GiB")])
def test_optimize_qwen3_next(benchmark, gpu, budget):
    profile = profiles.load("qwen3-next-80b-a3b", gpu=gpu)
    plan = benchmark.pedantic(planner.optimize, args=(profile, budget), rounds=5, iterations=1, warmup_rounds=1)
    assert plan.memory.gpu_total_bytes <= plan.budget_bytes
    benchmark.extra_info["output_tokens_per_s"] = plan.predicted.output_tokens_per_s
    benchmark.extra_info["solver_status"] = plan.solver_status
