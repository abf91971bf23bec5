"""Qwen3 dense: the Llama layout plus per-head RMSNorm on queries and keys before RoPE."""

from .layers import CausalLM


class Qwen3(CausalLM):
    qk_norm = True
