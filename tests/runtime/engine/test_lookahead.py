"""The engine's lookahead (runtime/engine/lookahead.py), on the CPU: a paged shim over the
compiled tiny bundle keeps sampled tokens in a feed buffer, as the cuda executor does on
the GPU, so the next decode step is planned and run before the last one's tokens are
read. Tokens, stops, limits, aborts and pages must come out as without lookahead."""

from __future__ import annotations

import random

import torch

from arle_runtime.engine import Engine, EngineConfig
from arle_runtime.engine.scheduler import PENDING
from arle_runtime.generate import generate
from arle_runtime.sampler import SamplingParams

from .test_paged_runner import PagedShim

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


class FeedShim(PagedShim):
    """PagedShim plus the cuda executor's feed: decode rows may name a row of the last
    sampled tokens instead of a token."""

    lookahead_capable = True

    def __init__(self, executor):
        super().__init__(executor)
        self.feed_buffer = torch.zeros(64, dtype=torch.long)
        self.fed_rows = 0

    def set_feed(self, tokens):
        self.feed_buffer[: tokens.numel()] = tokens

    def decode_paged(self, tokens, positions, slots, page_tables, feed=None):
        if feed is not None:
            assert all(t == PENDING for t in tokens) and all(f >= 0 for f in feed)
            tokens = [int(self.feed_buffer[f]) for f in feed]
            self.fed_rows += len(feed)
        assert PENDING not in tokens
        return super().decode_paged(tokens, positions, slots, page_tables)


def _prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(n)] for n in lengths]


def _engine(session, shim, **config):
    return Engine(shim, session.tokenizer, session.bundle.eos_token_ids, EngineConfig(**config))


def _alone(session, prompt, params=GREEDY):
    return generate(session.executor, session.tokenizer, prompt, params, session.bundle.eos_token_ids)


def test_lookahead_keeps_every_greedy_token_through_prefix_hits_waves_and_preemption(engine_session):
    shim = FeedShim(engine_session.executor)
    prefix = _prompts([32], seed=5)[0]
    prompts = [prefix + p for p in _prompts([1, 9, 17], seed=6)] + _prompts([5, 30, 40, 3, 12, 7, 21], seed=7)
    engine = _engine(engine_session, shim, kv_pages=9, max_batch=4)  # 10 prompts in waves of 4, a tight pool
    results = engine.generate(prompts, GREEDY)
    assert shim.fed_rows > 0 and engine.stats()["kv_pages_in_use"] == 0 and not engine.has_work
    assert engine.stats()["preemptions"] > 0
    for prompt, result in zip(prompts, results):
        assert result.token_ids == _alone(engine_session, prompt).token_ids


def test_stops_limits_and_sampled_requests_end_as_they_do_without_lookahead(engine_session):
    prompt = _prompts([12], seed=3)[0]  # the tiny random model repeats "hat", then says " Wearing"
    alone = _alone(engine_session, prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    late = next(i for i, t in enumerate(alone.token_ids) if t != alone.token_ids[0])
    assert late > 8, alone.token_ids
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=(alone.token_ids[late],)),  # a stop token
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),  # a length limit
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=4, ignore_eos=True),  # sampled: no lookahead
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=("Wear",)),  # a stop string
    ]
    batch = [prompt, *_prompts([14, 6], seed=8), prompt]
    shim = FeedShim(engine_session.executor)
    ahead = _engine(engine_session, shim).generate(batch, params)
    plain = _engine(engine_session, FeedShim(engine_session.executor), lookahead=False).generate(batch, params)
    assert shim.fed_rows > 0
    for a, b in zip(ahead, plain):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert PENDING not in a.token_ids
    assert [r.finish_reason for r in ahead] == ["stop", "length", "length", "stop"]
    assert ahead[0].token_ids == alone.token_ids[:late] and "Wear" not in ahead[3].text


def test_an_abort_while_a_token_is_pending_frees_the_pages_and_reports_only_real_tokens(engine_session):
    shim = FeedShim(engine_session.executor)
    engine = _engine(engine_session, shim)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    rid = engine.add_request(_prompts([20], seed=9)[0], long)
    other = engine.add_request(_prompts([5], seed=10)[0], GREEDY)
    streamed = []
    for _ in range(6):
        streamed += [o.token for o in engine.step() if o.request_id == rid and o.token is not None]
    seq = engine.scheduler._live[rid]
    assert seq.token_ids[-1] == PENDING  # a step is in flight
    assert engine.abort(rid)
    finals = [o for o in engine.step() if o.request_id == rid]
    assert len(finals) == 1 and finals[0].finish_reason == "abort"
    assert finals[0].result.token_ids == streamed and PENDING not in finals[0].result.token_ids
    while engine.has_work:
        engine.step()
    assert engine.stats()["kv_pages_in_use"] == 0
    assert not engine.abort(other)


def test_lookahead_is_off_for_executors_that_cannot_feed_and_when_switched_off(engine_session, monkeypatch):
    from .test_paged_runner import PagedShim as Plain

    assert _engine(engine_session, Plain(engine_session.executor))._greedy is None
    assert _engine(engine_session, FeedShim(engine_session.executor))._greedy is not None
    monkeypatch.setenv("ARLE_LOOKAHEAD", "0")
    assert _engine(engine_session, FeedShim(engine_session.executor))._greedy is None
    assert _engine(engine_session, FeedShim(engine_session.executor), lookahead=True)._greedy is not None


def _closed_loop(engine, prompts, params, clients: int) -> tuple[dict[int, object], dict[str, int]]:
    """`clients` requests at a time, each finished one replaced by the next prompt (as a
    server's clients do): -> ({prompt index: result}, counts of planned-ahead steps that
    admitted a prompt, and of those declined with a sampled prompt at the queue's head)."""
    counts, plan_ahead = {"admitted": 0, "declined_sampled": 0}, engine.scheduler.schedule_lookahead

    def counted(**kw):
        head = engine.scheduler.waiting[0] if engine.scheduler.waiting else None
        plan = plan_ahead(**kw)
        counts["admitted"] += bool(plan and any(c.start == 0 for c in plan.prefills))
        counts["declined_sampled"] += plan is None and head is not None and head.params.temperature > 0
        # its tokens are argmaxed on the device: only plain greedy prompts may be in it
        assert plan is None or all(c.seq.params.temperature == 0 for c in plan.prefills)
        return plan

    engine.scheduler.schedule_lookahead = counted
    queue, live, results = list(enumerate(zip(prompts, params))), {}, {}
    while queue or live:
        while queue and len(live) < clients:
            index, (prompt, p) = queue.pop(0)
            live[engine.add_request(prompt, p)] = index
        for out in engine.step():
            if out.finished:
                results[live.pop(out.request_id)] = out.result
    return results, counts


def test_prompts_arriving_while_a_step_is_in_flight_join_it_without_leaving_lookahead(engine_session):
    """A closed loop's new prompts are admitted by the planned-ahead step (chunked ones
    too), and every greedy token equals the one-request loop's."""
    prompts = _prompts([5, 30, 40, 3, 12, 7, 21, 50, 9, 2], seed=21)  # 50: two chunks of at most 32
    shim = FeedShim(engine_session.executor)
    results, counts = _closed_loop(_engine(engine_session, shim, max_batch=4), prompts, [GREEDY] * len(prompts),
                                   clients=3)
    assert counts["admitted"] >= 3 and shim.fed_rows > 0
    for index, prompt in enumerate(prompts):
        assert results[index].token_ids == _alone(engine_session, prompt).token_ids


def test_a_sampled_prompt_arriving_mid_flight_is_planned_normally(engine_session):
    """Only greedy prompts join a planned-ahead step; a sampled one at the head of the queue
    sends the engine back to a normal step, and its tokens are those of an engine without
    lookahead."""
    prompts = _prompts([6, 14, 9, 20, 4], seed=22)
    sampled = SamplingParams(temperature=5.0, seed=5, max_tokens=12, ignore_eos=True)  # far from the argmax
    # staggered lengths: each sampled prompt arrives while a greedy step is in flight
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (6, 40, 1, 30, 1)]
    params[2] = params[4] = sampled
    ahead, counts = _closed_loop(_engine(engine_session, FeedShim(engine_session.executor), max_batch=4), prompts,
                                 params, clients=2)
    assert counts["declined_sampled"] >= 1
    plain, _ = _closed_loop(_engine(engine_session, FeedShim(engine_session.executor), max_batch=4, lookahead=False),
                            prompts, params, clients=2)
    for index in range(len(prompts)):
        assert ahead[index].token_ids == plain[index].token_ids
        assert PENDING not in ahead[index].token_ids


def test_lookahead_for_decodes_only_leaves_prompts_to_normal_steps(engine_session, monkeypatch):
    monkeypatch.setenv("ARLE_LOOKAHEAD", "decodes")
    prompts = _prompts([5, 30, 40, 3, 12, 7], seed=23)
    shim = FeedShim(engine_session.executor)
    results, counts = _closed_loop(_engine(engine_session, shim, max_batch=4), prompts, [GREEDY] * len(prompts),
                                   clients=3)
    assert counts["admitted"] == 0 and shim.fed_rows > 0
    for index, prompt in enumerate(prompts):
        assert results[index].token_ids == _alone(engine_session, prompt).token_ids


def test_a_long_prompt_arriving_as_the_last_sequence_ends_runs_without_a_failed_step(engine_session, caplog):
    """The step planned ahead would hold only the long prompt's first chunk, which samples
    nothing (no token to keep on the device): the engine plans it normally, no step fails,
    and the request completes with the one-request loop's tokens."""
    shim = FeedShim(engine_session.executor)
    engine = _engine(engine_session, shim)
    short, long = _prompts([6, 70], seed=24)  # the bundle's chunk is 32 tokens
    engine.add_request(short, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    engine.step()  # its one token is in flight
    rid = engine.add_request(long, GREEDY)
    finals = {}
    while engine.has_work:
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert finals[rid].finish_reason == "length"
    assert finals[rid].result.token_ids == _alone(engine_session, long).token_ids
    assert not [r for r in caplog.records if "step failed" in r.getMessage()]
