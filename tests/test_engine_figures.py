"""What the simulator takes from vLLM's own behaviour (session 10's measurements, bench/NOTES.md):
its default batched tokens, its reserve as its start-up log itemizes it, the rate of its UVA
reads, and the expert FFN time past the measured table; and the balanced routing the
profiler times vLLM's kernel with. Each worked out by hand."""

import math

import numpy as np
import pytest

import profiles
from planner.cost_model import UVA_READ_SHARE, CostModel, StepShape
from planner.memory import vllm_reserve_bytes
from profiles.profiler import balanced_routing
from simulator import Workload, simulate
from simulator.scheduler import vllm_batched_tokens
from simulator.workload import Request

GiB = 2**30


def test_vllm_batched_tokens_follow_its_defaults_by_gpu_and_engine():
    assert vllm_batched_tokens(int(139.8 * GiB), offline=True) == 16384  # its LLM class on an H200
    assert vllm_batched_tokens(int(139.8 * GiB), offline=False) == 8192  # its server
    assert vllm_batched_tokens(int(44.98 * GiB), offline=True) == 8192  # an A40: under 70 GiB
    assert vllm_batched_tokens(int(44.98 * GiB), offline=False) == 2048
    assert vllm_batched_tokens(80 * GiB, offline=True, gpu_name="A100-SXM4-80GB") == 8192  # vLLM's A100 exception


def test_an_offline_workload_gets_the_offline_engines_chunks_and_a_timed_one_the_servers():
    profile = profiles.load("mixtral-8x7b", "h200")
    batch = Workload.synthetic(64, 512, 16)
    assert batch.offline and not Workload("t", [Request(0, 0.0, 512, 16), Request(1, 0.5, 512, 16)]).offline
    kv = 64 * profile.model.kv_bytes_per_sequence(528)
    first = simulate(profile, batch, system="vllm", kv_cache_bytes=kv, max_num_seqs=64).timeline[0]
    assert first.tokens == 16384  # 32 prompts of 512 in the first step
    timed = Workload("t", [Request(i, 0.0 if i < 63 else 1.0, 512, 16) for i in range(64)])
    first = simulate(profile, timed, system="vllm", kv_cache_bytes=kv, max_num_seqs=64).timeline[0]
    assert first.tokens == 8192


def test_the_reserve_is_vllms_logged_activation_outside_torch_and_graphs_by_layers():
    """3.5 GiB activation at Mixtral's width, 0.27 GiB outside torch, CUDA graphs 0.183 GiB and
    0.0133 GiB a layer: 4.06 GiB for the 8-layer stand-in (its log: 3.5 + 0.27 + 0.29), 4.38 for
    the 32 layers (plain vLLM's measured KV at 0.9 of the H200)."""
    full, standin = profiles.load_model("mixtral-8x7b"), profiles.load_model("models/mixtral-8x7b-8layers")
    expect = lambda layers: int(0.27 * GiB) + int(0.183 * GiB) + int(0.0133 * GiB) * layers + int(3.5 * GiB)  # noqa: E731
    assert vllm_reserve_bytes(full) == pytest.approx(expect(32), abs=2)
    assert vllm_reserve_bytes(standin) == pytest.approx(expect(8), abs=2)
    assert vllm_reserve_bytes(full) / GiB == pytest.approx(4.38, abs=0.01)
    assert vllm_reserve_bytes(standin) / GiB == pytest.approx(4.06, abs=0.01)


def test_uva_reads_run_at_their_share_of_the_copy_rate():
    cost = CostModel(profiles.load("mixtral-8x7b", "h200"))
    step = StepShape(tokens=256, sequences=256, context_tokens=576)
    offload = 16 * GiB
    read = offload * cost.routed_share(256)  # all 8 experts active at 256 tokens
    # 64 tokens an expert on average, in blocks of 128: one read whatever the spread (Poisson).
    assert cost.offload_rereads(step) == pytest.approx(1.0, abs=1e-6)
    link = cost.hw.h2d_seconds(read) * 1.0 / UVA_READ_SHARE
    got = cost.offload_step_time(step, offload)
    assert got.link_s == pytest.approx(link)
    assert got.total_s == pytest.approx(cost.resident_step_time(step).total_s + link)
    assert UVA_READ_SHARE == 0.93


def test_uva_reads_per_expert_are_the_mean_of_each_experts_blocks():
    """Mixtral's shapes on the H200 (blocks of 128 rows), per expert 128, 256 and 512 tokens on
    average: measured 1.45, 2.48 and 4.38 reads (bench/results/uva_reads_2026-11-25.json). The
    ceiling of the mean says 1, 2 and 4; the mean of Poisson ceilings 1.48, 2.48 and 4.49."""
    from planner.cost_model import expected_blocks

    measured = {128: 1.45, 256: 2.48, 512: 4.38}
    for mean, reads in measured.items():
        assert expected_blocks(mean, 128) == pytest.approx(reads, rel=0.03)
        assert abs(math.ceil(mean / 128) - reads) > 0.3  # what the old model missed
    assert expected_blocks(80, 128) == pytest.approx(1.0, abs=1e-6)  # Qwen3-Next at 4,096 tokens: 0.99
    assert expected_blocks(320, 128) == pytest.approx(2.97, rel=0.03)  # and at 16,384


def test_expert_time_grows_with_tokens_past_the_measured_table():
    cost = CostModel(profiles.load("mixtral-8x7b", "h200"))
    last = cost._ffn_curve.x[-1]
    assert last == 4096
    assert cost.expert_ffn_s(2 * last) == pytest.approx(2 * cost.expert_ffn_s(last))
    assert cost.expert_ffn_s(last / 2) == pytest.approx(cost._ffn_curve(last / 2))  # inside: the table itself


@pytest.mark.parametrize("tokens,experts,top_k", [(3, 8, 2), (5, 512, 10), (64, 8, 2), (7, 3, 2)])
def test_balanced_routing_gives_every_expert_its_tokens_and_each_token_distinct_experts(tokens, experts, top_k):
    ids = balanced_routing(tokens, experts, top_k)
    assert ids.shape == (math.ceil(tokens * experts / top_k), top_k)
    counts = np.bincount(ids.ravel(), minlength=experts)
    assert counts.min() >= tokens and counts.max() <= tokens + 1
    assert all(len(set(row)) == top_k for row in ids.tolist())
