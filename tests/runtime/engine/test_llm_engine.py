"""The engine on the compiled tiny bundle, judged against the one-request loop
(runtime/generate.py): batching, prefix reuse and preemption must not change a greedy
token; stop strings, limits, aborts, seeds and failures behave as documented."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from arle_runtime.engine import Engine, EngineConfig
from arle_runtime.errors import ArleError
from arle_runtime.generate import generate
from arle_runtime.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def _prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(n)] for n in lengths]


def _engine(session, **config) -> Engine:
    return Engine(session.executor, session.tokenizer, session.bundle.eos_token_ids, EngineConfig(**config))


def _alone(session, prompt, params=GREEDY, on_text=None):
    return generate(session.executor, session.tokenizer, prompt, params, session.bundle.eos_token_ids, on_text=on_text)


def test_greedy_tokens_of_prompts_run_together_equal_each_prompt_run_alone(engine_session):
    # Lengths straddle page (16) and chunk (32) edges; the default token budget (8 + 32)
    # splits the later prompts into chunks that differ from the one-request loop's.
    prompts = _prompts([1, 5, 16, 17, 31, 32, 33, 40, 64, 70, 100, 9])
    engine = _engine(engine_session, prefix_cache=False)
    results = engine.generate(prompts, GREEDY)
    for prompt, result in zip(prompts, results):
        expected = _alone(engine_session, prompt)
        assert result.token_ids == expected.token_ids
        assert result.text == expected.text and result.finish_reason == expected.finish_reason == "length"
    assert engine.stats()["kv_pages_in_use"] == 0


def test_prompts_padded_into_shared_prefill_calls_keep_every_greedy_token(engine_session):
    # The cuda executor's allowance (padded rows in one call); the CPU's own is 1.0.
    prompts = _prompts([30, 28, 31, 12, 32, 29, 25, 27], seed=3)
    engine = _engine(engine_session, prefix_cache=False, max_num_batched_tokens=8 + 128)
    engine.runner.prefill_padding_limit = 1.25
    calls = []
    inner = engine_session.executor.prefill
    engine_session.executor.prefill = lambda *a: calls.append(a[0].shape[0]) or inner(*a)
    try:
        results = engine.generate(prompts, GREEDY)
    finally:
        engine_session.executor.prefill = inner
    assert max(calls) > 1  # some calls really held several prompts
    for prompt, result in zip(prompts, results):
        assert result.token_ids == _alone(engine_session, prompt).token_ids


def test_a_shared_prefix_is_served_from_the_cache_and_changes_no_token(engine_session):
    prefix = _prompts([40], seed=1)[0]
    first, second = prefix + [501, 502, 503], prefix + [601, 602, 603, 604, 605]
    engine = _engine(engine_session)
    a = engine.generate([first], GREEDY)[0]
    b = engine.generate([second], GREEDY)[0]
    assert a.cached_tokens == 0
    assert b.cached_tokens == 32  # the prefix's two full pages
    assert engine.stats()["prefix_hit_tokens"] == 32
    assert b.token_ids == _alone(engine_session, second).token_ids
    assert b.token_ids == _engine(engine_session, prefix_cache=False).generate([second], GREEDY)[0].token_ids
    again = engine.generate([first], GREEDY)[0]
    assert again.cached_tokens == 32 and again.token_ids == a.token_ids
    # A prompt of whole pages, repeated: its last token is recomputed into a copy of
    # the cached last page (copy-on-write), which the runner must apply first.
    aligned = prefix[:32]
    once, twice = engine.generate([aligned], GREEDY)[0], engine.generate([aligned], GREEDY)[0]
    assert twice.cached_tokens == 31 and twice.token_ids == once.token_ids == _alone(engine_session, aligned).token_ids


def test_preemption_under_a_tiny_kv_pool_still_gives_the_same_tokens(engine_session):
    prompts = _prompts([30, 25, 35, 20, 28, 33], seed=2)
    engine = _engine(engine_session, kv_pages=10)
    results = engine.generate(prompts, GREEDY)
    assert engine.stats()["preemptions"] > 0 and any(r.preemptions for r in results)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == _alone(engine_session, prompt).token_ids
    assert engine.stats()["kv_pages_in_use"] == 0


def test_a_stop_string_cuts_the_text_and_streamed_deltas_never_show_it(engine_session):
    prompt = _prompts([12], seed=3)[0]
    text = _alone(engine_session, prompt).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=(stop,))
    expected = _alone(engine_session, prompt, params)
    assert expected.finish_reason == "stop" and expected.text == text[: text.find(stop)]

    engine = _engine(engine_session)
    others = [engine.add_request(p, GREEDY) for p in _prompts([7, 20], seed=4)]
    rid = engine.add_request(prompt, params)
    deltas, final = [], None
    while final is None:
        for out in engine.step():
            if out.request_id == rid:
                deltas.append(out.text)
                assert stop not in "".join(deltas)
                final = out if out.finished else None
    assert final.finish_reason == "stop" and final.result.finish_reason == "stop"
    assert "".join(deltas) == final.result.text == expected.text
    assert final.result.token_ids == expected.token_ids
    assert all(engine.abort(o) for o in others)


def test_max_tokens_ends_with_length_and_a_stop_token_id_ends_with_stop(engine_session):
    prompt = _prompts([10], seed=5)[0]
    tokens = _alone(engine_session, prompt).token_ids
    engine = _engine(engine_session)
    short, by_token = engine.generate(
        [prompt, prompt],
        [SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
         SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=(tokens[3],))],
    )
    assert short.token_ids == tokens[:7] and short.finish_reason == "length"
    assert by_token.token_ids == tokens[: tokens.index(tokens[3])] and by_token.finish_reason == "stop"


def test_the_context_limit_ends_generation_with_length(engine_session):
    prompt = _prompts([250], seed=6)[0]
    result = _engine(engine_session).generate([prompt], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))[0]
    assert result.finish_reason == "length" and len(prompt) + len(result.token_ids) == 256
    assert result.token_ids == _alone(engine_session, prompt, SamplingParams(temperature=0.0, max_tokens=100,
                                                                            ignore_eos=True)).token_ids


def test_abort_frees_the_pages_at_once_and_ends_the_request(engine_session):
    engine = _engine(engine_session)
    running = engine.add_request(_prompts([40], seed=7)[0], SamplingParams(temperature=0.0, max_tokens=200,
                                                                             ignore_eos=True))
    streamed = []
    for _ in range(3):  # chunks of 32 and 8 (the first token), then one decode
        streamed += [o.token for o in engine.step()]
    assert engine.stats()["kv_pages_in_use"] == 3
    assert engine.abort(running)
    assert engine.stats()["kv_pages_in_use"] == 0
    waiting = engine.add_request(_prompts([8], seed=8)[0], GREEDY)
    assert engine.abort(waiting)
    outputs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outputs] == [(running, True, "abort"),
                                                                              (waiting, True, "abort")]
    assert outputs[0].result.token_ids == streamed and len(streamed) == 2 and outputs[1].result.token_ids == []
    assert not engine.abort(running) and not engine.abort(12345)
    assert not engine.has_work


def test_seeded_sampling_is_reproducible_alone_or_in_a_batch(engine_session):
    prompt = _prompts([15], seed=9)[0]

    def params(seed):
        return SamplingParams(temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=seed, max_tokens=30,
                              ignore_eos=True)

    alone = _engine(engine_session).generate([prompt], params(11))[0]
    batch = _engine(engine_session).generate(_prompts([20, 3], seed=10) + [prompt, prompt],
                                             [GREEDY, params(5), params(11), params(12)])
    assert batch[2].token_ids == alone.token_ids == _alone(engine_session, prompt, params(11)).token_ids
    assert batch[3].token_ids != alone.token_ids


def test_logprobs_come_with_the_chosen_token_and_the_top_alternatives(engine_session):
    prompt = _prompts([9], seed=11)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    engine = _engine(engine_session)
    rid = engine.add_request(prompt, params)
    outs = []
    while engine.has_work:
        outs += [o for o in engine.step() if o.request_id == rid]
    expected = _alone(engine_session, prompt, params)
    assert [o.token for o in outs] == expected.token_ids
    for out, lp in zip(outs, expected.logprobs):
        assert len(out.top_logprobs) == 3 and out.top_logprobs[0][0] == out.token  # greedy: the top one
        assert out.logprob == pytest.approx(lp, abs=1e-5) == out.top_logprobs[0][1]
    assert outs[-1].result.logprobs == [o.logprob for o in outs]


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_goes_on(engine_session, monkeypatch):
    engine = _engine(engine_session)
    ids = [engine.add_request(p, GREEDY) for p in _prompts([5, 9], seed=12)]
    real_run = engine.runner.run

    def broken(plan):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "run", broken)
    outputs = engine.step()
    assert sorted(o.request_id for o in outputs) == ids
    assert all(o.finished and o.finish_reason == "error" and "device lost" in o.error for o in outputs)
    assert engine.stats()["kv_pages_in_use"] == 0 and not engine.has_work
    monkeypatch.setattr(engine.runner, "run", real_run)
    prompt = _prompts([6], seed=13)[0]
    assert engine.generate([prompt], GREEDY)[0].token_ids == _alone(engine_session, prompt).token_ids


def test_a_prompt_that_cannot_run_is_refused_at_add(engine_session):
    engine = _engine(engine_session)
    with pytest.raises(ArleError, match="context holds 256"):
        engine.add_request(list(range(100, 356)), GREEDY)
    with pytest.raises(ArleError, match="empty"):
        engine.generate([[101, 102], []], GREEDY)
    assert not engine.has_work or engine.step()[0].finish_reason == "abort"
    assert not engine.has_work


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=30),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=3, max_tokens=30, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=30, stop=("e",)),
    ],
    ids=["greedy", "seeded", "stop-string"],
)
def test_session_generate_goes_through_the_engine_with_the_same_results(engine_session, params):
    for prompt in _prompts([5, 17, 40], seed=14):
        theirs, ours = [], []
        expected = _alone(engine_session, prompt, params, on_text=theirs.append)
        got = engine_session.generate(prompt, params, on_text=ours.append)
        assert (got.text, got.token_ids, got.prompt_tokens, got.finish_reason) == (
            expected.text, expected.token_ids, expected.prompt_tokens, expected.finish_reason)
        assert ours == theirs
        if got.cached_tokens == 0:  # a cache hit computes the prompt in other chunks: last-ulp logprobs
            assert got.logprobs == expected.logprobs
    assert engine_session.engine.stats()["kv_pages_in_use"] == 0


def test_run_json_through_the_engine_reports_what_the_one_request_loop_gives(engine_bundle, engine_session):
    exe = Path(sys.executable).parent / "arle-runtime"
    proc = subprocess.run([str(exe), "run", str(engine_bundle), "--raw", "--prompt", "The sea is", "--json",
                           "--max-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    prompt = engine_session.encode("The sea is")
    expected = _alone(engine_session, prompt, SamplingParams(temperature=0.0, max_tokens=12))
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text
    assert out["prompt_tokens"] == len(prompt) and out["completion_tokens"] == len(expected.token_ids)
    assert out["finish_reason"] == expected.finish_reason
    assert out["ttft_ms"] >= 0 and out["decode_tok_s"] >= 0
