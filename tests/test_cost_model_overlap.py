"""The cost model's prefetch overlap, worked out by hand on a 3-layer toy.

Layer compute 1, 2 and 3 ms; a host expert crosses the link in 1 ms; a compressed expert
decodes in 0.5 ms on the GPU. Transfers of layer l hide behind the compute of the `depth`
layers before it (cyclically: the previous step's tail) and behind layer l's own decodes, which
start with the transfer (both wait only for the layer's staging buffer)."""

import pytest

from planner.cost_model import CostModel, StepShape, TierCounts
from profiles import Profile
from tests.conftest import tiny_gpu, tiny_model

MS = 1e-3


@pytest.fixture
def cost(monkeypatch):
    model = CostModel(Profile(tiny_model(3, 8), tiny_gpu()))
    monkeypatch.setattr(model, "layer_compute_s", lambda step: [1 * MS, 2 * MS, 3 * MS])
    monkeypatch.setattr(model, "fixed_s", lambda step: 0.0)
    model.stack_transfer_s_per_expert, model.decode_s_per_expert = 1 * MS, 0.5 * MS  # host experts fetched whole
    return model


STEP = StepShape(4, 4, 100.0)


@pytest.mark.parametrize("host,depth,stall_ms,total_ms", [
    # GPU per layer: 1, 2, 3 + 2 x 0.5 = 4 ms (7 ms in all). Links: 6 + 1 = 7 ms.
    ((6, 1, 0), 0, 7, 14),  # nothing hides: both transfers stall in full
    ((6, 1, 0), 1, 3, 10),  # layer 0 hides 3 of 6 behind layer 2's compute; layer 1 hides 1 behind layer 0
    ((6, 1, 0), 2, 1, 8),  # layer 0 hides 3 + 2 = 5 ms, layer 1 behind 1 + 3 = 4 ms
    ((6, 5, 0), 2, 2, 11),  # stalls 1 + 1, and the link's 11 ms outlast the GPU's 7 + 2 ms
    ((6, 5, 0), 1, 7, 14),  # layer 0 stalls 6 - 3 = 3, layer 1 stalls 5 - 1 = 4
    ((0, 0, 2), 0, 1, 8),  # layer 2's own decodes (1 ms) hide half of its 2 ms transfer
])
def test_stalls_by_hand(cost, host, depth, stall_ms, total_ms):
    tiers = [TierCounts(8 - h - c, c, h) for h, c in zip(host, (0, 0, 2))]
    t = cost.step_time(tiers, STEP, depth)
    assert t.gpu_s == pytest.approx(7 * MS)
    assert t.link_s == pytest.approx(sum(host) * MS)
    assert t.stall_s == pytest.approx(stall_ms * MS)
    assert t.total_s == pytest.approx(total_ms * MS)


def test_window_layers_wrap_around_to_the_previous_step():
    assert CostModel.window_layers(3, 0, 2) == [2, 1]
    assert CostModel.window_layers(3, 1, 1) == [0]
    assert CostModel.window_layers(3, 2, 5) == [1, 0, 2]


def test_a_steady_decode_step_by_hand():
    """Continuous batching at steady state: each step decodes `batch` tokens and prefills its
    share of the prompts (batch x prompt / output), at the mean context (prompt + output / 2)."""
    step = StepShape.steady_decode(4, 512, 128)
    assert (step.tokens, step.sequences, step.context_tokens) == (4 + 4 * 512 // 128, 4, 512 + 64)
    one = StepShape.steady_decode(3, 100, 1)  # one output token: the whole prompt in the step
    assert (one.tokens, one.context_tokens) == (3 + 300, 100.5)
    assert StepShape.steady_decode(1, 0, 5).tokens == 1  # a step runs at least one token
    assert StepShape.steady_decode(2, 10, 0).tokens == 2 + 20  # no output: prompts as if one step each


@pytest.mark.parametrize("model,gpu", [("mixtral-8x7b", "h200"), ("qwen3-30b-a3b", "a40"), ("qwen3-next-80b-a3b", "h200")])
@pytest.mark.parametrize("host_compressed", [False, True])
def test_the_paging_bound_is_below_every_placement_that_frees_as_much(model, gpu, host_compressed):
    """The planner visits candidates by `paging_lower_bound_s` and stops where it cannot beat the
    best plan: a bound above any real placement would prune the optimum. Random placements,
    depths and batches: the bound for the bytes a placement frees (net of its staging and
    landing slots) never exceeds its step time."""
    import random

    import profiles
    from planner.memory import MemoryModel

    profile = profiles.load(model, gpu=gpu)
    cost, mem = CostModel(profile), MemoryModel.of(profile)
    m, rng = profile.model, random.Random(7)
    E = m.num_experts
    for _ in range(60):
        tiers = []
        for _ in m.moe_layers:
            r = rng.randint(0, E)
            c = rng.randint(0, E - r)
            hc = rng.randint(0, E - r - c) if host_compressed else 0
            tiers.append(TierCounts(r, c, E - r - c - hc, hc))
        depth, batch = rng.randint(0, 3), rng.choice([1, 16, 128, 512])
        step = StepShape.steady_decode(batch, 512, 128)
        freed = mem.all_experts_bytes - (mem.placement_bytes(tiers, depth) - mem.fixed_bytes)
        bound = cost.paging_lower_bound_s(step, freed, mem.host_bytes(tiers), (depth + 1) / m.num_moe_layers,
                                          host_compressed)
        assert bound <= cost.step_time(tiers, step, depth).total_s * (1 + 1e-9)


def test_linear_attention_reads_and_writes_each_sequences_state_once_per_layer():
    """Qwen3-Next's linear-attention layers, by hand: a step reads and writes every running
    sequence's recurrent state once (context length does not matter), at the profile's HBM rate,
    and its prompt tokens (all but one per sequence) run the chunked kernels at the measured
    rate per token and state byte; its full-attention layers read the KV of the context instead."""
    import profiles
    from planner.cost_model import CostModel, StepShape

    profile = profiles.load("qwen3-next-80b-a3b", gpu="h200")
    m, hw = profile.model, profile.hardware
    cost = CostModel(profile)
    assert m.attention.count("linear") == 36 and m.linear_state_bytes_per_layer > 0
    rate = hw.hbm_gbps * 1e9 * hw.memory_efficiency
    for sequences, context in ((1, 100), (64, 100), (64, 20_000)):
        step = StepShape(sequences + 50, sequences, context)  # prefill tokens beside: the state is per sequence
        by_hand = (2 * sequences * m.linear_state_bytes_per_layer / rate + hw.kernel_overhead_s
                   + 50 * m.linear_state_bytes_per_layer * hw.linear_prefill_s_per_token_state_byte)
        assert cost._attention_s("linear", step) == pytest.approx(by_hand, rel=1e-12)
    assert hw.linear_prefill_s_per_token_state_byte * m.linear_state_bytes_per_layer == pytest.approx(115e-9)
    short, long = (cost._attention_s("full", StepShape(64, 64, c)) for c in (100, 20_000))
    assert long > 5 * short  # full attention grows with context, linear does not


def test_full_and_sliding_attention_by_hand_with_the_measured_kv_read_curve():
    """gpt-oss-120b on the measured H200: a full-attention layer reads every sequence's context
    of KV at the rate the measured curve gives for that many bytes (or is bound by its decode
    FLOPs), and its prefill tokens (beyond one a sequence) attend causally, over half the
    context on average, at the measured prefill share of the peak for that length; a sliding
    layer reads and attends over at most its window."""
    import profiles
    from planner.cost_model import CostModel, StepShape

    profile = profiles.load("gpt-oss-120b", gpu="h200")
    m, hw = profile.model, profile.hardware
    assert hw.attention_kv_gbps is not None and hw.prefill_attention_efficiency is not None
    assert {"full", "sliding"} <= set(m.attention) and m.sliding_window == 128
    cost = CostModel(profile)
    flops_per_s = hw.bf16_tflops * 1e12 * hw.gemm_efficiency

    def by_hand(kind, step):
        context = min(step.context_tokens, m.sliding_window) if kind == "sliding" else step.context_tokens
        kv = step.sequences * context * m.kv_bytes_per_token_layer[kind]
        read = kv / (hw.attention_kv_gbps(kv) * 1e9)
        prefill = (4 * m.attention_width * (step.tokens - step.sequences) * context / 2
                   / (hw.bf16_tflops * 1e12 * hw.prefill_attention_efficiency(context)))
        decode = max(4 * m.attention_width * step.sequences * context / flops_per_s, read)
        return decode + prefill + hw.kernel_overhead_s

    decode, prefill = StepShape(64, 64, 20_000), StepShape(8192, 1, 4096)
    for kind in ("full", "sliding"):
        for step in (decode, prefill, StepShape(64, 64, 100)):
            assert cost._attention_s(kind, step) == pytest.approx(by_hand(kind, step), rel=1e-12)
    # A chunk of 8,192 tokens of one sequence at 4,096 of context: 8,191 prompt tokens over 2,048
    # keys on average at 0.71 of the peak (measured for 4,096-token prompts), after its KV read
    causal = 4 * m.attention_width * 8191 * 4096 / 2 / (hw.bf16_tflops * 1e12 * 0.7087)
    kv = 4096 * m.kv_bytes_per_token_layer["full"]
    read = kv / (hw.attention_kv_gbps(kv) * 1e9)
    assert cost._attention_s("full", prefill) == pytest.approx(read + causal + hw.kernel_overhead_s, rel=0.001)
    short = StepShape(64, 64, 100)  # within the window, sliding and full read the same
    assert cost._attention_s("sliding", short) == cost._attention_s("full", short)
    assert cost._attention_s("sliding", decode) == cost._attention_s("sliding", StepShape(64, 64, 128))
    assert cost._attention_s("full", decode) > 5 * cost._attention_s("sliding", decode)


def test_the_split_host_bound_is_the_lps_optimum():
    """With the host-compressed tier, host experts split between the two host tiers: the bound
    is the optimum of that small LP, found by its vertices; scipy's HiGHS solves the same LP."""
    import random

    import numpy as np
    import profiles
    from scipy.optimize import linprog

    profile = profiles.load("qwen3-30b-a3b", gpu="h200")
    cost, rng = CostModel(profile), random.Random(3)
    total = profile.model.total_experts
    for _ in range(30):
        step = StepShape(rng.choice([1, 16, 128, 512]), 16, 500.0)
        free, host, share = rng.uniform(1e8, 4e10), rng.choice([1e9, 2e10, 1e12]), rng.uniform(0, 0.05)
        base = cost.resident_step_time(step)
        eb = cost.expert_bytes * (1 - share)
        saved = cost.expert_bytes - cost.compressed_expert_bytes - cost.expert_bytes * share
        td, tb, tc = cost.decode_s_per_expert, cost.stack_transfer_s_per_expert, cost.compressed_transfer_s_per_expert
        a = np.array([[td, 0, td, -1], [0, tb, tc, -1], [-saved, -eb, -eb, 0],
                      [0, cost.expert_bytes, cost.compressed_expert_bytes, 0], [1, 1, 1, 0]])
        b = np.array([-base.gpu_s, 0, -free, host, total])
        scale = np.abs(a).max(axis=1)  # seconds, bytes and counts: HiGHS's tolerances need rows near 1
        lp = linprog([0, 0, 0, 1], A_ub=a / scale[:, None], b_ub=b / scale, bounds=[(0, None)] * 4, method="highs")
        bound = cost.paging_lower_bound_s(step, free, host, share, host_compressed=True)
        if lp.status == 2:  # infeasible: nothing frees that much
            assert bound == float("inf")
        else:
            assert bound == pytest.approx(lp.x[3] + base.fixed_s, rel=1e-6)
