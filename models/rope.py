"""Rotary position embeddings with the scaling schemes real checkpoints use.

Frequencies follow Hugging Face transformers' definitions so that logits match it on
the same weights. `dynamic` (NTK) scaling depends on the longest position in the call,
so it is computed inside the step; the others are fixed at build time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, RopeConfig


def base_inv_freq(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (theta**exponents)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    original = rope.original_max_position

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = base_inv_freq(rope.theta, dim)
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        rope, dim = config.rope, config.head_dim
        self.rope = rope
        self.dim = dim
        self.max_position = config.max_position_embeddings
        self.attention_scaling = 1.0
        if rope.type in ("default", "dynamic"):
            inv_freq = base_inv_freq(rope.theta, dim)
        elif rope.type == "linear":
            inv_freq = base_inv_freq(rope.theta, dim) / rope.factor
        elif rope.type == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(rope, dim)
        elif rope.type == "llama3":
            inv_freq = _llama3_inv_freq(rope, dim)
        else:
            raise ValueError(f"unsupported rope type {rope.type!r}")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _dynamic_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        # Same rule as transformers: stretch the base once the longest position in the
        # call passes the trained length, never shrink below it.
        seq_len = (positions.max() + 1).float().clamp(min=self.max_position)
        factor = self.rope.factor
        theta = self.rope.theta * ((factor * seq_len / self.max_position) - (factor - 1)) ** (
            self.dim / (self.dim - 2)
        )
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=positions.device).float() / self.dim
        return 1.0 / (theta**exponents)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, head_dim] for integer positions [B, T]."""
        inv_freq = self._dynamic_inv_freq(positions) if self.rope.type == "dynamic" else self.inv_freq
        freqs = positions.float()[..., None] * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
