"""Qwen3.5 GGUF files (`qwen35`, `qwen35moe`): the config from llama.cpp's metadata, and the
tensors back in Hugging Face's layout (what arle's models and every other source use).

llama.cpp's convert_hf_to_gguf.py (its Qwen3Next model and the linear-attention V-head
reorder on top of it) rewrites these tensors; `to_hf_layout` undoes each step:
- zero-centred RMSNorm weights (input/post-attention norms, the final norm, q/k norms) are
  stored as 1 + w; the gated norm inside the linear layers is stored as it is;
- A_log is stored as ssm_a = -exp(A_log), dt_bias as ssm_dt.bias, the depthwise conv kernel
  squeezed to [channels, kernel];
- when a linear layer has more value heads than key heads, its value heads are reordered
  from grouped by key head (k0v0 k0v1 k1v0 k1v1, HF) to tiled (k0v0 k1v0 k0v1 k1v1) in every
  tensor with one block per value head: the v rows of in_proj_qkv and the v channels of the
  conv, the rows of in_proj_z / in_proj_a / in_proj_b, A_log, dt_bias, out_proj's columns;
- multi-token-prediction layers follow the decoder's (`block_count` counts them,
  `nextn_predict_layers` says how many); arle does not use them, so they are skipped.
"""

from __future__ import annotations

import torch

from arle_runtime.errors import ArleError

# GGUF architecture -> arle architecture
ARCHITECTURES = {"qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe"}

# blk.N.<gguf name> -> layers.N.<arle name> (gguf-py's TensorNameMap for QWEN35 / QWEN35MOE)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",  # q and the output gate, interleaved per head as in HF
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "linear_attn.in_proj_qkv",
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_beta": "linear_attn.in_proj_b",
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",  # [E, I, H] stacks; sources.fuse_expert_tensors joins them
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Parameters stored without a .weight suffix in arle (and HF).
BARE_NAMES = {
    "ssm_a": "linear_attn.A_log",  # blk.N.ssm_a
    "ssm_dt.bias": "linear_attn.dt_bias",  # blk.N.ssm_dt.bias
    "ffn_gate_up_exps.weight": "mlp.experts.gate_up_proj",  # a fused [E, 2I, H] stack (gate rows first)
}
# Norms llama.cpp stores as 1 + w (Qwen3.5's RMSNorm multiplies by 1 + w; the gated one by w).
OFFSET_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight")


def tensor_name(name: str, num_layers: int) -> str | None:
    """The arle name of a layer's GGUF tensor (blk.N.*; the others are named as for every
    architecture); "" for one that is deliberately skipped (an MTP layer's), None for one
    that has no place in the model."""
    parts = name.split(".", 2)
    if len(parts) < 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    layer, rest = int(parts[1]), parts[2]
    if layer >= num_layers:
        return ""
    if rest in BARE_NAMES:
        return f"layers.{layer}.{BARE_NAMES[rest]}"
    stem, _, suffix = rest.rpartition(".")
    if stem in LAYER_NAMES and suffix == "weight":
        return f"layers.{layer}.{LAYER_NAMES[stem]}.weight"
    return None


def config_fields(meta, path, head_dim: int, block_count: int, moe: bool) -> dict:
    """ModelConfig's fields for the hybrid layers (and the MoE ones of qwen35moe)."""
    def need(key):
        value = meta(key)
        if value is None:
            raise ArleError(f"{path}: the GGUF metadata lacks {key}; is it a complete Qwen3.5 file?")
        return value

    num_layers = block_count - int(meta("nextn_predict_layers", 0) or 0)
    interval = int(meta("full_attention_interval", 4))
    v_heads = int(need("ssm.time_step_rank"))
    fields = dict(
        num_layers=num_layers,
        layer_types=tuple("linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)),
        linear_num_key_heads=int(need("ssm.group_count")),
        linear_num_value_heads=v_heads,
        linear_key_head_dim=int(need("ssm.state_size")),
        linear_value_head_dim=int(need("ssm.inner_size")) // v_heads,
        linear_conv_kernel=int(need("ssm.conv_kernel")),
        partial_rotary_factor=int(meta("rope.dimension_count", head_dim)) / head_dim,
        attn_output_gate=True,
    )
    if moe:
        fields.update(
            intermediate_size=0,
            num_experts=int(need("expert_count")),
            num_experts_per_tok=int(need("expert_used_count")),
            moe_intermediate_size=int(need("expert_feed_forward_length")),
            norm_topk_prob=True,  # Qwen3.5-MoE always renormalises its top-k weights
            shared_expert_intermediate_size=int(need("expert_shared_feed_forward_length")),
        )
    return fields


def _untile_v_heads(t: torch.Tensor, dim: int, k_heads: int, per_k: int, head_dim: int) -> torch.Tensor:
    """Tiled value-head order (v index major) back to grouped by key head, along dim."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], per_k, k_heads, head_dim, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


def to_hf_layout(tensors: dict[str, torch.Tensor], config) -> None:
    """Undo llama.cpp's rewrites (module docstring), in place."""
    for name in list(tensors):
        if name == "norm.weight" or name.endswith(OFFSET_NORMS):
            tensors[name] = tensors[name] - 1
        elif name.endswith("linear_attn.A_log"):
            tensors[name] = torch.log(-tensors[name])
        elif name.endswith("linear_attn.conv1d.weight") and tensors[name].dim() == 2:
            tensors[name] = tensors[name].unsqueeze(1)
        elif name.endswith("mlp.shared_expert_gate.weight"):
            tensors[name] = tensors[name].reshape(1, -1)
    k_heads, v_heads = config.linear_num_key_heads, config.linear_num_value_heads
    if k_heads == v_heads:
        return
    per_k, dv = v_heads // k_heads, config.linear_value_head_dim
    key_rows = 2 * k_heads * config.linear_key_head_dim  # q and k rows come before v
    for layer in config.linear_attention_layers:
        p = f"layers.{layer}.linear_attn."
        for part in ("in_proj_qkv.weight", "conv1d.weight"):
            t = tensors[p + part]
            tensors[p + part] = torch.cat([t[:key_rows], _untile_v_heads(t[key_rows:], 0, k_heads, per_k, dv)])
        tensors[p + "in_proj_z.weight"] = _untile_v_heads(tensors[p + "in_proj_z.weight"], 0, k_heads, per_k, dv)
        for part in ("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias"):
            tensors[p + part] = _untile_v_heads(tensors[p + part], 0, k_heads, per_k, 1)
        tensors[p + "out_proj.weight"] = _untile_v_heads(tensors[p + "out_proj.weight"], 1, k_heads, per_k, dv)
