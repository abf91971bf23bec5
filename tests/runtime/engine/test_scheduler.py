"""The scheduler over a fake model: budgets, chunked prefill beside decodes, preemption
and recompute, stop conditions, aborts and the queue limit. Outputs are compared with
an unpaged reference, so any bookkeeping slip shows up as wrong tokens."""

from __future__ import annotations

import pytest

from arle_runtime.engine import PageManager, QueueFullError, Scheduler, SchedulerConfig, Sequence, SequenceStatus
from arle_runtime.errors import ArleError
from arle_runtime.sampler import SamplingParams

from .engine_fakes import FakeRunner, drive, reference


def _engine(num_pages=64, **config):
    pm = PageManager(num_pages)
    return Scheduler(SchedulerConfig(**config), pm), FakeRunner(pm)


def _seq(prompt, max_tokens=8, **params) -> Sequence:
    return Sequence(list(prompt), SamplingParams(temperature=0.0, max_tokens=max_tokens, **params))


def _step(sched, runner):
    plan = sched.schedule()
    outputs = sched.postprocess(plan, runner.step(plan))
    return plan, outputs


def test_decodes_keep_running_beside_a_chunked_long_prefill_within_the_token_budget():
    sched, runner = _engine(max_num_batched_tokens=16, max_batch=4, max_prefill_chunk=16)
    short = [_seq(range(i, i + 5), max_tokens=20) for i in (1, 2)]
    for seq in short:
        sched.add(seq)
    _step(sched, runner)
    long = _seq(range(100, 140), max_tokens=3)
    sched.add(long)

    chunks = []
    while not long.is_finished:
        plan, _ = _step(sched, runner)
        assert plan.num_tokens <= 16 and len(plan.decodes) + len(plan.prefills) <= 4
        assert set(plan.decodes) >= set(short)
        chunks += [(c.start, c.length) for c in plan.prefills if c.seq is long]
    assert chunks == [(0, 14), (14, 14), (28, 12)]
    drive(sched, runner)
    for seq in (*short, long):
        assert seq.output_ids == reference(seq.prompt_ids, seq.params.max_tokens)
        assert seq.finish_reason == "length"


def test_a_prompt_chunk_never_exceeds_the_per_sequence_chunk_limit():
    sched, runner = _engine(max_num_batched_tokens=64, max_batch=4, max_prefill_chunk=10)
    seq = _seq(range(35), max_tokens=2)
    sched.add(seq)
    lengths = []
    drive(sched, runner, on_step=lambda plan: lengths.extend(c.length for c in plan.prefills))
    assert lengths == [10, 10, 10, 5]
    assert seq.output_ids == reference(seq.prompt_ids, 2)


def test_preemption_under_a_tiny_pool_recomputes_and_yields_the_complete_output():
    sched, runner = _engine(num_pages=6, max_num_batched_tokens=64, max_batch=4)
    seqs = [_seq(range(10 * i, 10 * i + 20), max_tokens=30) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    drive(sched, runner, on_step=lambda plan: sched.pages.check_invariants(sched.running))
    assert sched.num_preemptions > 0
    assert any(seq.num_preemptions for seq in seqs)
    for seq in seqs:
        assert seq.output_ids == reference(seq.prompt_ids, 30) and seq.finish_reason == "length"
    assert sched.pages.num_in_use == 0


def test_the_latest_arrival_is_preempted_and_resumes_first():
    sched, runner = _engine(num_pages=4, max_num_batched_tokens=64, max_batch=4)
    first, second = _seq(range(30), max_tokens=20), _seq(range(50, 80), max_tokens=20)
    sched.add(first)
    sched.add(second)
    while not sched.num_preemptions:
        plan, _ = _step(sched, runner)
    assert plan.preempted == [second] and second.status is SequenceStatus.WAITING
    assert second.page_table == [] and second.num_computed == 0 and second.num_output_tokens > 0
    later = _seq(range(90, 95))
    sched.add(later)
    assert list(sched.waiting) == [second, later]
    drive(sched, runner)
    assert second.output_ids == reference(second.prompt_ids, 20)


def test_a_sequence_that_outgrows_the_whole_pool_finishes_with_length():
    sched, runner = _engine(num_pages=2, max_context=1000)
    seq = _seq(range(10), max_tokens=100)
    sched.add(seq)
    drive(sched, runner)
    # 32 positions fit; the 33rd token is sampled but would need a third page.
    assert seq.finish_reason == "length" and seq.num_tokens == 33
    assert seq.output_ids == reference(seq.prompt_ids, 23)
    assert sched.pages.num_in_use == 0


def test_a_prompt_larger_than_the_pool_or_the_context_is_refused_at_add():
    sched, _ = _engine(num_pages=2, max_context=100)
    with pytest.raises(ArleError, match="KV cache holds 32"):
        sched.add(_seq(range(40)))
    with pytest.raises(ArleError, match="context holds 100"):
        _engine(max_context=100)[0].add(_seq(range(100)))
    with pytest.raises(ArleError, match="empty"):
        sched.add(_seq([]))


def test_a_full_queue_raises_queue_full_error():
    sched, _ = _engine(max_waiting=2)
    sched.add(_seq(range(5)))
    sched.add(_seq(range(5)))
    with pytest.raises(QueueFullError) as err:
        sched.add(_seq(range(5)))
    assert isinstance(err.value, ArleError) and err.value.code == "queue_full"


def test_abort_frees_the_pages_at_once():
    sched, runner = _engine(num_pages=8)
    running, waiting = _seq(range(40), max_tokens=50), _seq(range(60, 70))
    sched.add(running)
    _step(sched, runner)
    sched.add(waiting)
    assert sched.pages.num_in_use == 3
    assert sched.abort(running.seq_id) is running
    assert running.finish_reason == "abort" and sched.pages.num_in_use == 0
    assert sched.abort(waiting.seq_id) is waiting and not sched.has_work
    assert sched.abort(12345) is None and sched.abort(running.seq_id) is None
    sched.pages.check_invariants([])


def test_a_request_aborted_while_its_step_runs_is_skipped_by_postprocess():
    sched, runner = _engine()
    a, b = _seq(range(5)), _seq(range(7))
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    sampled = runner.step(plan)
    sched.abort(a.seq_id)
    outputs = sched.postprocess(plan, sampled)
    assert [o.seq for o in outputs] == [b] and a.output_ids == []
    sched.pages.check_invariants(sched.running)


def test_eos_stops_unless_ignored_and_stop_token_ids_always_stop():
    prompt = list(range(3, 12))
    expected = reference(prompt, 10)
    eos = expected[3]
    cut = expected.index(eos)
    sched, runner = _engine(eos_token_ids=(eos,))
    stopped = _seq(prompt, 10)
    ignoring = _seq(prompt, 10, ignore_eos=True)
    by_id = _seq(prompt, 10, stop_token_ids=(eos,))
    for seq in (stopped, ignoring, by_id):
        sched.add(seq)
    drive(sched, runner)
    assert stopped.output_ids == expected[:cut] and stopped.finish_reason == "stop"
    assert ignoring.output_ids == expected and ignoring.finish_reason == "length"
    assert by_id.output_ids == expected[:cut] and by_id.finish_reason == "stop"


def test_the_context_limit_ends_generation():
    sched, runner = _engine(max_context=20)
    seq = _seq(range(15), max_tokens=100)
    sched.add(seq)
    drive(sched, runner)
    assert seq.num_tokens == 20 and seq.finish_reason == "length"


def test_finish_from_outside_ends_a_request_with_the_given_reason():
    sched, runner = _engine()
    seq = _seq(range(5), max_tokens=50)
    sched.add(seq)
    _step(sched, runner)
    sched.finish(seq.seq_id, "stop")  # the server matched a stop string
    assert seq.finish_reason == "stop" and not sched.has_work


def test_a_second_request_with_the_same_prompt_starts_after_the_cached_pages():
    sched, runner = _engine()
    first = _seq(range(40), max_tokens=4)
    sched.add(first)
    drive(sched, runner)
    second = _seq(range(40), max_tokens=4)
    sched.add(second)
    plan, _ = _step(sched, runner)
    assert [(c.start, c.length) for c in plan.prefills] == [(32, 8)]
    assert sched.stats()["prefix_hit_tokens"] == 32
    drive(sched, runner)
    assert second.output_ids == first.output_ids


def test_running_set_and_step_stay_within_max_batch():
    sched, runner = _engine(max_batch=2, max_num_batched_tokens=64)
    seqs = [_seq(range(i, i + 4), max_tokens=5) for i in range(5)]
    for seq in seqs:
        sched.add(seq)

    def check(plan):
        assert len(sched.running) <= 2 and len(plan.decodes) + len(plan.prefills) <= 2

    drive(sched, runner, on_step=check)
    assert all(seq.output_ids == reference(seq.prompt_ids, 5) for seq in seqs)


def test_step_outputs_report_each_new_token_once():
    sched, runner = _engine()
    seq = _seq(range(5), max_tokens=6)
    sched.add(seq)
    streamed = []
    while sched.has_work:
        _, outputs = _step(sched, runner)
        streamed += [o.token for o in outputs if o.token is not None]
    assert streamed == seq.output_ids == reference(seq.prompt_ids, 6)


def test_a_lookahead_step_that_would_sample_nothing_is_left_to_the_normal_path():
    """The only running sequence ends on the token in flight and a long prompt arrives: a
    planned-ahead step would hold just the prompt's first chunk, which samples no token,
    so schedule_lookahead declines; the prompt stays admitted and the normal path runs
    its chunks to the reference tokens."""
    sched, runner = _engine(max_num_batched_tokens=16, max_batch=4, max_prefill_chunk=16)
    short = _seq(range(1, 6), max_tokens=1)
    sched.add(short)
    plan = sched.schedule()
    tokens = runner.step(plan)
    sched.advance(plan)  # the engine's lookahead: the token stays PENDING on the device
    long = _seq(range(100, 140), max_tokens=3)
    sched.add(long)
    assert sched.schedule_lookahead() is None
    assert long.status is SequenceStatus.RUNNING and long.num_computed == 0  # admitted, pages reserved
    sched.resolve(plan, tokens)
    assert short.is_finished and short.output_ids == reference(short.prompt_ids, 1)
    drive(sched, runner)
    assert long.output_ids == reference(long.prompt_ids, 3)
    assert sched.pages.stats()["kv_pages_in_use"] == 0
