"""The one memory model against hand sums, and baselines that do not move with FluxMoE's options."""

import math
from pathlib import Path

import pytest

import planner
import profiles
from fluxmoe.names import System
from planner.cost_model import TierCounts
from planner.memory import VLLM_MAX_NUM_SEQS, MemoryModel
from profiles import Profile
from tests.conftest import tiny_gpu, tiny_model

GiB = 2**30
ROOT = Path(__file__).resolve().parent.parent

RESERVE = 16 << 10


def test_placement_bytes_by_hand():
    model = tiny_model(2, 4)  # experts of 3 x 64 x 128 bf16 = 49,152 bytes
    mem = MemoryModel(model, compressed_ratio=0.7, reserve_bytes=RESERVE)
    eb = 3 * 64 * 128 * 2
    assert mem.expert_bytes == eb
    tiers = [TierCounts(1, 2, 1), TierCounts(0, 1, 3)]
    # fixed + resident 1 + compressed 3 x 0.7 + staging (depth 1 + 1) x 4 slots
    expected = model.non_expert_bytes + RESERVE + eb + 3 * 0.7 * eb + 2 * 4 * eb
    assert mem.placement_bytes(tiers, depth=1) == pytest.approx(expected)
    assert mem.host_bytes(tiers) == 4 * eb
    assert mem.kv_left(10**7, tiers, 1) == math.floor(10**7 - expected)
    assert mem.fits(10**7, 4 * eb, tiers, 1, mem.kv_left(10**7, tiers, 1)) and not mem.fits(10**7, 3 * eb, tiers, 1, 0)


def test_baseline_footprints_by_hand():
    model = tiny_model(2, 4)
    mem = MemoryModel(model, 0.7, RESERVE)
    budget = 10**6
    weights = model.non_expert_bytes + 8 * mem.expert_bytes
    plain = mem.baseline(System.VLLM, budget)
    assert plain.kv_cache_bytes == budget - RESERVE - weights and plain.max_num_seqs == VLLM_MAX_NUM_SEQS
    kv = plain.kv_cache_bytes + 100_000
    offload = mem.offload_for_kv(budget, kv)
    assert offload == weights + RESERVE + kv - budget == 100_000
    footprint = mem.baseline(System.VLLM_OFFLOAD, budget, offload)
    # vLLM moves whole parameters: at least what was asked, and KV gets all of it
    assert footprint.offload_bytes == mem.uva_offloaded_bytes(offload) == 4 * mem.expert_bytes * 2 // 3
    assert footprint.kv_cache_bytes == plain.kv_cache_bytes + footprint.offload_bytes >= kv


def test_vllm_offloads_whole_parameters_layer_by_layer():
    mem = MemoryModel(tiny_model(2, 4), 0.7, RESERVE)
    layer = 4 * mem.expert_bytes  # a layer's stacked experts: gate/up matrix 2/3 of it, down 1/3
    gate_up = layer * 2 // 3
    assert mem.uva_offloaded_bytes(0) == 0
    assert mem.uva_offloaded_bytes(1) == gate_up  # the first layer's gate/up matrix alone
    assert mem.uva_offloaded_bytes(gate_up) == gate_up
    assert mem.uva_offloaded_bytes(gate_up + 1) == layer
    assert mem.uva_offloaded_bytes(layer) == layer  # stops once it has what was asked
    assert mem.uva_offloaded_bytes(layer + 1) == layer + gate_up
    assert mem.uva_offloaded_bytes(10 * layer) == 2 * layer  # no more than every expert


def test_offloaded_bytes_match_what_vllm_moved_on_the_h200():
    """The KV sizes of the runs moved by these steps (bench/calibration.json): Qwen3-Next's
    experts are 3 GiB a layer, the 8-layer Mixtral's 2.625 GiB."""
    qwen = MemoryModel.of(profiles.load("qwen3-next-80b-a3b", gpu="h200"))
    assert [qwen.uva_offloaded_bytes(g * GiB) / GiB for g in (7.33, 40, 44, 48)] == [8, 41, 44, 48]
    mixtral = MemoryModel.of(profiles.load(str(ROOT / "models" / "mixtral-8x7b-8layers"), gpu="h200"))
    assert [mixtral.uva_offloaded_bytes(g * GiB) / GiB for g in (13, 16, 19)] == [13.125, 17.5, 20.125]


def test_a_plans_memory_adds_up_to_its_budget_and_matches_the_memory_model():
    profile = profiles.load("mixtral-8x7b", gpu="h200")
    plan = planner.optimize(profile, "46GiB")
    mem = MemoryModel.of(profile)
    assert plan.memory.gpu_total_bytes == plan.budget_bytes
    tiers = plan.tier_counts()
    assert plan.kv_cache_bytes == pytest.approx(mem.kv_left(plan.budget_bytes, tiers, plan.prefetch_depth), abs=1)
    assert any(t.host_compressed for t in tiers)  # so the landing slots are held, and counted
    assert plan.memory.staging_bytes == (mem.staging_bytes(plan.prefetch_depth, plan.slots_per_buffer)
                                         + mem.landing_bytes)
    # Mixtral's w13 (2 x 14336 x 4096 bf16 = 224 MiB) is over a chunk: one expert per chunk, two slots
    assert mem.landing_bytes == math.ceil(2 * (2 * 14336 * 4096 * 2) * profile.hardware.codec.compressed_ratio)
    three_tiers = planner.optimize(profile, "46GiB", host_compressed=False)
    assert not any(t.host_compressed for t in three_tiers.tier_counts())
    assert three_tiers.memory.staging_bytes == mem.staging_bytes(three_tiers.prefetch_depth,
                                                                 three_tiers.slots_per_buffer)


def test_baselines_do_not_change_with_fluxmoes_own_options():
    profile = Profile(tiny_model(3, 4), tiny_gpu(1.0))
    a = planner.optimize(profile, 720 * 1024, reserve_bytes=RESERVE, max_num_seqs=8)
    b = planner.optimize(profile, 720 * 1024, reserve_bytes=RESERVE, max_num_seqs=64, prefetch_depths=(0, 1))
    assert a.baselines == b.baselines
    big = profiles.load("mixtral-8x7b", gpu="h200")
    c = planner.optimize(big, "120GiB", max_num_seqs=16)
    d = planner.optimize(big, "120GiB")
    assert c.baselines == d.baselines
    vllm = c.baseline("vllm")
    assert vllm.kv_cache_bytes == MemoryModel.of(big).resident_kv(c.budget_bytes)
    assert vllm.prediction.batch_size == min(VLLM_MAX_NUM_SEQS, vllm.kv_cache_bytes // big.model.kv_bytes_per_sequence(640))
