"""The memory model against vLLM's own KV sizing on the H200 (recorded runs, replayed on the
CPU): for each recorded run, the KV cache the model predicts for that budget and placement
must be within 2% of the KV cache vLLM allocated. A change to the memory model that breaks
the calibration fails here."""

import json
from pathlib import Path

import pytest

import profiles
from planner.memory import MemoryModel
from planner.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
RUNS = json.loads((ROOT / "bench" / "results" / "vllm_mixtral_2026-11-24.json").read_text())["runs"]


@pytest.mark.parametrize("name", ["plain", "resident", "budget46"])
def test_predicted_kv_matches_vllms_within_2_percent(name):
    run = RUNS[name]
    profile = profiles.load("mixtral-8x7b", gpu="h200")
    mem = MemoryModel.of(profile)
    budget = run["util"] * run["gpu_total_bytes"]  # what vLLM's --gpu-memory-utilization means
    if run["plan"]:
        plan = Plan.load(ROOT / run["plan"])
        predicted = mem.kv_left(budget, plan.tier_counts(), plan.prefetch_depth)
    else:
        predicted = mem.resident_kv(budget)
    assert abs(predicted / run["kv_bytes"] - 1) <= 0.02, (predicted, run["kv_bytes"])
