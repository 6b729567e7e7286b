"""The simulator against real runs on the H200 (bench/calibration.json): each point names the
result file and run it was measured in, and is replayed here in the simulator. A change that
moves the simulator away from a measurement by more than the point's tolerance fails."""

import json
from pathlib import Path

import pytest

import profiles
from planner.memory import MemoryModel
from planner.plan import Plan
from simulator.compare import baseline_settings
from simulator.engine import simulate
from simulator.prefetch_offload import PrefetchOffload
from simulator.workload import parse_workload

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = json.loads((ROOT / "bench" / "calibration.json").read_text())
GiB = 2**30


def _model(name: str) -> str:
    return str(ROOT / name) if "/" in name else name


@pytest.mark.parametrize("point", CALIBRATION["points"], ids=lambda p: p["run"] + "@" + Path(p["source"]).stem)
def test_the_simulator_reproduces_a_measured_run(point):
    run = json.loads((ROOT / point["source"]).read_text())["runs"][point["run"]]
    assert run["gpu"] == "NVIDIA H200"
    profile = profiles.Profile(profiles.load_model(_model(point["model"])), profiles.load_gpu("h200"))
    workload = parse_workload(point["workload"])
    assert run["prompt_tokens"] == sum(r.prompt_tokens for r in workload.requests)  # the same requests
    assert run["output_tokens"] == sum(r.output_tokens for r in workload.requests)
    budget = int(run["util"] * run["gpu_total_bytes"])  # what vLLM's --gpu-memory-utilization means
    measured_kv = run["kv_tokens"] * profile.model.kv_bytes_per_token if point.get("kv") == "measured" else None
    if point["system"] == "fluxmoe":
        plan = Plan.load(ROOT / point["plan"])
        assert plan.budget_bytes == pytest.approx(budget, rel=0.002)  # the run served this plan's budget
        result = simulate(profile, workload, plan=plan, kv_cache_bytes=measured_kv, keep_timeline=False)
    elif point["system"] == "vllm_prefetch":
        setting = PrefetchOffload.parse(point["prefetch"])
        kv = setting.vllm_kv_cache_bytes(MemoryModel.of(profile), budget) if measured_kv is None else measured_kv
        result = simulate(profile, workload, system="vllm_prefetch", prefetch_offload=setting, kv_cache_bytes=kv,
                          max_num_seqs=min(run["settings"]["max_num_seqs"], len(workload)), keep_timeline=False)
    else:
        config = baseline_settings(MemoryModel.of(profile), point["system"], budget,
                                   int(point.get("offload_gib", 0) * GiB))
        config["max_num_seqs"] = min(config["max_num_seqs"], len(workload))
        if measured_kv is not None:
            config["kv_cache_bytes"] = measured_kv
        result = simulate(profile, workload, system=point["system"], keep_timeline=False, **config)
    error = result.output_tokens_per_s / run["output_tok_s"] - 1
    assert abs(error) <= point["tolerance"], f"simulated {result.output_tokens_per_s:.1f} vs measured " \
                                             f"{run['output_tok_s']} output tok/s ({error:+.1%})"


ONLINE = ROOT / "bench" / "results" / "online_a40_standin_h200_2026-11-24.json"


@pytest.mark.parametrize("system", ["fluxmoe", "prefetch"])
def test_the_simulator_reproduces_an_online_run_on_the_code_trace(system):
    """bench/online.py on the H200: each server replayed the code trace's arrivals and lengths.
    Throughput and median TPOT must hold within 5%; TTFT is a known gap (calibration.json)."""
    from bench.online import predict, trace_workload
    from simulator.workload import Workload

    report = json.loads(ONLINE.read_text())
    run = report["runs"][f"{system}@x2"]
    assert report["device"] == "NVIDIA H200"
    trace = trace_workload(report["requests"], 2.0, 4096)
    assert trace.name == report["workloads"]["x2"]
    # Both servers refused the same requests (HTTP 400): the longest, whose tokens are exactly
    # what the run's totals miss.
    refused = sorted(trace.requests, key=lambda r: -(r.prompt_tokens + r.output_tokens))[:run["failed"]]
    served = Workload(trace.name, [r for r in trace.requests if r not in refused])
    assert sum(r.prompt_tokens for r in served.requests) == run["total_input_tokens"]
    assert sum(r.output_tokens for r in served.requests) == run["total_output_tokens"]
    if system == "fluxmoe":
        figures = predict(report["model"], served, plan_path=str(ROOT / report["plan"]))
    else:
        figures = predict(report["model"], served, prefetch=report["prefetch"], kv_tokens=run["kv_tokens"])
    assert figures["output_tok_s"] == pytest.approx(run["output_throughput"], rel=0.05)
    assert figures["tpot_p50_ms"] == pytest.approx(run["median_tpot_ms"], rel=0.05)
