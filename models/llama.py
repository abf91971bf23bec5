"""Llama architecture (Llama 2/3, SmolLM2, TinyLlama, ...): the plain pre-norm decoder."""

from .layers import CausalLM


class Llama(CausalLM):
    qk_norm = False
