"""The pager's stats in a server, on the CPU: step counting, the periodic log line, the worker
call and the HTTP endpoint (with a stand-in engine). Timings themselves need CUDA events: the
GPU test reads them from CUDA-graph replays (tests/test_executor_gpu.py)."""

import asyncio

import pytest
import torch

import profiles
from bench.vllm_identity import variants
from executor.moe_layer import random_stack
from executor.tiers import ExpertLayout
from fluxmoe.errors import ConfigError
from fluxmoe.serve import _plugins_with_stats
from fluxmoe.vllm_plugin import endpoint, runtime as runtime_module, stats
from fluxmoe.vllm_plugin.runtime import PagingRuntime
from fluxmoe.vllm_plugin.worker import FluxMoEWorkerExtension
from planner.plan import Plan
from tests.test_vllm_plugin import ROOT, TINY, _forward


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def served():
    """A paged plan placed on the CPU with stats on, a fake clock and the lines it logs."""
    plan = variants(Plan.load(ROOT / "bench" / "plans" / "mixtral-tiny.json"))["per_layer_d1"]
    spec = profiles.load_model(TINY)
    routers, stacks = random_stack(spec.num_moe_layers, 64, 96, spec.num_experts, "cpu", seed=5)
    runtime = PagingRuntime(plan, ExpertLayout(64, 96), "cpu", stats_interval_s=30.0)
    clock, lines = Clock(), []
    runtime.reporter.clock, runtime.reporter.emit, runtime.reporter._last = clock, lines.append, clock.now
    for layer, (w13, w2) in zip(runtime.moe_layers, stacks):
        runtime.place(layer, w13, w2) if runtime.is_paged(layer) else runtime.keep_resident(layer, w13, w2)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    step = lambda: _forward(runtime, routers, x, spec.experts_per_token)  # noqa: E731
    return runtime, step, clock, lines


def test_steps_are_counted_and_a_line_is_logged_once_per_interval(served):
    runtime, step, clock, lines = served
    for _ in range(5):
        step()
    snap = runtime.stats()
    assert snap["steps"] == 5 and snap["paged_layers"] == len(runtime.paged_layers) == 3
    assert [entry["layer"] for entry in snap["layers"]] == sorted(runtime.paged_layers)
    runtime.reporter.poll()
    assert lines == []  # not due yet
    clock.now += 30.0
    runtime.reporter.poll()
    runtime.reporter.poll()
    assert lines == ["FluxMoE pager: 5 steps, no timed step read yet"]  # CPU: no CUDA events to time
    clock.now += 29.0
    step()
    runtime.reporter.poll()
    assert len(lines) == 1
    clock.now += 1.0
    runtime.reporter.poll()
    assert lines[-1] == "FluxMoE pager: 6 steps, no timed step read yet"


def test_a_timed_step_names_the_layer_that_waited_most(served):
    runtime, step, clock, lines = served
    step()
    pager = runtime.pager
    waits = {1: 0.25, 2: 1.5, 3: 0.5}
    for layer, s in zip(runtime.moe_layers, pager.stats.layers):
        if layer in waits:
            s.wait_ms, s.h2d_bytes, s.h2d_ms, s.decode_bytes, s.decode_ms = waits[layer], 4_000_000, 0.1, 0, 0.0
    pager.stats.samples = 1
    snap = runtime.stats()
    assert snap["wait_ms"] == 2.25 and snap["h2d_gbps"] == 40.0 and snap["decode_gbps"] == 0.0
    assert stats.StatsReporter.line(snap) == ("FluxMoE pager: 1 steps; latest timed step: compute waited 2.250 ms over "
                                              "3 paged layers (most: layer 2, 1.500 ms), H2D 40.0 GB/s, decode 0.0 GB/s")


def test_a_pager_built_in_inference_mode_counts_steps_outside_it(served):
    """vLLM builds the pager inside inference mode, then captures graphs outside it."""
    runtime, step, *_ = served
    with torch.inference_mode():
        pager = runtime.pager
    step()
    with torch.inference_mode():
        step()
    assert int(pager.steps) == 2


def test_lines_reach_the_handler_vllm_installs(served, monkeypatch):
    """vLLM's processes print only what reaches the handler on its "vllm" logger."""
    import logging

    runtime, step, clock, _ = served
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    vllm_logger = logging.getLogger("vllm")
    monkeypatch.setattr(vllm_logger, "handlers", [handler])
    monkeypatch.setattr(vllm_logger, "propagate", False)
    vllm_logger.setLevel(logging.INFO)
    runtime.reporter.emit = stats.log.info
    step()
    clock.now += 31.0
    runtime.reporter.poll()
    encoded = sum(len(t.compressed_ids) + len(t.host_compressed_ids) for t in runtime.layers)
    assert encoded > 0
    assert [r.getMessage() for r in records] == [f"FluxMoE: {encoded} compressed and host-compressed experts were "
                                                 f"encoded at load in {runtime.encode_seconds:.1f} s",  # pager built
                                                 "FluxMoE pager: 1 steps, no timed step read yet"]


def test_without_stats_nothing_is_counted(served):
    runtime, *_ = served
    quiet = PagingRuntime(runtime.plan, runtime.layout, "cpu")
    assert quiet.reporter is None and quiet.stats()["stats"] == "off"


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(stats.INTERVAL_ENV, "5")
    assert stats.interval_from_env() == 5.0
    monkeypatch.delenv(stats.INTERVAL_ENV)
    assert stats.interval_from_env() == stats.DEFAULT_INTERVAL_S
    for bad in ("-1", "soon"):
        monkeypatch.setenv(stats.INTERVAL_ENV, bad)
        with pytest.raises(ConfigError, match=f"FLUXMOE_STATS_INTERVAL: expected seconds >= 0, got '{bad}'"):
            stats.interval_from_env()


def test_the_worker_answers_with_its_runtimes_stats(served, monkeypatch):
    runtime, step, *_ = served
    worker = FluxMoEWorkerExtension()
    monkeypatch.setattr(runtime_module, "_current", None)
    assert worker.fluxmoe_stats() == {"plan": None}
    monkeypatch.setattr(runtime_module, "_current", runtime)
    step()
    answer = worker.fluxmoe_stats()
    assert answer["plan"] == runtime.plan.model and answer["steps"] == 1 and len(answer["layers"]) == 3


class Engine:
    def __init__(self, answer):
        self.answer, self.calls = answer, []

    async def collective_rpc(self, method):
        self.calls.append(method)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("engine, status, body", [
    (Engine([{"plan": "m", "steps": 7}]), 200, {"workers": [{"plan": "m", "steps": 7}]}),
    (None, 503, {"error": "no engine behind this server"}),
    (Engine(NotImplementedError("Method 'fluxmoe_stats' is not implemented.")), 501, None),
])
def test_the_endpoint_asks_every_worker(engine, status, body):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app, plugin = FastAPI(), endpoint.StatsEndpoint()
    plugin.attach_router(app)
    asyncio.run(plugin.init_state(engine, app.state, None))
    response = TestClient(app).get(endpoint.STATS_PATH)
    assert response.status_code == status
    if body is not None:
        assert response.json() == body
        assert engine is None or engine.calls == ["fluxmoe_stats"]
    else:
        assert "--worker-extension-cls fluxmoe.vllm_plugin.worker.FluxMoEWorkerExtension" in response.json()["error"]
    # vLLM's --api-key middleware guards paths under /v1 only: the route must sit there.
    assert endpoint.STATS_PATH.startswith("/v1/")


def test_serve_allowlists_the_endpoint_and_keeps_other_plugins():
    assert _plugins_with_stats("other") == "other,fluxmoe,fluxmoe-stats"
    assert _plugins_with_stats("fluxmoe,fluxmoe-stats") == "fluxmoe,fluxmoe-stats"
    assert _plugins_with_stats(None).split(",")[-1] == "fluxmoe-stats"  # every installed general plugin, then ours
    assert "fluxmoe" in _plugins_with_stats(None).split(",")


def test_the_endpoint_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."vllm.endpoint_plugins"]' in text
    assert 'fluxmoe-stats = "fluxmoe.vllm_plugin.endpoint:StatsEndpoint"' in text
    assert endpoint.StatsEndpoint.name == "fluxmoe-stats"
