"""Weight-only quantized layers (CPU kernels from ATen), swapped in for nn.Linear.

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
