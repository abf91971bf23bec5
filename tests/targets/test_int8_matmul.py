"""The cuda target's weight-only int8 matmul (templates/int8_matmul.py.j2) and its layer.

Rendering and the layer's plain-torch product run everywhere; the kernel's numerics run on
the CPU in Triton's interpreter (fp16: the interpreter has no bf16) against a float64
product, and in bf16/fp16 on a GPU (skipped without one)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from arle_targets.kernels import Int8MatmulSpec, render_int8_matmul
from conftest import run_check_script


def test_rendered_source_names_both_ops_and_hashes_them():
    a, b = render_int8_matmul(Int8MatmulSpec(num_sms=132)), render_int8_matmul(Int8MatmulSpec(num_sms=78))
    for src in (a, b):
        compile(src, "kernel", "exec")
        assert "{{" not in src and src.count("triton_op(") == 2
    assert "NUM_SMS = 132" in a and "NUM_SMS = 78" in b
    assert [ln for ln in a.splitlines() if "triton_op(" in ln] != [ln for ln in b.splitlines() if "triton_op(" in ln]


def _int8_layer(n: int, k: int, dtype=torch.float32):
    from arlec.quant import _int8_linear

    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False)
    return linear, _int8_linear(linear, dtype, kernels="cuda")


def test_the_cuda_int8_layer_is_the_dequantized_linear():
    from arle_models.quant_layers import Int8CudaLinear

    linear, layer = _int8_layer(48, 80)
    assert type(layer) is Int8CudaLinear and layer.weight.dtype == torch.int8 and layer.kernel is None
    x = torch.randn(3, 5, 80)
    dequantized = layer.weight.float() * layer.scales[:, None]
    torch.testing.assert_close(layer(x), x @ dequantized.T, atol=1e-5, rtol=1e-5)
    # and int8 rounding stays close to the float weights (per-channel symmetric: < 1% of each row's max)
    assert ((dequantized - linear.weight).abs() <= linear.weight.abs().amax(1, keepdim=True) / 254 + 1e-7).all()


def test_a_cuda_int8_model_keeps_float_embeddings_and_fuses():
    from arle_models import ModelConfig, build_model
    from arle_models.fused_decode import fusable
    from arle_models.quant_layers import Int8CudaLinear
    from arlec.quant import parse_quant, quantize_model

    cfg = ModelConfig("qwen3", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    model = build_model(cfg).eval().fuse_projections()
    tokens = torch.randint(0, 256, (2, 9))
    expected = model.all_logits(tokens)
    quantize_model(model, parse_quant("int8"), kernels="cuda")
    linears = [m for m in model.layers.modules() if isinstance(m, Int8CudaLinear)]
    assert len(linears) == 4 * cfg.num_layers and type(model.embed_tokens) is nn.Embedding
    assert fusable(model) is None  # decode_fused takes int8 weights too
    got = model.all_logits(tokens)
    assert ((got.float() - expected).norm() / expected.norm()).item() < 0.05


# Each op (decode: 16-row tiles; prefill: 64-row tiles) on rows that do and do not fill a
# tile and on widths that are not multiples of the tiles, against the float64 product and
# against the layer's own plain-torch product on the same tensors.
CHECK = textwrap.dedent("""
    import pathlib, sys, tempfile, torch
    from arle_models.quant_layers import Int8CudaLinear
    from arle_targets.kernels import Int8MatmulSpec, load_kernel_module, render_int8_matmul
    device, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    path = pathlib.Path(tempfile.mkdtemp()) / "int8.py"
    path.write_text(render_int8_matmul(Int8MatmulSpec(num_sms=4)))
    module = load_kernel_module(path)
    torch.manual_seed(0)
    for op in (module.int8_linear_decode, module.int8_linear_prefill):
        for m, n, k in ((1, 96, 64), (5, 40, 80), (70, 64, 48), (16, 24, 272)):
            x = torch.randn(m, k, dtype=dtype, device=device)
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
            s = (torch.rand(n, device=device) * 0.02 + 0.001).to(dtype)
            out = op(x, w, s)
            assert out.shape == (m, n) and out.dtype == dtype
            ref = (x.double() @ w.double().T) * s.double()
            err = ((out.double() - ref).abs() / (ref.abs() + 1)).max().item()
            assert err < 1e-2, (op, m, n, k, err)
            layer = Int8CudaLinear(k, n, dtype).to(device)
            layer.weight, layer.scales = w, s
            torch.testing.assert_close(out.float(), layer(x).float(), atol=2e-2, rtol=2e-2)
    print("ok")
""")


def test_kernel_equals_the_float64_product_in_tritons_interpreter():
    run_check_script(CHECK, "cpu", "float16", interpreted=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kernel_equals_the_float64_product_on_the_gpu(dtype):
    run_check_script(CHECK, "cuda", dtype, interpreted=False)
