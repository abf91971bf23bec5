"""The engine's compiled test model: the shared random-weight tiny Llama, built once per
session with room for batching (8 sequences, 256 positions, prefill chunks of 32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import build_bundle


@pytest.fixture(scope="session")
def engine_bundle(bundle_dir, tiny_hf_model) -> Path:
    return build_bundle(bundle_dir, "engine-tiny-fp32", "--model", str(tiny_hf_model), "--quant", "fp32",
                        "--max-batch", "8", "--max-prefill-tokens", "32", "--max-context", "256")


@pytest.fixture(scope="session")
def engine_session(engine_bundle):
    """The loaded bundle (executor, tokenizer); tests make their own engines over it."""
    from arle_runtime.session import Session

    return Session.open(engine_bundle)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: the tiny model gains nothing from two, and on a shared
    2-core machine a spinning second OpenMP thread made a test 100x slower (measured: 0.3 s -> 34 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
