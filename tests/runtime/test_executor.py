"""The executor enforces the manifest's shape ranges (AOTInductor does not) and the
compiled step handles ragged batches: each row equals that sequence run alone."""

from __future__ import annotations

import pytest
import torch

from arle_runtime.bundle import load_bundle
from arle_runtime.errors import ArleError
from arle_runtime.executor import load_executor
from arle_runtime.generate import prefill


@pytest.fixture(scope="module")
def executor(tiny_bundle):
    return load_executor(load_bundle(tiny_bundle))


def _cache(ex, batch, length):
    return torch.zeros(ex.cache_shape(batch, length), dtype=ex.kv_dtype)


def _args(ex, batch, tokens, past):
    k = _cache(ex, batch, past)
    return (torch.ones(batch, tokens, dtype=torch.long), torch.zeros(batch, tokens, dtype=torch.long), k, k.clone(),
            torch.full((batch,), past, dtype=torch.long), torch.zeros(batch, dtype=torch.long))


def test_rejects_batch_above_max(executor):
    with pytest.raises(ArleError, match="batch of 5"):
        executor.decode(*_args(executor, 5, 1, 3))


def test_rejects_prefill_chunk_above_max(executor):
    with pytest.raises(ArleError, match="prefill chunk of 33"):
        executor.prefill(*_args(executor, 1, 33, 0))


def test_rejects_context_overflow(executor):
    with pytest.raises(ArleError, match="context of 64"):
        executor.decode(*_args(executor, 1, 1, 64))


def test_decode_rejects_multiple_tokens(executor):
    with pytest.raises(ArleError, match="one token"):
        executor.decode(*_args(executor, 1, 2, 3))


def test_ragged_batch_rows_match_single_sequences(executor):
    prompts = [[5, 9, 200, 31, 7, 8, 1000], [42, 17, 3]]
    singles = [prefill(executor, p) for p in prompts]
    # Batch the next decode step: pad the shorter cache to the longer one, mask by past_lens.
    P = max(len(p) for p in prompts)
    k = _cache(executor, 2, P)
    v = torch.zeros_like(k)
    for row, (_, sk, sv) in enumerate(singles):
        k[:, row, :, : sk.shape[3]] = sk[:, 0]
        v[:, row, :, : sv.shape[3]] = sv[:, 0]
    next_tokens = torch.tensor([[int(s[0].argmax())] for s in singles])
    lens = torch.tensor([len(p) for p in prompts])
    logits, _, _ = executor.decode(next_tokens, lens[:, None], k, v, lens, torch.zeros(2, dtype=torch.long))
    for row, (_, sk, sv) in enumerate(singles):
        alone, _, _ = executor.decode(next_tokens[row : row + 1], lens[row : row + 1, None], sk, sv,
                                      lens[row : row + 1], torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(logits[row], alone[0], atol=1e-4, rtol=1e-4)
