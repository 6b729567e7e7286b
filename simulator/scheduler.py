"""A vLLM-style scheduler: continuous batching, chunked prefill, paged KV, recompute preemption.

Each step it first keeps running sequences going (decodes, then unfinished prefill chunks),
preempting the most recently admitted sequence when the KV cache cannot hold the next block;
then admits waiting requests first-come first-served while `max_num_seqs`, the step's token
budget (`max_num_batched_tokens`) and free KV allow. KV is counted in whole blocks of
`block_tokens` per sequence through the model's own accounting (full-attention KV grows with
context, sliding windows cap, linear-attention layers hold a fixed state per sequence).
A preempted sequence drops its KV and later recomputes its prompt and the tokens it had
generated, as vLLM's recompute preemption does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from profiles.model_spec import ModelSpec
from simulator.workload import Request


@dataclass(eq=False)
class Sequence:
    """A request being served: how much of its context the KV cache holds and what it produced."""

    request: Request
    computed: int = 0  # context tokens whose KV is in the cache
    generated: int = 0  # output tokens produced so far
    kv_bytes: int = 0  # cache bytes allocated to it
    first_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0

    @property
    def pending(self) -> int:
        """Tokens to feed before the next output token: the prompt at first, 1 when decoding, and
        prompt plus everything generated after a preemption (recompute)."""
        return self.request.prompt_tokens + self.generated - self.computed

    @property
    def in_prefill(self) -> bool:
        return self.pending > 1

    @property
    def done(self) -> bool:
        return self.generated >= self.request.output_tokens


@dataclass
class ScheduledStep:
    """One step's work: tokens per sequence (decodes get 1, prefills a chunk)."""

    work: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.work)

    @property
    def empty(self) -> bool:
        return not self.work


def vllm_batched_tokens(gpu_memory_bytes: int, offline: bool, gpu_name: str = "") -> int:
    """vLLM 0.26's default max_num_batched_tokens (engine/arg_utils.py): 16,384 for its offline
    `LLM` class and 8,192 for its server on GPUs of >= 70 GiB other than the A100; 8,192 and
    2,048 below that. Measured on the H200: offline prefill chunks of 16,384 tokens
    (bench/results/step_times_2026-11-25.json)."""
    big = gpu_memory_bytes >= 70 * 2**30 and "a100" not in gpu_name.lower()
    return (16384 if offline else 8192) if big else (8192 if offline else 2048)


class VLLMScheduler:
    """Continuous batching over a KV pool of `kv_cache_bytes`."""

    def __init__(self, model: ModelSpec, kv_cache_bytes: int, max_num_seqs: int,
                 max_num_batched_tokens: int = 8192, block_tokens: int | None = None):
        self.model, self.capacity = model, kv_cache_bytes
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.block_tokens = block_tokens or model.kv_block_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.used = 0
        self.preemptions = 0
        self.preemption_log: list[tuple[int, int]] = []  # (free KV bytes, bytes needed) at each preemption

    def kv_bytes(self, context_tokens: int) -> int:
        return self.model.kv_bytes_per_sequence(context_tokens, self.block_tokens) if context_tokens else 0

    def add(self, request: Request) -> None:
        self.waiting.append(Sequence(request))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Allocate KV for `tokens` more context tokens of `seq`; False if the pool is too full."""
        need = self.kv_bytes(seq.computed + tokens) - seq.kv_bytes
        if self.used + need > self.capacity:
            return False
        self.used += need
        seq.kv_bytes += need
        return True

    def _release(self, seq: Sequence) -> None:
        self.used -= seq.kv_bytes
        seq.kv_bytes = 0

    def _preempt(self, seq: Sequence, step: ScheduledStep, need: int) -> None:
        self.preemption_log.append((self.capacity - self.used, need))
        self.running.remove(seq)
        self._release(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        step.preempted.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.max_tokens
        # 1. Running sequences, oldest first; the newest is preempted when KV runs out.
        preempted: set[int] = set()
        for seq in list(self.running):  # kept in admission order
            if id(seq) in preempted or budget <= 0:
                continue
            tokens = min(budget, seq.pending)
            while not self._grow(seq, tokens):
                victim = self.running[-1]  # the newest admitted
                self._preempt(victim, step, self.kv_bytes(seq.computed + tokens) - seq.kv_bytes)
                preempted.add(id(victim))
                if victim is seq:
                    break
            else:
                step.work.append((seq, tokens))
                budget -= tokens
        # 2. Admit waiting requests, first come first served, while everything allows.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not step.preempted:
            seq = self.waiting[0]
            tokens = min(budget, seq.pending)
            if not self._grow(seq, tokens):
                break
            self.waiting.popleft()
            self.running.append(seq)  # running stays in admission order
            step.work.append((seq, tokens))
            budget -= tokens
        return step

    def complete(self, step: ScheduledStep, now: float) -> list[Sequence]:
        """Apply a finished step: advance contexts, emit tokens, free finished sequences."""
        finished = []
        for seq, tokens in step.work:
            seq.computed += tokens
            if seq.pending > 0:
                continue  # a chunk of a longer prefill: no token yet
            seq.generated += 1
            if seq.first_token_s is None:
                seq.first_token_s = now
            if seq.done:
                seq.finish_s = now
                self.running.remove(seq)
                self._release(seq)
                finished.append(seq)
        return finished
