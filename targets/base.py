"""The target protocol: how one target lowers a quantized model into bundle artifacts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from arle_models import CausalLM


@dataclass(frozen=True)
class ShapePlan:
    """Shape ranges the compiled steps accept, and the buckets the runtime pads to."""

    max_batch: int
    decode_batch_sizes: tuple[int, ...]
    max_prefill_tokens: int
    max_context: int
    kv_dtype: str = "auto"  # the KV pool's torch dtype name; "auto": the model's compute dtype

    def to_dict(self) -> dict:
        return {
            "max_batch": self.max_batch,
            "decode_batch_sizes": list(self.decode_batch_sizes),
            "max_prefill_tokens": self.max_prefill_tokens,
            "prefill_chunk_tokens": [self.max_prefill_tokens],
            "max_context": self.max_context,
        }


def decode_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, then every multiple of 8 up to max_batch (the CUDA-graph bucket rule)."""
    sizes = [b for b in (1, 2, 4) if b <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return tuple(sizes)


@dataclass
class Lowered:
    """What a target produced: programs (name -> description with its relative path), files written."""

    executor: str
    programs: dict[str, dict]
    requirements: dict
    files: list[Path] = field(default_factory=list)


class Target(Protocol):
    name: str

    def check(self, quant_scheme: str) -> None:
        """Raise ArleError when this target cannot build the quantization."""

    def lower(self, model: CausalLM, plan: ShapePlan, out_dir: Path, progress) -> Lowered:
        """Compile the model's steps into out_dir; no compilation may be left for load time."""
