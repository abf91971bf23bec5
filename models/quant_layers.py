"""Quantized layers swapped in for nn.Linear: weight-only int8/int4 (ATen's CPU kernels,
tinygemm's CUDA int4 kernel, a generated CUDA int8 kernel) and fp8 e4m3 weights with
dynamic fp8 activations (Hopper).

The stored tensors are exactly what the kernels take, so a bundle loads with no
re-quantization or repacking.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """int8 weight [N, K] with one float scale per output channel."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales)
        return out.reshape(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """int4 weight in ATen's CPU-packed layout, asymmetric per group of `group_size` inputs.

    w = (q - 8) * scale + zero, with scale and zero stored as [K / group, N, 2].
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]), self.weight, self.group_size, self.scales_and_zeros
        )
        return out.reshape(*shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Embedding rows in int8 with one scale per row; the same tensors serve a tied int8 head."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_embeddings, dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings, dtype=dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weight[tokens].to(self.scales.dtype) * self.scales[tokens][..., None]


FP8_MAX = 448.0  # largest finite float8_e4m3fn


class Fp8Linear(nn.Module):
    """float8 e4m3 weight [N, K] with one float32 scale per output channel; activations are
    quantized per row (token) on the fly, and torch._scaled_mm multiplies on fp8 tensor
    cores with both scales applied in its epilogue."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("scales", torch.ones(1, out_features, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        x_scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        xq = (x / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.scales, out_dtype=self.out_dtype)
        return out.reshape(*shape[:-1], self.out_features)


class Int4CudaLinear(nn.Module):
    """int4 weight in tinygemm's CUDA layout (torch.ops.aten._weight_int4pack_mm), with the
    same group-wise asymmetric scheme as Int4Linear: w = (q - 8) * scale + zero."""

    INNER_K_TILES = 8

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        k_tiles = self.INNER_K_TILES
        self.register_buffer(
            "weight", torch.zeros(out_features // 8, in_features // (k_tiles * 16), 32, k_tiles // 2, dtype=torch.int32)
        )
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, shape[-1]), self.weight, self.group_size, self.scales_and_zeros)
        return out.reshape(*shape[:-1], self.out_features)


class Int8CudaLinear(nn.Module):
    """Int8Linear's tensors (int8 weight [N, K], one scale per output channel) for the cuda
    target, multiplied by the generated kernel the target sets as `kernel`
    (templates/int8_matmul.py.j2: the weight widened as it loads, the scale in the
    epilogue). Without one (the build's eager reference, the CPU tests) the same product
    in plain torch: the int8 values are exact in bf16/fp16, and the scale is applied to the
    fp32 product."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype))
        self.kernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.kernel is not None:
            out = self.kernel(x, self.weight, self.scales)
        else:
            out = (torch.matmul(x.float(), self.weight.t().float()) * self.scales.float()).to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)


class Int4MetalLinear(nn.Module):
    """int4 weight packed two to a byte, [N, K / 2] uint8 (even k in the high nibble), with the
    group-wise asymmetric scheme of Int4Linear (w = (q - 8) * scale + zero; scales and zeros
    [N, K / group]) dequantized by plain torch ops before the matmul. Written for TVM's
    importer (the metal target), which has no int4 matmul: its fusion folds the dequantizing
    ops into the matmul kernel, so the float weight is never materialized."""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # Frozen parameters, not buffers: TVM's importer binds buffers into the program as
        # constants (and then folds the dequantization into float weights at build time).
        groups = in_features // group_size
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False)
        self.scales = nn.Parameter(torch.ones(out_features, groups, dtype=dtype), requires_grad=False)
        self.zeros = nn.Parameter(torch.zeros(out_features, groups, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, groups = self.scales.shape
        packed = self.weight.to(torch.int32)  # TVM's importer has no shifts, and types literals int32
        q = torch.stack((packed // 16, packed & 15), dim=-1).to(self.scales.dtype)
        w = (q.reshape(N, groups, self.group_size) - 8) * self.scales[..., None] + self.zeros[..., None]
        # 2-D, so every step's import is one x @ W.T (a 3-D one can import as a batched matmul
        # of a broadcast weight, which stops the dequantization from fusing into it)
        out = nn.functional.linear(x.reshape(-1, self.in_features), w.reshape(N, self.in_features))
        return out.reshape(*x.shape[:-1], N)
