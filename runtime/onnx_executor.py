"""Runs the ONNX step programs of an onnx bundle with onnxruntime (CPU execution provider).

onnxruntime is imported only here, and only when an onnx bundle is loaded: the serving
image of the other targets does not need it. Inputs and outputs cross as raw pointers
through IOBinding: onnxruntime reads the engine's torch tensors in place and writes its
outputs into torch tensors allocated here, so no step copies a tensor.
"""

from __future__ import annotations

import torch

from .bundle import Bundle
from .errors import ArleError
from .executor import StepLimits, check_step

NUMPY_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}
INPUT_NAMES = ("tokens", "positions", "past_k", "past_v", "past_lens", "last_index")  # targets/onnx.py
OUTPUT_NAMES = ("logits", "new_k", "new_v")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ArleError("This bundle runs on onnxruntime, which is not installed; pip install onnxruntime.") from None
    return onnxruntime


class OnnxExecutor:
    """Same contract as AotiExecutor: limits, kv_dtype, device, cache_shape, prefill, decode."""

    program_names = ("prefill", "decode")

    def __init__(self, bundle: Bundle, threads: int | None = None):
        ort = import_onnxruntime()
        import numpy as np

        self._np = np
        buckets = bundle.manifest["buckets"]
        self.limits = StepLimits(buckets["max_batch"], buckets["max_prefill_tokens"], buckets["max_context"])
        self.kv_dtype = getattr(torch, bundle.manifest["kv_cache"]["dtype"])
        self.device = torch.device("cpu")
        cfg = bundle.config
        self._cache_dims = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        self._vocab = cfg.vocab_size
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default, one per physical core
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions = {}
        for name in self.program_names:
            path = bundle.root / bundle.manifest["programs"][name]["path"]
            try:
                self._sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
                raise ArleError(f"onnxruntime could not load {path.name} of bundle {bundle.root} ({e}); rebuild it.") from None

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        layers, heads, dim = self._cache_dims
        return (layers, batch, heads, length, dim)

    def _run(self, program, tokens, positions, past_k, past_v, past_lens, last_index):
        inputs = [t.contiguous() for t in (tokens, positions, past_k, past_v, past_lens, last_index)]
        batch, new = tokens.shape
        logits = torch.empty(batch, self._vocab, dtype=torch.float32)
        new_k = torch.empty(self.cache_shape(batch, new), dtype=self.kv_dtype)
        new_v = torch.empty_like(new_k)
        session = self._sessions[program]
        binding = session.io_binding()
        np = self._np
        for name, t in zip(INPUT_NAMES, inputs):
            binding.bind_input(name, "cpu", 0, np.dtype(NUMPY_DTYPES[t.dtype]), tuple(t.shape), t.data_ptr())
        for name, t in zip(OUTPUT_NAMES, (logits, new_k, new_v)):
            binding.bind_output(name, "cpu", 0, np.dtype(NUMPY_DTYPES[t.dtype]), tuple(t.shape), t.data_ptr())
        session.run_with_iobinding(binding)
        return logits, new_k, new_v

    def prefill(self, tokens, positions, past_k, past_v, past_lens, last_index):
        check_step(self.limits, tokens, past_k, decode=False)
        return self._run("prefill", tokens, positions, past_k, past_v, past_lens, last_index)

    def decode(self, tokens, positions, past_k, past_v, past_lens, last_index):
        check_step(self.limits, tokens, past_k, decode=True)
        return self._run("decode", tokens, positions, past_k, past_v, past_lens, last_index)
