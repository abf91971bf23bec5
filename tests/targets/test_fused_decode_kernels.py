"""The cuda target's fused small-batch decode kernels (templates/fused_decode.py.j2).

Each operation is checked against its plain-torch specification in arle_models.fused_decode:
on the CPU in Triton's interpreter (fp16: the interpreter has no bf16), and in bf16 with
the model's real shapes on a GPU (skipped without one)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from arle_targets.kernels import FusedDecodeSpec, render_fused_decode
from conftest import run_check_script

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def spec(**kw) -> FusedDecodeSpec:
    base = dict(head_dim=64, num_heads=8, num_kv_heads=2, page_size=16, kv_dtype="bfloat16", qk_norm=True, num_sms=132)
    return FusedDecodeSpec(**{**base, **kw})


def test_rendered_source_is_specialised_valid_python_with_hashed_op_names():
    a, b = render_fused_decode(spec()), render_fused_decode(spec(num_kv_heads=4))
    for src in (a, b):
        compile(src, "kernel", "exec")
        assert "{{" not in src and src.count("triton_op(") == 4
    assert "NUM_SMS = 132" in a and "GROUP=4" in a and "GROUP=2" in b
    op_lines = [line for line in a.splitlines() if "triton_op(" in line]
    assert all(line not in b for line in op_lines)


def test_fused_spec_refuses_shapes_the_kernels_cannot_do():
    from arle_runtime.errors import ArleError

    with pytest.raises(ArleError, match="at least 32"):
        spec(head_dim=16)
    with pytest.raises(ArleError, match="do not divide"):
        spec(num_heads=9, num_kv_heads=2)


# One script, run on the CPU in Triton's interpreter (fp16) and on a GPU (bf16): every op
# against its specification over several batch sizes (one past the 16-row M tile), with
# and without bias, per-head norm, an fp8 and an int8 weight, a pool whose first row has no past.
OPS_CHECK = textwrap.dedent("""
    import pathlib, sys, tempfile, torch
    from arle_targets.kernels import FusedDecodeSpec, load_kernel_module, render_fused_decode
    from arle_models import fused_decode as ref

    device, dt = sys.argv[1], getattr(torch, sys.argv[2])
    H, Hkv, D, hidden, inter = (int(v) for v in sys.argv[3:8])
    tol = float(sys.argv[8])

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    g = torch.Generator(device=device).manual_seed(0)
    for qk_norm in (True, False):
        s = FusedDecodeSpec(head_dim=D, num_heads=H, num_kv_heads=Hkv, page_size=16, kv_dtype=sys.argv[2],
                            qk_norm=qk_norm, num_sms=4 if device == "cpu" else 132)
        path = pathlib.Path(tempfile.mkdtemp()) / "k.py"
        path.write_text(render_fused_decode(s))
        mod = load_kernel_module(path)
        for B in (1, 3, 17):
            x = rand(B, hidden)
            nw = (torch.rand(hidden, generator=g, device=device) + 0.5).to(dt)
            n_qkv = (H + 2 * Hkv) * D
            w = rand(n_qkv, hidden, scale=hidden ** -0.5)
            for bias in (None, rand(n_qkv)):
                got = mod.norm_linear_op(x, nw, w, None, bias, 1e-6)
                want = ref.norm_linear(x.double(), nw.double(), w.double(), None, None if bias is None else bias.double(), 1e-6)
                assert rel(got, want) < tol, ("norm_linear", B, rel(got, want))
            w8 = (torch.randn(n_qkv, hidden, generator=g, device=device) * 3).to(torch.float8_e4m3fn)
            scale = torch.rand(n_qkv, generator=g, device=device) / 50 + 0.01
            got = mod.norm_linear_op(x, nw, w8, scale, None, 1e-6)
            want = ref.norm_linear(x.double(), nw.double(), w8, scale.double(), None, 1e-6)
            assert rel(got, want) < tol, ("norm_linear fp8", B, rel(got, want))
            w_int8 = torch.randint(-127, 128, (n_qkv, hidden), generator=g, device=device).to(torch.int8)
            got = mod.norm_linear_op(x, nw, w_int8, scale / 100, None, 1e-6)  # the cuda target's --quant int8
            want = ref.norm_linear(x.double(), nw.double(), w_int8, scale.double() / 100, None, 1e-6)
            assert rel(got, want) < tol, ("norm_linear int8", B, rel(got, want))
            wg = rand(2 * inter, hidden, scale=hidden ** -0.5)
            got = mod.norm_gated_up_op(x, nw, wg, None, None, 1e-6)
            want = ref.norm_gated_up(x.double(), nw.double(), wg.double(), None, None, 1e-6)
            assert got.shape == (B, inter) and rel(got, want) < tol, ("norm_gated_up", B, rel(got, want))
            h, wd = rand(B, inter), rand(hidden, inter, scale=inter ** -0.5)
            got = mod.linear_residual_op(h, wd, None, None, x)
            want = ref.linear_residual(h.double(), wd.double(), None, None, x.double())
            assert rel(got, want) < tol, ("linear_residual", B, rel(got, want))

            pages = 6
            past_lens = torch.randint(1, pages * 16, (B,), generator=g, device=device).to(torch.int32)
            past_lens[0] = 0
            table = torch.randperm(B * pages, generator=g, device=device).view(B, pages).to(torch.int32)
            k_pool, v_pool = rand(B * pages * 16 + 2, Hkv, D), rand(B * pages * 16 + 2, Hkv, D)
            qkv = rand(B, n_qkv)
            inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device).double() / D))
            freqs = past_lens.double()[:, None] * inv
            emb = torch.cat((freqs, freqs), -1)
            cos, sin = emb.cos().to(dt), emb.sin().to(dt)
            q_norm, k_norm = ((torch.rand(D, generator=g, device=device) + 0.5).to(dt) for _ in range(2))
            if not qk_norm:
                q_norm = k_norm = None
            got = mod.attention(qkv, cos, sin, q_norm, k_norm, k_pool, v_pool, table, past_lens, H, Hkv, 1e-6)
            dbl = lambda t: None if t is None else t.double()
            want = ref.attention(qkv.double(), cos.double(), sin.double(), dbl(q_norm), dbl(k_norm), k_pool.double(),
                                 v_pool.double(), table, past_lens, H, Hkv, 1e-6)
            for name, a, b in zip(("out", "k", "v"), got, want):
                assert a.shape == b.shape and a.dtype == dt, (name, a.shape, b.shape)
                assert rel(a, b) < tol, ("attention " + name, B, qk_norm, rel(a, b))
    print("ok")
""")


def test_fused_ops_match_their_specification_in_tritons_interpreter():
    run_check_script(OPS_CHECK, "cpu", "float16", "4", "2", "32", "96", "80", "3e-3", interpreted=True)


STEP_CHECK = textwrap.dedent("""
    import pathlib, tempfile, torch
    from arle_models import ModelConfig, build_model
    from arle_models.fused_decode import FusedOps
    from arle_targets.kernels import FusedDecodeSpec, load_kernel_module, render_fused_decode

    for arch, heads, kv_heads in (("qwen3", 4, 2), ("llama", 6, 2)):
        cfg = ModelConfig(arch, vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=heads,
                          num_kv_heads=kv_heads, head_dim=32, max_position_embeddings=128)
        torch.manual_seed(0)
        model = build_model(cfg).eval().fuse_projections().half()
        s = FusedDecodeSpec(head_dim=32, num_heads=heads, num_kv_heads=kv_heads, page_size=16, kv_dtype="float16",
                            qk_norm=arch == "qwen3", num_sms=4)
        path = pathlib.Path(tempfile.mkdtemp()) / "k.py"
        path.write_text(render_fused_decode(s))
        ops = load_kernel_module(path).OPS
        g = torch.Generator().manual_seed(1)
        k_pool, v_pool = (torch.randn(2, 200, kv_heads, 32, generator=g).half() for _ in range(2))
        table = torch.randperm(12, generator=g).view(3, 4).to(torch.int32)
        past = torch.tensor([0, 20, 50], dtype=torch.int32)
        args = (torch.randint(0, 256, (3, 1), generator=g), past.long()[:, None], k_pool, v_pool, table, past)
        with torch.no_grad():
            want = model.forward_paged(*args)
            got = model.forward_paged_fused(*args, ops)
        for a, b in zip(got, want):
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            assert err < 3e-3, (arch, err)
    print("ok")
""")


def test_a_whole_fused_step_equals_the_paged_step_in_tritons_interpreter():
    run_check_script(STEP_CHECK, interpreted=True)


@needs_gpu
@pytest.mark.parametrize("shape", [(16, 8, 128, 1024, 3072), (9, 3, 64, 576, 1536)])  # Qwen3-0.6B, SmolLM2-135M
def test_fused_ops_match_their_specification_on_the_gpu_in_bf16(shape):
    run_check_script(OPS_CHECK, "cuda", "bfloat16", *map(str, shape), "1e-2", interpreted=False)
