"""Quantization at build time: float weights in, the tensors the target's kernels take out.

Weight-only schemes swap nn.Linear modules for their quantized counterparts
(gpt-fast style); activations and the KV cache stay in the compute dtype.

  fp32 | bf16 | fp16   all weights cast; compute in that dtype
  int8                 per-output-channel symmetric int8 for every linear and the LM head;
                       embedding rows int8 with a per-row scale (shared with a tied head)
  int4                 group-wise asymmetric int4 for decoder linears (group size an option);
                       LM head and embedding as in int8 (as llama.cpp's Q4 files keep them)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from arle_models import CausalLM
from arle_models.quant_layers import Int4Linear, Int8Embedding, Int8Linear
from arle_runtime.errors import ArleError

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEMES = ("fp32", "bf16", "fp16", "int8", "int4")


@dataclass(frozen=True)
class QuantSpec:
    scheme: str = "fp32"
    group_size: int = 32  # int4 only

    @property
    def compute_dtype(self) -> torch.dtype:
        # ATen's CPU int8/int4 weight-only kernels have fast paths (AVX512-BF16) only for
        # bf16 activations: measured 20-40x slower with fp32 ones (docs/performance.md).
        return FLOAT_DTYPES.get(self.scheme, torch.bfloat16)

    @property
    def bits(self) -> int:
        return {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}[self.scheme]

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


def _int8_linear(linear: nn.Linear, dtype: torch.dtype) -> Int8Linear:
    mod = Int8Linear(linear.in_features, linear.out_features, dtype)
    mod.weight, scales = quantize_int8_rows(linear.weight.data)
    mod.scales = scales.to(dtype)
    return mod


def _int4_linear(linear: nn.Linear, group_size: int, dtype: torch.dtype) -> Int4Linear:
    if linear.in_features % group_size:
        raise ArleError(
            f"int4 with group size {group_size} needs every layer's input width to be a multiple of it, "
            f"but one is {linear.in_features}; pass a smaller --group-size."
        )
    mod = Int4Linear(linear.in_features, linear.out_features, group_size, dtype)
    q, scales_and_zeros = quantize_int4_groups(linear.weight.data, group_size)
    mod.scales_and_zeros = scales_and_zeros.to(dtype)
    mod.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return mod


def quantize_model(model: CausalLM, quant: QuantSpec) -> CausalLM:
    """Convert a float model in place to `quant` and return it."""
    if quant.scheme in FLOAT_DTYPES:
        return model.to(FLOAT_DTYPES[quant.scheme])
    if any(linear.bias is not None for linear in _linears(model)):
        raise ArleError(f"{quant.scheme} quantization of layers with a bias is not supported yet; use a float quant.")
    dtype = quant.compute_dtype
    # Quantize from the float32 source weights, then cast what stays float (norms).
    for parent, name, linear in list(_decoder_linears(model)):
        new = _int8_linear(linear, dtype) if quant.scheme == "int8" else _int4_linear(linear, quant.group_size, dtype)
        setattr(parent, name, new)
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


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _decoder_linears(model):
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    yield parent, name, child
