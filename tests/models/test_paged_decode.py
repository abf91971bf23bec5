"""The paged decode step (what the cuda target compiles) equals the dense-past step."""

import pytest
import torch

from arle_models import ModelConfig, build_model

PAGE = 16


def shuffled_pages(batch: int, pages_per_row: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(batch * pages_per_row, generator=generator).view(batch, pages_per_row).to(torch.int32)


def paged_copy(past: torch.Tensor, lens: list[int], table: torch.Tensor, generator: torch.Generator):
    """Scatter a dense past [L,B,Hkv,P,D] into a pool [L,slots,Hkv,D] along the page
    table, with random junk in every slot no sequence owns."""
    L, B, H, P, D = past.shape
    pool = torch.randn(L, table.numel() * PAGE + 2, H, D, generator=generator, dtype=past.dtype)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = table[b, pos // PAGE].long() * PAGE + pos % PAGE
        pool[:, slots] = past[:, b, :, :n].transpose(1, 2)
    return pool


@pytest.mark.parametrize("arch,heads,kv_heads", [("llama", 6, 2), ("qwen3", 4, 4)])
def test_paged_decode_matches_dense(arch, heads, kv_heads):
    cfg = ModelConfig(arch, vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = build_model(cfg).eval().fuse_projections()
    B, P = 3, 37
    lens = [37, 16, 0]
    past_k = torch.randn(cfg.num_layers, B, kv_heads, P, 16, generator=g)
    past_v = torch.randn_like(past_k)
    tokens = torch.randint(0, 256, (B, 1), generator=g)
    past_lens = torch.tensor(lens)
    with torch.no_grad():
        dense = model(tokens, past_lens[:, None], past_k, past_v, past_lens, torch.zeros(B, dtype=torch.long))
        table = shuffled_pages(B, -(-P // PAGE) + 1, g)
        k_pool, v_pool = paged_copy(past_k, lens, table, g), paged_copy(past_v, lens, table, g)
        paged = model.forward_paged(tokens, past_lens[:, None], k_pool, v_pool, table, past_lens.to(torch.int32))
    torch.testing.assert_close(paged[0], dense[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged[1], dense[1][:, :, :, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(paged[2], dense[2][:, :, :, 0], atol=1e-6, rtol=1e-6)
