"""Time of one engine step, layer by layer, for a placement of experts into tiers.

Shared by the planner (which linearizes it) and the simulator (which plays it out event by
event). A step runs the decoder layers in order. Layer l costs, on the GPU timeline,
`compute_l` (attention, dense GEMMs and the expert FFNs of the tokens routed there, the same
whatever tier the experts came from) plus `decode_l` (compressed experts decoded into the
staging pool: the decoder shares the SMs and HBM with compute, so it is serialized with it).
Host experts cross PCIe on the copy engine (`transfer_l`), overlapping the compute of the
`prefetch_depth` layers before l; wrapping around, since next step's early layers prefetch
during this step's last ones. Steady state:

    step = max(sum_l (compute_l + decode_l) + sum_l stall_l,  sum_l transfer_l) + fixed
    stall_l = max(0, transfer_l - sum of (compute + decode) over the depth layers before l)

Routing: with T tokens and top-k of E experts, an expert of popularity p (a Zipf law of
exponent `routing_skew` over the E experts; 0 is uniform) is active with probability
1 - (1 - min(1, k p))^T; uniformly that makes E(1 - (1 - k/E)^T) active experts in a layer.
With routed-only fetch (a plan's `routed_fetch`), a layer's host experts cross the link only
when active, after its router: that link time is on the layer's path, unhidden. Given measured
per-expert popularity (planner/popularity.py), the odds are each expert's own, and which
experts sit on the host matters: by default the coldest, or the ids a plan names.
Baselines: plain vLLM (all resident) and vLLM with CPU weight offload, whose offloaded bytes
cross PCIe every step without overlap.

On several GPUs (profiles/parallel.py) the profile is one rank's: every layer adds two
all-reduces of the step's hidden states to the GPU timeline (NCCL kernels run on the compute
stream), the step adds the embedding's all-reduce and the logits' gather, and under expert
parallel a layer's experts take as long as the busiest rank's: the one the batch routes the
most tokens to (under a routing skew, averaged over random placements of hot experts).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from planner.popularity import ExpertPopularity
from profiles.registry import Profile

# vLLM's UVA offload reads host weights from inside its GEMM kernels, tile by tile, at this share
# of the copy engine's pinned rate. Measured, not fitted: our own gather kernel, which reads
# pinned memory through UVA the same way, got 0.92-0.94 of the copy engine's rate in six runs on
# the H200 (bench/results/routed_fetch_*_2026-11-24.json). With the bytes vLLM really offloads
# (MemoryModel.uva_offloaded_bytes) it puts 8 of the 10 UVA runs within 1.2%.
UVA_READ_SHARE = 0.93

# Per decoder layer, vLLM runs small kernels besides its GEMMs, attention and experts: two fused
# residual-add RMS norms, the rotary embedding, the KV-cache write, the router's top-k and a
# Triton elementwise kernel: 6 kernels a layer-step in plain vLLM's kernel profile of Mixtral-8x7B
# (bench/results/e2e_fits_short_kernels_2026-11-25.json: 224 ms in 4,352 layer-steps), each
# at least a kernel's fixed cost, and together about 12 reads or writes of a token's hidden state.
LAYER_SMALL_KERNELS = 6
LAYER_HIDDEN_PASSES = 12

# Batch sizes (concurrent sequences) the planner considers.
BATCH_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512,
              640, 768, 896, 1024, 1280, 1536, 2048)


# Every choice of four of the eight constraints of CostModel._split_bound_s's LP.
_VERTEX_ROWS = np.array(list(itertools.combinations(range(8), 4)))

# The host-compressed tier moves each stacked matrix in chunks of about HOST_CHUNK_BYTES of bf16
# (at least one expert) through landing slots on the GPU (executor/landing.py): small enough to
# cost little memory, large enough that each copy runs at the link's rate.
HOST_CHUNK_BYTES = 128 << 20


def host_chunk_bf16_bytes(expert_bytes: int, num_experts: int) -> int:
    """bf16 bytes of a layer's largest host-compressed chunk: w13's (two thirds of an expert)
    times the experts a chunk holds."""
    w13 = 2 * expert_bytes // 3
    return min(num_experts, max(1, HOST_CHUNK_BYTES // max(w13, 1))) * w13


@dataclass(frozen=True)
class StepShape:
    """What one engine step processes: tokens (decode + prefill chunk), sequences, mean context."""

    tokens: int
    sequences: int
    context_tokens: float

    @classmethod
    def steady_decode(cls, batch: int, prompt_tokens: int, output_tokens: int) -> "StepShape":
        """A continuous-batching step: `batch` decodes plus their amortized share of prefill."""
        prefill_per_step = batch * prompt_tokens / max(output_tokens, 1)
        return cls(tokens=max(1, round(batch + prefill_per_step)), sequences=batch,
                   context_tokens=prompt_tokens + output_tokens / 2)


@dataclass(frozen=True)
class TierCounts:
    """How many of one MoE layer's experts sit in each tier."""

    resident: int
    compressed: int
    host: int
    host_compressed: int = 0

    @property
    def paged(self) -> int:
        """Experts that need a staging slot when the layer runs."""
        return self.compressed + self.host + self.host_compressed


@functools.lru_cache(maxsize=1 << 16)
def tier_counts(resident: int, compressed: int, host: int, host_compressed: int = 0) -> TierCounts:
    """A shared TierCounts for these counts (frozen, so one object serves every placement that
    holds it): the planner builds a few hundred thousand a plan, at 0.5 us each built anew."""
    return TierCounts(resident, compressed, host, host_compressed)


@dataclass(frozen=True)
class StepTime:
    """A step's time and where it went; all in seconds."""

    total_s: float
    gpu_s: float
    link_s: float
    stall_s: float
    fixed_s: float


@functools.lru_cache(maxsize=4096)
def expected_blocks(mean_tokens: float, block: int) -> float:
    """E[ceil(n / block) | n >= 1] for n ~ Poisson(mean_tokens): the blocks of `block` rows a
    kernel runs for an expert that gets at least one token, when experts get tokens at random
    about that mean (1 where every expert's tokens fit one block). scipy.special's Poisson
    survival function, not scipy.stats': the same values at a few microseconds a call instead of
    ~350 (and no second of importing scipy.stats), on the simulator's per-step path."""
    from scipy.special import pdtrc  # P(n > k) for n ~ Poisson(mean)

    if mean_tokens <= 0:
        return 1.0
    active = -math.expm1(-mean_tokens)  # P(n >= 1)
    j = np.arange(1, int((mean_tokens + 12 * math.sqrt(mean_tokens) + 12) / block) + 2)
    return 1.0 + float(pdtrc(j * block, mean_tokens).sum()) / active


class CostModel:
    """Per-layer times for one model on one GPU; tier-independent parts cached per step shape."""

    def __init__(self, profile: Profile, routing_skew: float = 0.0, popularity: ExpertPopularity | None = None):
        """popularity: measured per-expert shares; it replaces `routing_skew` where given."""
        if not routing_skew >= 0:
            raise ValueError(f"routing_skew: must be >= 0, got {routing_skew!r}")
        m = profile.model
        if popularity is not None and (popularity.num_layers, popularity.num_experts) != (m.num_moe_layers,
                                                                                           m.num_experts):
            raise ValueError(f"popularity: covers {popularity.num_layers} layers of {popularity.num_experts} experts, "
                             f"the model has {m.num_moe_layers} of {m.num_experts}")
        self.parallel = profile.parallel
        self._refuse_under_expert_parallel(popularity)
        self.profile = profile
        self.routing_skew = routing_skew
        self.popularity = popularity
        self.model = profile.model
        self.hw = profile.hardware
        # Under expert parallel a token picks among every rank's experts: num_experts x shards.
        self.routing_experts = m.num_experts * self.parallel.expert_shards
        m, hw = self.model, self.hw
        self._flops_per_s = hw.bf16_tflops * 1e12 * hw.gemm_efficiency
        self._bytes_per_s = hw.hbm_gbps * 1e9 * hw.memory_efficiency
        self._ffn_curve = hw.expert_ffn_s.get(f"{m.hidden_size}x{m.expert_intermediate_size}")
        self._ffn_scale = 1.0
        tp = self.parallel.tensor_parallel
        if self._ffn_curve is None and tp > 1 and self.parallel.expert_shards == 1:
            # A tensor-parallel cut of a measured expert: 1/tp of its FLOPs and bytes, in the
            # same fused kernel, so 1/tp of its measured time (the roofline would charge each
            # cut a kernel launch of its own).
            self._ffn_curve = hw.expert_ffn_s.get(f"{m.hidden_size}x{m.expert_intermediate_size * tp}")
            self._ffn_scale = 1 / tp
        self.expert_bytes = m.expert_bytes
        self.compressed_expert_bytes = m.expert_bytes * hw.codec.compressed_ratio
        # Per-expert costs of the paged tiers. A host-compressed expert crosses the link encoded;
        # its decode is pipelined behind the link chunk by chunk (two landing slots) at ~20x the
        # link's rate, so only the link time is on the layer's path (measured on the H200: the
        # layer waits for the link alone, bench/results/e2e_a40_standin_host-compressed_*.json);
        # those decodes still take GPU time beside compute (`layer_decode_s`).
        self.decode_s_per_expert = m.expert_bytes / (hw.codec.decode_gbps * 1e9)
        # Fetched whole, a layer's host experts cross as one copy per stacked matrix and its
        # host-compressed ones in chunks of several (HOST_CHUNK_BYTES): at the link's rate for a
        # chunk-sized copy, not one expert's (54 GB/s against 46 for Qwen3-Next's 4.3 MB encoded;
        # the pager measured 53, bench/results/e2e_qwen3_next_standin_spread_*.json). A layer
        # with fewer bf16 host experts than a chunk holds copies less at once, a little slower.
        chunk = host_chunk_bf16_bytes(m.expert_bytes, m.num_experts)
        self.stack_transfer_s_per_expert = m.expert_bytes / (hw.h2d_gbps(chunk) * 1e9)
        self.compressed_transfer_s_per_expert = (self.compressed_expert_bytes
                                                 / (hw.h2d_gbps(chunk * hw.codec.compressed_ratio) * 1e9))
        # Routed-only fetch: the gather kernel reads a layer's routed host experts from pinned
        # memory in one launch, as UVA offload's GEMMs do, at UVA_READ_SHARE of a large copy's
        # rate: 50.8-51.4 GB/s on the H200 (bench/results/routed_fetch_*_2026-11-24.json), where
        # one expert-sized copy gets 48.
        self.routed_s_per_expert = m.expert_bytes / (hw.h2d_gbps(chunk) * 1e9 * UVA_READ_SHARE)
        self._compute_cache: dict[StepShape, list[float]] = {}
        self._active_cache: dict[float, float] = {}  # tokens -> active experts, under a routing skew
        self._pick_odds: list[float] | None = None  # per expert, P(one token picks it), under a skew
        self._rank_cache: dict[float, tuple[float, float]] = {}  # tokens -> busiest rank's (active, routed)

    def _refuse_under_expert_parallel(self, popularity: ExpertPopularity | None) -> None:
        if popularity is not None and self.parallel.expert_shards > 1:
            raise ValueError("popularity: measured per-expert popularity under expert parallel is not modelled")

    def set_popularity(self, popularity: ExpertPopularity | None) -> None:
        """Routing changed (the simulator's drift): per-step caches that depend on it are dropped."""
        self._refuse_under_expert_parallel(popularity)
        self.popularity = popularity
        self._active_cache.clear()
        self._compute_cache.clear()

    # ------------------------------------------------------------------ compute
    def _gemm_s(self, params: float, tokens: float, kernels: int = 1) -> float:
        """Roofline time of reading `params` weights once and multiplying them by `tokens` rows,
        in `kernels` GEMM kernels, each with its fixed cost (cuBLAS on the H200: 3-7 us above
        the roofline at few tokens, bench/results/kernel_rates_2026-11-25.json)."""
        if params <= 0:
            return 0.0
        return max(2 * params * tokens / self._flops_per_s,
                   params * self.model.dtype_bytes / self._bytes_per_s) + kernels * self.hw.kernel_overhead_s

    def expert_ffn_s(self, tokens: float) -> float:
        """One expert's FFN over `tokens` tokens: measured table if the profile has one, else roofline."""
        curve = self._ffn_curve
        if curve is not None:
            # Past the table's last row the kernel is compute-bound: time grows with the tokens.
            stretch = max(1.0, tokens / curve.x[-1])
            return curve(tokens) * stretch * self._ffn_scale
        return self._gemm_s(self.model.expert_params, tokens)

    def active_experts(self, tokens: float) -> float:
        """Expected experts of a layer (of this rank's, on the busiest rank under expert
        parallel) that at least one of `tokens` tokens routes to."""
        m = self.model
        E, k = m.num_experts, m.experts_per_token
        if self.parallel.expert_shards > 1:
            return self.busiest_rank(tokens)[0]
        if self.popularity is not None:
            if tokens not in self._active_cache:
                self._active_cache[tokens] = self.popularity.active_experts(tokens)
            return self._active_cache[tokens]
        if self.routing_skew == 0:
            return E * (1 - (1 - k / E) ** tokens)
        if tokens not in self._active_cache:  # E terms, asked for every simulated step: once per size
            self._active_cache[tokens] = sum(1 - (1 - q) ** tokens for q in self.pick_odds())
        return self._active_cache[tokens]

    def routed_pairs(self, tokens: float) -> float:
        """Token-expert pairs a layer's experts on this rank (the busiest one) compute."""
        if self.parallel.expert_shards > 1:
            return self.busiest_rank(tokens)[1]
        return tokens * self.model.experts_per_token

    def pick_odds(self) -> list[float]:
        """Per expert of a layer, hottest first: the odds that one token picks it (Zipf skew)."""
        if self._pick_odds is None:
            E, k = self.routing_experts, self.model.experts_per_token
            weights = [rank ** -self.routing_skew for rank in range(1, E + 1)]
            self._pick_odds = [min(1.0, k * w / sum(weights)) for w in weights]
        return self._pick_odds

    # Random placements of experts by popularity over the ranks, averaged under a skew: which
    # ids are hot is not known ahead, and vLLM places experts by id.
    EP_PLACEMENT_DRAWS = 64

    def busiest_rank(self, tokens: float) -> tuple[float, float]:
        """Expert parallel: the (active experts, routed token-expert pairs) of the rank that a
        step of `tokens` tokens routes the most to. Uniform routing: every rank alike."""
        cached = self._rank_cache.get(tokens)
        if cached is not None:
            return cached
        E, k, local = self.routing_experts, self.model.experts_per_token, self.model.num_experts
        if self.routing_skew == 0:
            answer = (local * (1 - (1 - k / E) ** tokens), tokens * k * local / E)
        else:
            odds = np.asarray(self.pick_odds())
            rng = np.random.default_rng(0)
            draws = np.stack([odds[rng.permutation(E)] for _ in range(self.EP_PLACEMENT_DRAWS)])
            groups = draws.reshape(self.EP_PLACEMENT_DRAWS, -1, local)  # draw, rank, expert
            routed = tokens * groups.sum(axis=2)
            busiest = routed.argmax(axis=1)
            rows = np.arange(self.EP_PLACEMENT_DRAWS)
            active = (1 - (1 - groups[rows, busiest]) ** tokens).sum(axis=1)
            answer = (float(active.mean()), float(routed[rows, busiest].mean()))
        self._rank_cache[tokens] = answer
        return answer

    def routed_share(self, tokens: float) -> float:
        """The share of a layer's experts a step of `tokens` tokens routes to (routed-only fetch
        moves this share of the host experts; the placement does not pick them by popularity)."""
        return self.active_experts(tokens) / self.model.num_experts

    def _attention_s(self, kind: str, step: StepShape) -> float:
        m = self.model
        if kind == "linear":
            state_io = 2 * step.sequences * m.linear_state_bytes_per_layer
            prefill = 0.0
            if self.hw.linear_prefill_s_per_token_state_byte:  # prompt tokens: all but one per sequence
                prefill = ((step.tokens - step.sequences) * m.linear_state_bytes_per_layer
                           * self.hw.linear_prefill_s_per_token_state_byte)
            return state_io / self._bytes_per_s + prefill + self.hw.kernel_overhead_s
        context = min(step.context_tokens, m.sliding_window) if kind == "sliding" else step.context_tokens
        kv_read = step.sequences * context * m.kv_bytes_per_token_layer.get(kind, 0)
        measured = self.hw.attention_kv_gbps
        read_s = kv_read / (measured(kv_read) * 1e9) if measured and kv_read else kv_read / self._bytes_per_s
        prefill_share = self.hw.prefill_attention_efficiency
        if prefill_share is None:
            flops = 4 * m.attention_width * step.tokens * context
            return max(flops / self._flops_per_s, read_s) + self.hw.kernel_overhead_s
        # Decode: one query a sequence over its context, bound by the KV read. Prefill: the
        # tokens beyond one a sequence, each over half the context on average (causal), at the
        # measured share of the peak for prompts of that length.
        decode_flops = 4 * m.attention_width * step.sequences * context
        prefill_flops = 4 * m.attention_width * max(0, step.tokens - step.sequences) * context / 2
        prefill_s = prefill_flops / (self.hw.bf16_tflops * 1e12 * prefill_share(context)) if prefill_flops else 0.0
        return max(decode_flops / self._flops_per_s, read_s) + prefill_s + self.hw.kernel_overhead_s

    def layer_compute_s(self, step: StepShape) -> list[float]:
        """Per-layer compute time (attention + dense + routed experts), independent of tiers."""
        cached = self._compute_cache.get(step)
        if cached is not None:
            return cached
        m = self.model
        active = self.active_experts(step.tokens)
        experts_s = active * self.expert_ffn_s(self.routed_pairs(step.tokens) / active)
        # Tensor parallel: attention and the FFN each end in an all-reduce of the hidden states.
        all_reduces_s = 2 * self.parallel.all_reduce_s(step.tokens * m.hidden_size * m.dtype_bytes)
        small_s = (LAYER_SMALL_KERNELS * self.hw.kernel_overhead_s
                   + LAYER_HIDDEN_PASSES * step.tokens * m.hidden_size * m.dtype_bytes / self._bytes_per_s)
        times = []
        for layer in range(m.num_layers):
            t = (self._gemm_s(m.layer_dense_params(layer), step.tokens, m.layer_dense_gemms(layer))
                 + self._attention_s(m.attention[layer], step) + small_s + all_reduces_s)
            if m.is_moe_layer(layer):
                t += experts_s
            times.append(t)
        self._compute_cache[step] = times
        return times

    def fixed_s(self, step: StepShape) -> float:
        """Per-step cost outside the layers: LM head over the sampled rows, engine overhead;
        on several GPUs the embedding's all-reduce and the gather of each rank's logits."""
        m, par = self.model, self.parallel
        collectives = (par.all_reduce_s(step.tokens * m.hidden_size * m.dtype_bytes)
                       + par.gather_s(step.sequences * m.vocab_size * par.tensor_parallel * m.dtype_bytes))
        return self._gemm_s(m.vocab_size * m.hidden_size, step.sequences) + self.hw.step_overhead_s + collectives

    # ------------------------------------------------------------------ steps
    def step_time(self, tiers: list[TierCounts], step: StepShape, prefetch_depth: int,
                  routed_fetch: bool = False, host_ids: list[list[int]] | None = None) -> StepTime:
        """Steady-state step time for a placement (one TierCounts per MoE layer, in order).
        routed_fetch: host experts move after the router, only the routed ones, unhidden.
        host_ids: which experts each layer keeps on the host (default: the coldest), where
        popularity is known."""
        m = self.model
        if len(tiers) != m.num_moe_layers:
            raise ValueError(f"need one TierCounts per MoE layer ({m.num_moe_layers}), got {len(tiers)}")
        compute = self.layer_compute_s(step)
        path = list(compute)  # each layer's compute, and its routed fetch where there is one
        decode = [0.0] * m.num_layers
        transfer = [0.0] * m.num_layers
        routed = 0.0
        for position, (layer, counts) in enumerate(zip(m.moe_layers, tiers)):
            decode[layer] = self.layer_decode_s(counts)
            transfer[layer] = self.layer_transfer_s(counts, routed_fetch)
            if routed_fetch:
                on_path = self.layer_routed_s(counts, step, position, host_ids[position] if host_ids else None)
                path[layer] += on_path
                routed += on_path
        gpu = [p + d for p, d in zip(path, decode)]
        L, window = m.num_layers, range(1, min(prefetch_depth, m.num_layers) + 1)  # window_layers, inlined
        stall = sum(max(0.0, transfer[layer] - sum(path[(layer - j) % L] for j in window) - decode[layer])
                    for layer in range(L) if transfer[layer] > 0)
        gpu_s, link_s, fixed = sum(gpu) - routed, sum(transfer) + routed, self.fixed_s(step)
        return StepTime(max(gpu_s + routed + stall, link_s) + fixed, gpu_s, link_s, stall + routed, fixed)

    def layer_decode_s(self, counts: TierCounts) -> float:
        """GPU time of a layer's decodes: its compressed experts', and its host-compressed
        experts' as their chunks land. Both may run while the layer's transfer is under way."""
        return (counts.compressed + counts.host_compressed) * self.decode_s_per_expert

    def layer_transfer_s(self, counts: TierCounts, routed_fetch: bool = False) -> float:
        """Link time ahead of the layer: its host (unless fetched routed-only) and host-compressed experts."""
        host = 0 if routed_fetch else counts.host * self.stack_transfer_s_per_expert
        return host + counts.host_compressed * self.compressed_transfer_s_per_expert

    def layer_routed_s(self, counts: TierCounts, step: StepShape, position: int = 0,
                       host_ids: list[int] | None = None) -> float:
        """Routed-only fetch: link time of the layer's routed host experts, after its router.
        position: the layer among MoE layers (for its popularity); host_ids: default the coldest."""
        if self.popularity is None:
            return counts.host * self.routed_share(step.tokens) * self.routed_s_per_expert
        ids = self.popularity.coldest(position, counts.host) if host_ids is None else host_ids
        return self.popularity.expected_routed(position, ids, step.tokens) * self.routed_s_per_expert

    @staticmethod
    def window_layers(num_layers: int, layer: int, prefetch_depth: int) -> list[int]:
        """The layers whose compute hides layer `layer`'s transfer (cyclic: the previous step's tail).
        The layer's own decodes hide it too: they start when its staging buffer is free, as the
        transfer does, on the decode streams (measured on the H200 at depth 0: a layer took
        max(link, decodes) + compute, bench/results/e2e_qwen3_next_standin_spread_*)."""
        return [(layer - j) % num_layers for j in range(1, min(prefetch_depth, num_layers) + 1)]

    def resident_step_time(self, step: StepShape) -> StepTime:
        """Every expert resident: the fastest a step can be (and plain vLLM's step)."""
        tiers = [TierCounts(self.model.num_experts, 0, 0)] * self.model.num_moe_layers
        return self.step_time(tiers, step, prefetch_depth=1)

    def offload_rereads(self, step: StepShape) -> float:
        """How often, on average, vLLM's UVA offload reads each routed offloaded weight per step.

        vLLM 0.26's `cpu_offload_gb` leaves weights in pinned host memory and lets the GEMM
        kernels read them over PCIe; a kernel reads its weight tile once per block of
        `offload_tile_tokens` token rows, so each expert's weights cross the link once per
        such block of the tokens routed to it (what made prefill so slow on the H200). The
        tokens an expert gets vary from expert to expert (Poisson about their mean), and each
        expert's blocks are rounded up on their own: the mean of the ceilings, not the ceiling
        of the mean (Mixtral's shapes on the H200 at 512, 1,024 and 2,048 tokens: 1.45, 2.48 and
        4.38 reads measured, 1.5, 2.5 and 4.5 so modelled, 1, 2 and 4 by the ceiling of the mean;
        bench/results/uva_reads_2026-11-25.json).
        """
        per_expert = self.routed_pairs(step.tokens) / self.active_experts(step.tokens)
        return expected_blocks(per_expert, self.hw.offload_tile_tokens)

    def offload_step_time(self, step: StepShape, offload_bytes: float) -> StepTime:
        """vLLM with CPU weight offload: offloaded weights cross PCIe every step, unhidden. They
        are expert weights, read in place by the kernels: only the experts a step routes to cross
        (measured on the H200: 8 sequences on Qwen3-Next's shapes ran 5x what all bytes would,
        bench/results/e2e_qwen3_next_small_batch_standin_spread_*.json)."""
        base = self.resident_step_time(step)
        read = offload_bytes * self.routed_share(step.tokens)
        link = self.hw.h2d_seconds(read) * self.offload_rereads(step) / UVA_READ_SHARE
        return StepTime(base.total_s + link, base.gpu_s, link, link, base.fixed_s)

    def paging_lower_bound_s(self, step: StepShape, bytes_to_free: float, host_bytes: float,
                             slot_share: float = 0.0, host_compressed: bool = False) -> float:
        """No placement that frees `bytes_to_free` of expert memory has a shorter step than this.

        Relaxes integrality, staging memory and per-layer stalls: free C compressed experts
        (each saves eb(1 - ratio), costs decode time on the GPU) and H host experts (each saves
        eb, costs link time); the best split balances GPU and link time. With the
        host-compressed tier allowed, host experts split between the two host tiers as well
        (encoded: less link time, but a decode on the GPU): the LP's vertices, `_split_bound_s`.
        """
        base = self.resident_step_time(step)
        if bytes_to_free <= 0:
            return base.total_s
        # A paged expert needs a staging slot in each of depth+1 buffers; spread evenly over the
        # layers that is at least `slot_share` of an expert's bytes (the max is >= the mean).
        eb = self.expert_bytes * (1 - slot_share)
        saved_c = max(self.expert_bytes - self.compressed_expert_bytes - self.expert_bytes * slot_share, 1e-9)
        if eb <= 0:
            return math.inf
        if host_compressed:
            return self._split_bound_s(base.gpu_s, bytes_to_free, host_bytes, eb, saved_c) + base.fixed_s
        td, tx, total = self.decode_s_per_expert, self.stack_transfer_s_per_expert, self.model.total_experts
        h_max = min(total, host_bytes / self.expert_bytes)
        if h_max * eb + (total - h_max) * saved_c < bytes_to_free:
            return math.inf

        def time_at(c: float) -> float:
            h = max(0.0, (bytes_to_free - saved_c * c) / eb)
            return max(base.gpu_s + td * c, tx * h) if h <= h_max + 1e-9 else math.inf

        c_balance = (tx * bytes_to_free / eb - base.gpu_s) / (td + tx * saved_c / eb)
        c_min = max(0.0, (bytes_to_free - h_max * eb) / saved_c)
        c_max = min(total, bytes_to_free / saved_c)
        candidates = [c_min, c_max, min(max(c_balance, c_min), c_max)]
        return min(time_at(c) for c in candidates) + base.fixed_s

    def _split_bound_s(self, gpu_s: float, bytes_to_free: float, host_bytes: float, eb: float,
                       saved_c: float) -> float:
        """min T over (c, hb, hc) >= 0, the compressed, bf16 host and host-compressed experts:
        GPU gpu_s + td (c + hc) <= T, link tb hb + tc hc <= T, freed saved_c c + eb (hb + hc) >=
        bytes_to_free, host bytes within host_bytes, c + hb + hc <= experts. Four unknowns: the
        optimum is a vertex where four of the eight constraints hold with equality."""
        td, tb, tc = self.decode_s_per_expert, self.stack_transfer_s_per_expert, self.compressed_transfer_s_per_expert
        a = np.array([[td, 0, td, -1], [0, tb, tc, -1], [-saved_c, -eb, -eb, 0],
                      [0, self.expert_bytes, self.compressed_expert_bytes, 0], [1, 1, 1, 0],
                      [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 0]], dtype=float)
        b = np.array([-gpu_s, 0, -bytes_to_free, host_bytes, self.model.total_experts, 0, 0, 0], dtype=float)
        scale = np.abs(a).max(axis=1)  # rows in seconds, bytes and counts: compare each at its own scale
        a, b = a / scale[:, None], b / scale
        systems, rhs = a[_VERTEX_ROWS], b[_VERTEX_ROWS]
        ok = np.abs(np.linalg.det(systems)) > 1e-12
        if not ok.any():
            return math.inf
        x = np.linalg.solve(systems[ok], rhs[ok][..., None])[..., 0]
        feasible = (x @ a.T <= b + 1e-9 * (1 + np.abs(b))).all(axis=1)
        return float(x[feasible, 3].min()) if feasible.any() else math.inf
