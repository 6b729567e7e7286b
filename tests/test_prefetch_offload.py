"""vLLM's prefetch offloader in the simulator: which layers, which buffer waits for which layer,
its memory, and step times worked out by hand (measured runs: tests/test_calibration.py)."""

import pytest

from fluxmoe.errors import ConfigError
from planner.cost_model import CostModel, StepShape, TierCounts
from planner.memory import MemoryModel
from profiles import Profile
from simulator.engine import simulate
from simulator.prefetch_offload import PrefetchOffload
from simulator.workload import parse_workload
from tests.conftest import tiny_gpu, tiny_model


def test_layers_tiers_and_release_distances_by_hand():
    """vLLM offloads the last `offloaded` of every `group` decoder layers; offloaded layer j's
    copy is issued when offloaded layer j - step finishes (circularly)."""
    m = tiny_model(8, 4)
    eight = PrefetchOffload.parse("8/7/1")
    assert eight.layers(m) == [1, 2, 3, 4, 5, 6, 7]
    assert eight.tiers(m) == [TierCounts(4, 0, 0)] + [TierCounts(0, 0, 4)] * 7
    # Layer 1's copy waits for layer 7 of the step before (8 - 7 + 1 = 2 layers back), the rest for the one before.
    assert eight.release_after(m) == [8, 2, 1, 1, 1, 1, 1, 1]
    four = PrefetchOffload(4, 3, 1)  # layers 1, 2, 3, 5, 6, 7
    assert four.release_after(m) == [8, 2, 1, 1, 8, 2, 1, 1]
    two_buffers = PrefetchOffload(4, 2, 2)  # layers 2, 3, 6, 7: layer 6 reuses layer 2's buffer
    assert two_buffers.layers(m) == [2, 3, 6, 7]
    assert two_buffers.release_after(m) == [8, 8, 4, 4, 8, 8, 4, 4]
    own_buffer = PrefetchOffload(4, 2, 2)  # 4 layers: two offloaded, two buffers: each waits for itself, a step back
    assert own_buffer.release_after(tiny_model(4, 4)) == [4, 4, 4, 4]


def test_memory_is_the_resident_layers_and_step_buffers_of_a_whole_layer():
    m = tiny_model(8, 4)
    mem = MemoryModel.of(Profile(m, tiny_gpu()), 16 << 10)
    for setting, resident_layers in ((PrefetchOffload(8, 7, 1), 1), (PrefetchOffload(4, 2, 2), 4)):
        layer = 4 * m.expert_bytes
        assert setting.gpu_bytes(mem) == mem.fixed_bytes + (resident_layers + setting.step) * layer
        assert setting.kv_cache_bytes(mem, 10 << 20) == (10 << 20) - setting.gpu_bytes(mem)
        # vLLM sizes KV without the buffers, which it allocates after measuring the weights.
        assert setting.vllm_kv_cache_bytes(mem, 10 << 20) == (10 << 20) - setting.gpu_bytes(mem) + setting.step * layer
        assert setting.buffer_bytes(m) == setting.step * layer
        assert setting.host_bytes(m) == (8 - resident_layers) * layer


def test_the_benchmark_holds_the_offloader_within_the_budget_and_ranks_only_runs_within_it():
    """bench/e2e.py: an `_in_budget` run asks vLLM for the budget less the static buffers (the
    stand-in's experts: 8 x 3 x 4096 x 14336 x 2 bytes a layer); a run whose measured peak
    exceeds the budget is shown but is not its family's best."""
    from bench.e2e import SETTINGS, prefetch_in_budget_util, table

    setting = SETTINGS["a40_standin"]()
    layer = 8 * 3 * 4096 * 14336 * 2
    total = 150_109_880_320  # the H200's torch total
    assert prefetch_in_budget_util(setting, "8/7/1", total) == round((15.53 * 2**30 - layer) / total, 4) == 0.0923
    assert prefetch_in_budget_util(setting, "8/6/2", total) == round((15.53 * 2**30 - 2 * layer) / total, 4)
    run = dict(output_tok_s=0.0, total_tok_s=0.0, kv_tokens=1, startup_s=1.0)
    report = {"setting": "a40_standin", "note": "", "util": 0.1111, "config": {"budget_gib": 15.53}, "predicted": {},
              "runs": {"prefetch_8_6_1": {**run, "output_tok_s": 700.0, "max_allocated_bytes": 17.9 * 2**30},
                       "prefetch_8_7_1_in_budget": {**run, "output_tok_s": 600.0, "max_allocated_bytes": 15.3 * 2**30},
                       "fluxmoe_plan": {**run, "output_tok_s": 900.0, "max_allocated_bytes": 15.1 * 2**30}}}
    text = table(report)
    assert "peak 17.90 GiB: over the budget" in text.splitlines()[2]
    assert "best prefetch within the budget (prefetch_8_7_1_in_budget): 1.50x" in text


def prefetch_in_budget_util(setting, label, total):
    from bench.e2e import prefetch_in_budget_util

    return prefetch_in_budget_util(setting, label, total)


@pytest.mark.parametrize("text", ["8/0/1", "8/9/1", "0/0/1", "8/7/0", "8-7-1", "8/7"])
def test_bad_settings_are_refused_with_the_setting(text):
    with pytest.raises(ConfigError, match="prefetch offload"):
        PrefetchOffload.parse(text)


def test_step_times_by_hand():
    """Four layers, compute c = 15.41 us each (7.37 of roofline and one kernel's fixed cost, 2
    more for the layer's other two GEMMs, 6.04 for its 6 small kernels), fixed part f = 11.82 us
    after the layers, a whole layer's copy x = 11.53 us (toy GPU at 20 GB/s, at the link's rate
    for a chunk-sized copy)."""
    profile = Profile(tiny_model(4, 4), tiny_gpu(20.0))
    cost, step = CostModel(profile), StepShape(1, 1, 100.0)
    c, f = cost.layer_compute_s(step), cost.fixed_s(step)
    x = cost.layer_transfer_s(TierCounts(0, 0, 4))
    assert (c[0] * 1e6, f * 1e6, x * 1e6) == (pytest.approx(15.41, abs=0.01), pytest.approx(11.82, abs=0.01),
                                               pytest.approx(11.53, abs=0.01))
    # 4/2/1: layer 2's copy starts after layer 3 of the step before, hidden by f + c0 + c1;
    # layer 3's starts after layer 2 and nothing is left to hide it.
    assert PrefetchOffload(4, 2, 1).steady_step_s(cost, step) == pytest.approx(sum(c) + f + x, rel=1e-9)
    # 4/2/2: each copy starts a whole step ahead, after its own layer: both hidden.
    assert PrefetchOffload(4, 2, 2).steady_step_s(cost, step) == pytest.approx(sum(c) + f, rel=1e-9)
    # 4/4/1: layer 0's copy hides behind f only (here x < f: all of it), the other three not at all.
    assert x < f
    assert PrefetchOffload(4, 4, 1).steady_step_s(cost, step) == pytest.approx(sum(c) + f + 3 * x, rel=1e-9)


def test_simulate_takes_a_setting_only_for_the_prefetch_baseline():
    profile = Profile(tiny_model(4, 4), tiny_gpu(20.0))
    wl = parse_workload("fixed:n=4,prompt=16,output=8")
    result = simulate(profile, wl, system="vllm_prefetch", prefetch_offload=PrefetchOffload(4, 2, 1),
                      kv_cache_bytes=1 << 20, max_num_seqs=4, keep_timeline=False)
    assert result.output_tokens == 32
    with pytest.raises(ConfigError, match="prefetch_offload: a setting for system 'vllm_prefetch' and only for it"):
        simulate(profile, wl, system="vllm_prefetch", kv_cache_bytes=1 << 20, max_num_seqs=4)
    with pytest.raises(ConfigError, match="prefetch_offload"):
        simulate(profile, wl, system="vllm", prefetch_offload=PrefetchOffload(4, 2, 1), kv_cache_bytes=1 << 20,
                 max_num_seqs=4)


def test_comparisons_tune_the_offloader_within_the_budget():
    """The best three settings of the grid by one steady step, each with the KV its budget leaves
    after its buffers; none whose offloaded experts exceed the host budget."""
    import planner
    from simulator.compare import PREFETCH_SIMULATED, prefetch_settings

    profile = Profile(tiny_model(4, 4), tiny_gpu(20.0))
    wl = parse_workload("fixed:n=8,prompt=64,output=16")
    plan = planner.optimize(profile, 1200 * 1024, reserve_bytes=16 << 10, host_budget=8 * profile.model.expert_bytes)
    mem = MemoryModel.of(profile, 16 << 10)
    configs = prefetch_settings(profile, plan, wl)
    assert 1 <= len(configs) <= PREFETCH_SIMULATED
    for config in configs:
        setting = config["prefetch_offload"]
        assert setting.host_bytes(profile.model) <= 8 * profile.model.expert_bytes  # two layers of 4 experts at most
        assert config["kv_cache_bytes"] == setting.kv_cache_bytes(mem, plan.budget_bytes) > 0
    assert len({c["prefetch_offload"].label for c in configs}) == len(configs)
