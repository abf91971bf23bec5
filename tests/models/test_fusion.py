"""Fusing q/k/v and gate/up projections (a build-time transform) changes no result."""

import copy

import pytest
import torch

from arle_models import ModelConfig, build_model
from conftest import assert_attention_variant_matches


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_projections_give_identical_logits(arch):
    cfg = ModelConfig(arch, vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    fused = copy.deepcopy(model).fuse_projections()
    tokens = torch.randint(0, 256, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(fused.all_logits(tokens), model.all_logits(tokens), rtol=1e-6, atol=1e-6)
    names = {n for n, _ in fused.named_parameters()}
    assert "layers.0.self_attn.qkv_proj.weight" in names and "layers.0.mlp.gate_up_proj.weight" in names
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n in names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_past_attention_matches_sdpa(dtype):
    """The decode program's attention (no cache concatenation) equals SDPA, ragged pasts included."""
    assert_attention_variant_matches(lambda m: m.use_split_attention(True), dtype, (1, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expanded_kv_attention_matches_gqa_sdpa(dtype):
    """The cuda prefill option (K/V repeated per query head, no enable_gqa) gives the
    default path's outputs, ragged pasts and multi-token chunks included."""
    expanded = assert_attention_variant_matches(lambda m: m.use_expanded_kv(True), dtype, (1, 4))
    assert all(layer.self_attn.expand_kv for layer in expanded.layers)
