"""The small-batch decode step as five fused operations per layer, in plain torch.

At batch 1..16 a decode step is a chain of kernels each too small to fill the GPU, so
kernel boundaries, not bytes, set its time (docs/perf/cuda-h200.md: ~11 kernels per
layer, 41 us where reading the layer's weights takes 7). `CausalLM.forward_paged_fused`
runs a layer as five operations, each one kernel on the cuda target:

1. `norm_linear`: RMSNorm of the residual stream folded into the q/k/v projection.
2. `attention`: q/k RMSNorm and RoPE of the new token, then paged decode attention;
   also returns the new token's K and V for the pool.
3. `linear_residual`: the output projection plus the residual add.
4. `norm_gated_up`: RMSNorm, the gate/up projection and SiLU(gate) * up.
5. `linear_residual`: the down projection plus the residual add.

The functions here are the specification (and the CPU reference); the cuda target
renders Triton kernels from templates/fused_decode.py.j2 with the same signatures and
swaps them in (`FusedOps`). Each rounds where the unfused eager path rounds (after the
norm, after each projection), so both paths agree to bf16 rounding.

A linear is given as (weight, scale, bias): `scale` is None for float weights and the
per-output-channel scale of an fp8 or int8 weight (weight-only: the kernels widen those
weights as they load them, which halves the bytes read at small batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def dequantized(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return weight.to(dtype)
    return (weight.float() * scale.reshape(-1, 1)).to(dtype)


def linear(x, weight, scale, bias):
    return F.linear(x, dequantized(weight, scale, x.dtype), bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """arle_models.layers.RMSNorm as a function (float32 statistics, weight in x's dtype)."""
    dtype = x.dtype
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


def norm_linear(x, norm_weight, weight, scale, bias, eps: float):
    """x [B, K] -> linear(rms_norm(x)) [B, N]."""
    return linear(rms_norm(x, norm_weight, eps), weight, scale, bias)


def norm_gated_up(x, norm_weight, weight, scale, bias, eps: float):
    """x [B, K]; weight [2I, K] = gate rows then up rows -> silu(gate) * up [B, I]."""
    gate, up = norm_linear(x, norm_weight, weight, scale, bias, eps).chunk(2, dim=-1)
    return F.silu(gate) * up


def linear_residual(x, weight, scale, bias, residual):
    """residual + linear(x), [B, N]."""
    return residual + linear(x, weight, scale, bias)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, D]; cos, sin [B, D] (transformers' rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention(qkv, cos, sin, q_norm, k_norm, k_pool, v_pool, page_table, past_lens,
              num_heads: int, num_kv_heads: int, eps: float, page_size: int = 16):
    """qkv [B, (H + 2 Hkv) D] straight from the projection; cos, sin [B, D]; q_norm,
    k_norm [D] or None (no per-head norm); k_pool, v_pool [slots, Hkv, D] of this layer
    -> (out [B, H D], k [B, Hkv, D], v [B, Hkv, D]): the new token's K (normed, rotated)
    and V, which the caller writes into the pool."""
    from .layers import paged_decode_reference

    B = qkv.shape[0]
    D = cos.shape[-1]
    q, k, v = qkv.view(B, num_heads + 2 * num_kv_heads, D).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    out = paged_decode_reference(q, k, v, k_pool, v_pool, page_table, past_lens, page_size)
    return out.reshape(B, num_heads * D), k.contiguous(), v.contiguous()


@dataclass(frozen=True)
class FusedOps:
    """The five operations of a fused decode layer (reference functions by default)."""

    norm_linear: Callable = norm_linear
    attention: Callable = attention
    linear_residual: Callable = linear_residual
    norm_gated_up: Callable = norm_gated_up


def linear_parts(module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(weight, per-channel scale or None, bias or None) of a float nn.Linear, an Fp8Linear or
    an Int8CudaLinear (the kernels widen fp8 and int8 weights alike as they load them)."""
    scale = getattr(module, "scales", None)
    return module.weight, None if scale is None else scale.reshape(-1), getattr(module, "bias", None)


def fusable(model) -> str | None:
    """Why `model` cannot take the fused decode path, or None when it can: dense MLPs,
    fused q/k/v and gate/up projections, float (bf16/fp16), fp8 or int8 weights."""
    from .layers import MLP
    from .quant_layers import Fp8Linear, Int8CudaLinear

    if model.config.is_hybrid:
        return "hybrid linear-attention layers"
    if model.compute_dtype not in (torch.bfloat16, torch.float16):
        return f"compute dtype {model.compute_dtype}"
    for layer in model.layers:
        if not isinstance(layer.mlp, MLP) or layer.mlp.gate_up_proj is None or layer.self_attn.qkv_proj is None:
            return "mixture-of-experts or unfused projections"
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            # exact types: a tensor-parallel RowParallelLinear is an nn.Linear with an all-reduce
            if type(lin) not in (torch.nn.Linear, Fp8Linear, Int8CudaLinear):
                return f"{type(lin).__name__} weights"
    if type(model.embed_tokens) is not torch.nn.Embedding:
        return f"{type(model.embed_tokens).__name__} embeddings"
    return None
