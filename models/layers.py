"""Shared decoder layers and the step function every architecture exposes.

The step contract (what targets export and executors call):

    step(tokens[B,T], positions[B,T], past_k[L,B,Hkv,P,D], past_v, past_lens[B], last_index[B])
      -> logits[B,V] (float32, at last_index of each row), new_k[L,B,Hkv,T,D], new_v

The KV cache is explicit input and output: the step reads P past positions (row b uses
the first past_lens[b] of them) and returns only the keys/values of its T new tokens;
the caller owns the cache layout (contiguous, paged). One program covers prefill
(P may be 0) and decode (T = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(h, q, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, kv, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, kv, bias=config.attention_bias)
        self.o_proj = nn.Linear(q, h, bias=config.attention_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if qk_norm else None
        self.qkv_proj = None  # set by fuse_projections()
        self.split_past = False  # set by CausalLM.use_split_attention()
        self.expand_kv = False  # set by CausalLM.use_expanded_kv()
        self.prefill_kernel = None  # set by CausalLM.use_prefill_kernel()

    def fuse_projections(self) -> None:
        """One matmul for q, k and v instead of three (fewer, larger kernels per step)."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x):
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)

    def forward(self, x, cos, sin, past_k, past_v, mask, past_lens=None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.prefill_kernel is not None:  # reads past_lens instead of the mask; writes [B, T, H, D]
            out = self.prefill_kernel(q, k, v, past_k, past_v, past_lens)
            return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim)), k, v
        if self.split_past:
            out = attention_split_past(q, k, v, past_k, past_v, mask)
        else:
            keys = torch.cat((past_k, k), dim=2)
            values = torch.cat((past_v, v), dim=2)
            if self.expand_kv and self.num_kv_heads != self.num_heads:
                # K/V repeated per query head: on CUDA, SDPA with enable_gqa and a mask has only
                # its fp32 math path; without enable_gqa the memory-efficient kernel takes the mask.
                groups = self.num_heads // self.num_kv_heads
                keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out), k, v

    def forward_paged(self, x, cos, sin, k_pool, v_pool, page_table, past_lens, attention):
        """One decode token per row, the past read from the paged pool by `attention`
        (a paged_decode_reference-shaped function). Returns (out, k [B,Hkv,D], v)."""
        B = x.shape[0]
        q, k, v = self.project(x)
        q = q.reshape(B, 1, self.num_heads, self.head_dim)
        k = k.reshape(B, 1, self.num_kv_heads, self.head_dim)
        v = v.reshape(B, 1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin)[:, :, 0], apply_rotary(k, cos, sin)[:, :, 0]
        v = v[:, :, 0]
        out = attention(q, k, v, k_pool, v_pool, page_table, past_lens)
        return self.o_proj(out.reshape(B, 1, self.num_heads * self.head_dim)), k, v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.gate_up_proj = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """Stack linears that read the same input into one (outputs concatenated in order)."""
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(lin.out_features for lin in linears), bias=first.bias is not None)
    fused = fused.to(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, qk_norm: bool = False, mlp: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qk_norm=qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config) if mlp is None else mlp

    def forward(self, x, cos, sin, past_k, past_v, mask, past_lens=None):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, mask, past_lens)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


def attention_split_past(q, k, v, past_k, past_v, mask):
    """Attention over [past | new] without concatenating the cache: scores against the
    past and the new keys separately, one softmax, two weighted sums. For decode (T=1)
    on CPU this is 2.6x (P=256) to 5.8x (P=1024) faster per layer than the fused SDPA
    kernel (measured on AOTInductor, docs/performance.md); for long prefill SDPA wins.

    q [B,H,T,D]; k, v [B,Hkv,T,D]; past_k, past_v [B,Hkv,P,D]; mask [B,1,T,P+T].
    """
    B, H, T, D = q.shape
    kv_heads = k.shape[1]
    groups = H // kv_heads
    qg = q.reshape(B, kv_heads, groups * T, D)  # GQA: query heads grouped under their KV head
    scores = torch.cat((qg @ past_k.transpose(-1, -2), qg @ k.transpose(-1, -2)), dim=-1).float() * D**-0.5
    scores = scores.reshape(B, kv_heads, groups, T, -1).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).reshape(B, kv_heads, groups * T, -1)
    P = past_k.shape[2]
    out = probs[..., :P] @ past_v + probs[..., P:] @ v
    return out.reshape(B, H, T, D)


def paged_decode_reference(q, k_new, v_new, k_pool, v_pool, page_table, past_lens, page_size: int = 16):
    """Decode attention over a paged pool, in plain torch (the generated kernel's spec).

    q [B,H,D]; k_new, v_new [B,Hkv,D]: the decoded token's own K/V (not yet in the pool);
    k_pool, v_pool [slots,Hkv,D]; page_table [B,pages]: row b's past position p lives in
    slot page_table[b, p // page_size] * page_size + p % page_size; past_lens [B].
    """
    B, H, D = q.shape
    kv_heads = k_new.shape[1]
    P = page_table.shape[1] * page_size
    pos = torch.arange(P, device=q.device)
    slots = page_table.long()[:, pos // page_size] * page_size + pos % page_size  # [B, P]
    past_k, past_v = k_pool[slots].to(k_new.dtype), v_pool[slots].to(v_new.dtype)  # fp8 pools widen here
    keys = torch.cat((past_k, k_new[:, None]), dim=1).transpose(1, 2)  # [B, Hkv, P+1, D]
    values = torch.cat((past_v, v_new[:, None]), dim=1).transpose(1, 2)
    visible = torch.cat((pos[None] < past_lens[:, None], torch.ones(B, 1, dtype=torch.bool, device=q.device)), dim=1)
    qg = q.reshape(B, kv_heads, H // kv_heads, D)
    scores = (qg.float() @ keys.float().transpose(-1, -2)) * D**-0.5  # [B, Hkv, G, P+1]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values.float()
    return out.reshape(B, H, D).to(q.dtype)


def step_mask(past_lens: torch.Tensor, past_len_padded: int, new_len: int) -> torch.Tensor:
    """Boolean [B, 1, T, P+T]: row b sees its own valid past and the new tokens causally."""
    device = past_lens.device
    past_ok = torch.arange(past_len_padded, device=device)[None, :] < past_lens[:, None]  # [B, P]
    causal = torch.ones(new_len, new_len, dtype=torch.bool, device=device).tril()  # [T, T]
    B = past_lens.shape[0]
    past_part = past_ok[:, None, :].expand(B, new_len, past_len_padded)
    new_part = causal[None].expand(B, new_len, new_len)
    return torch.cat((past_part, new_part), dim=-1)[:, None]


class CausalLM(nn.Module):
    """A pre-norm decoder-only transformer (Llama family); architectures subclass it."""

    qk_norm = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, qk_norm=self.qk_norm, mlp=self.make_mlp(i)) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)
        self.paged_attention = paged_decode_reference  # the cuda target swaps in its generated kernel

    def make_mlp(self, layer: int) -> nn.Module:
        """The feed-forward block of decoder layer `layer` (MoE architectures override it)."""
        return MLP(self.config)

    def fuse_projections(self) -> "CausalLM":
        """Merge q/k/v and gate/up projections (a build-time transform; checkpoints keep HF names)."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        return self

    def use_split_attention(self, enabled: bool) -> "CausalLM":
        """Attention without cache concatenation (the decode program's choice)."""
        for layer in self.layers:
            layer.self_attn.split_past = enabled
        return self

    def use_expanded_kv(self, enabled: bool) -> "CausalLM":
        """SDPA over K/V repeated per query head instead of enable_gqa (a cuda prefill
        option, targets/cuda.py); layers without the option keep theirs."""
        for layer in self.layers:
            if hasattr(layer.self_attn, "expand_kv"):
                layer.self_attn.expand_kv = enabled
        return self

    def use_prefill_kernel(self, kernel) -> "CausalLM":
        """Prefill attention by a generated kernel (q, k, v, past_k, past_v, past_lens ->
        [B, T, H, D]; the cuda target's templates/prefill_attention.py.j2), or SDPA again
        with None. Layers without the option keep SDPA."""
        for layer in self.layers:
            if hasattr(layer.self_attn, "prefill_kernel"):
                layer.self_attn.prefill_kernel = kernel
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def hidden_states(self, tokens, positions, past_k, past_v, past_lens):
        x = self.embed_tokens(tokens).to(self.compute_dtype)
        cos, sin = self.rotary(positions, x.dtype)
        mask = step_mask(past_lens, past_k.shape[3], tokens.shape[1])
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, past_k[i], past_v[i], mask, past_lens)
            new_k.append(k)
            new_v.append(v)
        return self.norm(x), torch.stack(new_k), torch.stack(new_v)

    def forward(self, tokens, positions, past_k, past_v, past_lens, last_index):
        x, new_k, new_v = self.hidden_states(tokens, positions, past_k, past_v, past_lens)
        last = x[torch.arange(x.shape[0], device=x.device), last_index]  # [B, H]
        logits = self.lm_head(last).float()
        return logits, new_k, new_v

    def forward_paged(self, tokens, positions, k_pool, v_pool, page_table, past_lens):
        """The paged decode step: tokens, positions [B,1]; k_pool, v_pool [L,slots,Hkv,D];
        page_table [B,pages] int32; past_lens [B] int32 -> (logits [B,V] float32,
        new_k [L,B,Hkv,D], new_v). The caller writes new_k/new_v into the pool."""
        x = self.embed_tokens(tokens).to(self.compute_dtype)
        cos, sin = self.rotary(positions, x.dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            attn, k, v = layer.self_attn.forward_paged(
                layer.input_layernorm(x), cos, sin, k_pool[i], v_pool[i], page_table, past_lens, self.paged_attention
            )
            x = x + attn
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_k.append(k)
            new_v.append(v)
        logits = self.lm_head(self.norm(x)[:, 0]).float()
        return logits, torch.stack(new_k), torch.stack(new_v)

    def forward_paged_fused(self, tokens, positions, k_pool, v_pool, page_table, past_lens, ops):
        """`forward_paged` as five fused operations per layer (arle_models.fused_decode;
        `ops` a FusedOps: the plain-torch reference, or the cuda target's kernels)."""
        from .fused_decode import linear_parts

        c = self.config
        x = self.embed_tokens(tokens[:, 0]).to(self.compute_dtype)  # [B, hidden]
        cos, sin = self.rotary(positions, x.dtype)
        cos, sin = cos[:, 0], sin[:, 0]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = ops.norm_linear(x, layer.input_layernorm.weight, *linear_parts(attn.qkv_proj), c.rms_norm_eps)
            q_norm = None if attn.q_norm is None else attn.q_norm.weight
            k_norm = None if attn.k_norm is None else attn.k_norm.weight
            out, k, v = ops.attention(qkv, cos, sin, q_norm, k_norm, k_pool[i], v_pool[i], page_table, past_lens,
                                      c.num_heads, c.num_kv_heads, c.rms_norm_eps)
            x = ops.linear_residual(out, *linear_parts(attn.o_proj), x)
            h = ops.norm_gated_up(x, layer.post_attention_layernorm.weight, *linear_parts(mlp.gate_up_proj),
                                  c.rms_norm_eps)
            x = ops.linear_residual(h, *linear_parts(mlp.down_proj), x)
            new_k.append(k)
            new_v.append(v)
        logits = self.lm_head(self.norm(x)).float()
        return logits, torch.stack(new_k), torch.stack(new_v)

    def all_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at every position of a fresh batch [B, T] (for checks and perplexity)."""
        B, T = tokens.shape
        empty = self.empty_cache(B, 0)
        positions = torch.arange(T, device=tokens.device)[None].expand(B, T)
        past_lens = torch.zeros(B, dtype=torch.long, device=tokens.device)
        x, _, _ = self.hidden_states(tokens, positions, empty, empty, past_lens)
        return self.lm_head(x).float()

    def empty_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Per-sequence state beyond the KV cache, extra step inputs and outputs (none
        here; hybrid models such as Qwen3.5 keep their linear-attention state)."""
        return ()

    def empty_cache(self, batch: int, length: int) -> torch.Tensor:
        c = self.config
        return torch.zeros(
            c.num_layers, batch, c.num_kv_heads, length, c.head_dim, dtype=self.compute_dtype,
            device=self.norm.weight.device,
        )


class PagedDecodeStep(nn.Module):
    """`CausalLM.forward_paged` (or, given `ops`, `forward_paged_fused`) as a module's
    forward, for torch.export."""

    def __init__(self, model: CausalLM, ops=None):
        super().__init__()
        self.model = model
        self.ops = ops

    def forward(self, tokens, positions, k_pool, v_pool, page_table, past_lens, *state):
        if self.ops is not None:
            return self.model.forward_paged_fused(tokens, positions, k_pool, v_pool, page_table, past_lens, self.ops)
        return self.model.forward_paged(tokens, positions, k_pool, v_pool, page_table, past_lens, *state)
