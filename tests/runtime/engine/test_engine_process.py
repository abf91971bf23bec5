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


# --- several lines to one engine (serve --http-processes N) ---------------------------------


@pytest.fixture(scope="module")
def two_lines(engine_bundle):
    from arle_runtime.engine_process import EngineClient, start_engine_process, stop_engine_process

    proc, (control, *lines), limits = start_engine_process(partial(_open, engine_bundle), clients=3)
    # numbered as serve_processes numbers them: 1, 3, 5, ... and 2, 4, 6, ...
    clients = [EngineClient(line, limits, first_id=i + 1, id_step=2) for i, line in enumerate(lines)]
    yield proc, control, clients
    stop_engine_process(proc, control)


def test_two_lines_to_one_engine_each_get_their_own_tokens(two_lines, engine_session):
    _, _, clients = two_lines

    async def go():
        jobs = [_collect(clients[i % 2], prompt) for i, prompt in enumerate(PROMPTS)]
        return await asyncio.gather(*jobs)

    for prompt, outs in zip(PROMPTS, asyncio.run(go())):
        final = outs[-1]
        assert final.finished and final.error is None, final
        expected = generate(engine_session.executor, engine_session.tokenizer, prompt, GREEDY)
        assert final.result.token_ids == expected.token_ids
        assert {o.request_id for o in outs} == {final.request_id}


def test_a_line_that_hangs_up_loses_its_requests_and_the_other_carries_on(engine_bundle):
    """An HTTP process that dies mid-request: the engine cancels what it had running (its
    KV pages come back) and keeps serving the other line."""
    from arle_runtime.engine_process import EngineClient, start_engine_process, stop_engine_process

    proc, (control, first, second), limits = start_engine_process(partial(_open, engine_bundle), clients=3)
    gone, staying = EngineClient(first, limits, 1, 2), EngineClient(second, limits, 2, 2)
    long = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)

    async def go():
        stream = await gone.submit_async(PROMPTS[2], long)
        async for _ in stream:
            break  # it is running
        gone.close()
        for _ in range(200):  # the engine notices the closed line within a step or two
            stats = await staying.stats_async()
            if stats["requests_running"] == 0:
                break
            await asyncio.sleep(0.05)
        return stats, await _collect(staying, PROMPTS[0])

    try:
        stats, outs = asyncio.run(asyncio.wait_for(go(), 60))
        assert stats["requests_running"] == 0 and stats["kv_pages_in_use"] == 0
        assert outs[-1].finish_reason == "length" and outs[-1].error is None
        assert proc.is_alive()
    finally:
        stop_engine_process(proc, control)
    assert not proc.is_alive()


def test_a_steps_outputs_cross_the_pipe_as_columns_and_come_back_equal():
    from arle_runtime.engine.llm_engine import Completion, RequestOutput
    from arle_runtime.engine_process import pack_outputs, unpack_outputs

    plain = [RequestOutput(2 * i + 1, 500 + i, f" w{i}") for i in range(5)]
    others = [RequestOutput(4, None, "", True, "length", result=Completion("x", [1], 3, "length", 0.1, 0.2, request_id=4)),
              RequestOutput(6, 9, "é", logprob=-0.5, top_logprobs=((9, -0.5), (3, -1.0))),
              RequestOutput(8, None, "", True, "error", error="boom")]
    outputs = plain[:2] + others[:1] + plain[2:] + others[1:]
    ids, tokens, texts, whole = pack_outputs(outputs)
    assert ids == [o.request_id for o in plain] and whole == others  # only the plain ones go as columns
    back = unpack_outputs(*pickle.loads(pickle.dumps((ids, tokens, texts, whole))))
    assert sorted(back, key=lambda o: o.request_id) == sorted(outputs, key=lambda o: o.request_id)
