"""Quantization at build time: float weights in, the tensors the target's kernels take out.

Weight-only schemes swap nn.Linear modules for their quantized counterparts
(gpt-fast style); activations and the KV cache stay in the compute dtype.

  fp32 | bf16 | fp16   all weights cast; compute in that dtype
  int8                 per-output-channel symmetric int8 for every linear and the LM head;
                       embedding rows int8 with a per-row scale (shared with a tied head)
  int4                 group-wise asymmetric int4 for decoder linears (group size an option);
                       LM head and embedding as in int8 (as llama.cpp's Q4 files keep them);
                       on cuda (tinygemm's kernel) the LM head and embedding stay bf16;
                       on metal (dequantized by plain ops in the TVM program) they stay fp32
  fp8                  cuda only: e4m3 weights with a float32 scale per output channel for
                       every linear and the LM head, activations quantized per token at run
                       time (torch._scaled_mm on Hopper's fp8 tensor cores); embedding bf16
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from arle_models import CausalLM
from arle_models.moe import Experts, Int8Experts
from arle_models.quant_layers import (
    FP8_MAX, Fp8Linear, Int4CudaLinear, Int4Linear, Int4MetalLinear, Int8CudaLinear, Int8Embedding, Int8Linear,
)
from arle_runtime.errors import ArleError

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEMES = ("fp32", "bf16", "fp16", "int8", "int4", "fp8")


@dataclass(frozen=True)
class QuantSpec:
    scheme: str = "fp32"
    group_size: int = 32  # int4 only
    compute: str | None = None  # a target's own compute dtype (FLOAT_DTYPES key); see for_target

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.compute:
            return FLOAT_DTYPES[self.compute]
        # ATen's CPU int8/int4 weight-only kernels have fast paths (AVX512-BF16) only for
        # bf16 activations: measured 20-40x slower with fp32 ones (docs/performance.md).
        return FLOAT_DTYPES.get(self.scheme, torch.bfloat16)

    @property
    def bits(self) -> int:
        return {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4, "fp8": 8}[self.scheme]

    def to_dict(self) -> dict:
        d = {"scheme": self.scheme, "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}
        if self.scheme == "int4":
            d["group_size"] = self.group_size
        return d


def parse_quant(scheme: str, group_size: int = 32) -> QuantSpec:
    if scheme not in SCHEMES:
        raise ArleError(f"Unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}.")
    if group_size not in (32, 64, 128, 256):
        raise ArleError(f"Group size {group_size} is not supported; choose 32, 64, 128 or 256.")
    return QuantSpec(scheme, group_size)


def for_target(quant: QuantSpec, target: str) -> QuantSpec:
    """The spec a target builds: metal int4 computes in fp32 (its dequantizing matmul is
    plain TVM code, and fp16 does not import yet; docs/metal.md)."""
    if target == "metal" and quant.scheme == "int4":
        return QuantSpec(quant.scheme, quant.group_size, compute="fp32")
    return quant


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w ~= q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group: w ~= (q - 8) * scale + zero; returns q [N, K] int32, [K/g, N, 2]."""
    w = w.float()
    N, K = w.shape
    g = w.reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale
    scales_and_zeros = torch.stack((scale.squeeze(-1), zero.squeeze(-1)), dim=-1).transpose(0, 1).contiguous()
    return q, scales_and_zeros


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 per row: w ~= q * scale[:, None], the row's largest magnitude mapped to 448."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _fp8_linear(weight: torch.Tensor, dtype: torch.dtype) -> Fp8Linear:
    out_features, in_features = weight.shape
    if in_features % 16 or out_features % 16:
        raise ArleError(
            f"fp8 needs every layer's widths to be multiples of 16 (torch._scaled_mm), but one is "
            f"{out_features} x {in_features}; use --quant bf16."
        )
    mod = Fp8Linear(in_features, out_features, dtype)
    mod.weight, scales = quantize_fp8_rows(weight)
    mod.scales = scales[None, :]
    return mod


def _int8_linear(linear: nn.Linear, dtype: torch.dtype, kernels: str = "cpu") -> nn.Module:
    mod = (Int8CudaLinear if kernels == "cuda" else Int8Linear)(linear.in_features, linear.out_features, dtype)
    mod.weight, scales = quantize_int8_rows(linear.weight.data)
    mod.scales = scales.to(dtype)
    return mod


def _int4_linear(linear: nn.Linear, group_size: int, dtype: torch.dtype, kernels: str = "cpu") -> nn.Module:
    if linear.in_features % group_size:
        raise ArleError(
            f"int4 with group size {group_size} needs every layer's input width to be a multiple of it, "
            f"but one is {linear.in_features}; pass a smaller --group-size."
        )
    q, scales_and_zeros = quantize_int4_groups(linear.weight.data, group_size)
    if kernels == "metal":  # plain-op dequantization that TVM imports and fuses into the matmul
        mod = Int4MetalLinear(linear.in_features, linear.out_features, group_size, dtype)
        nibbles = q.to(torch.uint8)
        mod.weight.data = nibbles[:, ::2] << 4 | nibbles[:, 1::2]
        scale, zero = scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)
        mod.scales.data, mod.zeros.data = scale.contiguous(), zero.contiguous()
        return mod
    if kernels == "cuda":
        tiles = Int4CudaLinear.INNER_K_TILES
        if linear.in_features % (tiles * 16) or linear.out_features % 8:
            raise ArleError(
                f"int4 on cuda needs layer widths that are multiples of {tiles * 16} (inputs) and 8 (outputs), "
                f"but one is {linear.out_features} x {linear.in_features}; use --quant bf16 or fp8."
            )
        mod = Int4CudaLinear(linear.in_features, linear.out_features, group_size, dtype)
        nibbles = q.to(torch.uint8)
        packed = (nibbles[:, ::2] << 4 | nibbles[:, 1::2]).cuda()  # tinygemm packs on the GPU
        mod.weight = torch.ops.aten._convert_weight_to_int4pack(packed, tiles).cpu()
    else:
        mod = Int4Linear(linear.in_features, linear.out_features, group_size, dtype)
        mod.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    mod.scales_and_zeros = scales_and_zeros.to(dtype)
    return mod


def quantize_model(model: CausalLM, quant: QuantSpec, kernels: str = "cpu") -> CausalLM:
    """Convert a float model in place to `quant` and return it. `kernels` ("cpu", "cuda" or
    "metal") picks the layout of the target's kernels where they differ (int4)."""
    if quant.scheme in FLOAT_DTYPES:
        return model.to(FLOAT_DTYPES[quant.scheme])
    if any(linear.bias is not None for linear in _linears(model)):
        raise ArleError(f"{quant.scheme} quantization of layers with a bias is not supported yet; use a float quant.")
    dtype = quant.compute_dtype
    _quantize_experts(model, quant, dtype)
    # Quantize from the float32 source weights, then cast what stays float (norms).
    for parent, name, linear in list(_decoder_linears(model)):
        if quant.scheme == "fp8":
            new = _fp8_linear(linear.weight.data, dtype)
        elif quant.scheme == "int8" or (kernels == "cpu" and linear.out_features % 16):
            # ATen's CPU int4 packing needs N % 16 == 0; narrow layers (Qwen3.5's per-head
            # beta/decay projections, a shared-expert gate) stay int8.
            new = _int8_linear(linear, dtype, kernels)
        else:
            new = _int4_linear(linear, quant.group_size, dtype, kernels)
        setattr(parent, name, new)
    if quant.scheme == "fp8":
        head_weight = model.embed_tokens.weight if model.config.tie_word_embeddings else model.lm_head.weight
        model.lm_head = _fp8_linear(head_weight.data, dtype)  # a tied head gets its own fp8 copy
        return _cast_floats(model, dtype)
    if kernels in ("cuda", "metal"):  # int8/int4 there: no int8 gather/GEMV kernels for these, so they stay float
        return model.to(dtype)
    embedding = Int8Embedding(model.config.vocab_size, model.config.hidden_size, dtype)
    embedding.weight, scales = quantize_int8_rows(model.embed_tokens.weight.data)
    embedding.scales = scales.to(dtype)
    if model.config.tie_word_embeddings:
        head = Int8Linear(model.config.hidden_size, model.config.vocab_size, dtype)
        head.weight, head.scales = embedding.weight, embedding.scales
    else:
        head = _int8_linear(model.lm_head, dtype)
    model.embed_tokens, model.lm_head = embedding, head
    return model.to(dtype)


def _cast_floats(model: CausalLM, dtype: torch.dtype) -> CausalLM:
    """model.to(dtype) except fp8 layers, whose weights and float32 scales must stay as they are."""
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            continue
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                setattr(module, name, buf.to(dtype))
    return model


def _quantize_experts(model: CausalLM, quant: QuantSpec, dtype: torch.dtype) -> None:
    """Mixture-of-experts stacks (arle_models.moe): int8 per expert output row, like the
    linears; the router stays in the compute dtype (routing is sensitive to its rounding)."""
    layers = [layer for layer in model.layers if isinstance(getattr(layer.mlp, "experts", None), Experts)]
    if layers and quant.scheme != "int8":
        raise ArleError(
            f"--quant {quant.scheme} does not support mixture-of-experts weights yet; use int8 or a float quant."
        )
    for layer in layers:
        experts = layer.mlp.experts
        E, I2, H = experts.gate_up_proj.shape
        new = Int8Experts(E, H, I2 // 2, dtype)
        q, scales = quantize_int8_rows(experts.gate_up_proj.data.reshape(E * I2, H))
        new.gate_up_proj, new.gate_up_scales = q.reshape(E, I2, H), scales.reshape(E, I2).to(dtype)
        q, scales = quantize_int8_rows(experts.down_proj.data.reshape(E * H, I2 // 2))
        new.down_proj, new.down_scales = q.reshape(E, H, I2 // 2), scales.reshape(E, H).to(dtype)
        layer.mlp.experts = new


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _decoder_linears(model):
    for layer in model.layers:
        mixer = layer.self_attn if hasattr(layer, "self_attn") else layer.linear_attn  # hybrid models: either
        for parent in (mixer, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    yield parent, name, child
