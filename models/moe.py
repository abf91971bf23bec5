"""Sparse mixture-of-experts feed-forward block (Qwen3-MoE; reused by Qwen3.5-MoE).

Semantics are transformers' Qwen3MoeSparseMoeBlock: router logits in the compute dtype,
softmax in float32, top-k experts per token, optionally renormalised to sum to one
(`norm_topk_prob`), weights cast back to the compute dtype; each chosen expert is a SwiGLU
MLP and the token's output is the weighted sum of its experts' outputs.

Parameters keep transformers' in-memory layout (per layer):
    gate.weight               [E, H]       router
    experts.gate_up_proj      [E, 2I, H]   gate rows, then up rows, per expert
    experts.down_proj         [E, H, I]

Expert compute, chosen for torch.export + AOTInductor (static shapes, no data-dependent
control flow; transformers' per-expert loop needs both):
- prefill (the default): every expert runs on every token as one [N, H] x [H, E*2I] GEMM
  and one [N, E*I] x [E*I, H] GEMM, the routing weights (zero for unchosen experts) applied
  in between. E/k times the active FLOPs, but few large kernels and no per-token copies.
- decode (`gather = True`, set for the decode program): each token's k experts' weights
  are gathered and applied with batched GEMVs, so a step reads only the chosen experts.
  Gathering during prefill would materialise N*k weight matrices.
(torch._grouped_mm would do both with only the active FLOPs, but its meta kernel accepts
bf16 only, so an fp32 program cannot be exported through it; seen with torch 2.13.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Router(nn.Module):
    """Top-k expert choice per token: (weights [N, k] in x's dtype, experts [N, k] int64)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts


def dense_experts(x, experts, weights, gate_up_proj, down_proj) -> torch.Tensor:
    """sum_j weights[n, j] * SwiGLU_{experts[n, j]}(x[n]) for every token n, all experts computed.

    x [N, H]; experts, weights [N, k]; gate_up_proj [E, 2I, H]; down_proj [E, H, I].
    """
    E, I2, H = gate_up_proj.shape
    routing = torch.zeros(x.shape[0], E, dtype=x.dtype, device=x.device).scatter(1, experts, weights)
    gate, up = (x @ gate_up_proj.reshape(E * I2, H).t()).reshape(-1, E, I2).chunk(2, dim=-1)
    act = F.silu(gate) * up * routing[..., None]  # [N, E, I]
    return torch.einsum("nei,ehi->nh", act, down_proj)


def gathered_experts(x, weights, gate_up, down) -> torch.Tensor:
    """The same sum from each token's own experts: gate_up [N, k, 2I, H], down [N, k, H, I]."""
    gate, up = torch.einsum("nh,nkoh->nko", x, gate_up).chunk(2, dim=-1)
    act = F.silu(gate) * up * weights[..., None]  # [N, k, I]
    return torch.einsum("nki,nkhi->nh", act, down)


class Experts(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.zeros(e, h, i))

    def select(self, index):
        """(gate_up, down) of the experts `index` picks, in the compute dtype."""
        return self.gate_up_proj[index], self.down_proj[index]

    def forward(self, x, experts, weights, gather: bool = False):
        if gather:
            return gathered_experts(x, weights, *self.select(experts))
        return dense_experts(x, experts, weights, *self.select(slice(None)))


class Int8Experts(nn.Module):
    """Expert weights in int8 with one scale per output row of each expert (the scheme of
    Int8Linear). ATen's int8 matmul has no batched form, so the experts a step uses are
    dequantized to the compute dtype inside the step (Inductor fuses it with the gather)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("gate_up_proj", torch.zeros(num_experts, 2 * intermediate, hidden, dtype=torch.int8))
        self.register_buffer("gate_up_scales", torch.ones(num_experts, 2 * intermediate, dtype=dtype))
        self.register_buffer("down_proj", torch.zeros(num_experts, hidden, intermediate, dtype=torch.int8))
        self.register_buffer("down_scales", torch.ones(num_experts, hidden, dtype=dtype))

    def select(self, index):
        dtype = self.gate_up_scales.dtype
        gate_up = self.gate_up_proj[index].to(dtype) * self.gate_up_scales[index][..., None]
        down = self.down_proj[index].to(dtype) * self.down_scales[index][..., None]
        return gate_up, down

    forward = Experts.forward


class Qwen3MoeBlock(nn.Module):
    """forward(x [..., H]) -> [..., H]; the sparse counterpart of layers.MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.gather = False  # the decode program's choice (Qwen3Moe.use_split_attention)
        # fn(x, experts, weights, gate_up_proj, down_proj) -> [N, H] computing gathered_experts
        # from the stacked weights: the cuda target's fused kernel (templates/fused_moe.py.j2)
        self.kernel = None

    def fuse_projections(self) -> None:
        pass  # gate and up are stored fused already (transformers' layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.gate(flat)
        if self.kernel is not None:
            out = self.kernel(flat, experts, weights, self.experts.gate_up_proj, self.experts.down_proj)
            return out.reshape(x.shape)
        return self.experts(flat, experts, weights, self.gather).reshape(x.shape)
