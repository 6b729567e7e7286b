"""The scheduler's rules worked out by hand: vLLM preempts the newest sequence, the preempted
one recomputes its prompt and generated tokens, a step that preempted admits nobody, and
prefill is chunked under the token budget."""

from simulator.scheduler import VLLMScheduler
from simulator.workload import Request
from tests.conftest import tiny_model

MODEL = tiny_model(2, 4)  # 32 bytes of KV per token and layer: 64 per token, 1 KiB per 16-token block
BLOCK = 16 * 64


def _scheduler(blocks: int, max_tokens: int = 8192) -> VLLMScheduler:
    assert MODEL.kv_bytes_per_sequence(16) == BLOCK and MODEL.kv_bytes_per_sequence(17) == 2 * BLOCK
    return VLLMScheduler(MODEL, blocks * BLOCK, max_num_seqs=8, max_num_batched_tokens=max_tokens)


def test_the_newest_sequence_is_preempted_and_recomputes_prompt_plus_output():
    s = _scheduler(blocks=3)
    a, b, c = (Request(i, 0.0, 16, 20) for i in range(3))
    s.add(a)
    s.add(b)
    first = s.schedule()  # both prompts fit in one block each: 2 of 3 blocks
    assert [(seq.request.id, n) for seq, n in first.work] == [(0, 16), (1, 16)] and s.used == 2 * BLOCK
    s.complete(first, 1.0)  # each has produced its first token
    s.add(c)
    second = s.schedule()  # A's 17th token takes the third block; B's would need a fourth
    assert [seq.request.id for seq in second.preempted] == [1]  # the newest, not the oldest
    assert [(seq.request.id, n) for seq, n in second.work] == [(0, 1)]  # and nobody is admitted
    assert [seq.request.id for seq in s.waiting] == [1, 2]  # B goes back to the head of the queue
    assert s.used == 2 * BLOCK and s.preemptions == 1
    s.complete(second, 2.0)
    preempted = second.preempted[0]
    assert preempted.computed == 0 and preempted.generated == 1
    assert preempted.pending == 16 + 1  # recompute: prompt plus the token it had produced


def test_prefill_is_chunked_under_the_token_budget():
    s = _scheduler(blocks=64, max_tokens=40)
    s.add(Request(0, 0.0, 100, 4))
    s.add(Request(1, 0.0, 10, 4))
    chunks = []
    while True:
        step = s.schedule()
        chunks.append([(seq.request.id, n) for seq, n in step.work])
        s.complete(step, float(len(chunks)))
        if s.running and s.running[0].generated:
            break
    # 100 prompt tokens in chunks of 40, 40, 20; the second request waits for budget.
    assert chunks == [[(0, 40)], [(0, 40)], [(0, 20), (1, 10)]]


def test_with_three_running_the_newest_is_preempted_once_and_not_scheduled_again_that_step():
    """Three decoding sequences, one free block: A grows into it, B cannot, so C (the newest,
    not the next) is preempted, B takes C's block, and C, already preempted, is skipped."""
    s = _scheduler(blocks=4)
    a, b, c = (Request(i, 0.0, 16, 20) for i in range(3))
    for r in (a, b, c):
        s.add(r)
    s.complete(s.schedule(), 1.0)  # three prompts in three blocks, a first token each
    step = s.schedule()
    assert [seq.request.id for seq in step.preempted] == [2]
    assert [(seq.request.id, n) for seq, n in step.work] == [(0, 1), (1, 1)]
    assert s.preemption_log == [(0, BLOCK)]  # nothing free; B needed one more block
    assert [seq.preemptions for seq in s.running] == [0, 0] and step.preempted[0].preemptions == 1
    assert step.preempted[0].kv_bytes == 0 and step.preempted[0].computed == 0  # all of its KV given back
    assert s.used == 4 * BLOCK and [seq.request.id for seq in s.waiting] == [2]


def test_a_spent_token_budget_schedules_nobody_else_not_even_for_zero_tokens():
    s = _scheduler(blocks=64, max_tokens=3)
    for i in range(3):
        s.add(Request(i, 0.0, 1, 5))
    s.complete(s.schedule(), 1.0)  # three one-token prompts
    s.max_tokens = 2  # two tokens a step from now on: the third decoding sequence waits
    step = s.schedule()
    assert [(seq.request.id, n) for seq, n in step.work] == [(0, 1), (1, 1)]


def test_admission_takes_the_last_token_of_budget_and_stops_at_max_num_seqs():
    s = VLLMScheduler(MODEL, 64 * BLOCK, max_num_seqs=2, max_num_batched_tokens=9)
    for i, prompt in enumerate((8, 5, 5)):
        s.add(Request(i, 0.0, prompt, 4))
    step = s.schedule()
    assert [(seq.request.id, n) for seq, n in step.work] == [(0, 8), (1, 1)]  # B's prompt starts with 1 token
    assert [seq.request.id for seq in s.waiting] == [2]
    s = VLLMScheduler(MODEL, 64 * BLOCK, max_num_seqs=2, max_num_batched_tokens=20)
    for i, prompt in enumerate((8, 5, 5)):
        s.add(Request(i, 0.0, prompt, 4))
    step = s.schedule()  # budget is left, but two sequences run: C waits
    assert [(seq.request.id, n) for seq, n in step.work] == [(0, 8), (1, 5)] and len(s.waiting) == 1


def test_one_step_can_preempt_twice_and_counts_both():
    """Three one-block sequences fill three blocks; A's growth preempts C, then B cannot grow
    and, as the newest left, preempts itself."""
    s = _scheduler(blocks=3)
    for i in range(3):
        s.add(Request(i, 0.0, 16, 20))
    s.complete(s.schedule(), 1.0)
    step = s.schedule()
    assert [seq.request.id for seq in step.preempted] == [2, 1] and s.preemptions == 2
    assert [(seq.request.id, n) for seq, n in step.work] == [(0, 1)]
    assert [seq.request.id for seq in s.waiting] == [1, 2]


def test_a_prefill_chunk_one_token_short_of_the_prompt_emits_no_token():
    s = _scheduler(blocks=64, max_tokens=40)
    s.add(Request(0, 0.0, 41, 4))
    s.complete(s.schedule(), 1.0)
    seq = s.running[0]
    assert seq.pending == 1 and seq.generated == 0 and seq.first_token_s is None


def test_a_sequence_preempted_twice_counts_two():
    from simulator.scheduler import ScheduledStep

    s = _scheduler(blocks=8)
    s.add(Request(0, 0.0, 16, 4))
    for _ in range(2):
        seq = s.schedule().work[0][0]  # admitted (again), its prompt recomputed
        s._preempt(seq, ScheduledStep(), 0)
    assert seq.preemptions == 2 and s.preemptions == 2 and s.used == 0
