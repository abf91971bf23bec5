"""Fresh prompts' prefill through buckets (runtime/prefill_graphs.py), on the CPU.

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


def test_buckets_cover_the_chunk_within_the_step_budget():
    assert prefill_buckets(8, 32, 64) == [(1, 16), (2, 16), (4, 16), (1, 32), (2, 32)]
    # a chunk that is not a power of two is a bucket of its own; one row always fits
    assert prefill_buckets(2, 100, 50) == [(1, 16), (2, 16), (1, 32), (1, 64), (1, 100)]
    assert all(r * t <= 2048 for r, t in prefill_buckets(64, 512, 2048))


@pytest.mark.parametrize("rows, width, expected", [
    (1, 5, (1, 16)),        # short prompts pad to the smallest bucket
    (3, 128, (4, 128)),     # 512 positions: launch-bound, padding is free
    (5, 128, None),         # 8 x 128 is 1.6x the call's own positions: run it unpadded
    (12, 128, (16, 128)),   # 1.33x
    (1, 300, (1, 512)),     # one row up to 512 always replays
    (1, 600, None),         # no bucket holds it
    (65, 16, None),         # more rows than any bucket
])
def test_a_call_takes_the_smallest_bucket_worth_padding_to(rows, width, expected):
    assert pick_bucket(prefill_buckets(64, 512, 2048), rows, width) == expected


def _pool(executor, slots: int):
    layers, _, heads, _, dim = executor.cache_shape(1, 1)
    k = torch.zeros(layers, slots + 2, heads, dim, dtype=executor.kv_dtype)
    return k, torch.zeros_like(k)


def test_a_padded_bucket_call_gives_each_prompt_its_own_logits_and_kv(engine_session):
    """Three ragged prompts in the (4, 32) bucket against each prompt alone through the
    program: logits of its last token, and its K/V in exactly its slots."""
    ex = engine_session.executor
    k_pool, v_pool = _pool(ex, 128)
    scratch = 129
    graphs = PrefillGraphs(ex.prefill, k_pool, v_pool, scratch, ex.cache_shape, ex.kv_dtype,
                           prefill_buckets(8, 32, 128), use_graphs=False)
    graphs.capture()
    prompts = _prompts([17, 3, 30], seed=11)
    slot_rows = [list(range(0, 17)), list(range(40, 43)), list(range(60, 90))]
    bucket = graphs.bucket(len(prompts), max(map(len, prompts)))
    assert bucket == (4, 32)
    with torch.no_grad():
        logits = graphs.run(bucket, prompts, slot_rows)
    assert logits.shape[0] == 3
    for row, (ids, slots) in enumerate(zip(prompts, slot_rows)):
        n = len(ids)
        empty = torch.zeros(ex.cache_shape(1, 0), dtype=ex.kv_dtype)
        with torch.no_grad():
            alone, new_k, new_v = ex.prefill(torch.tensor([ids]), torch.arange(n)[None], empty, empty,
                                             torch.zeros(1, dtype=torch.long), torch.tensor([n - 1]))
        torch.testing.assert_close(logits[row], alone[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k_pool[:, slots], new_k[:, 0].transpose(1, 2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_pool[:, slots], new_v[:, 0].transpose(1, 2), atol=1e-5, rtol=1e-5)
    written = sorted(s for slots in slot_rows for s in slots) + [scratch]
    untouched = [s for s in range(k_pool.shape[1]) if s not in written]
    assert not k_pool[:, untouched].any() and not v_pool[:, untouched].any()  # padding went to the scratch slot only


class BucketShim(PagedShim):
    """The paged shim with the cuda executor's prefill buckets (uncaptured on the CPU)."""

    def bind_kv_pool(self, k, v, scratch_slot):
        super().bind_kv_pool(k, v, scratch_slot)
        self.prefill_graphs = PrefillGraphs(self.prefill, k, v, scratch_slot, self.cache_shape, self.kv_dtype,
                                            prefill_buckets(8, 32, 128), use_graphs=False)
        self.prefill_graphs.capture()
        self.bucket_calls = 0
        run = self.prefill_graphs.run

        def counted(*args):
            self.bucket_calls += 1
            return run(*args)

        self.prefill_graphs.run = counted


def test_bucketed_prefill_through_the_engine_equals_the_one_request_loop(engine_session):
    """Fresh prompts take the buckets, prefix-cache hits and long prompts' later chunks the
    program; every greedy token equals the one-request loop's."""
    shim = BucketShim(engine_session.executor)
    prefix = _prompts([32], seed=5)[0]
    prompts = _prompts([2, 7, 19, 45], seed=12) + [prefix + p for p in _prompts([1, 9], seed=13)]
    engine = Engine(shim, engine_session.tokenizer, engine_session.bundle.eos_token_ids, EngineConfig(kv_pages=40))
    results = engine.generate(prompts, GREEDY)
    assert shim.bucket_calls > 0 and engine.stats()["kv_pages_in_use"] == 0
    for prompt, result in zip(prompts, results):
        alone = generate(engine_session.executor, engine_session.tokenizer, prompt, GREEDY, ())
        assert result.token_ids == alone.token_ids
