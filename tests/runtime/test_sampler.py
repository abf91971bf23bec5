"""Sampler behaviour on hand-made logits."""

import pytest
import torch

from arle_runtime.errors import ArleError
from arle_runtime.generate import StopChecker
from arle_runtime.sampler import SamplerState, SamplingParams, sample


def _state(**kw):
    params = SamplingParams(**kw)
    return SamplerState.create(params, [], torch.device("cpu"))


def test_greedy_picks_argmax_and_logprobs_only_on_request():
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0])
    token, lp = sample(logits, _state(temperature=0))
    assert token == 1 and lp is None
    token, lp = sample(logits, _state(temperature=0, logprobs=2))
    assert token == 1 and torch.allclose(lp.exp().sum(), torch.tensor(1.0))


def test_same_seed_same_tokens():
    logits = torch.randn(1000)
    a, b = _state(temperature=1.0, seed=7), _state(temperature=1.0, seed=7)
    assert [sample(logits, a)[0] for _ in range(20)] == [sample(logits, b)[0] for _ in range(20)]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(500)
    best = int(logits.argmax())
    assert all(sample(logits, _state(temperature=1.5, top_k=1, seed=s))[0] == best for s in range(10))
    assert all(sample(logits, _state(temperature=1.5, top_p=1e-6, seed=s))[0] == best for s in range(10))


def test_min_p_excludes_unlikely_tokens():
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    picks = {sample(logits, _state(temperature=1.0, min_p=0.5, seed=s))[0] for s in range(50)}
    assert picks <= {0, 1}


def test_penalties_discourage_repeats():
    logits = torch.tensor([2.0, 1.9, 0.0])
    state = _state(temperature=0, presence_penalty=1.0)
    state.observe(0)
    assert sample(logits, state)[0] == 1
    state = _state(temperature=0, repetition_penalty=2.0)
    state.observe(0)
    assert sample(logits, state)[0] == 1


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0.0), ("top_k", -2), ("max_tokens", 0),
                                         ("min_p", 1.5), ("frequency_penalty", 3.0), ("logprobs", 50)])
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(ArleError, match=field):
        SamplingParams(**{field: value})


def test_stop_checker_finds_earliest_stop_and_holds_back():
    checker = StopChecker(("END", "\n\n"))
    assert checker.find("abc\n\nxyz END") == 3
    assert StopChecker(("END",)).find("no stop here") is None
    assert checker.hold == 2


def test_stop_checker_finds_a_stop_string_split_across_growing_text():
    checker = StopChecker(("STOP", "x"))
    text = ""
    for piece in ["a long ", "answer S", "T", "OP and more"]:
        text += piece
        cut = checker.find(text)
        if cut is not None:
            break
    assert cut == text.index("STOP") == 14 and piece == "OP and more"
    assert StopChecker(()).find("anything") is None
