"""The cuda target's fused mixture-of-experts kernel (templates/fused_moe.py.j2) against
its specification, arle_models.moe.gathered_experts: on the CPU in Triton's interpreter
(fp16), in bf16 on a GPU (skipped without one)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from arle_targets.kernels import FusedMoeSpec, render_fused_moe
from conftest import run_check_script


def test_rendered_source_is_valid_python_with_a_hashed_op_name():
    a = render_fused_moe(FusedMoeSpec(hidden=64, intermediate=32, num_experts=8, top_k=2))
    b = render_fused_moe(FusedMoeSpec(hidden=64, intermediate=32, num_experts=8, top_k=4))
    compile(a, "kernel", "exec")
    assert "{{" not in a and a.count("triton_op(") == 1
    assert [line for line in a.splitlines() if "triton_op(" in line] != [line for line in b.splitlines() if "triton_op(" in line]


MOE_CHECK = textwrap.dedent("""
    import pathlib, sys, tempfile, torch
    from arle_models.moe import Router, gathered_experts
    from arle_targets.kernels import FusedMoeSpec, load_kernel_module, render_fused_moe

    device, dt = sys.argv[1], getattr(torch, sys.argv[2])
    H, I, E, k = (int(v) for v in sys.argv[3:7])
    tol = float(sys.argv[7])
    path = pathlib.Path(tempfile.mkdtemp()) / "moe.py"
    path.write_text(render_fused_moe(FusedMoeSpec(hidden=H, intermediate=I, num_experts=E, top_k=k)))
    mod = load_kernel_module(path)
    g = torch.Generator(device=device).manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, H, generator=g, device=device) * H ** -0.5).to(dt)
    down = (torch.randn(E, H, I, generator=g, device=device) * I ** -0.5).to(dt)
    for T in (1, 5, 70):  # one token; a few (shared experts); more than one 64-row block of pairs per expert
        x = torch.randn(T, H, generator=g, device=device).to(dt)
        logits = torch.randn(T, E, generator=g, device=device)
        if T == 70:
            logits[:, 3] += 10  # every token picks expert 3: its pairs span two row blocks
        weights, experts = torch.topk(torch.softmax(logits, -1), k, dim=-1)
        weights = weights.to(dt)
        want = gathered_experts(x.double(), weights.double(), gate_up[experts].double(), down[experts].double())
        for got in (mod.decode_moe(x, experts, weights, gate_up, down), mod.prefill_moe(x, experts, weights, gate_up, down)):
            assert got.shape == (T, H) and got.dtype == dt
            err = ((got.double() - want).norm() / want.norm()).item()
            assert err < tol, (T, err)
    print("ok")
""")


def test_fused_moe_matches_gathered_experts_in_tritons_interpreter():
    run_check_script(MOE_CHECK, "cpu", "float16", "64", "32", "8", "2", "3e-3", interpreted=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_moe_matches_gathered_experts_on_the_gpu_in_bf16():
    # Qwen3-30B-A3B's expert shape: hidden 2048, 768 per expert, 128 experts, top 8
    run_check_script(MOE_CHECK, "cuda", "bfloat16", "2048", "768", "128", "8", "1e-2", interpreted=False)


MODEL_CHECK = textwrap.dedent("""
    import pathlib, tempfile, torch
    from arle_models import ModelConfig, build_model
    from arle_models.moe import Qwen3MoeBlock
    from arle_targets.kernels import FusedMoeSpec, load_kernel_module, render_fused_moe
    from arle_targets.cuda import set_moe_kernel

    cfg = ModelConfig("qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=128, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True)
    torch.manual_seed(0)
    model = build_model(cfg).eval().fuse_projections()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model = model.half()
    path = pathlib.Path(tempfile.mkdtemp()) / "moe.py"
    path.write_text(render_fused_moe(FusedMoeSpec(64, 32, 8, 2)))
    mod = load_kernel_module(path)
    blocks = [layer.mlp for layer in model.layers if isinstance(layer.mlp, Qwen3MoeBlock)]
    tokens = torch.randint(0, 256, (3, 9))
    with torch.no_grad():
        want = model.all_logits(tokens)
        set_moe_kernel(blocks, mod.prefill_moe)
        got = model.all_logits(tokens)
    err = ((got - want).norm() / want.norm()).item()
    assert len(blocks) == 2 and err < 3e-3, err
    print("ok")
""")


def test_a_moe_model_with_the_kernel_equals_its_torch_path_in_tritons_interpreter():
    run_check_script(MODEL_CHECK, interpreted=True)
