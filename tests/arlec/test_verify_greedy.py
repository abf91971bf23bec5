"""`arlec verify`'s greedy rule: equal tokens, or equal up to a tie at the compute precision."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from arlec.inspect_bundle import greedy_agrees

REFERENCE = [5, 9, 2, 7]


def test_equal_tokens_agree_without_a_note():
    assert greedy_agrees(list(REFERENCE), REFERENCE, [1.0, 1.0, 1.0, 1.0], 0.3) == (True, "")


def test_a_split_at_a_near_tie_agrees_and_says_where():
    ok, note = greedy_agrees([5, 9, 4, 1], REFERENCE, [1.0, 1.0, 0.0, 1.0], 0.3)
    assert ok and "token 2" in note and "tie" in note


def test_a_split_where_the_reference_was_decisive_fails():
    ok, note = greedy_agrees([5, 9, 4, 1], REFERENCE, [1.0, 1.0, 0.5, 0.0], 0.3)
    assert not ok and "first difference at token 2" in note and "0.5" in note


def test_without_stored_margins_only_equal_tokens_pass():
    assert not greedy_agrees([5, 9, 4, 1], REFERENCE, None, 0.3)[0]


def test_a_shorter_continuation_never_agrees():
    assert not greedy_agrees([5, 9], REFERENCE, [0.0, 0.0, 0.0, 0.0], 0.3)[0]


def test_the_build_stores_each_greedy_steps_margin(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    ref = load_file(str(tiny_bundle / manifest["reference"]["path"]))
    margins = ref["greedy_margins"]
    assert margins.shape == ref["greedy_ids"].shape and bool((margins >= 0).all())
    assert float(margins.max()) > 0
