"""Shared fixtures. Compiled bundles are expensive (AOTInductor on 2 cores), so each is
built once per test session and shared; tests must not modify them (copy first).

ARLE_TEST_BUNDLES=DIR reuses bundles built by an earlier session in DIR (local
iteration only; CI builds fresh)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arle_models import ModelConfig, build_model

REPO = Path(__file__).resolve().parents[1]


def require_triton_interpreter() -> None:
    """Skip unless Triton's CPU interpreter can run here: Triton installed, and numpy older
    than 2.3 (Triton 3.6's interpreter calls int() on one-element arrays, which 2.3 refuses)."""
    pytest.importorskip("triton")
    import numpy

    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 3):
        pytest.skip(f"Triton's interpreter breaks on numpy {numpy.__version__} (the test extras pin numpy<2.3)")


def run_check_script(script: str, *args: str, interpreted: bool) -> None:
    """Run a check script in a fresh Python (in Triton's CPU interpreter when `interpreted`,
    else on this machine's GPU); it prints "ok" when every check held."""
    if interpreted:
        require_triton_interpreter()
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"} if interpreted else None
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def assert_attention_variant_matches(variant, dtype, chunk_lengths, device: str = "cpu"):
    """A copy of a small GQA model with `variant` applied gives the default model's outputs
    (logits, new K/V) for ragged pasts and each chunk length (tests/models/test_fusion.py;
    tests/targets/test_prefill_kernel.py runs it in Triton's interpreter and on a GPU)."""
    cfg = ModelConfig("qwen3", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=6,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    model = build_model(cfg).eval().to(device, dtype)
    changed = variant(copy.deepcopy(model))
    B, P = 3, 9
    past_k = torch.randn(cfg.num_layers, B, 2, P, 16, dtype=dtype, device=device)
    past_v = torch.randn_like(past_k)
    past_lens = torch.tensor([9, 4, 0], device=device)
    for T in chunk_lengths:
        args = (torch.randint(0, 256, (B, T), device=device), past_lens[:, None] + torch.arange(T, device=device),
                past_k, past_v, past_lens, torch.full((B,), T - 1, device=device))
        with torch.no_grad():
            expected, got = model(*args), changed(*args)
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    return changed


def default_sigint() -> None:
    """preexec_fn for children that tests interrupt: a test run launched in the background
    of a non-interactive shell inherits SIGINT ignored, and so would every child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, stdin: str | None = None, timeout: float = 900, env: dict | None = None):
    """Run a console script in a subprocess (as a user would) and return CompletedProcess."""
    exe = Path(sys.executable).parent / args[0]
    if not exe.exists():  # not pip-installed: the GPU machine's benchmarks/gpu_env.sh puts them on PATH
        exe = Path(shutil.which(args[0]) or exe)
    return subprocess.run(
        [str(exe), *args[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def assert_clean_error(proc, pattern: str | None = None):
    """Failed with one readable line: non-zero exit, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and "error:" in lines[-1], proc.stderr
    if pattern:
        assert pattern.lower() in proc.stderr.lower(), proc.stderr


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    reuse = os.environ.get("ARLE_TEST_BUNDLES")
    if reuse:
        Path(reuse).mkdir(parents=True, exist_ok=True)
        return Path(reuse)
    return tmp_path_factory.mktemp("bundles")


def build_bundle(bundle_dir: Path, name: str, *args: str) -> Path:
    """`arlec build --out bundle_dir/name.arle ARGS` once (reused when already there)."""
    out = bundle_dir / f"{name}.arle"
    if (out / "manifest.json").is_file():
        return out
    proc = run_cli("arlec", "build", "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory) -> Path:
    """A random-weight Llama in Hugging Face layout, with a real byte-level BPE tokenizer
    (SmolLM2's, truncated to the model's vocabulary is not possible, so the vocab matches it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from arlec.sources import load_source

    path = tmp_path_factory.mktemp("tiny-llama")
    spec = load_source(None)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=spec.config.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    (path / "tokenizer.json").write_text(spec.tokenizer_json)
    (path / "chat_template.jinja").write_text(spec.chat_template)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return path


@pytest.fixture(scope="session")
def tiny_bundle(bundle_dir, tiny_hf_model) -> Path:
    """Compiled tiny model: fast to build, used for error and range tests."""
    return build_bundle(bundle_dir, "tiny-fp32", "--model", str(tiny_hf_model), "--quant", "fp32", "--max-batch", "4",
                  "--max-prefill-tokens", "32", "--max-context", "64")


@pytest.fixture(scope="session")
def default_bundle(bundle_dir) -> Path:
    """The embedded default model with the default options (what the README builds)."""
    return build_bundle(bundle_dir, "default")


@pytest.fixture(scope="session")
def fp32_bundle(bundle_dir) -> Path:
    return build_bundle(bundle_dir, "smollm2-fp32", "--quant", "fp32")


@pytest.fixture
def bundle_copy(tmp_path):
    """Copy a session bundle so a test may damage it."""

    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return copy


def assert_steps_equal_eager_torch(bundle, executor, split_decode: bool = False):
    """A target's compiled prefill and decode against the eager model on the bundle's own
    weights: batch 3 over a shared padded past with valid lengths 7, 3 and 0 (one empty)."""
    import torch

    from arle_models import build_model

    model = build_model(bundle.config).fuse_projections().eval()
    model.load_state_dict(bundle.weights, strict=False)
    torch.manual_seed(1)
    past_k = torch.randn(executor.cache_shape(3, 7))
    past_v = torch.randn(executor.cache_shape(3, 7))
    past_lens = torch.tensor([7, 3, 0])
    for step, new, split in ((executor.prefill, 5, False), (executor.decode, 1, split_decode)):
        tokens = torch.randint(0, bundle.config.vocab_size, (3, new))
        positions = past_lens[:, None] + torch.arange(new)[None]
        last = torch.full((3,), new - 1)
        got = step(tokens, positions, past_k, past_v, past_lens, last)
        model.use_split_attention(split)
        with torch.no_grad():
            want = model(tokens, positions, past_k, past_v, past_lens, last)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
