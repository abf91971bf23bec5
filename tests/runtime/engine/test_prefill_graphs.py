"""Prefill calls through buckets (runtime/prefill_graphs.py), on the CPU.

The cuda executor captures each bucket's padded call in a CUDA graph; here the same
padded call runs without capture on the compiled tiny bundle, so the padding, the slot
layout and the in-step pool writes are checked against the program called on each prompt
alone. The capture itself runs in tests/targets/test_cuda.py (GPU only).
"""

from __future__ import annotations

import pytest
import torch

from arle_runtime.engine import Engine, EngineConfig
from arle_runtime.generate import generate
from arle_runtime.prefill_graphs import PrefillGraphs, pick_bucket, prefill_buckets

from .test_paged_runner import GREEDY, PagedShim, _prompts


def test_buckets_cover_the_chunk_within_the_step_budget_and_the_context():
    fresh = [(1, 16, 0), (2, 16, 0), (4, 16, 0), (1, 32, 0), (2, 32, 0)]
    past = [(r, t, 128) for t in (16, 32) for r in (1, 2)]  # 512 and 2048 leave no room in a context of 160
    assert prefill_buckets(8, 32, 64, 160) == fresh + past
    # a chunk that is not a power of two is a bucket of its own; one row always fits
    assert prefill_buckets(2, 100, 50, 100)[:5] == [(1, 16, 0), (2, 16, 0), (1, 32, 0), (1, 64, 0), (1, 100, 0)]
    buckets = prefill_buckets(64, 512, 2048, 1024)
    assert all(r * t <= 2048 and p + t <= 1024 for r, t, p in buckets)
    assert {p for _, _, p in buckets} == {0, 128, 512}


@pytest.mark.parametrize("rows, width, past, expected", [
    (1, 5, 0, (1, 16, 0)),        # short prompts pad to the smallest bucket
    (3, 128, 0, (4, 128, 0)),     # 512 positions: launch-bound, padding is free
    (5, 128, 0, None),            # 8 x 128 is 1.6x the call's own positions: run it unpadded
    (12, 128, 0, (16, 128, 0)),   # 1.33x
    (1, 300, 0, (1, 512, 0)),     # one row up to 512 always replays
    (1, 600, 0, None),            # no bucket holds it
    (65, 16, 0, None),            # more rows than any bucket
    (1, 20, 32, (1, 32, 128)),    # a prefix-cache hit: the past pads to its bucket
    (2, 100, 300, (2, 128, 512)),
    (3, 16, 32, None),            # more rows with a past than its buckets take
    (1, 16, 900, None),           # a past beyond the largest bucket
])
def test_a_call_takes_the_smallest_bucket_worth_padding_to(rows, width, past, expected):
    assert pick_bucket(prefill_buckets(64, 512, 2048, 1024), rows, width, past) == expected


def _pool(executor, slots: int):
    layers, _, heads, _, dim = executor.cache_shape(1, 1)
    k = torch.zeros(layers, slots + 2, heads, dim, dtype=executor.kv_dtype)
    return k, torch.zeros_like(k)


@pytest.mark.parametrize("starts", [(0, 0, 0), (0, 37, 5)])
def test_a_padded_bucket_call_gives_each_row_its_own_logits_and_kv(engine_session, starts):
    """Three ragged rows in one bucket call, fresh or continuing pasts held in the pool,
    against each row alone through the program with its dense past: logits of its last
    token, and its K/V in exactly its slots (nothing else written but the scratch slot)."""
    ex = engine_session.executor
    k_pool, v_pool = _pool(ex, 160)
    torch.manual_seed(3)
    past_slot_rows = [list(range(100, 100 + n)) for n in starts]  # the rows' pasts, already in the pool
    for old in past_slot_rows:
        k_pool[:, old], v_pool[:, old] = torch.randn_like(k_pool[:, old]), torch.randn_like(v_pool[:, old])
    before_k, before_v = k_pool.clone(), v_pool.clone()
    scratch = 161
    buckets = [(4, 32, 0), (2, 32, 128), (4, 32, 128)]
    graphs = PrefillGraphs(ex.prefill, k_pool, v_pool, scratch, ex.cache_shape, ex.kv_dtype, buckets,
                           use_graphs=False)
    graphs.capture()
    k_pool[:, scratch], v_pool[:, scratch] = before_k[:, scratch], before_v[:, scratch]  # the capture's warm-up
    prompts = _prompts([17, 3, 30], seed=11)
    slot_rows = [list(range(0, 17)), list(range(40, 43)), list(range(60, 90))]
    bucket = graphs.bucket(len(prompts), max(map(len, prompts)), max(starts))
    assert bucket == ((4, 32, 128) if any(starts) else (4, 32, 0))
    with torch.no_grad():
        logits = graphs.run(bucket, prompts, slot_rows, list(starts), past_slot_rows)
    assert logits.shape[0] == 3
    for row, (ids, slots, start, old) in enumerate(zip(prompts, slot_rows, starts, past_slot_rows)):
        n = len(ids)
        past_k = before_k[:, old].permute(0, 2, 1, 3)[:, None].contiguous()  # [L, 1, Hkv, start, D]
        past_v = before_v[:, old].permute(0, 2, 1, 3)[:, None].contiguous()
        with torch.no_grad():
            alone, new_k, new_v = ex.prefill(torch.tensor([ids]), torch.arange(start, start + n)[None], past_k, past_v,
                                             torch.tensor([start]), torch.tensor([n - 1]))
        torch.testing.assert_close(logits[row], alone[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k_pool[:, slots], new_k[:, 0].transpose(1, 2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_pool[:, slots], new_v[:, 0].transpose(1, 2), atol=1e-5, rtol=1e-5)
    written = {s for slots in slot_rows for s in slots} | {scratch}
    untouched = [s for s in range(k_pool.shape[1]) if s not in written]
    assert torch.equal(k_pool[:, untouched], before_k[:, untouched])  # padding went to the scratch slot only
    assert torch.equal(v_pool[:, untouched], before_v[:, untouched])


class BucketShim(PagedShim):
    """The paged shim with the cuda executor's prefill buckets (uncaptured on the CPU)."""

    def bind_kv_pool(self, k, v, scratch_slot):
        super().bind_kv_pool(k, v, scratch_slot)
        self.prefill_graphs = PrefillGraphs(self.prefill, k, v, scratch_slot, self.cache_shape, self.kv_dtype,
                                            prefill_buckets(8, 32, 128, 256), use_graphs=False)
        self.prefill_graphs.capture()
        self.bucket_calls = {"fresh": 0, "past": 0}
        run = self.prefill_graphs.run

        def counted(bucket, *args):
            self.bucket_calls["past" if bucket[2] else "fresh"] += 1
            return run(bucket, *args)

        self.prefill_graphs.run = counted


def test_bucketed_prefill_through_the_engine_equals_the_one_request_loop(engine_session):
    """Fresh prompts, prefix-cache hits and long prompts' later chunks take the buckets
    (pasts up to 128), the rest the program; every greedy token equals the one-request
    loop's."""
    shim = BucketShim(engine_session.executor)
    prefix = _prompts([32], seed=5)[0]
    prompts = _prompts([2, 7, 19, 45, 200], seed=12) + [prefix + p for p in _prompts([1, 9], seed=13)]
    engine = Engine(shim, engine_session.tokenizer, engine_session.bundle.eos_token_ids, EngineConfig(kv_pages=60))
    # one prefixed prompt after the other: the second finds the first's pages in the cache
    results = engine.generate(prompts[:5], GREEDY) + [engine.generate([p], GREEDY)[0] for p in prompts[5:]]
    assert shim.bucket_calls["fresh"] > 0 and shim.bucket_calls["past"] > 0
    assert engine.stats()["kv_pages_in_use"] == 0
    for prompt, result in zip(prompts, results):
        alone = generate(engine_session.executor, engine_session.tokenizer, prompt, GREEDY, ())
        assert result.token_ids == alone.token_ids
