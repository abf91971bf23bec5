"""Qwen3.5 (text) and Qwen3.5-MoE: hybrid decoders. Most layers mix tokens with a Gated
DeltaNet (linear attention, models/linear_attention.py); every few layers
(config.layer_types) is full attention with an output gate and partial RoPE. Norms are
zero-centred (scale = 1 + weight). Qwen3.5-MoE swaps every MLP for routed experts plus
a gated shared expert.

What each layer keeps per sequence during decode:

    full_attention    K and V of every past position      [B, Hkv, P, D] each
    linear_attention  conv_state  [B, conv_dim, kernel-1] and
                      recurrent_state [B, Hv, Dk, Dv] (float32), fixed size

The step contract extends the shared one (arle_models.layers) with the linear state,
whole in and whole out:

    step(tokens, positions, past_k, past_v, past_lens, last_index, conv_state, recurrent_state)
      -> logits, new_k, new_v, conv_state', recurrent_state'

past_k/past_v hold only the full-attention layers [Lfull, B, Hkv, P, D]; conv_state and
recurrent_state stack the linear layers [Llin, B, ...]. Row b's linear state advances
over tokens[b, :last_index[b] + 1]: right padding after the sampled token is ignored.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP, CausalLM, attention_split_past, paged_decode_reference, step_mask
from .linear_attention import GatedDeltaNet
from .moe import Qwen3MoeBlock
from .rope import RotaryEmbedding, rotate_half


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose weight is stored as an offset from one: y = x_hat * (1 + w), in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of each head; the rest pass through. x [B,H,T,D]."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class GatedAttention(nn.Module):
    """Full attention with per-head zero-centred q/k norms, partial RoPE and, when
    config.attn_output_gate, a sigmoid gate (from q_proj's second half) on the output."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.gated = config.attn_output_gate
        h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(h, q * (2 if self.gated else 1), bias=config.attention_bias)
        self.k_proj = nn.Linear(h, kv, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, kv, bias=config.attention_bias)
        self.o_proj = nn.Linear(q, h, bias=config.attention_bias)
        self.q_norm = ZeroCenteredRMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(config.head_dim, config.rms_norm_eps)
        self.split_past = False  # set by Qwen3_5.use_split_attention()

    def forward(self, x, cos, sin, past_k, past_v, mask):
        B, T, _ = x.shape
        q = self.q_proj(x)
        if self.gated:  # per head: [query | gate]
            q, gate = q.reshape(B, T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(B, T, self.num_heads * self.head_dim)
        q = self.q_norm(q.reshape(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        if self.split_past:
            out = attention_split_past(q, k, v, past_k, past_v, mask)
        else:
            keys, values = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        if self.gated:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out), k, v

    def forward_paged(self, x, cos, sin, k_pool, v_pool, page_table, past_lens, attention):
        """One decode token per row, the past read from the paged pool by `attention` (a
        layers.paged_decode_reference-shaped function). Returns (out, k [B,Hkv,D], v)."""
        B = x.shape[0]
        q = self.q_proj(x)
        if self.gated:
            q, gate = q.reshape(B, 1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(B, 1, self.num_heads * self.head_dim)
        q = self.q_norm(q.reshape(B, 1, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).reshape(B, 1, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).reshape(B, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)[:, :, 0]
        q, k = apply_partial_rotary(q, cos, sin)[:, :, 0], apply_partial_rotary(k, cos, sin)[:, :, 0]
        out = attention(q, k, v, k_pool, v_pool, page_table, past_lens).reshape(B, 1, self.num_heads * self.head_dim)
        if self.gated:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out), k, v


class HybridDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str, mlp: nn.Module):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp


def _stack(tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(tensors) if tensors else like[:0]


class Qwen3_5(CausalLM):
    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            HybridDecoderLayer(config, config.layer_types[i], self.make_mlp(i)) for i in range(config.num_layers)
        )
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        self.rotary = RotaryEmbedding(dataclasses.replace(config, head_dim=rotary_dim))
        # Static chunk count for the linear-attention scan of a compiled prefill (set by
        # the target before export: a loop over a dynamic token count cannot export).
        self.scan_chunks: int | None = None
        self.paged_attention = paged_decode_reference  # the cuda target swaps in its generated kernel

    def fuse_projections(self) -> "Qwen3_5":
        for layer in self.layers:
            if hasattr(layer.mlp, "fuse_projections"):
                layer.mlp.fuse_projections()
        return self

    def use_split_attention(self, enabled: bool) -> "Qwen3_5":
        for layer in self.layers:
            if not layer.is_linear:
                layer.self_attn.split_past = enabled
        return self

    def hidden_states(self, tokens, positions, past_k, past_v, past_lens, conv_state, recurrent_state, valid_lens):
        x = self.embed_tokens(tokens).to(self.compute_dtype)
        cos, sin = self.rotary(positions, x.dtype)
        mask = step_mask(past_lens, past_k.shape[3], tokens.shape[1])
        new_k, new_v, new_conv, new_rec = [], [], [], []
        for layer in self.layers:
            h = layer.input_layernorm(x)
            if layer.is_linear:
                i = len(new_conv)
                h, conv, rec = layer.linear_attn(h, conv_state[i], recurrent_state[i], valid_lens, self.scan_chunks)
                new_conv.append(conv)
                new_rec.append(rec)
            else:
                i = len(new_k)
                h, k, v = layer.self_attn(h, cos, sin, past_k[i], past_v[i], mask)
                new_k.append(k)
                new_v.append(v)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        new_k = _stack(new_k, past_k)
        new_v = _stack(new_v, past_v)
        return self.norm(x), new_k, new_v, _stack(new_conv, conv_state), _stack(new_rec, recurrent_state)

    def forward(self, tokens, positions, past_k, past_v, past_lens, last_index, conv_state, recurrent_state):
        x, new_k, new_v, conv, rec = self.hidden_states(
            tokens, positions, past_k, past_v, past_lens, conv_state, recurrent_state, last_index + 1
        )
        last = x[torch.arange(x.shape[0], device=x.device), last_index]
        return self.lm_head(last).float(), new_k, new_v, conv, rec

    def forward_paged(self, tokens, positions, k_pool, v_pool, page_table, past_lens, conv_state, recurrent_state):
        """The paged decode step (layers.CausalLM.forward_paged) with the linear layers'
        state of the batch's rows in and out: -> (logits, new_k, new_v, conv_state',
        recurrent_state'); k_pool, v_pool hold the full-attention layers only."""
        x = self.embed_tokens(tokens).to(self.compute_dtype)
        cos, sin = self.rotary(positions, x.dtype)
        one = torch.ones(tokens.shape[0], dtype=torch.long, device=tokens.device)  # each row advances one token
        new_k, new_v, new_conv, new_rec = [], [], [], []
        for layer in self.layers:
            h = layer.input_layernorm(x)
            if layer.is_linear:
                i = len(new_conv)
                h, conv, rec = layer.linear_attn(h, conv_state[i], recurrent_state[i], one, None)
                new_conv.append(conv)
                new_rec.append(rec)
            else:
                i = len(new_k)
                h, k, v = layer.self_attn.forward_paged(h, cos, sin, k_pool[i], v_pool[i], page_table, past_lens,
                                                        self.paged_attention)
                new_k.append(k)
                new_v.append(v)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm_head(self.norm(x)[:, 0]).float()
        none = k_pool.new_zeros(1, tokens.shape[0], *k_pool.shape[2:])  # shape of an empty stack
        return (logits, _stack(new_k, none), _stack(new_v, none), _stack(new_conv, conv_state),
                _stack(new_rec, recurrent_state))

    def all_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        empty = self.empty_cache(B, 0)
        positions = torch.arange(T, device=tokens.device)[None].expand(B, T)
        zeros = torch.zeros(B, dtype=torch.long, device=tokens.device)
        valid = torch.full((B,), T, dtype=torch.long, device=tokens.device)
        x, *_ = self.hidden_states(tokens, positions, empty, empty, zeros, *self.empty_state(B), valid)
        return self.lm_head(x).float()

    def empty_cache(self, batch: int, length: int) -> torch.Tensor:
        c = self.config
        return torch.zeros(
            len(c.full_attention_layers), batch, c.num_kv_heads, length, c.head_dim, dtype=self.compute_dtype,
            device=self.norm.weight.device,
        )

    def empty_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_state(self.config, batch, self.compute_dtype, self.norm.weight.device)


class SharedExpertMoeBlock(Qwen3MoeBlock):
    """Qwen3.5-MoE's feed-forward: the routed experts of moe.Qwen3MoeBlock (top-k always
    renormalised) plus a shared SwiGLU expert scaled by a per-token sigmoid gate."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.shared_expert = MLP(dataclasses.replace(config, intermediate_size=config.shared_expert_intermediate_size))
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def fuse_projections(self) -> None:
        self.shared_expert.fuse_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Qwen3_5Moe(Qwen3_5):
    """Qwen3.5-MoE (e.g. Qwen3.5-35B-A3B): Qwen3.5's hybrid layers, every MLP sparse.
    Decode state is Qwen3.5's; routing is stateless."""

    def make_mlp(self, layer: int) -> nn.Module:
        return SharedExpertMoeBlock(self.config)

    def use_split_attention(self, enabled: bool) -> "Qwen3_5Moe":
        """Also the decode program's expert choice: gather each token's experts (moe.py)."""
        for layer in self.layers:
            layer.mlp.gather = enabled
        return super().use_split_attention(enabled)


def linear_state(config: ModelConfig, batch: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero (conv_state, recurrent_state) for `batch` fresh sequences, all linear layers."""
    layers = len(config.linear_attention_layers)
    conv = torch.zeros(layers, batch, config.linear_conv_dim, config.linear_conv_kernel - 1, dtype=dtype, device=device)
    rec = torch.zeros(
        layers, batch, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim,
        dtype=torch.float32, device=device,
    )
    return conv, rec
