"""The closed loop in a server, on the CPU: a stand-in engine whose workers are real paging
runtimes, the loop's decisions and swaps, the admin routes and the `fluxmoe budget` call."""

import asyncio
import json

import pytest
import torch

import profiles
from executor.moe_layer import reference_forward
from fluxmoe.errors import ConfigError
from fluxmoe.names import Tier
from fluxmoe.units import format_bytes
from fluxmoe.vllm_plugin import endpoint, runtime as runtime_module
from fluxmoe.vllm_plugin.adapt import ADAPT_ENV, AdaptSettings, ServerLoop
from fluxmoe.vllm_plugin.worker import FluxMoEWorkerExtension
from planner.replan import ReplanPolicy, Replanner
from tests.test_vllm_plugin import TINY, _forward, _runtime, tiny_plans  # noqa: F401 (a fixture)


class Workers:
    """vLLM's `collective_rpc` over one worker, run between steps as vLLM runs it; `eager`:
    the engine's CUDA graphs are off (vLLM's --enforce-eager)."""

    def __init__(self, runtime, eager=True):
        self.runtime, self.calls, self.eager = runtime, [], eager

    async def collective_rpc(self, method, args=()):
        from types import SimpleNamespace

        self.calls.append(method)
        runtime_module._current = self.runtime
        worker = FluxMoEWorkerExtension()
        worker.vllm_config = SimpleNamespace(model_config=SimpleNamespace(enforce_eager=self.eager))
        try:
            return [getattr(worker, method)(*args)]
        finally:
            runtime_module._current = None


@pytest.fixture
def served(tiny_plans):
    """Mixtral-tiny placed per expert over the tiers, host experts fetched routed-only."""
    plan = tiny_plans["per_expert_routed_d2"]
    spec = profiles.load_model(TINY)
    routers, stacks, runtime = _runtime(plan, spec)
    for layer, (w13, w2) in zip(runtime.moe_layers, stacks):
        runtime.place(layer, w13, w2) if runtime.is_paged(layer) else runtime.keep_resident(layer, w13, w2)
    profile = profiles.Profile(spec, profiles.load_gpu("h200"))
    return runtime, routers, stacks, profile, spec


def _skewed_tokens(routers, runtime, experts, n=8):
    """Tokens that lean toward the first layer's host experts (what the loop should bring in)."""
    host = runtime.plan.layer(runtime.moe_layers[0]).host
    lean = sum(routers[0][e].float() for e in host[:experts])
    noise = torch.randn(n, lean.numel(), generator=torch.Generator().manual_seed(0))
    return (noise + 30 * lean).to(torch.bfloat16), host[:experts]


def test_the_loop_swaps_hot_host_experts_in_between_steps_and_the_tokens_stay_the_same(served):
    runtime, routers, stacks, profile, spec = served
    k = spec.experts_per_token
    x, hot = _skewed_tokens(routers, runtime, k)
    want = reference_forward(x, routers, stacks, k)
    workers = Workers(runtime)
    naps = []

    async def nap(seconds):
        naps.append(seconds)

    loop = ServerLoop(workers, Replanner(profile, runtime.plan, ReplanPolicy(min_tokens=8, patience=2)),
                      sleep=nap)
    decisions = []
    for _ in range(4):
        for _ in range(3):
            assert torch.equal(_forward(runtime, routers, x, k), want)
        decisions.append(asyncio.run(loop.tick()))
    acted = [d for d in decisions if d is not None and d.act]
    assert len(acted) == 1 and decisions[0] is not None and not decisions[0].act  # patience: not the first window
    assert "fluxmoe_swap" in workers.calls and loop.swaps_made == len(acted[0].swaps) > 0
    first = runtime.plan.layer(runtime.moe_layers[0])
    assert set(hot) <= set(first.resident)  # the experts the tokens lean to are resident now
    assert runtime.pager.placement()[0][Tier.RESIDENT] == runtime.pager.layers[0].resident_ids
    assert sorted(runtime.pager.layers[0].resident_ids) == sorted(first.resident)
    assert torch.equal(_forward(runtime, routers, x, k), want)  # same tokens after the change
    assert naps and loop.history[-1]["act"] is False


def test_the_loop_waits_for_route_counts_and_survives_a_failing_worker(served):
    runtime, routers, stacks, profile, spec = served

    class Broken:
        async def collective_rpc(self, method, args=()):
            raise RuntimeError("worker died")

    stops = []

    async def nap(seconds):
        if stops:
            raise asyncio.CancelledError
        stops.append(seconds)

    loop = ServerLoop(Broken(), Replanner(profile, runtime.plan), interval_s=5, sleep=nap)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(loop.run())
    assert loop.history[-1]["error"] == "worker died" and stops == [5]
    quiet = ServerLoop(Workers(runtime), Replanner(profile, runtime.plan))
    assert asyncio.run(quiet.tick()) is None and quiet.history == []  # no step yet: no counts to read
    _forward(runtime, routers, torch.randn(3, 64).to(torch.bfloat16), spec.experts_per_token)
    decision = asyncio.run(quiet.tick())
    assert not decision.act and "fewer than 1024 routed tokens" in decision.reason


def test_adapt_settings_from_the_environment(monkeypatch):
    monkeypatch.delenv(ADAPT_ENV, raising=False)
    assert AdaptSettings.from_env() is None
    monkeypatch.setenv(ADAPT_ENV, json.dumps({"model": "m", "gpu": "h200", "interval_s": 2}))
    assert AdaptSettings.from_env() == AdaptSettings("m", "h200", 2)
    monkeypatch.setenv(ADAPT_ENV, json.dumps({"model": "m", "gpu": "h200", "interval_s": 0}))
    with pytest.raises(ConfigError, match="FLUXMOE_ADAPT: interval_s must be > 0, got 0"):
        AdaptSettings.from_env()
    monkeypatch.setenv(ADAPT_ENV, "{")
    with pytest.raises(ConfigError, match="FLUXMOE_ADAPT: expected JSON with model, gpu"):
        AdaptSettings.from_env()


def test_the_admin_routes(served, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    runtime, routers, stacks, profile, spec = served
    app, plugin = FastAPI(), endpoint.StatsEndpoint()
    plugin.attach_router(app)
    client = TestClient(app)
    assert client.get(endpoint.ADAPT_PATH).status_code == 404
    assert "fluxmoe serve --adapt" in client.post(endpoint.BUDGET_PATH, json={"budget": "1GiB"}).json()["error"]
    app.state.fluxmoe_loop = ServerLoop(Workers(runtime), Replanner(profile, runtime.plan))
    app.state.fluxmoe_plan_dir = str(tmp_path)
    assert client.get(endpoint.ADAPT_PATH).json() == {"swaps_made": 0, "decisions": []}
    bad = client.post(endpoint.BUDGET_PATH, json={"budget": 5})
    assert bad.status_code == 400 and "field 'budget': expected a string" in bad.json()["error"]
    assert client.post(endpoint.BUDGET_PATH, json={"budget": "lots"}).status_code == 400
    small = client.post(endpoint.BUDGET_PATH, json={"budget": "1GiB"})
    assert small.status_code == 400 and "the smallest budget that works is" in small.json()["error"]
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    k = spec.experts_per_token
    want = reference_forward(x, routers, stacks, k)
    kv, seqs = runtime.plan.kv_cache_bytes, runtime.plan.max_num_seqs
    answer = client.post(endpoint.BUDGET_PATH, json={"budget": "3GiB"}).json()
    assert answer["budget_bytes"] == 3 << 30 and (tmp_path / answer["plan"].split("/")[-1]).is_file()
    # made for the engine as it runs: its KV cache and sequence limit stay
    assert answer["kv_cache_bytes"] >= kv and answer["max_num_seqs"] <= seqs
    assert answer["apply"].startswith("applied") and "fluxmoe_rebuild" in app.state.fluxmoe_loop.engine.calls
    assert runtime.plan.budget_bytes == 3 << 30 and app.state.fluxmoe_loop.replanner.plan is not None
    assert app.state.fluxmoe_loop.replanner.plan.budget_bytes == 3 << 30
    assert answer["workers"][0]["expert_bytes_after"] == runtime.expert_bytes
    assert torch.equal(_forward(runtime, routers, x, k), want)  # the same bits in the new tiers
    app.state.fluxmoe_loop.engine.eager = False  # CUDA graphs hold the arena: a restart, nothing changed
    tight = client.post(endpoint.BUDGET_PATH, json={"budget": "2.5GiB"}).json()["error"]
    assert f"the running engine's KV cache {format_bytes(answer['kv_cache_bytes'])}" in tight
    graphs = client.post(endpoint.BUDGET_PATH, json={"budget": "2.9GiB"}).json()
    assert graphs["apply"].startswith("not applied (this engine runs CUDA graphs") and "restart: fluxmoe serve" in \
        graphs["apply"]
    assert runtime.plan.budget_bytes == 3 << 30 and torch.equal(_forward(runtime, routers, x, k), want)
    for path in (endpoint.ADAPT_PATH, endpoint.BUDGET_PATH):
        assert path.startswith("/v1/")  # vLLM's --api-key guards /v1: admin routes take the API's key


def test_fluxmoe_budget_posts_with_the_api_key(monkeypatch, capsys):
    import urllib.request

    from fluxmoe.cli import main

    seen = {}

    class Answer:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b'{"apply": "restart: fluxmoe serve ..."}'

    def urlopen(request, timeout):
        seen.update(url=request.full_url, auth=request.get_header("Authorization"), body=request.data)
        return Answer()

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert main(["budget", "40GiB", "--url", "http://127.0.0.1:9000/", "--api-key", "KEY"]) == 0
    assert seen == {"url": "http://127.0.0.1:9000/v1/fluxmoe/budget", "auth": "Bearer KEY",
                    "body": b'{"budget": "40GiB"}'}
    assert "restart" in capsys.readouterr().out
    assert main(["budget", "forty"]) == 2
    assert "budget" in capsys.readouterr().err


def test_serve_with_adapt_hands_the_loop_its_settings(capsys, tmp_path, monkeypatch):
    from fluxmoe.cli import build_parser
    from fluxmoe.serve import prepare

    args = build_parser().parse_args(["serve", "--model", str(TINY), "--gpu-budget", "3GiB", "--no-verify",
                                      "--adapt", "--adapt-interval", "3", "--save-plan", str(tmp_path / "p.json")])
    from fluxmoe.cli import _workload, make_plan

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    launch = prepare(args, [], lambda profile: make_plan(args, profile, _workload(args)))
    settings = json.loads(launch.env[ADAPT_ENV])
    assert settings["gpu"] == "h200" and settings["interval_s"] == 3 and settings["model"].endswith("mixtral-tiny")
    assert launch.env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # freed experts reach the driver
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.8")  # the user's own stays
    assert prepare(args, [], lambda profile: make_plan(args, profile, _workload(args))).env[
        "PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.8"
    with pytest.raises(ConfigError, match="--adapt: the closed loop does not run under expert parallel"):
        prepare(args, ["--tensor-parallel-size", "2", "--enable-expert-parallel"],
                lambda profile: make_plan(args, profile, _workload(args)))
    with pytest.raises(ConfigError, match="--adapt: the closed loop does not run under expert parallel"):
        ServerLoop.from_settings(None, AdaptSettings(str(TINY), "h200x2", expert_parallel=True), "unused.json")


class _Registry:
    """prometheus_client's registry as vLLM's stat loggers fill it (two engines)."""

    def __init__(self, samples):
        from types import SimpleNamespace

        self.metrics = [SimpleNamespace(samples=[SimpleNamespace(name=n, value=v) for n, v in samples])]

    def collect(self):
        return self.metrics


def test_the_engines_kv_use_and_running_requests_reach_the_replanner(served):
    """vLLM's gauges give the loop the KV use and the sequences running; the re-planner turns
    them into the context its sequences hold (KV per sequence, inverted), which prices its
    decisions and a re-plan for another budget."""
    from fluxmoe.vllm_plugin.adapt import engine_load
    from planner.replan import measured_workload

    runtime, routers, stacks, profile, spec = served
    gauges = _Registry([("vllm:kv_cache_usage_perc", 0.5), ("vllm:kv_cache_usage_perc", 0.3),
                        ("vllm:num_requests_running", 5.0), ("vllm:num_requests_running", 3.0)])
    assert engine_load(gauges) == {"kv_use": pytest.approx(0.4), "mean_batch": 8.0}
    assert engine_load(_Registry([("vllm:num_requests_running", 2.0)])) == {}  # no KV gauge: nothing
    assert engine_load(_Registry([("vllm:kv_cache_usage_perc", 0.1), ("vllm:num_requests_running", 0.0)])) == \
        {"kv_use": pytest.approx(0.1)}  # idle: no batch to divide by
    plan = runtime.plan
    w = measured_workload(profile, plan, 0.4, 8)
    context = w.prompt_tokens + w.output_tokens / 2
    per_sequence = 0.4 * plan.kv_cache_bytes / 8
    assert spec.kv_bytes_per_sequence(round(context)) <= per_sequence < spec.kv_bytes_per_sequence(round(context) + 2)
    assert w.output_tokens == plan.workload.output_tokens
    loop = ServerLoop(Workers(runtime), Replanner(profile, plan, ReplanPolicy(min_tokens=8)), load=lambda: {
        "kv_use": 0.4, "mean_batch": 8.0})
    for _ in range(2):
        _forward(runtime, routers, torch.randn(16, 64).to(torch.bfloat16), spec.experts_per_token)
    asyncio.run(loop.tick())
    assert loop.replanner.workload == w and loop.history[-1]["kv_use"] == 0.4
    assert loop.history[-1]["context_tokens"] == round(context)
    assert loop.replanner.rebudget("3GiB").workload == w  # a re-plan is made for the measured context
