"""Page pool, prefix tree, copy-on-write and eviction, driven directly (no scheduler)."""

from __future__ import annotations

from arle_runtime.engine import PageCopy, PageManager, Sequence
from arle_runtime.sampler import SamplingParams

from .engine_fakes import FakeRunner

PARAMS = SamplingParams(temperature=0.0)


def _seq(tokens) -> Sequence:
    return Sequence(list(tokens), PARAMS)


def _run_prompt(pm: PageManager, seq: Sequence, runner: FakeRunner | None = None) -> list[PageCopy]:
    """Admit and compute the whole prompt, as one prefill step would."""
    copies = pm.try_admit(seq)
    assert copies is not None
    if runner is not None:
        runner.copy(copies)
        runner.write(seq, seq.num_computed, seq.num_uncomputed)
    seq.num_computed = seq.num_tokens
    pm.publish(seq)
    return copies


def test_admission_takes_pages_for_the_whole_prompt_and_release_returns_them():
    pm = PageManager(4, prefix_cache=False)
    seq = _seq(range(20))
    assert pm.try_admit(seq) == []
    assert seq.page_table == [0, 1] and pm.num_in_use == 2 and pm.num_free == 2
    pm.check_invariants([seq])
    seq.num_computed = 20
    pm.release(seq)
    assert seq.page_table == [] and pm.num_free == 4 and pm.num_cached == 0
    pm.check_invariants([])


def test_full_pages_stay_cached_after_release_and_the_partial_page_is_freed():
    pm = PageManager(4)
    seq = _seq(range(20))
    _run_prompt(pm, seq)
    pm.release(seq)
    assert pm.num_cached == 1 and pm.num_evictable == 1 and pm.num_free == 3 and pm.num_in_use == 0
    pm.check_invariants([])


def test_second_request_with_the_same_40_token_prompt_reuses_two_full_pages():
    pm = PageManager(8)
    first = _seq(range(100, 140))
    _run_prompt(pm, first)
    shared = first.page_table[:2]
    pm.release(first)
    assert pm.lookup(list(range(100, 140))) == 32
    before = pm.stats()

    second = _seq(range(100, 140))
    assert pm.try_admit(second) == []
    assert second.page_table[:2] == shared and second.page_table[2] not in shared
    assert second.num_computed == 32 and second.num_cached_tokens == 32
    after = pm.stats()
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 32
    assert after["prefix_lookup_tokens"] - before["prefix_lookup_tokens"] == 40
    pm.check_invariants([second])


def test_a_different_tail_shares_only_the_common_full_pages():
    pm = PageManager(8)
    first = _seq(list(range(16)) + [1] * 24)
    _run_prompt(pm, first)
    pm.release(first)
    assert pm.lookup(list(range(16)) + [2] * 24) == 16


def test_the_last_prompt_token_is_never_cached_its_page_is_copied():
    pm = PageManager(8)
    runner = FakeRunner(pm)
    first = _seq(range(32))
    _run_prompt(pm, first, runner)
    cached_page = first.page_table[1]
    pm.release(first)
    assert pm.lookup(list(range(32))) == 31
    assert pm.lookup(list(range(16))) == 15

    second = _seq(range(32))
    copies = _run_prompt(pm, second, runner)
    # The prompt's last token is recomputed into a private copy of the cached page.
    assert second.num_cached_tokens == 31
    assert copies == [PageCopy(cached_page, copies[0].dst)] and copies[0].dst != cached_page
    assert runner.read(second, 32) == list(range(32))
    pm.check_invariants([second])
    # Once full, the copy duplicates the cached page: the sequence switches back to it.
    assert second.page_table[1] == cached_page and pm.num_in_use == 2
    pm.check_invariants([second])


def test_copy_on_write_of_a_forked_tail_page_leaves_the_shared_page_untouched():
    pm = PageManager(8)
    runner = FakeRunner(pm)
    parent = _seq(range(20))
    _run_prompt(pm, parent, runner)
    child = _seq(range(20))
    pm.fork(parent, child)
    assert child.page_table == parent.page_table
    parent.append(7)
    child.append(9)
    pm.check_invariants([parent, child])

    shared_tail = child.page_table[1]
    assert pm.pages_needed(child, 21) == 1
    copies = pm.prepare(child, 21)
    assert copies == [PageCopy(shared_tail, child.page_table[1])]
    runner.copy(copies)
    runner.write(child, 20, 1)
    assert runner.read(child, 21) == list(range(20)) + [9]
    assert runner.kv.view(-1, 16)[shared_tail].tolist() == list(range(16, 20)) + [-1] * 12

    # The parent now owns its tail alone and writes in place.
    assert pm.prepare(parent, 21) == [] and parent.page_table[1] == shared_tail
    pm.check_invariants([parent, child])


def test_eviction_takes_the_least_recently_used_leaf_first():
    pm = PageManager(8)
    old, recent = list(range(33)), list(range(200, 233))
    for prompt in (old, recent, old[:32] + [5]):  # the third request touches `old` again
        seq = _seq(prompt)
        _run_prompt(pm, seq)
        pm.release(seq)
    recent_pages = pm.lookup(recent)
    assert pm.lookup(old) == 32 and recent_pages == 32 and pm.num_free == 4

    # 5 fresh pages with 4 free: one cached page must go, the leaf of the older prefix.
    big = _seq(range(300, 380))
    assert pm.try_admit(big) == []
    assert pm.num_evicted == 1
    assert pm.lookup(old) == 32 and pm.lookup(recent) == 16
    pm.check_invariants([big])


def test_admission_fails_cleanly_when_pages_are_short():
    pm = PageManager(3)
    holder = _seq(range(40))
    assert pm.try_admit(holder) == []
    stats = pm.stats()
    assert pm.try_admit(_seq(range(50, 70))) is None
    assert pm.stats() == stats
    pm.check_invariants([holder])


def test_a_prompt_that_fills_the_pool_is_readmitted_from_cache_without_a_copy():
    pm = PageManager(2)
    seq = _seq(range(32))
    _run_prompt(pm, seq)
    pm.release(seq)
    again = _seq(range(32))
    # Copying the last page would need a third page; recomputing its 16 tokens fits.
    assert pm.try_admit(again) == []
    assert again.num_computed == 16
    pm.check_invariants([again])


def test_identical_pages_computed_side_by_side_are_kept_once():
    pm = PageManager(8)
    a, b = _seq(range(40)), _seq(range(40))
    assert pm.try_admit(a) == [] and pm.try_admit(b) == []
    assert pm.num_in_use == 6
    for seq in (a, b):
        seq.num_computed = 40
        pm.publish(seq)
    assert b.page_table[:2] == a.page_table[:2] and pm.num_in_use == 4
    pm.check_invariants([a, b])


def test_hot_prefix_reuse_does_not_grow_the_lru_heap_without_bound():
    pm = PageManager(8)
    for _ in range(500):
        seq = _seq(range(40))
        _run_prompt(pm, seq)
        pm.release(seq)
    assert len(pm._heap) <= 2 * pm.num_cached + 65
    pm.check_invariants([])
