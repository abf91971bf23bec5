"""Runs a metal bundle's TVM Relax step programs: Metal on Apple silicon, else the llvm build.

TVM is imported only here, and only when a metal bundle is loaded. Weights are the
bundle's mmapped safetensors, handed to every call by DLPack (no copy on CPU).

The Metal path is written against TVM 0.27's runtime API and has NOT been run: no Apple
hardware exists where arle is built and tested (docs/metal.md). What is run and verified
here is the llvm path: the same Relax module compiled for this CPU.
On macOS the bundle's arm64 objects are linked once into a dylib with the system
toolchain (`cc`, Xcode's command line tools) and cached under ~/.cache/arle/metal.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch

from .bundle import Bundle
from .errors import ArleError
from .executor import StepLimits, check_step

ALIGNMENT = 64  # TVM refuses DLPack tensors whose data is not 64-byte aligned


def import_tvm(threads: int | None):
    if threads:
        os.environ.setdefault("TVM_NUM_THREADS", str(threads))  # read when TVM's pool starts
    try:
        import tvm
    except ImportError:
        raise ArleError("This bundle runs on Apache TVM, which is not installed; pip install 'arle[metal]'.") from None
    return tvm


def on_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


def link_metal_program(bundle: Bundle, entry: dict) -> str:
    """The program's arm64 objects linked into a cached dylib (macOS only; not run here)."""
    from tvm.support import cc

    folder = bundle.root / entry["path"]
    objects = [str(folder / name) for name in entry["objects"]]
    key = hashlib.sha256(b"".join(Path(o).read_bytes() for o in objects)).hexdigest()[:16]
    cache = Path(os.environ.get("ARLE_CACHE", Path.home() / ".cache" / "arle")) / "metal"
    cache.mkdir(parents=True, exist_ok=True)
    dylib = cache / f"{key}.dylib"
    if not dylib.is_file():
        tmp = dylib.with_suffix(f".{os.getpid()}.tmp")
        try:
            cc.create_shared(str(tmp), objects, options=["-framework", "Metal", "-framework", "Foundation"])
        except Exception as e:  # the toolchain's own error text
            raise ArleError(f"Could not link the Metal program of bundle {bundle.root} ({e}); "
                            "install Xcode's command line tools (xcode-select --install).") from None
        os.replace(tmp, dylib)
    return str(dylib)


class TvmExecutor:
    """Same contract as AotiExecutor: limits, kv_dtype, device, cache_shape, prefill, decode."""

    program_names = ("prefill", "decode")

    def __init__(self, bundle: Bundle, threads: int | None = None, variant: str | None = None):
        tvm = import_tvm(threads)
        from tvm import relax

        self.variant = variant or ("metal" if on_apple_silicon() else "llvm")
        buckets = bundle.manifest["buckets"]
        self.limits = StepLimits(buckets["max_batch"], buckets["max_prefill_tokens"], buckets["max_context"])
        self.kv_dtype = getattr(torch, bundle.manifest["kv_cache"]["dtype"])
        self.compute_dtype = getattr(torch, bundle.manifest["quantization"]["compute_dtype"])
        self.device = torch.device("cpu")  # the engine's tensors; the Metal path copies per step
        self.config = cfg = bundle.config
        self._cache_dims = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        self._tvm = tvm
        self._dev = tvm.metal() if self.variant == "metal" else tvm.cpu()
        weights = bundle.weights
        self._steps, self._params = {}, {}
        for name in self.program_names:
            entry = bundle.manifest["programs"][name]
            try:
                if self.variant == "metal":
                    lib = tvm.runtime.load_module(link_metal_program(bundle, entry))
                else:
                    lib = tvm.runtime.load_module(str(bundle.root / entry["llvm"]["path"]))
                self._steps[name] = relax.VirtualMachine(lib, self._dev)["main"]
            except ArleError:
                raise
            except Exception as e:  # TVM raises its own error types
                raise ArleError(f"TVM could not load the {name} program of bundle {bundle.root} ({e}); "
                                "rebuild it with this apache-tvm.") from None
            missing = [n for n in entry["params"] if n not in weights]
            if missing:
                raise ArleError(f"Bundle {bundle.root} lacks the weight {missing[0]} its {name} program needs.")
            self._params[name] = [self._to_device(weights[n]) for n in entry["params"]]

    def _to_device(self, t: torch.Tensor):
        if t.numel() == 0:  # torch strides an empty tensor unlike TVM's compact check: make TVM's own
            return self._tvm.runtime.empty(tuple(t.shape), str(t.dtype).removeprefix("torch."), self._dev)
        if self.variant == "metal":
            return self._tvm.runtime.tensor(t.contiguous().numpy(), self._dev)
        return self._tvm.runtime.from_dlpack(aligned(t))

    def _from_device(self, t) -> torch.Tensor:
        if self.variant == "metal":
            return torch.from_numpy(t.numpy())
        return torch.from_dlpack(t)

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        layers, heads, dim = self._cache_dims
        return (layers, batch, heads, length, dim)

    def empty_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        return ()  # the metal target builds no hybrid (linear-attention) model

    def _run(self, name, *inputs):
        args = [self._to_device(t) for t in inputs]
        logits, new_k, new_v = self._steps[name](*args, *self._params[name])
        return self._from_device(logits), self._from_device(new_k), self._from_device(new_v)

    def prefill(self, tokens, positions, past_k, past_v, past_lens, last_index, *state):
        check_step(self.limits, tokens, past_k, decode=False)
        return self._run("prefill", tokens, positions, past_k, past_v, past_lens, last_index)

    def decode(self, tokens, positions, past_k, past_v, past_lens, last_index, *state):
        check_step(self.limits, tokens, past_k, decode=True)
        return self._run("decode", tokens, positions, past_k, past_v, past_lens, last_index)
