"""Tensor parallelism (Megatron-style) for a built CausalLM, in plain torch.

`shard_model(model, rank, world)` cuts a model in place into rank's share:

- q/k/v and gate/up (fused or not) are column-parallel: each rank keeps the output rows
  of its heads (num_heads / world query heads, num_kv_heads / world KV heads) and of
  its slice of the MLP's intermediate width; attention and the activation need nothing
  from other ranks.
- o_proj and down_proj are row-parallel: each rank keeps the input columns matching its
  heads / intermediate slice, and the partial outputs are summed across ranks.
- the embedding is vocab-parallel: each rank holds vocab / world rows; a lookup zeroes
  ids outside the rank's slice and sums across ranks.
- the LM head is replicated: every rank computes the full logits from the full head.
  A vocab-parallel head needs an all-gather, which AOTInductor runs through its proxy
  executor; on gloo that deadlocked intermittently (seen 2026-11-29, torch 2.13: gloo's
  worker thread freed the gather's work while holding its queue lock and waited for the
  GIL, which the compiled program's caller held while waiting for that lock). The
  replicated head costs one head matrix per rank (about 6% more weight reads per token
  on an 8B model at TP=2) and no communication.

The collectives are torch's functional ones (`_c10d_functional.all_reduce` + `wait_tensor`): torch.export traces them and AOTInductor
compiles them into the package, where the process group is looked up by name when the
program runs (checked on CPU with gloo, torch 2.13). Tracing needs no process group, so
a build compiles one program that every rank runs with its own weights: nothing in it
depends on the rank (the vocab offset is a buffer, not a constant).

Two processes, one per rank: two forward passes whose all-reduces meet.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, CausalLM, RMSNorm

SPLITTABLE = ("llama", "qwen3")  # dense attention + MLP decoders
DEFAULT_GROUP = "0"  # torch.distributed names the default (world) process group "0"


class ShardingError(ValueError):
    """The model cannot be split over this many ranks (a sentence for the user)."""


def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", group))


class RowParallelLinear(nn.Linear):
    """A slice of a linear's input columns; the partial products are summed across ranks.
    A bias is added once (rank 0 keeps it, the others hold zeros)."""

    group = DEFAULT_GROUP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.group)


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + n) of the embedding; ids elsewhere look up zeros."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, group: str):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        # A buffer, not a Python int, so the compiled program is the same for every rank;
        # shaped [1, 1] because Inductor bakes 0-d and short 1-d tensors into the program.
        self.register_buffer("vocab_start", torch.full((1, 1), vocab_start, dtype=torch.long, device=weight.device))
        self.group = group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        inside = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        return all_reduce(rows * inside[..., None].to(rows.dtype), self.group)


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, index.to(t.device)).contiguous()


def _column_parallel(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """Keep the output rows in `index` (a linear whose output this rank computes alone)."""
    out = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
    out = out.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(_rows(linear.weight, index))
        if linear.bias is not None:
            out.bias.copy_(_rows(linear.bias, index))
    return out


def _row_parallel(linear: nn.Linear, start: int, width: int, rank: int, group: str) -> RowParallelLinear:
    out = RowParallelLinear(width, linear.out_features, bias=linear.bias is not None)
    out = out.to(device=linear.weight.device, dtype=linear.weight.dtype)
    out.group = group
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, start : start + width])
        if linear.bias is not None:
            out.bias.copy_(linear.bias if rank == 0 else torch.zeros_like(linear.bias))
    return out


def check_shardable(config, world: int) -> None:
    """Raise ShardingError when `world` ranks cannot split this model evenly."""
    if world < 1:
        raise ShardingError(f"The tensor-parallel size must be at least 1, got {world}.")
    if config.architecture not in SPLITTABLE:
        raise ShardingError(f"Tensor parallelism supports the {' and '.join(SPLITTABLE)} architectures; "
                            f"{config.architecture} is not split yet.")
    for what, n in (("attention heads", config.num_heads), ("KV heads", config.num_kv_heads),
                    ("MLP intermediate size", config.intermediate_size)):
        if n % world:
            raise ShardingError(f"Tensor parallelism over {world} ranks needs the model's {what} ({n}) to be "
                                f"divisible by {world}; choose a --tp that divides {n}.")


def vocab_shard(vocab_size: int, world: int) -> int:
    """Rows per rank: the vocab padded up to a multiple of world (padding rows are zero)."""
    return -(-vocab_size // world)


@torch.no_grad()
def shard_model(model: CausalLM, rank: int, world: int, group: str = DEFAULT_GROUP) -> CausalLM:
    """Cut a float model (fused projections or not) into rank's share, in place.

    Afterwards `model.config` describes one rank: num_heads / world query heads and
    num_kv_heads / world KV heads (what its KV cache holds); vocab_size stays whole,
    since every rank computes the whole logits.
    """
    cfg = model.config
    check_shardable(cfg, world)
    if not 0 <= rank < world:
        raise ShardingError(f"Rank {rank} is outside 0..{world - 1}.")
    if not isinstance(model.embed_tokens, nn.Embedding) or not isinstance(model.lm_head, nn.Linear):
        raise ShardingError("This model is already sharded or quantized; shard a float model once.")
    for layer in model.layers:
        if not isinstance(layer.mlp, MLP):
            raise ShardingError("Tensor parallelism supports dense models only (no mixture-of-experts yet).")
        for module in (*layer.self_attn.children(), *layer.mlp.children()):
            if not isinstance(module, (nn.Linear, RMSNorm)):
                raise ShardingError("Tensor parallelism needs float weights (fp32, bf16 or fp16); "
                                    "build with one of those --quant schemes.")
    D, I = cfg.head_dim, cfg.intermediate_size
    heads, kv_heads, inter = cfg.num_heads // world, cfg.num_kv_heads // world, I // world
    device = model.norm.weight.device
    q = torch.arange(rank * heads * D, (rank + 1) * heads * D, device=device)
    kv = torch.arange(rank * kv_heads * D, (rank + 1) * kv_heads * D, device=device)
    mlp = torch.arange(rank * inter, (rank + 1) * inter, device=device)
    for layer in model.layers:
        attn = layer.self_attn
        if attn.qkv_proj is not None:  # fused rows: [q | k | v]
            Q, KV = cfg.num_heads * D, cfg.num_kv_heads * D
            attn.qkv_proj = _column_parallel(attn.qkv_proj, torch.cat((q, Q + kv, Q + KV + kv)))
        else:
            attn.q_proj = _column_parallel(attn.q_proj, q)
            attn.k_proj = _column_parallel(attn.k_proj, kv)
            attn.v_proj = _column_parallel(attn.v_proj, kv)
        attn.o_proj = _row_parallel(attn.o_proj, rank * heads * D, heads * D, rank, group)
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        m = layer.mlp
        if m.gate_up_proj is not None:  # fused rows: [gate | up]
            m.gate_up_proj = _column_parallel(m.gate_up_proj, torch.cat((mlp, I + mlp)))
        else:
            m.gate_proj = _column_parallel(m.gate_proj, mlp)
            m.up_proj = _column_parallel(m.up_proj, mlp)
        m.down_proj = _row_parallel(m.down_proj, rank * inter, inter, rank, group)

    n = vocab_shard(cfg.vocab_size, world)

    def vocab_rows(weight: torch.Tensor) -> torch.Tensor:
        rows = weight[rank * n : (rank + 1) * n]
        pad = n - rows.shape[0]
        return torch.cat((rows, rows.new_zeros(pad, rows.shape[1]))) if pad else rows.clone()

    # A tied head keeps the whole table (it stays the old parameter); the embedding gets its slice.
    model.embed_tokens = VocabParallelEmbedding(vocab_rows(model.embed_tokens.weight), rank * n, group)
    model.config = dataclasses.replace(cfg, num_heads=heads, num_kv_heads=kv_heads)
    return model


def per_rank_config(config, world: int):
    """The config one rank's programs and KV cache see (shard_model's model.config)."""
    check_shardable(config, world)
    return dataclasses.replace(config, num_heads=config.num_heads // world, num_kv_heads=config.num_kv_heads // world)
