"""The cuda target. Kernel rendering, refusals and the CPU-side logic run everywhere; the
kernel, build, load and engine checks need a CUDA GPU and skip without one (CI has none:
their results on the H200 are in docs/perf/cuda-h200.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from arle_runtime.errors import ArleError
from arle_targets.kernels import PagedDecodeSpec, load_kernel_module, render_paged_decode
from conftest import REPO, assert_clean_error, build_bundle, require_triton_interpreter, run_cli

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
sys.path.insert(0, str(REPO / "benchmarks"))


def spec(**kw) -> PagedDecodeSpec:
    base = dict(head_dim=64, num_heads=9, num_kv_heads=3, page_size=16, kv_dtype="bfloat16")
    return PagedDecodeSpec(**{**base, **kw})


# --- everywhere ---------------------------------------------------------------------------


def test_kernel_source_is_specialised_per_shape_and_valid_python():
    a, b = render_paged_decode(spec()), render_paged_decode(spec(head_dim=128, num_heads=16, num_kv_heads=8))
    for src in (a, b):
        compile(src, "kernel", "exec")
        assert "{{" not in src and "triton_op" in src
    assert "HEAD_DIM=64, GROUP=3, BLOCK_G=16" in a and "HEAD_DIM=128, GROUP=2, BLOCK_G=16" in b
    name = [line for line in a.splitlines() if "triton_op(" in line]
    assert name and name[0] not in b  # the op name carries the specialisation's hash
    assert render_paged_decode(spec()) == a  # deterministic


@pytest.mark.parametrize("kw,words", [
    (dict(head_dim=80), "power-of-two head dim"),
    (dict(num_heads=10), "do not divide"),
    (dict(block_n=24), "does not tile"),
])
def test_kernel_spec_refuses_shapes_it_cannot_do(kw, words):
    with pytest.raises(ArleError, match=words):
        spec(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_build_without_a_gpu_says_so(tmp_path):
    proc = run_cli("arlec", "build", "--target", "cuda", "--quant", "bf16", "--out", str(tmp_path / "b.arle"))
    assert_clean_error(proc, "no CUDA GPU")
    assert not (tmp_path / "b.arle").exists()


def test_cuda_build_refuses_a_batch_of_one(tmp_path):
    proc = run_cli("arlec", "build", "--target", "cuda", "--quant", "bf16", "--max-batch", "1",
                   "--out", str(tmp_path / "b.arle"))
    assert_clean_error(proc, "needs --max-batch 2 or more")
    assert not (tmp_path / "b.arle").exists()


def test_cuda_build_refuses_an_unknown_prefill_attention(tmp_path):
    proc = run_cli("arlec", "build", "--target", "cuda", "--quant", "bf16", "--out", str(tmp_path / "b.arle"),
                   env={"ARLEC_PREFILL_ATTENTION": "flash"})
    assert_clean_error(proc, "ARLEC_PREFILL_ATTENTION must be one of kernel, gqa, expanded, got 'flash'")
    assert not (tmp_path / "b.arle").exists()


def test_cuda_build_refuses_quantizations_it_lacks(tmp_path):
    proc = run_cli("arlec", "build", "--target", "cuda", "--quant", "fp32", "--out", str(tmp_path / "b.arle"))
    assert_clean_error(proc, "does not support --quant fp32")


@pytest.mark.parametrize("target,quant", [("cpu", "fp8"), ("cpu", "bf16"), ("onnx", "fp32")])
def test_fp8_kv_cache_is_refused_off_cuda(tmp_path, target, quant):
    proc = run_cli("arlec", "build", "--target", target, "--quant", quant, "--kv-dtype", "fp8",
                   "--out", str(tmp_path / "b.arle"))
    assert_clean_error(proc, "fp8")
    assert not (tmp_path / "b.arle").exists()


def test_fp8_kernel_source_converts_pool_loads():
    source = render_paged_decode(spec(kv_dtype="float8_e4m3fn"))
    assert "KV dtype=float8_e4m3fn" in source and ".to(q.dtype)" in source


def test_the_runtime_finds_the_system_libstdcxx_and_reexecs_once():
    from arle_runtime.preload import system_libstdcxx

    lib = system_libstdcxx()
    if lib is None:
        pytest.skip("no libstdc++ in ldconfig's cache")
    code = "import os; print(os.environ.get('LD_PRELOAD', ''))"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ARLE_PRELOADED", "ARLE_NO_PRELOAD")}
    shim = f"from arle_runtime.preload import reexec_with_system_libstdcxx as r; r(); {code}"
    out = subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [lib]  # preloaded, and only once


PAGED_INTERPRETED = textwrap.dedent("""
    import pathlib, tempfile, torch
    from arle_models.layers import paged_decode_reference
    from arle_targets.kernels import PagedDecodeSpec, load_kernel_module, render_paged_decode
    for head_dim, heads, kv_heads, splits in ((64, 9, 3, 1), (32, 4, 4, 1), (64, 9, 3, 4), (32, 4, 2, 3)):
        spec = PagedDecodeSpec(head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads, page_size=16,
                               kv_dtype="float16", splits=splits)
        path = pathlib.Path(tempfile.mkdtemp()) / "k.py"
        path.write_text(render_paged_decode(spec))
        kernel = load_kernel_module(path).paged_decode_attention
        g = torch.Generator().manual_seed(head_dim)
        B, pages = 3, 6
        past_lens = torch.tensor([0, 17, 90], dtype=torch.int32)  # 90: 2 blocks, so splits 3 and 4 leave some empty
        table = torch.randperm(B * pages, generator=g).view(B, pages).to(torch.int32)
        pool_k = torch.randn(B * pages * 16 + 2, kv_heads, head_dim, generator=g).half()
        pool_v = torch.randn(pool_k.shape, generator=g).half()
        q = torch.randn(B, heads, head_dim, generator=g).half()
        k, v = (torch.randn(B, kv_heads, head_dim, generator=g).half() for _ in range(2))
        got = kernel(q, k, v, pool_k, pool_v, table, past_lens)
        assert got.dtype == q.dtype and got.shape == q.shape
        got = got.float()
        want = paged_decode_reference(q.float(), k.float(), v.float(), pool_k.float(), pool_v.float(), table, past_lens)
        err = ((got - want).norm() / want.norm()).item()
        assert got.dtype == torch.float32 and err < 2e-3, (head_dim, heads, kv_heads, splits, err)
    print("ok")
""")


def test_paged_decode_kernel_matches_the_torch_reference_in_tritons_interpreter():
    """The generated kernel's logic on the CPU (fp16: Triton's interpreter has no bf16)."""
    require_triton_interpreter()
    proc = subprocess.run([sys.executable, "-c", PAGED_INTERPRETED], capture_output=True, text=True, cwd=REPO,
                          env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# --- on a GPU -----------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 16, 8), (64, 8, 8), (128, 32, 4)])
def test_paged_decode_kernel_matches_the_torch_reference(tmp_path, head_dim, heads, kv_heads, splits):
    from arle_models.layers import paged_decode_reference

    s = spec(head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads, splits=splits)
    path = tmp_path / "k.py"
    path.write_text(render_paged_decode(s))
    kernel = load_kernel_module(path).paged_decode_attention
    g = torch.Generator(device="cuda").manual_seed(head_dim + heads)
    B, pages = 5, 40
    past_lens = torch.tensor([0, 1, 17, 300, 639], dtype=torch.int32, device="cuda")
    table = torch.randperm(B * pages, device="cuda", generator=g).view(B, pages).to(torch.int32)
    pool_k = torch.randn(B * pages * 16 + 2, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    pool_v = torch.randn_like(pool_k)
    q = torch.randn(B, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    got = kernel(q, k, v, pool_k, pool_v, table, past_lens).float()
    want = paged_decode_reference(q.float(), k.float(), v.float(), pool_k.float(), pool_v.float(), table, past_lens)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-2, err


@needs_gpu
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 16, 8)])
def test_paged_decode_kernel_reads_an_fp8_pool(tmp_path, head_dim, heads, kv_heads):
    from arle_models.layers import paged_decode_reference

    path = tmp_path / "k.py"
    path.write_text(render_paged_decode(spec(head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads,
                                             kv_dtype="float8_e4m3fn")))
    kernel = load_kernel_module(path).paged_decode_attention
    g = torch.Generator(device="cuda").manual_seed(7)
    B, pages = 4, 20
    past_lens = torch.tensor([0, 5, 100, 319], dtype=torch.int32, device="cuda")
    table = torch.randperm(B * pages, device="cuda", generator=g).view(B, pages).to(torch.int32)
    pool_k = torch.randn(B * pages * 16 + 2, kv_heads, head_dim, device="cuda", generator=g).to(torch.float8_e4m3fn)
    pool_v = torch.randn(pool_k.shape, device="cuda", generator=g).to(torch.float8_e4m3fn)
    q = torch.randn(B, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    got = kernel(q, k, v, pool_k, pool_v, table, past_lens).float()
    want = paged_decode_reference(q.float(), k.float(), v.float(), pool_k.float(), pool_v.float(), table, past_lens)
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def tiny_checkpoint(bundle_dir: Path) -> Path:
    return random_checkpoint_dir(bundle_dir, "llama-tiny")


def build_tiny_cuda(bundle_dir: Path, name: str, *args: str) -> Path:
    return build_bundle(bundle_dir, name, "--model", str(tiny_checkpoint(bundle_dir)), "--target", "cuda",
                        "--max-batch", "16", "--max-context", "512", *args)


PROMPT = " ".join(f"w{i}" for i in (5, 77, 301, 9, 1200, 44, 3000, 18))


def assert_greedy_equals_transformers(bundle: Path, checkpoint: Path, max_tokens: int = 32) -> None:
    """`arle-runtime run --raw --json` tokens == transformers' greedy on the same bf16 weights,
    up to a tie: where they first differ, transformers' own logit of arle's token must be
    within the bundle's logit tolerance of its top one (random bf16 models have exact ties)."""
    from transformers import AutoModelForCausalLM

    proc = run_cli("arle-runtime", "run", str(bundle), "--raw", "--json", "--prompt", PROMPT,
                   "--max-tokens", str(max_tokens), "--temperature", "0", "--no-verify")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads(proc.stdout)["token_ids"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda().eval()
    prompt = [int(w[1:]) for w in PROMPT.split()]
    ids = torch.tensor([prompt], device="cuda")
    theirs = model.generate(ids, max_new_tokens=len(ours), do_sample=False)[0, ids.shape[1]:].tolist()[: len(ours)]
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        assert first is not None, f"one stopped early: arle {len(ours)} tokens, transformers {len(theirs)}"
        with torch.no_grad():
            row = model(torch.tensor([prompt + theirs[:first]], device="cuda")).logits[0, -1].float()
        tol = json.loads((bundle / "manifest.json").read_text())["reference"]["logits_atol"]
        gap = float(row.max() - row[ours[first]])
        assert gap <= tol, f"token {first}: arle {ours[first]}, transformers {theirs[first]}, logit gap {gap:.3g} > {tol}"


def assert_verifies(bundle: Path) -> None:
    proc = run_cli("arlec", "verify", str(bundle))
    assert proc.returncode == 0, proc.stderr + proc.stdout


def random_checkpoint_dir(bundle_dir: Path, shape: str) -> Path:
    from random_checkpoint import write_checkpoint

    ckpt = bundle_dir / f"{shape}-ckpt"
    if not (ckpt / "config.json").is_file():
        write_checkpoint(shape, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def cuda_bundle(bundle_dir) -> Path:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return build_tiny_cuda(bundle_dir, "tiny-bf16-cuda", "--quant", "bf16")


@needs_gpu
@pytest.mark.parametrize("name,args", [("tiny-fp8-kvfp8-cuda", ("--quant", "fp8", "--kv-dtype", "fp8")),
                                       ("tiny-int4-cuda", ("--quant", "int4", "--group-size", "64")),
                                       ("tiny-int8-cuda", ("--quant", "int8"))])
def test_quantized_cuda_bundles_build_and_verify(bundle_dir, name, args):
    bundle = build_tiny_cuda(bundle_dir, name, *args)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if "fp8" in name:
        assert manifest["kv_cache"]["dtype"] == "float8_e4m3fn"
        assert manifest["programs"]["decode_paged"]["kernel_spec"]["kv_dtype"] == "float8_e4m3fn"
    if "int8" in name:  # the generated int8 matmul in both programs, and the fused program built over int8
        assert "kernels/int8_matmul.py" in manifest["programs"]["prefill"]["kernels"]
        assert "kernels/int8_matmul.py" in manifest["programs"]["decode_paged"]["kernels"]
        assert "decode_fused" in manifest["programs"], manifest["programs"]["decode_paged"].get("fused_decode")
    proc = run_cli("arlec", "verify", str(bundle))
    assert proc.returncode == 0, proc.stderr + proc.stdout


@needs_gpu
def test_greedy_tokens_equal_transformers_on_the_same_bf16_weights(cuda_bundle, bundle_dir):
    assert_greedy_equals_transformers(cuda_bundle, tiny_checkpoint(bundle_dir))


@needs_gpu
def test_tuned_decode_kernels_compile_into_the_program_and_keep_greedy_tokens(bundle_dir):
    """ARLEC_TUNE_DECODE=force takes the generated skinny matmul for every projection and a
    split attention kernel, so this checks those paths end to end (AOTInductor, graphs)."""
    out = bundle_dir / "tiny-tuned-cuda.arle"
    proc = run_cli("arlec", "build", "--model", str(tiny_checkpoint(bundle_dir)), "--target", "cuda", "--quant", "bf16",
                   "--max-batch", "16", "--max-context", "512", "--out", str(out), "--force",
                   env={**os.environ, "ARLEC_TUNE_DECODE": "force"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    decode = json.loads((out / "manifest.json").read_text())["programs"]["decode_paged"]
    assert {m["choice"] for m in decode["projection_matmuls"].values()} == {"kernel"}
    assert decode["attention_splits"]["chosen"] > 1 and decode["kernel_spec"]["splits"] > 1
    assert "kernels/skinny_matmul.py" in decode["kernels"]
    assert_verifies(out)
    assert_greedy_equals_transformers(out, tiny_checkpoint(bundle_dir))


@needs_gpu
@pytest.mark.parametrize("attention", ["kernel", "gqa"])
def test_each_prefill_attention_compiles_into_the_program_and_keeps_greedy_tokens(bundle_dir, attention):
    """The generated prefill kernel (templates/prefill_attention.py.j2) and SDPA end to end:
    whichever is not the default is built here (the default is in cuda_bundle)."""
    from arle_targets.cuda import DEFAULT_PREFILL_ATTENTION

    if attention == DEFAULT_PREFILL_ATTENTION:
        pytest.skip("the default is what cuda_bundle builds")
    out = bundle_dir / f"tiny-prefill-{attention}-cuda.arle"
    proc = run_cli("arlec", "build", "--model", str(tiny_checkpoint(bundle_dir)), "--target", "cuda", "--quant", "bf16",
                   "--max-batch", "16", "--max-context", "512", "--out", str(out), "--force",
                   env={**os.environ, "ARLEC_PREFILL_ATTENTION": attention})
    assert proc.returncode == 0, proc.stderr[-3000:]
    prefill = json.loads((out / "manifest.json").read_text())["programs"]["prefill"]
    assert prefill["attention"] == attention
    assert prefill["kernels"] == (["kernels/prefill_attention.py"] if attention == "kernel" else [])
    assert all((out / path).is_file() for path in prefill["kernels"])
    assert_verifies(out)
    assert_greedy_equals_transformers(out, tiny_checkpoint(bundle_dir))


@needs_gpu
def test_cuda_bundle_manifest_names_its_programs_kernels_and_buckets(cuda_bundle):
    manifest = json.loads((cuda_bundle / "manifest.json").read_text())
    assert manifest["target"]["executor"] == "aoti-cuda"
    assert manifest["buckets"]["decode_batch_sizes"] == [1, 2, 4, 8, 16]
    decode = manifest["programs"]["decode_paged"]
    assert (cuda_bundle / decode["path"]).is_file() and (cuda_bundle / decode["kernels"][0]).is_file()
    assert decode["kernel_spec"]["group"] == 4 and decode["kernel_spec"]["head_dim"] == 64
    prefill = manifest["programs"]["prefill"]
    assert prefill["attention"] == "kernel" and (cuda_bundle / prefill["kernels"][0]).is_file()


def test_the_prefill_program_may_not_bake_in_cudnn_attention():
    from arle_targets.cuda import prefill_attention_backends

    with prefill_attention_backends():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


@needs_gpu
def test_the_prefill_package_calls_no_cudnn_attention(cuda_bundle):
    """cuDNN's attention plans each new shape on its first call (~50 ms on an H100), and
    prefill shapes change every step: the compiled program must not contain it."""
    import zipfile

    path = cuda_bundle / json.loads((cuda_bundle / "manifest.json").read_text())["programs"]["prefill"]["path"]
    with zipfile.ZipFile(path) as package:
        sources = [n for n in package.namelist() if n.endswith((".cpp", ".py"))]
        assert sources, "no generated source in the package to check"
        text = "".join(package.read(n).decode(errors="replace") for n in sources)
    assert "cudnn_attention" not in text and "attention" in text


@needs_gpu
def test_verify_reproduces_the_build_reference(cuda_bundle):
    assert_verifies(cuda_bundle)


LOAD_AND_GENERATE = textwrap.dedent("""
    from arle_runtime.preload import reexec_with_system_libstdcxx
    reexec_with_system_libstdcxx()
    import json, sys, torch
    from torch._dynamo.utils import counters
    from arle_runtime.session import Session
    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.sampler import SamplingParams
    session = Session.open(sys.argv[1])
    engine = Engine(session.executor, session.tokenizer, (), EngineConfig(max_batch=16))
    prompts = [[3 + (7 * i + j) % 4000 for j in range(5 + 13 * i)] for i in range(11)]
    prefix = [11 + j for j in range(48)]  # run alone one after the other, the second hits the prefix cache
    prompts += [prefix + [500 + j for j in range(n)] for n in (3, 21)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    together = [r.token_ids for r in engine.generate(prompts, greedy)]
    alone = [engine.generate([p], greedy)[0].token_ids for p in prompts]
    prefill = session.executor.prefill_graphs
    print(json.dumps({"inductor": dict(counters["inductor"]), "together": together, "alone": alone,
                      "graphs": sorted(f"{p}/{b}" for p, b in session.executor._graphs),
                      "prefill_buckets": sorted(prefill._graphs) if prefill else [],
                      "prefill_graphs_off": session.executor.prefill_graphs_off}))
""")


@needs_gpu
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_fresh_prompts_prefill_from_graphs_and_keep_every_greedy_token(cuda_bundle, bundle_dir, kv):
    """The engine's prompts through the captured prefill buckets (fresh, and a prefix-cache
    hit through a past bucket) give the tokens they give through the program called
    directly (ARLE_PREFILL_GRAPHS=0); over an fp8 pool too, which the graphs write through
    the same saturating cast and widen as they gather."""
    bundle = cuda_bundle if kv == "bf16" else build_tiny_cuda(bundle_dir, "tiny-fp8-kvfp8-cuda", "--quant", "fp8",
                                                                "--kv-dtype", "fp8")
    graphs = load_and_generate(bundle)
    direct = load_and_generate(bundle, {**os.environ, "ARLE_PREFILL_GRAPHS": "0"})
    assert graphs["prefill_graphs_off"] == "" and [1, 16, 0] in graphs["prefill_buckets"], graphs["prefill_graphs_off"]
    assert [1, 32, 128] in graphs["prefill_buckets"]  # the prefix-cache hit's bucket
    assert direct["prefill_buckets"] == [] and direct["prefill_graphs_off"] == "ARLE_PREFILL_GRAPHS=0"
    assert graphs["together"] == direct["together"] and graphs["alone"] == direct["alone"]


@needs_gpu
def test_load_compiles_nothing_and_batching_changes_no_greedy_token(cuda_bundle, tmp_path):
    """Empty Triton and Inductor caches stay empty through load, graph capture and 13
    requests decoded together (buckets 16, 8, ...) and one by one (bucket 1)."""
    caches = {"TRITON_CACHE_DIR": tmp_path / "triton", "TORCHINDUCTOR_CACHE_DIR": tmp_path / "inductor"}
    for path in caches.values():
        path.mkdir()
    env = {**os.environ, **{k: str(v) for k, v in caches.items()}}
    result = load_and_generate(cuda_bundle, env)
    assert result["graphs"] == sorted(f"{p}/{b}" for p in ("decode_paged", "decode_fused") for b in (1, 2, 4, 8, 16))
    assert not any(result["inductor"].values()), result["inductor"]
    triton_files = [p for p in caches["TRITON_CACHE_DIR"].rglob("*") if p.is_file()]
    assert not triton_files, f"Triton compiled during load: {triton_files[:5]}"
    generated = [p for p in caches["TORCHINDUCTOR_CACHE_DIR"].rglob("*") if p.suffix in (".py", ".cpp", ".cu", ".ttir")]
    assert not generated, f"Inductor generated code during load: {generated[:5]}"
    assert result["together"] == result["alone"]


@needs_gpu
def test_bench_measures_a_cuda_bundle_against_a_gpu_reference(cuda_bundle, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("arlec", "bench", str(cuda_bundle), "--prompt-tokens", "32", "--new-tokens", "16",
                   "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["reference"]["device"].startswith("cuda") and result["gpu"]["peak_allocated_bytes"] > 0
    assert all(v > 0 for v in result["ratios"].values())


def load_and_generate(bundle: Path, env=None) -> dict:
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(bundle)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_gpu
def test_a_moe_bundle_runs_the_fused_expert_kernel_and_keeps_transformers_greedy_tokens(bundle_dir):
    ckpt = random_checkpoint_dir(bundle_dir, "qwen3-moe-tiny")
    bundle = build_bundle(bundle_dir, "moe-tiny-cuda", "--model", str(ckpt), "--target", "cuda", "--quant", "bf16",
                          "--max-batch", "16", "--max-context", "512")
    decode = json.loads((bundle / "manifest.json").read_text())["programs"]["decode_paged"]
    assert "kernels/fused_moe.py" in decode["kernels"]
    assert_verifies(bundle)
    assert_greedy_equals_transformers(bundle, ckpt)


@needs_gpu
@pytest.mark.parametrize("shape", ["qwen3_5-tiny", "qwen3_5-moe-tiny"])
def test_a_hybrid_bundle_decodes_its_linear_state_in_graphs_and_keeps_transformers_greedy_tokens(bundle_dir, shape):
    ckpt = random_checkpoint_dir(bundle_dir, shape)
    bundle = build_bundle(bundle_dir, f"{shape}-cuda", "--model", str(ckpt), "--target", "cuda", "--quant", "bf16",
                          "--max-batch", "16", "--max-context", "512")
    assert_verifies(bundle)
    assert_greedy_equals_transformers(bundle, ckpt)
    result = load_and_generate(bundle)
    assert result["together"] == result["alone"]
