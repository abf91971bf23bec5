"""The model runner over the compiled tiny bundle: page copies, the padded gather, pool
sizing, and decode batches split at the executor's max_batch."""

from __future__ import annotations

import pytest
import torch

from arle_runtime.engine import Engine, EngineConfig, ModelRunner, PageCopy, PageManager, Sequence, pool_pages
from arle_runtime.errors import ArleError
from arle_runtime.generate import generate
from arle_runtime.sampler import SamplingParams


@pytest.fixture
def runner(engine_session):
    return ModelRunner(engine_session.executor, PageManager(8))


def _fill(runner):
    """Every slot's K holds its slot number, V its negation (all layers, heads, dims)."""
    slots = torch.arange(runner.num_slots, dtype=runner.k.dtype)
    runner.k[:, : runner.num_slots] = slots[None, :, None, None]
    runner.v[:, : runner.num_slots] = -slots[None, :, None, None]


def test_a_page_copy_copies_all_sixteen_slots_and_reads_sources_before_writing(runner):
    _fill(runner)
    # Page 2 is copied to 5 and, in the same step, overwritten by page 1's copy.
    runner.copy_pages([PageCopy(2, 5), PageCopy(1, 2)])
    k = runner.k[0, :, 0, 0]
    assert k[80:96].tolist() == list(range(32, 48))
    assert k[32:48].tolist() == list(range(16, 32))
    assert runner.v[1, 80:96, 1, 3].tolist() == [-x for x in range(32, 48)]
    assert k[0:16].tolist() == list(range(16))  # untouched


def test_gather_builds_a_padded_past_in_the_step_layout(runner):
    _fill(runner)
    a, b = Sequence(list(range(20)), SamplingParams()), Sequence(list(range(5)), SamplingParams())
    a.page_table, b.page_table = [6, 1], [3]
    k, v = runner.gather([a, b], [20, 5])
    lay = runner.layout
    assert k.shape == v.shape == (lay.num_layers, 2, lay.num_kv_heads, 20, lay.head_dim)
    assert k.is_contiguous() and v.is_contiguous()  # the compiled steps assume dense inputs
    assert k[1, 0, 1, :, 0].tolist() == list(range(96, 112)) + list(range(16, 20))
    assert k[0, 1, 0, :, 2].tolist() == [48, 49, 50, 51, 52] + [0] * 15  # padding is the zero slot
    assert v[0, 1, 1, :5, 0].tolist() == [-48, -49, -50, -51, -52]


def test_pool_size_defaults_to_max_batch_full_contexts_capped_by_memory(engine_session):
    ex = engine_session.executor
    per_context = 256 // 16
    assert pool_pages(ex, 16) == ex.limits.max_batch * per_context
    # A tiny budget still leaves room for one full-context sequence.
    assert pool_pages(ex, 16, kv_memory_bytes=1) == per_context
    assert pool_pages(ex, 16, kv_pages=5) == 5
    with pytest.raises(ArleError, match="kv_pages"):
        pool_pages(ex, 16, kv_pages=0)


class _Recorder:
    """An executor that counts the batch sizes of decode calls."""

    def __init__(self, executor):
        self._executor = executor
        self.decode_batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self._executor, name)

    def decode(self, tokens, *args):
        self.decode_batches.append(tokens.shape[0])
        return self._executor.decode(tokens, *args)


def test_a_decode_batch_above_the_bundles_max_batch_is_split_and_rows_stay_exact(engine_session):
    ex = engine_session.executor
    engine = Engine(ex, engine_session.tokenizer, (), EngineConfig(max_batch=11, max_num_batched_tokens=200))
    recorder = _Recorder(ex)
    engine.runner.executor = recorder
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[100 + 7 * i + j for j in range(3 + i)] for i in range(11)]
    results = engine.generate(prompts, params)
    assert max(recorder.decode_batches) == ex.limits.max_batch == 8
    assert 3 in recorder.decode_batches  # 11 running sequences: calls of 8 and 3
    for prompt, result in zip(prompts, results):
        assert result.token_ids == generate(ex, engine_session.tokenizer, prompt, params).token_ids


def _chunk(start: int, length: int, seed: int = 0):
    from arle_runtime.engine import PrefillChunk

    seq = Sequence([(seed * 7919 + i * 31) % 4000 + 100 for i in range(start + length)], SamplingParams())
    return PrefillChunk(seq, start, length)


def test_prefill_groups_share_a_call_within_batch_context_and_padding_limits():
    from arle_runtime.engine.model_runner import prefill_groups
    from arle_runtime.executor import StepLimits

    limits = StepLimits(max_batch=3, max_prefill_tokens=32, max_context=64)
    gpu = 1.25  # the cuda executor's padding limit
    same = [_chunk(0, 30), _chunk(0, 28), _chunk(0, 29)]
    assert [len(g) for g in prefill_groups(same, limits, gpu)] == [3]
    # A fourth row is past max_batch; a short chunk beside long ones would pad too much.
    assert [len(g) for g in prefill_groups(same + [_chunk(0, 30)], limits, gpu)] == [3, 1]
    assert [[c.length for c in g] for g in prefill_groups([_chunk(0, 30), _chunk(0, 4)], limits, gpu)] == [[30], [4]]
    # Longest past + longest chunk must stay inside the context, whatever the rows are alone.
    assert len(prefill_groups([_chunk(40, 20), _chunk(0, 30)], limits, gpu)) == 2
    # No padding allowed (the CPU's limit): only equal rows share a call.
    assert [len(g) for g in prefill_groups(same + [_chunk(0, 30)], limits)] == [2, 1, 1]
    # Hybrid models (equal_lengths): padding would run through the recurrent state.
    assert len(prefill_groups([_chunk(0, 30), _chunk(0, 29)], limits, gpu, equal_lengths=True)) == 2
    assert len(prefill_groups([_chunk(0, 30), _chunk(0, 30)], limits, gpu, equal_lengths=True)) == 1


def test_a_padded_prefill_group_gives_each_chunk_the_logits_and_kv_of_running_it_alone(engine_session):
    def run(groups):
        pages = PageManager(32)
        runner = ModelRunner(engine_session.executor, pages)
        chunks = [_chunk(0, 20, seed=1), _chunk(0, 18, seed=2), _chunk(16, 17, seed=3)]
        for c in chunks:
            c.seq.page_table = [pages._allocate() for _ in range(pages.pages_for(c.start + c.length))]
        runner.k.normal_(), runner.v.normal_()  # the third chunk's first 16 positions are its past
        runner.k[:, runner.pad_slot] = runner.v[:, runner.pad_slot] = 0
        logits = [runner._prefill([chunks[i] for i in g]) for g in groups]
        slots = torch.tensor([s for c in chunks for s in pages.slots(c.seq, c.start, c.length)])
        return logits, runner.k[:, slots], runner.v[:, slots]

    torch.manual_seed(0)
    alone = run([[0], [1], [2]])
    torch.manual_seed(0)
    together = run([[0, 1, 2]])  # one call, rows padded to 16 past + 20 new positions
    torch.testing.assert_close(torch.cat(alone[0]), together[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone[1], together[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone[2], together[2], rtol=1e-4, atol=1e-4)
