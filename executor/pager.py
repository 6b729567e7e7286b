"""The expert pager: brings each MoE layer's non-resident experts into the staging pool just
before the layer runs, driven per layer by whoever owns the layer loop (vLLM or a harness).

Per step and layer l, the owner of the loop calls
    weights = pager.before_layer(l)   # issue layers l..l+depth, compute waits for layer l
    ... run the layer's experts from `weights` ...
    pager.after_layer(l)              # layer l's buffer is free once this point has run
and `pager.end_step()` after the last layer. Work goes to side streams and is ordered by
events only, so a step is CUDA-graph capturable. `LayerWeights` gives the layer's experts as
stacked groups in vLLM's layout (the resident stack, and the staged slots) with the global
expert id of each row, so a fused-MoE kernel can run on each group with an expert map; built
over an `ExpertArena`, each paged layer also comes as one span of rows with expert id -> row
(`LayerWeights.fused`), so it runs as one kernel call, bit-exact with plain vLLM.

Inside vLLM, piecewise CUDA graphs end a capture at every attention layer: `join()` makes the
compute stream wait for all side work in flight, so no capture ends with an unjoined stream.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from executor.arena import ExpertArena, FusedWeights
from executor.landing import LandingRing
from executor.route_counts import RouteCounter
from executor.routed_fetch import RoutedFetch, routed_experts, total_counters
from executor.staging import StagingPool
from executor.streams import CpuOrder, Streams
from executor.tiers import ExpertLayout, LayerTiers
from fluxmoe.errors import ConfigError
from fluxmoe.names import Tier


class RebuildError(RuntimeError):
    """A rebuild whose new tiers did not fit: `pager` runs the old tiers, built again."""

    def __init__(self, message: str, pager: "ExpertPager"):
        super().__init__(message)
        self.pager = pager


@dataclass(frozen=True)
class ExpertGroup:
    """Experts stacked as vLLM stacks them, and the global expert id of each row."""

    w13: torch.Tensor  # [n, 2I/tp, H]
    w2: torch.Tensor  # [n, H, I/tp]
    expert_ids: tuple[int, ...]


@dataclass(frozen=True)
class LayerWeights:
    """Where one layer's experts are while it runs: resident group, then staged group."""

    groups: tuple[ExpertGroup, ...]
    experts: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (w13, w2) per global expert id
    fused: FusedWeights | None = None  # paged layers built over an arena: one kernel call

    @classmethod
    def of(cls, groups: list[ExpertGroup], num_experts: int, fused: FusedWeights | None = None) -> "LayerWeights":
        views: list = [None] * num_experts
        for g in groups:
            for row, e in enumerate(g.expert_ids):
                views[e] = (g.w13[row], g.w2[row])
        return cls(tuple(g for g in groups if g.expert_ids), tuple(views), fused)


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6 if ms else 0.0


@dataclass
class LayerStats:
    """What one layer measured in the last step with stats on."""

    wait_ms: float = 0.0  # compute waited for weights
    h2d_bytes: int = 0
    h2d_ms: float = 0.0
    decode_bytes: int = 0  # bf16 output bytes of the compressed tier (host-compressed decodes: their own stream)
    decode_ms: float = 0.0

    @property
    def h2d_gbps(self) -> float:
        return _gbps(self.h2d_bytes, self.h2d_ms)

    @property
    def decode_gbps(self) -> float:
        return _gbps(self.decode_bytes, self.decode_ms)


@dataclass
class RuntimeStats:
    """Runtime feedback the planner can read: per layer, waits and achieved bandwidths."""

    layers: list[LayerStats] = field(default_factory=list)
    samples: int = 0  # steps whose timings were read into `layers` (the latest one is kept)

    @property
    def total_wait_ms(self) -> float:
        return sum(s.wait_ms for s in self.layers)

    @property
    def h2d_gbps(self) -> float:
        return _gbps(sum(s.h2d_bytes for s in self.layers), sum(s.h2d_ms for s in self.layers))

    @property
    def decode_gbps(self) -> float:
        return _gbps(sum(s.decode_bytes for s in self.layers), sum(s.decode_ms for s in self.layers))


class _LayerMarks:
    """Timing events of one paged layer, made once and recorded every step. `external=True`
    makes a record inside a CUDA-graph capture a node of the graph, so replays time too."""

    NAMES = ("h2d", "h2d_end", "decode", "decode_end", "wait", "wait_end")

    def __init__(self):
        for name in self.NAMES:
            setattr(self, name, torch.cuda.Event(enable_timing=True, external=True))

    def complete(self) -> bool:
        return all(getattr(self, name).query() for name in self.NAMES)

    def read_into(self, stats: LayerStats, h2d_bytes: int, decode_bytes: int) -> None:
        stats.wait_ms = self.wait.elapsed_time(self.wait_end)
        stats.h2d_bytes, stats.decode_bytes = h2d_bytes, decode_bytes
        stats.h2d_ms = self.h2d.elapsed_time(self.h2d_end)
        stats.decode_ms = self.decode.elapsed_time(self.decode_end)


class ExpertPager:
    """Pages the experts of a stack of MoE layers (indexed 0..L-1 in execution order)."""

    def __init__(self, layers: list[LayerTiers], prefetch_depth: int, device: torch.device | str,
                 slots: int | None = None, cpu_order: CpuOrder = "lazy", arena: ExpertArena | None = None,
                 telemetry: bool = False, routed_fetch: bool = False, count_routes: bool = False):
        """slots: staging slots per buffer (a plan's staging_slots / (depth + 1)); None sizes
        the pool to the most paged layer. arena: where the staging buffers and the paged layers'
        resident stacks were carved (see `ExpertPager.build`). telemetry: time every step (also
        inside CUDA graphs) and count steps on the device, for `harvest()` to read without a sync.
        routed_fetch: host experts are not copied ahead; the owner of the loop calls
        `fetch_routed(layer, topk_ids)` after the router, which moves only the routed ones
        (executor/routed_fetch.py). count_routes: `count_routes(layer, topk_ids)` counts each
        expert's picks on the device (executor/route_counts.py), for the closed loop."""
        if prefetch_depth < 0:
            raise ConfigError(f"prefetch_depth: must be >= 0, got {prefetch_depth!r}")
        self.device = torch.device(device)
        self.layers, self.depth = layers, prefetch_depth
        layout = layers[0].layout if layers else ExpertLayout(1, 1)
        most = max((len(t.staged_ids) for t in layers), default=0)
        slots = most if slots is None else slots
        if slots < most:
            raise ConfigError(f"staging slots: {slots} per buffer cannot hold the {most} paged experts of the "
                              f"most paged layer")
        self.paged = [bool(t.staged_ids) for t in layers]
        buffers, slots = (prefetch_depth + 1, slots) if any(self.paged) else (1, 0)
        if arena is not None and (arena.slots != slots or len(arena.plan.buffer_start) != buffers
                                  or [arena.is_paged(i) for i in range(len(layers))] != self.paged):
            raise ConfigError("arena: laid out for other tiers, slots or depth than these layers")
        self.arena = arena
        storage = [arena.buffer(b) for b in range(buffers)] if arena is not None and any(self.paged) else None
        self.pool = StagingPool(buffers, slots, layout, self.device, storage=storage)
        self.landing = self._landing_ring(layers)
        self.streams = Streams(self.device, cpu_order)
        # Every layer's weights sit in the same places every step: views made once, here.
        self.weights = [self._layer_weights(i, t) for i, t in enumerate(layers)]
        self.routed_fetch = routed_fetch
        self.fetchers = [self._fetcher(i, t) if routed_fetch and t.host_ids else None for i, t in enumerate(layers)]
        if any(self.fetchers):
            # Slots of unrouted host experts keep whatever was there: finite weights, which a
            # dense path multiplies by a zero gate (uninitialized bytes could be NaN).
            self.pool.zero_()
        self.stats = RuntimeStats([LayerStats() for _ in layers])
        experts = layers[0].num_experts if layers else 0
        self.route_counter = RouteCounter(len(layers), experts, self.device) if count_routes else None
        self._pending: dict[int, list] = {}
        self._marks: list[_LayerMarks | None] = [None] * len(layers)
        self._timed = False  # this step records timing events
        self._read_at_end = False  # end_step syncs and reads them (a harness asked for stats)
        self._forked = False
        self.telemetry = telemetry
        with torch.inference_mode(False):  # vLLM builds the pager in inference mode, and steps outside it
            self.steps = torch.zeros((), dtype=torch.int64, device=self.device)  # counted on the device
        # Issue layer l + depth + 1 as soon as layer l releases its buffer. Off inside piecewise
        # CUDA-graph captures, where that copy could only overlap the end of the capture.
        self.prefetch_on_release = True
        self.rebuild_seconds: dict[str, float | bool] = {}  # from a rebuild: its read and build, read on the GPU

    @classmethod
    def build(cls, stacks: list[tuple[torch.Tensor, torch.Tensor]], tiers: list[list[Tier]], layout: ExpertLayout,
              prefetch_depth: int, device: torch.device | str, slots: int | None = None, fused: bool = True,
              cpu_order: CpuOrder = "lazy", routed_fetch: bool = False, count_routes: bool = False,
              telemetry: bool = False) -> "ExpertPager":
        """A pager over full per-layer stacks; fused=True carves an arena for one-call layers."""
        device = torch.device(device)
        staged = max((sum(t is not Tier.RESIDENT for t in layer) for layer in tiers), default=0)
        slots = staged if slots is None else slots
        arena = ExpertArena(tiers, prefetch_depth + 1, slots, layout, device) if fused and staged else None
        layers = [LayerTiers(w13, w2, t, layout, device, what=f"layer {i}",
                             resident_into=arena.resident(i) if arena is not None and arena.is_paged(i) else None)
                  for i, ((w13, w2), t) in enumerate(zip(stacks, tiers))]
        return cls(layers, prefetch_depth, device, slots=slots, cpu_order=cpu_order, arena=arena,
                   routed_fetch=routed_fetch, count_routes=count_routes, telemetry=telemetry)

    def _landing_ring(self, layers: list[LayerTiers]) -> LandingRing | None:
        """Landing slots for the largest host-compressed chunk, and every chunk's view of each slot
        and its GPU decoder there, made here so that nothing is allocated on the hot path or inside a capture."""
        chunks = [c for t in layers for stack in t.host_compressed or () for c in stack]
        if not chunks:
            return None
        with torch.inference_mode(False):  # written every step, also outside vLLM's inference mode
            ring = LandingRing(max(c.nbytes for c in chunks), self.device)
        for chunk in chunks:
            chunk.landed = {s: ring.view(s, chunk.encoded) for s in range(ring.slots)}
            if self.device.type == "cuda":
                from executor.codec.triton_decode import DeviceDecoder

                chunk.decoders = {s: DeviceDecoder(view) for s, view in chunk.landed.items()}
        return ring

    def _fetcher(self, index: int, tiers: LayerTiers) -> RoutedFetch:
        """Layer `index`'s host experts and the first slots of its buffer, where they land."""
        slots = self.pool.buffer(self.pool.buffer_of(index), len(tiers.host_ids))
        return RoutedFetch(tiers.host, tiers.host_ids, slots, tiers.num_experts)

    def fetch_routed(self, layer: int, topk_ids: torch.Tensor) -> None:
        """After layer `layer`'s router, on the compute stream: its routed host experts into their
        slots (after `before_layer`, which waited for the buffer). A no-op without routed fetch."""
        fetcher = self.fetchers[layer]  # None without routed fetch, or without host experts
        if fetcher is not None:
            fetcher.begin_step()
            fetcher.fetch_routed(routed_experts(topk_ids, fetcher.num_experts))

    def count_routes(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count layer `layer`'s picks on the device (a no-op unless built with count_routes)."""
        if self.route_counter is not None:
            self.route_counter.add(layer, topk_ids)

    def swap(self, layer: int, into_gpu: int, out_of_gpu: int) -> None:
        """Between steps: host expert `into_gpu` takes resident expert `out_of_gpu`'s row, and
        that expert takes its host row. Same rows, same tensors, and the id maps (expert -> arena
        row, host row -> expert) updated in place on the device, so CUDA graphs captured before
        stay valid where they read a layer through `FusedWeights.row_of` (as the vLLM plugin
        does; `FusedWeights.experts()` resolves rows on the host, for eager harnesses).
        On the caller's stream, which the next step follows; a staging slot is the scratch row."""
        with torch.inference_mode():  # vLLM made these tensors in inference mode; its worker calls come outside it
            self._swap(layer, into_gpu, out_of_gpu)

    def _swap(self, layer: int, into_gpu: int, out_of_gpu: int) -> None:
        tiers = self.layers[layer]
        if into_gpu not in tiers.host_ids or out_of_gpu not in tiers.resident_ids:
            raise ConfigError(f"swap in layer {layer}: expert {into_gpu} must be on the host and {out_of_gpu} "
                              f"resident (host: {tiers.host_ids}, resident: {tiers.resident_ids})")
        r, j = tiers.resident_ids.index(out_of_gpu), tiers.host_ids.index(into_gpu)
        scratch = self.pool.buffer(self.pool.buffer_of(layer), 1)
        for resident, host, tmp in zip(tiers.resident, tiers.host, scratch):
            tmp[0].copy_(resident[r])
            resident[r].copy_(host[j], non_blocking=True)
            host[j].copy_(tmp[0], non_blocking=True)
        tiers.resident_ids[r], tiers.host_ids[j] = into_gpu, out_of_gpu
        fetcher = self.fetchers[layer]
        if fetcher is not None:
            fetcher.ids[j] = out_of_gpu
        old = self.weights[layer]
        fused = old.fused
        if fused is not None:
            rows = list(fused.rows_host)
            rows[into_gpu], rows[out_of_gpu] = rows[out_of_gpu], rows[into_gpu]
            fused.row_of[into_gpu], fused.row_of[out_of_gpu] = rows[into_gpu], rows[out_of_gpu]
            fused = replace(fused, rows_host=tuple(rows))
            self.arena.tiers[layer][into_gpu], self.arena.tiers[layer][out_of_gpu] = Tier.RESIDENT, Tier.HOST
        # Only the two experts' views change: no per-expert work (512 experts would cost ms a swap).
        views = list(old.experts)
        views[into_gpu], views[out_of_gpu] = views[out_of_gpu], views[into_gpu]
        resident, staged = old.groups[0], old.groups[-1]
        groups = (ExpertGroup(resident.w13, resident.w2, tuple(tiers.resident_ids)),
                  ExpertGroup(staged.w13, staged.w2, tuple(tiers.staged_ids)))
        self.weights[layer] = LayerWeights(groups, tuple(views), fused)

    def rebuild(self, tiers: list[list[Tier]], prefetch_depth: int | None = None,
                slots: int | None = None, fused: bool | None = None) -> "ExpertPager":
        """A pager over the same experts in other tiers (a new budget), made between steps: every
        expert is read back in full (on the GPU where it has room for a second copy: copies and
        decodes at HBM speed; else to the host), this pager's GPU memory is freed (and torch's
        cache emptied, so the free memory the driver reports follows), then the new one is built
        (from host copies if the GPU copies leave it no room). Pick counts carry over. This pager
        is unusable afterwards. Inside vLLM only with enforce_eager: CUDA graphs hold the old
        arena's addresses, and vLLM keeps its KV size. fused: carve an arena for one-call layers
        (default: as this pager). Where the new tiers cannot be built at all, the old ones are
        built again and `RebuildError` carries that pager: nothing is lost."""
        started, device, layout = time.perf_counter(), self.device, self.layout
        need = sum(t.num_experts for t in self.layers) * 2 * (math.prod(layout.w13_shape) + math.prod(layout.w2_shape))
        on_gpu = device.type == "cuda" and torch.cuda.mem_get_info(device)[0] > 1.2 * need
        stacks = [t.full_stacks(device if on_gpu else "cpu") for t in self.layers]
        read_s = time.perf_counter() - started
        counter = self.route_counter
        common = dict(cpu_order=self.streams.cpu_order, routed_fetch=self.routed_fetch,
                      count_routes=counter is not None, telemetry=self.telemetry)
        wanted = (tiers, self.depth if prefetch_depth is None else prefetch_depth, slots,
                  self.arena is not None if fused is None else fused)
        before = ([[t.tier_of(e) for e in range(t.num_experts)] for t in self.layers], self.depth,
                  self.pool.slots if any(self.paged) else None, self.arena is not None)
        self.layers, self.weights, self.fetchers, self.arena, self.pool, self.landing = [], [], [], None, None, None
        self._marks, self.route_counter = [], None

        def give_back() -> None:  # freed blocks from torch's cache to the driver
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()

        def build(tiers, depth, slots, fused) -> "ExpertPager":
            built = time.perf_counter()
            give_back()
            pager = ExpertPager.build(stacks, tiers, layout, depth, device, slots=slots, fused=fused, **common)
            if counter is not None:
                pager.route_counter.carry_over(counter)
            stacks.clear()  # the read-back copies and the encoder's temporaries go back to the driver too
            give_back()
            pager.rebuild_seconds = {"read": round(read_s, 3), "build": round(time.perf_counter() - built, 3),
                                     "read_on_gpu": on_gpu}
            return pager

        try:
            return build(*wanted)
        except torch.OutOfMemoryError as e:
            error = e
        if on_gpu:  # the copies read back on the GPU took the room: through the host instead
            stacks[:] = [tuple(x.cpu() for x in pair) for pair in stacks]
            on_gpu = False
            try:
                return build(*wanted)
            except torch.OutOfMemoryError as e:
                error = e
        raise RebuildError(f"the new tiers do not fit on the GPU ({error}); the old ones were built again",
                           build(*before)) from error

    def placement(self) -> list[dict[Tier, list[int]]]:
        """Each layer's expert ids per tier, as the pager holds them now."""
        return [{Tier.RESIDENT: list(t.resident_ids), Tier.COMPRESSED: list(t.compressed_ids),
                 Tier.HOST: list(t.host_ids), Tier.HOST_COMPRESSED: list(t.host_compressed_ids)} for t in self.layers]

    def routed_counters(self) -> dict[str, int]:
        """Host experts moved and routed over all steps, summed over layers (a host sync; the
        pager does not guess, so there are no hits to count)."""
        counts = total_counters(self.fetchers)
        return {"moved": counts["moved"], "routed": counts["routed"]}

    def _layer_weights(self, index: int, tiers: LayerTiers) -> LayerWeights:
        groups = [ExpertGroup(*tiers.resident, tuple(tiers.resident_ids))]
        fused = None
        if tiers.staged_ids:
            w13, w2 = self.pool.buffer(self.pool.buffer_of(index), len(tiers.staged_ids))
            groups.append(ExpertGroup(w13, w2, tuple(tiers.staged_ids)))
            if self.arena is not None:
                fused = self.arena.fused(index, tiers.staged_ids)
        return LayerWeights.of(groups, tiers.num_experts, fused)

    # ------------------------------------------------------------------ per layer
    def begin_step(self, stats: bool = False) -> None:
        """Fork the side streams from the compute stream; this also orders slot reuse across steps.
        stats=True: this step is timed and `end_step` reads the timings (a host sync)."""
        self._read_at_end = stats and self.streams.cuda
        self._timed = self.streams.cuda and (stats or self.telemetry)
        self._pending, self._forked = {}, False
        if self.telemetry:
            self.steps.add_(1)
        if not any(self.paged):
            return
        self.pool.released = [None] * self.pool.buffers
        self.pool.holder = [None] * self.pool.buffers
        if self.landing is not None:
            self.landing.reset()
        self._fork()

    def _fork(self) -> None:
        """Side streams start after everything issued on the compute stream so far."""
        s = self.streams
        s.follow_caller()
        start = s.record(s.compute)
        for side in s.sides:
            s.wait(side, start)
        self._forked = True

    def join(self) -> None:
        """The compute stream waits for all paging work in flight; later waits on it are no-ops,
        and the next paging work forks anew. Called where a CUDA-graph capture ends."""
        if not any(self.paged):
            return
        s = self.streams
        s.follow_caller()
        for layer, events in self._pending.items():
            for event in events:
                s.wait(s.compute, event)
            self._pending[layer] = []
        self.pool.released = [None] * self.pool.buffers  # compute is past every release now
        if self.landing is not None:
            self.landing.reset()
        self._forked = False

    def prefetch(self, layer: int) -> None:
        """Start bringing layer `layer`'s paged experts into its buffer (once per step)."""
        if not self.paged[layer] or layer in self._pending:
            return
        s, pool, tiers = self.streams, self.pool, self.layers[layer]
        b = pool.buffer_of(layer)
        if pool.holder[b] is not None:
            raise RuntimeError(f"layer {layer} needs staging buffer {b}, still held by layer {pool.holder[b]}: "
                               f"release it first")
        pool.holder[b] = layer
        if not self._forked:
            self._fork()
        for side in s.sides:
            s.wait(side, pool.released[b])
        marks = self._layer_marks(layer) if self._timed else None
        if marks is not None:
            marks.h2d.record(s.copy)
            marks.decode.record(s.decode)
        w13, w2 = pool.buffer(b)
        events = []
        if tiers.host_ids and not self.routed_fetch:
            events.append(s.launch(s.copy, lambda: tiers.copy_host_into(w13, w2)))
        if tiers.compressed_ids:
            events.append(s.launch(s.decode, lambda: tiers.decode_compressed_into(w13, w2, s.decode)))
        if tiers.host_compressed_ids:
            events.append(self._land_and_decode(tiers, w13, w2))
        if marks is not None:
            marks.h2d_end.record(s.copy)
            marks.decode_end.record(s.decode)
            # Compute must join past the marks too, or a CUDA-graph capture ends with unjoined work.
            events = [s.record(side) for side in s.sides]
        self._pending[layer] = events

    def _land_and_decode(self, tiers: LayerTiers, w13: torch.Tensor, w2: torch.Tensor):
        """Each host-compressed chunk: copy its bytes into a landing slot once the slot's last
        decode is done, then decode them into the chunk's staging slots. The event after the last."""
        s, ring = self.streams, self.landing
        done = None
        for chunk, out in tiers.host_compressed_chunks(w13, w2):
            slot = ring.take()
            s.wait(s.copy, ring.free[slot])
            landed = s.launch(s.copy, lambda c=chunk, sl=slot:
                              c.landed[sl].payload.copy_(c.encoded.payload, non_blocking=True))
            s.wait(s.landed_decode, landed)
            done = s.launch(s.landed_decode, lambda c=chunk, o=out, sl=slot: self._decode_chunk(c, o, sl))
            ring.free[slot] = done
        return done

    def _decode_chunk(self, chunk, out: torch.Tensor, slot: int) -> None:
        if chunk.decoders:
            chunk.decoders[slot].decode_into(out, self.streams.landed_decode)
        else:  # CPU: the reference decoder
            from executor.codec import decode

            out.copy_(decode(chunk.landed[slot]))

    def _layer_marks(self, layer: int) -> _LayerMarks:
        if self._marks[layer] is None:
            self._marks[layer] = _LayerMarks()
        return self._marks[layer]

    def wait(self, layer: int) -> LayerWeights:
        """The compute stream waits (on the device) until layer `layer`'s experts are in place."""
        if self.paged[layer]:
            if layer not in self._pending:
                raise RuntimeError(f"layer {layer} was never prefetched this step")
            s = self.streams
            marks = self._marks[layer] if self._timed else None
            if marks is not None:
                marks.wait.record(s.compute)
            for event in self._pending[layer]:
                s.wait(s.compute, event)
            if marks is not None:
                marks.wait_end.record(s.compute)
        return self.weights[layer]

    def release(self, layer: int) -> None:
        """Layer `layer` has been issued on the compute stream: its buffer may be reused after it."""
        if not self.paged[layer]:
            return
        b = self.pool.buffer_of(layer)
        if self.pool.holder[b] != layer:
            raise RuntimeError(f"layer {layer} releases staging buffer {b}, which it does not hold")
        self.pool.released[b] = self.streams.record(self.streams.compute)
        self.pool.holder[b] = None
        self._pending.pop(layer, None)

    def before_layer(self, layer: int, stats: bool = False) -> LayerWeights:
        """Issue layers `layer`..`layer + depth` where their buffers are free, then wait for `layer`."""
        if layer == 0:
            self.begin_step(stats)
        self.streams.follow_caller()
        for ahead in range(layer, min(layer + self.depth + 1, len(self.layers))):
            if self.paged[ahead] and ahead not in self._pending and self.pool.holder[self.pool.buffer_of(ahead)] is None:
                self.prefetch(ahead)
        return self.wait(layer)

    def after_layer(self, layer: int) -> None:
        self.release(layer)
        if self.prefetch_on_release and layer + self.depth + 1 < len(self.layers):
            self.prefetch(layer + self.depth + 1)

    def end_step(self) -> None:
        """After the last layer: read stats if this step was asked for them (syncs), drop CPU leftovers."""
        self.streams.drop_pending()
        if self._read_at_end:
            torch.cuda.synchronize(self.device)  # stats are read after the step, off the hot path
            self._read_marks()

    def harvest(self) -> bool:
        """Read the timings of the latest step whose events have all completed, without a sync
        (False, stats unchanged, if a step is still in flight or nothing was timed). Call it
        between steps: a step's events are recorded together, so complete ones are one step's."""
        marked = [m for m in self._marks if m is not None]
        if not marked or not all(m.complete() for m in marked):
            return False
        self._read_marks()
        return True

    def _read_marks(self) -> None:
        e = self.layout.expert_numel * 2
        for layer_stats, marks, tiers in zip(self.stats.layers, self._marks, self.layers):
            if marks is None:  # nothing paged in this layer
                layer_stats.wait_ms = layer_stats.h2d_ms = layer_stats.decode_ms = 0.0
                layer_stats.h2d_bytes = layer_stats.decode_bytes = 0
            else:
                host = 0 if self.routed_fetch else len(tiers.host_ids) * e  # routed: on the compute stream
                marks.read_into(layer_stats, host + tiers.host_compressed_bytes, len(tiers.compressed_ids) * e)
        self.stats.samples += 1

    # ------------------------------------------------------------------ accounting
    @property
    def layout(self) -> ExpertLayout:
        return self.pool.layout

    @property
    def gpu_bytes(self) -> dict[str, int]:
        """GPU memory by use: resident and compressed experts, staging pool."""
        out = {Tier.RESIDENT.value: 0, Tier.COMPRESSED.value: 0, "staging": self.pool.nbytes,
               "landing": self.landing.nbytes if self.landing is not None else 0}
        for tiers in self.layers:
            for tier, n in tiers.gpu_bytes.items():
                out[tier.value] += n
        return out

    @property
    def host_bytes(self) -> int:
        return sum(t.host_bytes for t in self.layers)
