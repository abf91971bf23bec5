"""Executors run a bundle's compiled step programs; one per target kind.

Contract (see arle_models.layers): step(tokens, positions, past_k, past_v, past_lens,
last_index) -> (logits[B,V] float32, new_k, new_v). Executors enforce the shape ranges
in the manifest themselves: AOTInductor does not check them, and an out-of-range call
runs silently into wrong memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from .bundle import Bundle
from .errors import ArleError


@dataclass(frozen=True)
class StepLimits:
    max_batch: int
    max_prefill_tokens: int
    max_context: int


class Executor(Protocol):
    limits: StepLimits
    kv_dtype: torch.dtype
    device: torch.device

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]: ...

    def prefill(self, tokens, positions, past_k, past_v, past_lens, last_index): ...

    def decode(self, tokens, positions, past_k, past_v, past_lens, last_index): ...


def check_step(limits: StepLimits, tokens: torch.Tensor, past_k: torch.Tensor, decode: bool) -> None:
    batch, new = tokens.shape
    past = past_k.shape[3]
    if not 1 <= batch <= limits.max_batch:
        raise ArleError(f"A batch of {batch} is outside this bundle's range 1..{limits.max_batch}.")
    if decode and new != 1:
        raise ArleError(f"The decode step takes one token per sequence, got {new}.")
    if not 1 <= new <= limits.max_prefill_tokens:
        raise ArleError(f"A prefill chunk of {new} tokens is outside this bundle's range 1..{limits.max_prefill_tokens}.")
    if past + new > limits.max_context:
        raise ArleError(
            f"The sequence would reach {past + new} tokens, past this bundle's context of {limits.max_context}."
        )


class AotiExecutor:
    """Runs AOTInductor packages built by the cpu target; weights come from the bundle mmap."""

    def __init__(self, bundle: Bundle):
        programs = bundle.manifest["programs"]
        buckets = bundle.manifest["buckets"]
        self.limits = StepLimits(buckets["max_batch"], buckets["max_prefill_tokens"], buckets["max_context"])
        self.kv_dtype = getattr(torch, bundle.manifest["kv_cache"]["dtype"])
        self.device = torch.device("cpu")
        weights = bundle.weights
        self._programs = {}
        for name in ("prefill", "decode"):
            package = torch._inductor.aoti_load_package(str(bundle.root / programs[name]["path"]))
            needed = package.get_constant_fqns()
            missing = [n for n in needed if n not in weights]
            if missing:
                raise ArleError(f"Bundle {bundle.root} lacks the weight {missing[0]} its {name} program needs.")
            # user_managed: the program reads our mmapped tensors in place, no copy.
            package.load_constants({n: weights[n] for n in needed}, check_full_update=True, user_managed=True)
            self._programs[name] = package
        self._weights = weights  # keep the mmapped tensors alive
        cfg = bundle.config
        self._cache_dims = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        layers, heads, dim = self._cache_dims
        return (layers, batch, heads, length, dim)

    def prefill(self, tokens, positions, past_k, past_v, past_lens, last_index):
        check_step(self.limits, tokens, past_k, decode=False)
        return self._programs["prefill"](tokens, positions, past_k, past_v, past_lens, last_index)

    def decode(self, tokens, positions, past_k, past_v, past_lens, last_index):
        check_step(self.limits, tokens, past_k, decode=True)
        return self._programs["decode"](tokens, positions, past_k, past_v, past_lens, last_index)


def load_executor(bundle: Bundle) -> Executor:
    kind = bundle.manifest["target"].get("executor")
    if kind == "aoti":
        threads = os.environ.get("ARLE_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        return AotiExecutor(bundle)
    raise ArleError(f"Bundle {bundle.root} needs the {kind!r} executor, which this runtime does not have.")
