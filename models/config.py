"""Model configuration: one frozen dataclass every architecture is built from.

Parsed once at the edge (an HF config.json, GGUF metadata, a bundle manifest) and
trusted inside the model code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # default | linear | dynamic | yarn | llama3
    factor: float = 1.0
    original_max_position: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # key into arle_models.ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (Qwen3-MoE); num_experts 0 keeps every layer dense. A layer is
    # sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer (as HF).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0  # Qwen3.5-MoE: a gated shared expert beside the routed ones
    # Hybrid linear attention (Qwen3.5): "full_attention" or "linear_attention" per
    # layer; empty means every layer is full attention (all the other architectures).
    layer_types: tuple[str, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    partial_rotary_factor: float = 1.0  # RoPE rotates only the first head_dim * factor dims
    attn_output_gate: bool = False  # q_proj also yields a sigmoid gate on the attention output

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_hybrid(self) -> bool:
        return "linear_attention" in self.layer_types

    @property
    def full_attention_layers(self) -> tuple[int, ...]:
        """Layers that keep a KV cache (all of them unless the model is hybrid)."""
        if not self.layer_types:
            return tuple(range(self.num_layers))
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    @property
    def linear_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "linear_attention")

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the short causal conv: q, k and v of all linear-attention heads."""
        key = self.linear_num_key_heads * self.linear_key_head_dim
        return 2 * key + self.linear_num_value_heads * self.linear_value_head_dim

    def _hybrid_mixer_parameters(self) -> int:
        """Attention-side parameters of all layers of a hybrid model (norms included)."""
        h, d = self.hidden_size, self.head_dim
        q = self.num_heads * d
        full = h * (q * (2 if self.attn_output_gate else 1) + 2 * self.num_kv_heads * d) + q * h + 2 * d
        hv, dv = self.linear_num_value_heads, self.linear_value_head_dim
        conv = self.linear_conv_dim
        linear = h * (conv + hv * dv + 2 * hv) + conv * self.linear_conv_kernel + 2 * hv + dv + hv * dv * h
        mixers = len(self.full_attention_layers) * full + len(self.linear_attention_layers) * linear
        sparse = sum(self.is_sparse_layer(n) for n in range(self.num_layers))
        shared_size = self.shared_expert_intermediate_size
        shared = sparse * (3 * h * shared_size + h) if shared_size else 0
        return mixers + shared + self.num_layers * 2 * h

    def is_sparse_layer(self, layer: int) -> bool:
        return (
            self.num_experts > 0 and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0
        )

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 2 * h
        if self.architecture in ("qwen3", "qwen3_moe"):
            per_layer += 2 * self.head_dim
        sparse = sum(self.is_sparse_layer(n) for n in range(self.num_layers))
        moe = self.num_experts * (3 * h * self.moe_intermediate_size + h)  # experts + router row
        mlps = (self.num_layers - sparse) * 3 * h * i + sparse * moe
        head = 0 if self.tie_word_embeddings else v * h
        if self.is_hybrid:
            per_layer = 0  # counted by _hybrid_mixer_parameters
            mlps += self._hybrid_mixer_parameters()
        return v * h + self.num_layers * per_layer + mlps + h + head

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["mlp_only_layers"] = tuple(d.get("mlp_only_layers", ()))
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(**d)
