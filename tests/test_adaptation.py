"""The simulator's closed loop against the H200 (bench/results/adaptive_residency_h200_*.json):
the same stand-in stacks, plans, popularity phases (measured from the stack's own routing) and
re-planning policy, played by the simulator. It must act in the same windows, predict the host
experts moved per step window by window, and the throughput of each plan against the fixed one."""

import json
from pathlib import Path

import pytest

import planner
import profiles
from bench.adaptive_residency import ROOT, SHAPES, plan_for
from fluxmoe.errors import ConfigError
from planner.popularity import ExpertPopularity
from planner.replan import ReplanPolicy
from simulator import Workload, simulate
from simulator.adaptation import Adaptation, RoutingDrift

RESULT = sorted(Path(__file__).resolve().parent.parent.glob("bench/results/adaptive_residency_h200_*.json"))[-1]
MEASURED = json.loads(RESULT.read_text())["shapes"]
# Host experts moved per step, per window away from a change: Qwen3-Next's windows average
# 1,500 picks, Mixtral's 50 (sampling noise of a few percent); throughput against the fixed plan.
TOLERANCE = {"qwen3-next-80b-a3b": dict(moved=0.03, ratio=0.10), "mixtral-8x7b": dict(moved=0.15, ratio=0.05)}


def _simulate(name: str, run: dict):
    shape, cfg = MEASURED[name], SHAPES[name]
    profile = profiles.Profile(profiles.load_model(ROOT / cfg["folder"]), profiles.load_gpu("h200"))
    E, L, steps, window = shape["experts"], shape["layers"], shape["steps"], shape["window"]
    phases = [ExpertPopularity(shares) for shares in shape["phase_shares"]]
    if run["mode"] == "oracle":
        residents = [sorted(range(E), key=lambda e: -phases[0].picks[l][e])[:run["resident"]] for l in range(L)]
    else:
        residents = [list(range(run["resident"]))] * L
    plan = plan_for(planner.optimize(profile, cfg["budget"], max_num_seqs=1), residents, E)
    adaptation = None
    if run["mode"] == "adaptive":
        policy = ReplanPolicy(min_gain=0.05, patience=2, cooldown=2, min_tokens=window // 2, smoothing=0.5)
        adaptation = Adaptation(window, policy, swap_s=run["swap_ms"] / 1e3)
    drift = RoutingDrift([0, steps // 2 + 1], phases)  # engine step 0 is the prompt's
    result = simulate(profile, Workload.synthetic(1, 8, steps + 1), plan=plan, kv_cache_bytes=1 << 31,
                      drift=drift, adaptation=adaptation)
    decode = result.timeline[1:]  # after the prompt's step, one decode step per measured step
    moved = [sum(r.experts_moved for r in decode[w * window:(w + 1) * window]) / window for w in range(steps // window)]
    swaps = [sum(r.swaps for r in decode[w * window:(w + 1) * window]) for w in range(steps // window)]
    tokens_per_s = len(decode) / (decode[-1].end_s - decode[0].start_s)
    return result, moved, swaps, tokens_per_s


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_simulated_loop_acts_when_and_moves_what_the_h200_run_did(name):
    runs = MEASURED[name]["runs"]
    fixed = None
    for run in runs:
        result, moved, swaps, tokens_per_s = _simulate(name, run)
        acted = [step for step, act, _ in result.adaptation if act]
        real = [d["step"] for d in run["decisions"] if d["act"]]
        # The same changes, each in the same window or the next: how many swaps fit in a step
        # sits on a knife edge (1.94 of them in the H200's steps, 2.03 in the simulator's).
        assert len(acted) == len(real) and acted[:2] == real[:2], (run["mode"], run["resident"], acted, real)
        assert all(abs(a - b) <= MEASURED[name]["window"] for a, b in zip(acted, real)), (acted, real)
        tol = TOLERANCE[name]["moved"]
        for w, (sim, window) in enumerate(zip(moved, run["windows"])):
            if swaps[w] or window["swaps"] or any(abs(a - b) and min(a, b) <= (w + 1) * MEASURED[name]["window"]
                                                  < max(a, b) + 2 * MEASURED[name]["window"]
                                                  for a, b in zip(acted, real)):
                continue  # the changes themselves, and where one came a window later than the other
            assert sim == pytest.approx(window["experts_moved_per_step"], rel=tol, abs=0.3), (run["mode"], w)
        if run["mode"] == "fixed":
            fixed = (tokens_per_s, run["tokens_per_s"])
        else:
            assert tokens_per_s / fixed[0] == pytest.approx(run["tokens_per_s"] / fixed[1],
                                                            rel=TOLERANCE[name]["ratio"]), (run["mode"], run["resident"])


def test_adaptation_needs_a_plan_and_a_drift_and_drift_phases_must_start_at_zero():
    profile = profiles.load("qwen3-next-80b-a3b", gpu="h200")
    m = profile.model
    flat = ExpertPopularity.zipf(m.num_moe_layers, m.num_experts, m.experts_per_token, 0.0)
    with pytest.raises(ConfigError, match="field 'starts_step': one start per phase of popularity, the first at step 0"):
        RoutingDrift([5], [flat])
    with pytest.raises(ConfigError, match=r"field 'starts_step': must increase, got \[0, 0\]"):
        RoutingDrift([0, 0], [flat, flat])
    with pytest.raises(ConfigError, match="adaptation: needs system 'fluxmoe' and a routing drift"):
        simulate(profile, Workload.synthetic(1, 8, 8), system="vllm", kv_cache_bytes=1 << 34, max_num_seqs=1,
                 adaptation=Adaptation())
