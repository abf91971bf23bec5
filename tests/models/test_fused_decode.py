"""The fused small-batch decode step (arle_models.fused_decode, the cuda target's
decode_fused program) equals the plain paged decode step."""

import pytest
import torch

from arle_models import ModelConfig, build_model
from arle_models.fused_decode import FusedOps, fusable

from test_paged_decode import PAGE, paged_copy, shuffled_pages


def random_model(arch: str, heads: int, kv_heads: int, dtype=torch.float32):
    cfg = ModelConfig(arch, vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    model = build_model(cfg).eval().fuse_projections()
    with torch.no_grad():  # norms away from 1, so a misplaced or missing norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def step_inputs(model, g: torch.Generator):
    cfg = model.config
    B, P = 3, 37
    lens = [37, 16, 0]
    past_k = torch.randn(cfg.num_layers, B, cfg.num_kv_heads, P, cfg.head_dim, generator=g).to(model.compute_dtype)
    past_v = torch.randn(past_k.shape, generator=g).to(model.compute_dtype)
    table = shuffled_pages(B, -(-P // PAGE) + 1, g)
    k_pool, v_pool = paged_copy(past_k, lens, table, g), paged_copy(past_v, lens, table, g)
    past_lens = torch.tensor(lens)
    tokens = torch.randint(0, cfg.vocab_size, (B, 1), generator=g)
    return tokens, past_lens[:, None], k_pool, v_pool, table, past_lens.to(torch.int32)


@pytest.mark.parametrize("arch,heads,kv_heads", [("llama", 6, 2), ("qwen3", 4, 4), ("qwen3", 8, 2)])
def test_fused_reference_step_equals_the_paged_step(arch, heads, kv_heads):
    model = random_model(arch, heads, kv_heads)
    inputs = step_inputs(model, torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.forward_paged(*inputs)
        got = model.forward_paged_fused(*inputs, FusedOps())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_reference_step_in_bf16_rounds_like_the_paged_step():
    model = random_model("qwen3", 8, 2, torch.bfloat16)
    inputs = step_inputs(model, torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.forward_paged(*inputs)
        got = model.forward_paged_fused(*inputs, FusedOps())
    err = ((got[0] - want[0]).norm() / want[0].norm()).item()
    assert err < 1e-2, err
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_only_dense_float_models_with_fused_projections_are_fusable():
    assert fusable(random_model("qwen3", 4, 4, torch.bfloat16)) is None
    assert "compute dtype" in fusable(random_model("qwen3", 4, 4))
    cfg = ModelConfig("qwen3", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                      num_kv_heads=4, head_dim=16, max_position_embeddings=128)
    assert "unfused" in fusable(build_model(cfg).to(torch.bfloat16))
