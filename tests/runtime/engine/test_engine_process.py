"""The engine in a process of its own (what `arle-runtime serve` runs): the same tokens as
in process, its errors raised in the server's process with their type, and a dead engine
process ending its streams with an error instead of hanging them."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
from functools import partial

import pytest

from arle_runtime.engine import EngineConfig, QueueFullError
from arle_runtime.engine_process import RemoteSession
from arle_runtime.errors import ArleError
from arle_runtime.generate import generate
from arle_runtime.sampler import SamplingParams
from arle_runtime.session import Session

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = [[100 + 7 * i + j for j in range(5 + 3 * i)] for i in range(4)]


def _open(path, max_waiting: int = 1024):
    import torch

    torch.set_num_threads(1)
    return Session.open(path, verify=False, engine_config=EngineConfig(max_waiting=max_waiting))


@pytest.fixture(scope="module")
def remote(engine_bundle):
    session = RemoteSession.start(engine_bundle, partial(_open, engine_bundle))
    yield session
    session.close()


async def _collect(engine, prompt, params=GREEDY):
    stream = await engine.submit_async(prompt, params)
    outs = [out async for out in stream]
    return outs


def test_concurrent_requests_get_the_tokens_they_get_in_process(remote, engine_session):
    async def go():
        return await asyncio.gather(*[_collect(remote.background(), p) for p in PROMPTS])

    for prompt, outs in zip(PROMPTS, asyncio.run(go())):
        final = outs[-1]
        assert final.finished and final.error is None, final
        expected = generate(engine_session.executor, engine_session.tokenizer, prompt, GREEDY)
        assert final.result.token_ids == expected.token_ids
        assert "".join(o.text for o in outs) == final.result.text == expected.text
    assert remote.limits == engine_session.limits


def test_a_bad_prompt_raises_the_engines_error_here(remote):
    async def go():
        await remote.background().submit_async([], GREEDY)

    with pytest.raises(ArleError, match="empty"):
        asyncio.run(go())
    assert remote.background().alive


def test_cancel_ends_the_stream_with_abort_and_stats_come_back(remote):
    async def go():
        engine = remote.background()
        stream = await engine.submit_async(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        outs = []
        async for out in stream:
            outs.append(out)
            if len(outs) == 2:
                engine.cancel(stream.request_id)
        return outs, await engine.stats_async()

    outs, stats = asyncio.run(go())
    assert outs[-1].finish_reason == "abort" and len(outs) < 50
    assert stats["kv_pages_in_use"] == 0


def test_errors_cross_processes_with_their_type():
    err = pickle.loads(pickle.dumps(QueueFullError(3)))
    assert type(err) is QueueFullError and err.code == "queue_full" and "3 requests" in err.message
    err = pickle.loads(pickle.dumps(ArleError("bad", param="x", code="y")))
    assert (err.message, err.param, err.code) == ("bad", "x", "y")


def test_a_failing_load_is_one_error_in_the_servers_process(engine_bundle):
    with pytest.raises(ArleError, match="refused to start"):
        RemoteSession.start(engine_bundle, _refuse)


def _refuse():
    raise ArleError("the engine refused to start")


def test_a_killed_engine_process_ends_live_streams_with_an_error(engine_bundle):
    session = RemoteSession.start(engine_bundle, partial(_open, engine_bundle))
    engine = session.background()

    async def go():
        stream = await engine.submit_async(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=4000,
                                                                      ignore_eos=True))
        outs = []
        async for out in stream:
            outs.append(out)
            if len(outs) == 1:
                os.kill(engine._proc.pid, signal.SIGKILL)
        return outs

    try:
        outs = asyncio.run(asyncio.wait_for(go(), 60))
        assert outs[-1].finished and outs[-1].finish_reason == "error"
        assert "engine process stopped" in outs[-1].error
        assert not engine.alive
        with pytest.raises(ArleError, match="engine process stopped"):
            asyncio.run(engine.submit_async(PROMPTS[0], GREEDY))
    finally:
        session.close()
