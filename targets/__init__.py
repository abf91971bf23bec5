"""Targets: one module per target behind the small protocol in base.py."""

from __future__ import annotations

from arle_runtime.errors import ArleError

from .base import Lowered, ShapePlan, Target, decode_buckets

TARGET_NAMES = ("cpu", "cuda", "onnx", "metal")


def get_target(name: str) -> Target:
    if name == "cpu":
        from .cpu import CpuTarget

        return CpuTarget()
    if name == "cuda":
        from .cuda import CudaTarget

        return CudaTarget()
    if name == "onnx":
        from .onnx import OnnxTarget

        return OnnxTarget()
    if name == "metal":
        from .metal import MetalTarget

        return MetalTarget()
    raise ArleError(f"Unknown target {name!r}; choose one of: {', '.join(TARGET_NAMES)}.")


__all__ = ["Lowered", "ShapePlan", "Target", "TARGET_NAMES", "decode_buckets", "get_target"]
