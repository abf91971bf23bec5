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
from torch.utils import _pytree as pytree

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


class AotiProgram:
    """A loaded AOTInductor package, called like torch's AOTICompiledModel.

    torch's own wrapper lives in torch.export.pt2_archive, whose import pulls in the export
    serializer, dynamo and sympy: 2.3 s of a 5.8 s cold start of the default bundle on the
    CPU machine. It also parses the call's input/output tree specs on every call; here they
    are parsed once."""

    def __init__(self, loader):
        self.loader = loader
        self._out_spec = pytree.treespec_loads(loader.get_call_spec()[1])

    def __call__(self, *args):
        flat = [x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)]
        return pytree.tree_unflatten(self.loader.boxed_run(flat), self._out_spec)

    def get_constant_fqns(self) -> list[str]:
        return self.loader.get_constant_fqns()

    def load_constants(self, constants: dict[str, torch.Tensor], *, check_full_update: bool,
                       user_managed: bool = False) -> None:
        self.loader.load_constants(constants, False, check_full_update, user_managed)


def load_aoti_package(path: str, device_index: int = -1, single_threaded: bool = False) -> AotiProgram:
    """Load an AOTInductor .pt2 without torch's Python wrapper (aoti_load_package).

    The wrapper only compares the package's recorded device facts with this machine's to
    log a warning, and to get this machine's CPU vector ISA it compiles and runs small C++
    probe programs: tens of seconds on a cold start (measured 36+ s on the H200 machine)
    and C++ sources in the Inductor cache, which a load must not need. The runtime checks
    compatibility from the manifest instead (runtime/bundle.py).
    """
    loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", single_threaded, 1, device_index)
    return AotiProgram(loader)


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


def load_programs(bundle: Bundle, names, weights: dict[str, torch.Tensor], device_index: int = -1,
                  single_threaded: bool = False) -> dict:
    """The named AOTInductor programs, each handed the weights it reads (by reference)."""
    programs = {}
    for name in names:
        entry = bundle.manifest["programs"][name]
        package = load_aoti_package(str(bundle.root / entry["path"]), device_index, single_threaded)
        prefix = entry.get("constant_prefix", "")
        needed = {n: n.removeprefix(prefix) for n in package.get_constant_fqns()}
        missing = [n for n in needed.values() if n not in weights]
        if missing:
            raise ArleError(f"Bundle {bundle.root} lacks the weight {missing[0]} its {name} program needs.")
        # user_managed: the program reads our tensors in place, no copy.
        package.load_constants({n: weights[w] for n, w in needed.items()}, check_full_update=True, user_managed=True)
        programs[name] = package
    return programs


class AotiExecutor:
    """Runs AOTInductor packages built by the cpu target; weights come from the bundle mmap."""

    program_names = ("prefill", "decode")
    dense_decode_program = "decode"

    def __init__(self, bundle: Bundle, device: torch.device = torch.device("cpu"), weights=None,
                 single_threaded: bool = False):
        buckets = bundle.manifest["buckets"]
        self.limits = StepLimits(buckets["max_batch"], buckets["max_prefill_tokens"], buckets["max_context"])
        self.kv_dtype = getattr(torch, bundle.manifest["kv_cache"]["dtype"])
        self.compute_dtype = getattr(torch, bundle.manifest["quantization"]["compute_dtype"])  # the programs' past
        self.device = device
        self._weights = bundle.weights if weights is None else weights  # kept alive: the programs read them
        index = -1 if device.index is None else device.index
        self._programs = load_programs(bundle, self.program_names, self._weights, index, single_threaded)
        cfg = bundle.config
        self.config = cfg
        self._cache_dims = (len(cfg.full_attention_layers), cfg.num_kv_heads, cfg.head_dim)

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        layers, heads, dim = self._cache_dims
        return (layers, batch, heads, length, dim)

    def empty_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Zero per-sequence state beyond the KV cache, the programs' trailing inputs and
        outputs: (conv_state, recurrent_state) of a hybrid model's linear-attention
        layers (arle_models.qwen3_5), nothing for the others."""
        if not self.config.is_hybrid:
            return ()
        from arle_models.qwen3_5 import linear_state

        return linear_state(self.config, batch, self.compute_dtype, self.device)

    def prefill(self, tokens, positions, past_k, past_v, past_lens, last_index, *state):
        check_step(self.limits, tokens, past_k, decode=False)
        return self._programs["prefill"](tokens, positions, past_k, past_v, past_lens, last_index, *state)

    def decode(self, tokens, positions, past_k, past_v, past_lens, last_index, *state):
        check_step(self.limits, tokens, past_k, decode=True)
        return self._programs[self.dense_decode_program](
            tokens, positions, past_k, past_v, past_lens, last_index, *state
        )


def load_executor(bundle: Bundle) -> Executor:
    tp = bundle.manifest.get("tensor_parallel")
    if tp and tp.get("size", 1) > 1 and "rank" not in tp:  # the whole bundle: one process per rank
        from .tensor_parallel import launch

        return launch(bundle)
    kind = bundle.manifest["target"].get("executor")
    if kind == "aoti":
        threads = os.environ.get("ARLE_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        return AotiExecutor(bundle)
    if kind == "onnxruntime":
        from .onnx_executor import OnnxExecutor

        threads = os.environ.get("ARLE_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        return OnnxExecutor(bundle, threads=int(threads) if threads else None)
    if kind == "tvm":
        from .tvm_executor import TvmExecutor

        threads = os.environ.get("ARLE_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        return TvmExecutor(bundle, threads=int(threads) if threads else None)
    if kind == "aoti-cuda":
        from .cuda_executor import CudaGraphExecutor

        return CudaGraphExecutor(bundle)
    raise ArleError(f"Bundle {bundle.root} needs the {kind!r} executor, which this runtime does not have.")
