"""The profiler's bookkeeping: measurements become a valid, measured, loadable profile."""

import dataclasses

import pytest

import profiles
from fluxmoe.serde import dump_json, load_json
from planner.cost_model import CostModel
from profiles.hardware import HardwareProfile
from profiles.profiler import (Measurements, build_profile, dense_gemm_efficiency, prefill_attention_efficiency,
                               shipped_expert_shapes)


def fake_measurements() -> Measurements:
    return Measurements(
        device="NVIDIA H200", gpu_memory_bytes=150_107_586_560, host_memory_bytes=100 * 2**30,
        h2d_gbps={1 << 16: 10.0, 1 << 24: 52.0, 1 << 30: 55.0}, d2h_gbps={1 << 16: 9.0, 1 << 30: 54.0},
        copy_gbps=4200.0, matmul_tflops=780.0, codec_decode_gbps=1430.0, codec_ratio=0.68,
        expert_ffn_s={"4096x14336": {1: 1e-4, 64: 1.2e-4, 4096: 2e-3}},
        attention_kv_gbps={1 << 20: 300.0, 1 << 30: 3000.0}, dense_gemm_efficiency=0.87, ffn_kernel="vllm")


def test_measurements_become_a_measured_profile_that_round_trips(tmp_path):
    base = profiles.load_gpu("h200", measured=False)
    hw = build_profile("h200", fake_measurements(), base)
    assert hw.provenance.kind == "measured" and hw.provenance.device == "NVIDIA H200"
    assert hw.codec.decode_gbps == 1430.0 and hw.h2d_seconds(1 << 30) == pytest.approx((1 << 30) / 55e9)
    assert hw.gemm_efficiency == 0.87 and "vllm kernel" in hw.provenance.source
    assert hw.step_overhead_s == base.step_overhead_s  # not measured: kept from the datasheet
    assert hw.host_pinned_bytes == base.host_pinned_bytes  # the serving host's, not the profiled VM's
    path = tmp_path / "h200-measured.json"
    dump_json(hw, path)
    assert load_json(HardwareProfile, path) == hw


def test_cost_model_uses_the_measured_expert_table():
    hw = build_profile("h200", fake_measurements(), profiles.load_gpu("h200", measured=False))
    cost = CostModel(profiles.Profile(profiles.load_model("mixtral-8x7b"), hw))
    assert cost.expert_ffn_s(64) == pytest.approx(1.2e-4)
    assert cost.expert_ffn_s(1) == pytest.approx(1e-4)


def test_every_shipped_expert_shape_is_profiled():
    shapes = {(h, i): e for h, i, e in shipped_expert_shapes()}
    assert shapes[(4096, 14336)] == 8 and shapes[(2048, 512)] == 512 and shapes[(2880, 2880)] == 128


def test_cost_model_reads_decode_attention_from_the_measured_curve():
    hw = build_profile("h200", fake_measurements(), profiles.load_gpu("h200", measured=False))
    cost = CostModel(profiles.Profile(profiles.load_model("mixtral-8x7b"), hw))
    from planner.cost_model import StepShape

    step = StepShape(tokens=1, sequences=1, context_tokens=64)  # 64 tokens x 4 KiB = 256 KiB of KV per layer
    kv = 64 * 2 * 8 * 128 * 2
    assert cost._attention_s("full", step) == pytest.approx(kv / 300e9 + hw.kernel_overhead_s, rel=1e-6)


def test_dense_gemm_efficiency_is_the_median_compute_bound_share():
    def row(tokens, k, n, tflops):  # a GEMM that ran at `tflops`
        return dict(tokens=tokens, k=k, n=n, s=2 * tokens * k * n / (tflops * 1e12))

    rows = [row(4096, 4096, 4096, 700), row(16384, 4096, 6144, 600), row(1024, 2048, 2048, 800),
            row(64, 4096, 4096, 100),  # few tokens: memory-bound, left out
            row(8192, 512, 2048, 100)]  # a small matrix: left out
    assert dense_gemm_efficiency(rows, 1000) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="compute-bound"):
        dense_gemm_efficiency(rows[3:], 1000)


def test_prefill_attention_efficiency_is_the_median_share_per_prompt_length():
    def row(shape, context, tflops, phase="prefill"):  # causal prefill of 8 prompts that ran at `tflops`
        flops = 4 * 32 * 128 * 8 * context * (context + 1) / 2
        return dict(shape=shape, phase=phase, context=context, flops=flops, s=flops / (tflops * 1e12))

    rows = [row("a", 512, 300), row("b", 512, 400), row("c", 512, 500), row("a", 4096, 700),
            row("a", 1024, 100, phase="decode")]  # decode rows are not prefill
    assert prefill_attention_efficiency(rows, 1000) == pytest.approx({512: 0.4, 4096: 0.7})
    hw = build_profile("h200", dataclasses.replace(fake_measurements(), prefill_attention_efficiency={512: 0.4}),
                       profiles.load_gpu("h200", measured=False))
    assert hw.prefill_attention_efficiency(512) == pytest.approx(0.4)
    assert "prefill attention measured" in hw.provenance.source
    assert build_profile("h200", fake_measurements()).prefill_attention_efficiency is None
