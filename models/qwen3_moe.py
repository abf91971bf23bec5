"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 layout (per-head q/k RMSNorm
before RoPE) with a sparse mixture-of-experts block (moe.Qwen3MoeBlock) in place of the
dense MLP on every layer that config.is_sparse_layer() picks; the others keep a dense
MLP of intermediate_size, as in transformers.

Decode state per layer: only the attention KV cache (the step contract's past_k/past_v);
routing is stateless, recomputed for every token.
"""

from torch import nn

from .layers import MLP, CausalLM
from .moe import Qwen3MoeBlock


class Qwen3Moe(CausalLM):
    qk_norm = True

    def make_mlp(self, layer: int) -> nn.Module:
        return Qwen3MoeBlock(self.config) if self.config.is_sparse_layer(layer) else MLP(self.config)

    def use_split_attention(self, enabled: bool) -> "Qwen3Moe":
        """The decode program's choices (targets call this around its export): split-past
        attention, and experts gathered per token rather than all run (moe.py says why)."""
        for layer in self.layers:
            if isinstance(layer.mlp, Qwen3MoeBlock):
                layer.mlp.gather = enabled
        return super().use_split_attention(enabled)
