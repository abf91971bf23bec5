"""The generated prefill attention kernel (templates/prefill_attention.py.j2).

Rendering runs everywhere; the kernel's numerics run on the CPU in Triton's interpreter
(fp16: the interpreter has no bf16) against SDPA over [past | new] with the step's mask,
and in bf16 on a GPU (skipped without one)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from arle_runtime.errors import ArleError
from arle_targets.kernels import PrefillAttentionSpec, render_prefill_attention
from conftest import run_check_script


def test_rendered_source_is_specialised_and_hashes_its_op_name():
    a = render_prefill_attention(PrefillAttentionSpec(128, 16, 8, "bfloat16"))
    b = render_prefill_attention(PrefillAttentionSpec(64, 9, 3, "bfloat16"))
    for src in (a, b):
        compile(src, "kernel", "exec")
        assert "{{" not in src and src.count("triton_op(") == 1
    assert "HEAD_DIM=128, NUM_HEADS=16, GROUP=2," in a and "HEAD_DIM=64, NUM_HEADS=9, GROUP=3," in b
    op = [line for line in a.splitlines() if "triton_op(" in line]
    assert op != [line for line in b.splitlines() if "triton_op(" in line]
    assert render_prefill_attention(PrefillAttentionSpec(128, 16, 8, "bfloat16")) == a


def test_spec_refuses_shapes_the_kernel_cannot_tile():
    with pytest.raises(ArleError, match="divide"):
        PrefillAttentionSpec(128, 16, 5, "bfloat16")
    with pytest.raises(ArleError, match="power-of-two head dim"):
        PrefillAttentionSpec(96, 16, 8, "bfloat16")


# Shapes: (rows, new tokens, padded past, past lengths per row). Past lengths vary per row
# (0 included: a first chunk next to a later one); token counts straddle the 64-token
# blocks; the fp16 past is compared in the kernel's reading too.
CHECK = textwrap.dedent("""
    import pathlib, sys, tempfile, torch
    import torch.nn.functional as F
    from arle_models.layers import step_mask
    from arle_targets.kernels import PrefillAttentionSpec, load_kernel_module, render_prefill_attention
    device, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2  # bf16 rounds the probabilities and the output 8x coarser
    torch.manual_seed(0)
    for heads, kv_heads, dim in ((4, 2, 32), (3, 3, 16)):
        path = pathlib.Path(tempfile.mkdtemp()) / "prefill.py"
        path.write_text(render_prefill_attention(PrefillAttentionSpec(dim, heads, kv_heads, str(dtype)[6:])))
        kernel = load_kernel_module(path).prefill_attention
        for rows, tokens, padded, lens in ((1, 5, 0, [0]), (2, 70, 40, [40, 0]), (3, 64, 130, [130, 1, 65]),
                                           (2, 129, 16, [3, 16])):
            q = torch.randn(rows, heads, tokens, dim, dtype=dtype, device=device)
            k, v = (torch.randn(rows, kv_heads, tokens, dim, dtype=dtype, device=device) for _ in "kv")
            past_k, past_v = (torch.randn(rows, kv_heads, padded, dim, dtype=dtype, device=device) for _ in "kv")
            past_lens = torch.tensor(lens, device=device)
            mask = step_mask(past_lens, padded, tokens)
            keys, values = torch.cat((past_k, k), 2).double(), torch.cat((past_v, v), 2).double()
            ref = F.scaled_dot_product_attention(q.double(), keys, values, attn_mask=mask, enable_gqa=True)
            out = kernel(q, k, v, past_k, past_v, past_lens)
            assert out.shape == (rows, tokens, heads, dim) and out.dtype == dtype
            err = (out.double().transpose(1, 2) - ref).abs().max().item()
            assert err < tol, (heads, kv_heads, rows, tokens, padded, lens, err)
            # Strided inputs, as the model passes them: q/k/v are views of one projection output.
            qkv = torch.randn(rows, tokens, heads + 2 * kv_heads, dim, dtype=dtype, device=device).transpose(1, 2)
            q2, k2, v2 = qkv.split([heads, kv_heads, kv_heads], dim=1)
            ref2 = F.scaled_dot_product_attention(q2.double(), torch.cat((past_k, k2), 2).double(),
                                                  torch.cat((past_v, v2), 2).double(), attn_mask=mask, enable_gqa=True)
            out2 = kernel(q2, k2, v2, past_k, past_v, past_lens)
            assert (out2.double().transpose(1, 2) - ref2).abs().max().item() < tol
    print("ok")
""")


# The model with the kernel in its attention layers (CausalLM.use_prefill_kernel) against
# the same model on SDPA: logits and new K/V, ragged pasts, chunks across block edges.
MODEL_CHECK = textwrap.dedent("""
    import pathlib, sys, tempfile, torch
    sys.path.insert(0, "tests")
    from conftest import assert_attention_variant_matches
    from arle_targets.kernels import PrefillAttentionSpec, load_kernel_module, render_prefill_attention
    device, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    path = pathlib.Path(tempfile.mkdtemp()) / "prefill.py"
    path.write_text(render_prefill_attention(PrefillAttentionSpec(16, 6, 2, str(dtype)[6:])))
    kernel = load_kernel_module(path).prefill_attention
    # fused q/k/v: the kernel reads strided views of one projection, as in a cuda build
    assert_attention_variant_matches(lambda m: m.fuse_projections().use_prefill_kernel(kernel), dtype, (1, 4, 70),
                                     device)
    print("ok")
""")


def test_model_with_the_kernel_equals_the_sdpa_model_in_tritons_interpreter():
    run_check_script(MODEL_CHECK, "cpu", "float16", interpreted=True)


def test_kernel_equals_masked_sdpa_in_tritons_interpreter():
    run_check_script(CHECK, "cpu", "float16", interpreted=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kernel_equals_masked_sdpa_on_the_gpu(dtype):
    run_check_script(CHECK, "cuda", dtype, interpreted=False)
    run_check_script(MODEL_CHECK, "cuda", dtype, interpreted=False)
