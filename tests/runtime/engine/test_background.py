"""The engine on its own thread: concurrent submits from threads and from asyncio,
cancellation, and failures that end requests with an error instead of hanging them."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from arle_runtime.engine import BackgroundEngine, Engine, EngineConfig
from arle_runtime.errors import ArleError
from arle_runtime.generate import generate
from arle_runtime.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts(count, seed):
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(rng.randint(3, 50))] for _ in range(count)]


@pytest.fixture
def front(engine_session):
    engine = Engine(engine_session.executor, engine_session.tokenizer, (), EngineConfig())
    with BackgroundEngine(engine) as front:
        yield front


def _alone(session, prompt, params=GREEDY):
    return generate(session.executor, session.tokenizer, prompt, params).token_ids


def test_eight_concurrent_submits_from_threads_all_complete_with_their_own_tokens(front, engine_session):
    prompts = _prompts(8, seed=0)
    results, errors = [None] * 8, []
    start = threading.Barrier(8)

    def client(i):
        try:
            start.wait()
            stream = front.submit(prompts[i], GREEDY)
            tokens = [out.token for out in stream if out.token is not None]
            results[i] = (tokens, stream)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and all(r is not None for r in results)
    for prompt, (tokens, _) in zip(prompts, results):
        assert tokens == _alone(engine_session, prompt)
    assert front.engine.num_live == 0 and front.engine.stats()["kv_pages_in_use"] == 0


def test_asyncio_callers_stream_with_async_for(front, engine_session):
    prompts = _prompts(4, seed=1)

    async def one(prompt):
        stream = front.submit(prompt, GREEDY)
        outs = [out async for out in stream]
        assert outs[-1].finished and sum(o.finished for o in outs) == 1
        assert "".join(o.text for o in outs) == outs[-1].result.text
        return outs[-1].result

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 60)

    for prompt, result in zip(prompts, asyncio.run(main())):
        assert result.token_ids == _alone(engine_session, prompt)


def test_cancel_ends_the_stream_with_abort_and_frees_the_pages(front):
    stream = front.submit(_prompts(1, seed=2)[0], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    outs = iter(stream)
    first = next(outs)
    assert not first.finished
    assert front.cancel(stream.request_id)
    rest = list(outs)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert front.engine.stats()["kv_pages_in_use"] == 0
    assert not front.cancel(stream.request_id)


def test_bad_requests_are_refused_in_the_callers_thread(front):
    with pytest.raises(ArleError, match="empty"):
        front.submit([], GREEDY)
    with pytest.raises(ArleError, match="context holds"):
        front.submit(list(range(100, 400)), GREEDY)
    assert front.alive


def test_a_step_that_raises_fails_its_requests_and_the_loop_keeps_serving(front, engine_session, monkeypatch):
    def broken(plan):
        raise RuntimeError("kernel fault")

    monkeypatch.setattr(front.engine.runner, "run", broken)
    failed = front.submit(_prompts(1, seed=3)[0], GREEDY)
    with pytest.raises(ArleError, match="kernel fault"):
        failed.result()
    monkeypatch.undo()
    # A bug outside the forward pass (here: the scheduler) ends every live request, not the thread.
    monkeypatch.setattr(front.engine.scheduler, "schedule", lambda: 1 / 0)
    also_failed = front.submit(_prompts(1, seed=4)[0], GREEDY)
    with pytest.raises(ArleError, match="ZeroDivisionError"):
        also_failed.result()
    monkeypatch.undo()
    assert front.alive
    prompt = _prompts(1, seed=5)[0]
    assert front.submit(prompt, GREEDY).result().token_ids == _alone(engine_session, prompt)


def test_close_ends_live_requests_with_an_error_and_refuses_new_ones(engine_session):
    engine = Engine(engine_session.executor, engine_session.tokenizer, (), EngineConfig())
    front = BackgroundEngine(engine)
    stream = front.submit(_prompts(1, seed=6)[0], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    next(iter(stream))
    front.close()
    outs = list(stream)
    assert outs and outs[-1].finished and outs[-1].finish_reason == "error"
    with pytest.raises(ArleError, match="stopped"):
        front.submit([101, 102], GREEDY)


def test_session_generate_uses_the_background_engine_once_started(engine_bundle):
    from arle_runtime.session import Session

    session = Session.open(engine_bundle, verify=False)
    prompt = list(range(1000, 1040))
    direct = session.generate(prompt, GREEDY)
    front = session.background()
    try:
        chunks = []
        threaded = session.generate(prompt, GREEDY, on_text=chunks.append)
        assert threaded.token_ids == direct.token_ids and "".join(chunks) == threaded.text == direct.text
        assert front.engine is session.engine and threaded.cached_tokens > 0
    finally:
        session.close()
