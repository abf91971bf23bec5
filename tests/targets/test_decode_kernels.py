"""The decode projections' generated skinny matmul and its build-time tuner.

Rendering, the tuner's rules and the module swap run everywhere; the kernel itself runs
on the CPU through Triton's interpreter (fp16: the interpreter has no bf16) where Triton
is installed, and in bf16 on a GPU (skipped without one)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from arle_targets.decode_tuning import (
    SkinnyLinear, block_ms, candidate_configs, choose, projection_shapes, render_skinny, swap_in, swap_out,
)
from conftest import REPO, require_triton_interpreter

CONFIG = (16, 64, 128, 2, 4, 3)  # BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages


def test_rendered_source_holds_the_chosen_configs_and_hashes_them_into_the_op_name():
    a = render_skinny([((256, 512), CONFIG)])
    b = render_skinny([((256, 512), (16, 32, 128, 4, 4, 3))])
    for src in (a, b):
        compile(src, "kernel", "exec")
        assert "{{" not in src and "triton_op" in src
    assert "(256, 512): (16, 64, 128, 2, 4, 3)," in a
    op_line = [line for line in a.splitlines() if "triton_op(" in line][0]
    assert op_line not in b and render_skinny([((256, 512), CONFIG)]) == a


def test_candidates_tile_the_weight_exactly():
    for n, k in ((4096, 1024), (1024, 3072), (6144, 1024), (1024, 2048), (96, 384)):
        configs = candidate_configs(n, k, 64)
        assert configs
        for block_m, block_n, block_k, split, *_ in configs:
            assert n % block_n == 0 and k % (block_k * split) == 0 and block_m in (16, 64)
    assert candidate_configs(100, 1024, 8) == []  # no block divides 100: the shape stays on cuBLAS


def test_m_tiles_cover_the_largest_batch_up_to_64():
    assert block_ms(1) == (16,) and block_ms(8) == (16,) and block_ms(24) == (16, 32)
    assert block_ms(64) == (16, 64) and block_ms(256) == (16, 64)


def test_the_kernel_is_kept_only_where_it_beats_cublas_over_all_timed_batches():
    cublas = {1: 10.0, 64: 12.0}
    fast_small = {"a": {1: 4.0, 64: 30.0}, "b": {1: 6.0, 64: 13.0}}
    assert choose(cublas, fast_small) == "b"  # 19 < 22; "a" wins batch 1 but loses the sum
    assert choose(cublas, {"a": {1: 9.0, 64: 14.0}}) is None  # 23 > 22: cuBLAS stays
    assert choose(cublas, {}) is None


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        block = nn.Module()
        block.qkv = nn.Linear(64, 96, bias=False).to(torch.bfloat16)
        block.down = nn.Linear(32, 64, bias=True).to(torch.bfloat16)
        block.norm_like = nn.Linear(64, 64).float()  # float32 stays on cuBLAS
        self.layers = nn.ModuleList([block])
        self.lm_head = nn.Linear(64, 1000, bias=False).to(torch.bfloat16)  # never tuned


def test_projection_shapes_are_the_layers_half_precision_linears():
    assert projection_shapes(Tiny()) == [(64, 32), (96, 64)]


def test_swap_keeps_weight_names_and_results_and_puts_everything_back():
    model = Tiny()
    names = [name for name, _ in model.named_parameters()]
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    expected = model.layers[0].down(x)
    swapped = swap_in(model, {(64, 32): CONFIG}, lambda x2d, w: x2d @ w.T)
    assert isinstance(model.layers[0].down, SkinnyLinear) and type(model.layers[0].qkv) is nn.Linear
    assert [name for name, _ in model.named_parameters()] == names  # the program's constant names
    torch.testing.assert_close(model.layers[0].down(x), expected, atol=1e-2, rtol=1e-2)  # bias added after, in bf16
    swap_out(swapped)
    assert type(model.layers[0].down) is nn.Linear


INTERPRETED = textwrap.dedent("""
    import pathlib, sys, tempfile, torch
    from arle_targets.kernels import load_kernel_module
    from arle_targets.decode_tuning import render_skinny
    configs = [((256, 512), (16, 64, 128, 2, 4, 3)), ((128, 256), (16, 32, 128, 1, 4, 3))]
    path = pathlib.Path(tempfile.mkdtemp()) / "skinny.py"
    path.write_text(render_skinny(configs))
    module = load_kernel_module(path)
    torch.manual_seed(0)
    for (n, k), _ in configs:
        for m in (1, 5, 20):  # 20 rows: two M tiles, the second partly masked
            x, w = torch.randn(m, k, dtype=torch.float16), torch.randn(n, k, dtype=torch.float16)
            out = module.skinny_linear(x, w)
            ref = x.double() @ w.double().T
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert out.shape == (m, n) and out.dtype == torch.float16 and err < 2e-3, (n, k, m, err)
    print("ok")
""")


def test_kernel_equals_a_float64_matmul_in_tritons_interpreter():
    require_triton_interpreter()
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)])
def test_kernel_matches_float64_in_bf16_on_the_gpu(tmp_path, n, k):
    from arle_targets.kernels import load_kernel_module

    configs = [((n, k), (16, 64, 128, 4, 4, 3)), ((n + 64, k), (64, 32, 256, 1, 4, 3))]  # fp32 partials; direct store
    path = tmp_path / "skinny.py"
    path.write_text(render_skinny(configs))
    module = load_kernel_module(path)
    for (rows, _), _config in configs:
        for m in (1, 7, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            out = module.skinny_linear(x, w)
            ref = x.double() @ w.double().T
            assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
