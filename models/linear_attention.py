"""Gated DeltaNet: the linear-attention token mixer of Qwen3.5 (and Qwen3-Next).

Instead of a KV cache that grows with the context, each layer keeps two fixed-size
tensors per sequence between steps:

    conv_state       [B, conv_dim, kernel - 1]  the last kernel-1 inputs of the short causal conv
    recurrent_state  [B, Hv, Dk, Dv] float32    the fast-weight memory S

Per token t and value head (q, k L2-normalised, q scaled by Dk^-0.5, g_t <= 0):

    S   = exp(g_t) * S                          decay
    S   = S + k_t (beta_t * (v_t - S^T k_t))^T  delta rule: write only what S mispredicts
    o_t = S^T q_t

Decode (one token) runs that recurrence directly. Prefill runs the chunked form: within
a chunk of 64 tokens all updates are solved at once (a unit lower-triangular system), and
the state is carried from chunk to chunk. Numerics follow transformers' torch fallback
(`torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule`), in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

CHUNK = 64


class GatedRMSNorm(nn.Module):
    """RMSNorm of the mixer output, then a SiLU gate from the input (z)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = self.weight * x.to(dtype)
        return (x * F.silu(gate.float())).to(dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def unit_lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """(I + L)^-1 for strictly lower-triangular L [..., n, n], n a power of two.

    Block forward substitution, doubling the block size each round: with X = diag(A^-1,
    D^-1) and C the block below the diagonal, [[A, 0], [C, D]]^-1 = X - X C X. All
    blocks of a round at once, as n x n matmuls with C masked out of L (few graph nodes,
    quick to compile). No triangular solver: the AOTInductor CPU fallback for
    linalg_solve_triangular returned wrong values here, and the Neumann series
    (I - L + L^2 ...) cancels catastrophically when keys are similar.
    """
    n = lower.shape[-1]
    idx = torch.arange(n, device=lower.device)
    inv = torch.eye(n, dtype=lower.dtype, device=lower.device).expand(lower.shape)
    size = 1
    while size < n:
        same_block = (idx[:, None] // (2 * size)) == (idx[None, :] // (2 * size))
        below = ((idx[:, None] % (2 * size)) >= size) & ((idx[None, :] % (2 * size)) < size)
        c = lower * (same_block & below).to(lower.dtype)
        inv = inv - inv @ c @ inv
        size *= 2
    return inv


def chunked_gated_delta_rule(q, k, v, g, beta, state, num_chunks: int):
    """All tokens of a prefill chunk. q, k [B,H,T,Dk]; v [B,H,T,Dv]; g, beta [B,H,T]
    (zero at padding, which leaves the state untouched); state [B,H,Dk,Dv].
    T is padded to num_chunks * CHUNK (a static count, so the loop exports).
    Returns out [B,H,T,Dv] and the final state."""
    B, H, T, _ = k.shape
    pad = num_chunks * CHUNK - T
    q, k, v = (F.pad(x, (0, 0, 0, pad)).reshape(B, H, num_chunks, CHUNK, -1) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)).reshape(B, H, num_chunks, CHUNK) for x in (g, beta))

    decay_to = g.cumsum(-1)  # log of the decay from the chunk start through token t
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    # pair_decay[t, s] = exp(decay_to[t] - decay_to[s]) for s <= t, else 0 (masked before exp).
    pair_decay = (decay_to[..., :, None] - decay_to[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]
    # Token t's update reads the state after tokens < t of the same chunk: solve for all
    # updates u at once, (I + L) u = beta * v - (beta * k * decay) S0.
    lower = ((k_beta @ k.transpose(-1, -2)) * pair_decay).tril(-1)
    solve = unit_lower_inverse(lower)
    u_from_v = solve @ (v * beta[..., None])
    u_from_state = solve @ (k_beta * decay_to.exp()[..., None])
    scores = (q @ k.transpose(-1, -2)) * pair_decay
    q_decayed = q * decay_to.exp()[..., None]
    k_to_end = k * (decay_to[..., -1:] - decay_to).exp()[..., None]
    chunk_decay = decay_to[..., -1].exp()[..., None, None]

    outs = []
    for i in range(num_chunks):
        u = u_from_v[:, :, i] - u_from_state[:, :, i] @ state
        outs.append(q_decayed[:, :, i] @ state + scores[:, :, i] @ u)
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ u
    out = torch.stack(outs, dim=2).reshape(B, H, num_chunks * CHUNK, -1)[:, :, :T]
    return out, state


def recurrent_gated_delta_step(q, k, v, g, beta, state):
    """One token per row. q, k [B,H,Dk]; v [B,H,Dv]; g, beta [B,H]; state [B,H,Dk,Dv]."""
    state = state * g.exp()[..., None, None]
    predicted = (state * k[..., None]).sum(-2)
    delta = (v - predicted) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return (state * q[..., None]).sum(-2), state


class GatedDeltaNet(nn.Module):
    """The linear-attention layer, parameter names as transformers' Qwen3_5GatedDeltaNet."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.k_dim, self.v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_size = self.num_k_heads * self.k_dim
        self.value_size = self.num_v_heads * self.v_dim
        self.conv_dim = config.linear_conv_dim
        self.kernel = config.linear_conv_kernel
        self.in_proj_qkv = nn.Linear(h, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(h, self.value_size, bias=False)
        self.in_proj_b = nn.Linear(h, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(h, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.v_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_size, h, bias=False)

    def conv(self, mixed: torch.Tensor, conv_state: torch.Tensor, valid_lens: torch.Tensor):
        """Short causal depthwise conv + SiLU over [past kernel-1 inputs | new]; mixed
        [B, C, T]. The new state is the kernel-1 inputs before each row's valid end."""
        window = torch.cat((conv_state.to(mixed.dtype), mixed), dim=-1)  # [B, C, K-1+T]
        out = F.silu(F.conv1d(window.to(self.conv1d.weight.dtype), self.conv1d.weight, groups=self.conv_dim))
        keep = valid_lens[:, None, None] + torch.arange(self.kernel - 1, device=mixed.device)
        new_state = window.gather(2, keep.expand(mixed.shape[0], self.conv_dim, self.kernel - 1))
        return out.to(mixed.dtype), new_state

    def forward(self, x, conv_state, recurrent_state, valid_lens, num_chunks: int | None):
        """x [B,T,hidden]; valid_lens [B]: tokens of each row that advance the state
        (right padding beyond them changes nothing). num_chunks: the static chunk count
        of a compiled prefill (None: from T, or the one-token recurrence for T == 1).
        Returns (out [B,T,hidden], conv_state, recurrent_state)."""
        B, T, _ = x.shape
        mixed, conv_state = self.conv(self.in_proj_qkv(x).transpose(1, 2), conv_state, valid_lens)
        q, k, v = mixed.transpose(1, 2).split([self.key_size, self.key_size, self.value_size], dim=-1)
        q = q.reshape(B, T, self.num_k_heads, self.k_dim)
        k = k.reshape(B, T, self.num_k_heads, self.k_dim)
        v = v.reshape(B, T, self.num_v_heads, self.v_dim)
        beta = self.in_proj_b(x).sigmoid().float()
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        if self.num_v_heads != self.num_k_heads:  # each key head serves consecutive value heads
            q = q.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
            k = k.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, T, D]
        q = l2norm(q) * self.k_dim**-0.5
        k = l2norm(k)
        beta, g = beta.transpose(1, 2), g.transpose(1, 2)  # [B, H, T]
        state = recurrent_state.float()
        if isinstance(T, int) and T == 1 and num_chunks is None:
            out, state = recurrent_gated_delta_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[..., 0], beta[..., 0], state)
            out = out[:, :, None]
        else:
            valid = (torch.arange(T, device=x.device)[None] < valid_lens[:, None])[:, None]  # [B, 1, T]
            k, g, beta = k * valid[..., None], g * valid, beta * valid
            chunks = num_chunks if num_chunks is not None else -(-T // CHUNK)
            out, state = chunked_gated_delta_rule(q, k, v, g, beta, state, chunks)
        out = out.transpose(1, 2).to(x.dtype)  # [B, T, Hv, Dv]
        z = self.in_proj_z(x).reshape(B, T, self.num_v_heads, self.v_dim)
        out = self.norm(out, z).reshape(B, T, self.value_size)
        return self.out_proj(out), conv_state, state
