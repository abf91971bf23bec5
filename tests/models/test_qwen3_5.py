"""Qwen3.5 (hybrid Gated DeltaNet + gated full attention) against transformers' own
implementation on the same random weights: the eager model, the compiled cpu bundle
through the one-request loop, the engine (batched decode, per-sequence linear state,
preemption) and `arle-runtime run --raw --json`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from arle_models import build_model
from arle_models.qwen3_5 import Qwen3_5
from conftest import assert_clean_error, build_bundle, run_cli

NEW_TOKENS = 12


def _config_kwargs(vocab_size: int) -> dict:
    # Three linear-attention layers, then full attention (transformers' default pattern);
    # 4 value heads share 2 key heads; head_dim 16 with partial RoPE (4 rotated dims).
    return dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, max_position_embeddings=256, tie_word_embeddings=True,
        # Weights large enough that greedy text does not collapse into one repeated token.
        initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )


def _randomize_norms_and_decay(model) -> None:
    """transformers initialises the zero-centred norms to 0 and dt_bias to 1; random
    values make a wrong (1 + w) or a wrong decay show up in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("dt_bias"):
                p.normal_(0, 0.3)


@pytest.fixture(scope="session")
def qwen3_5_hf(tmp_path_factory, tiny_hf_model) -> Path:
    """A random-weight Qwen3.5 text model written by transformers' save_pretrained, with
    the tiny Llama fixture's tokenizer files (SmolLM2's; the vocabulary matches it)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    path = tmp_path_factory.mktemp("tiny-qwen3_5")
    vocab_size = json.loads((tiny_hf_model / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**_config_kwargs(vocab_size)))
    _randomize_norms_and_decay(model)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "chat_template.jinja", "tokenizer_config.json"):
        shutil.copy(tiny_hf_model / name, path / name)
    return path


@pytest.fixture(scope="module")
def hf_model(qwen3_5_hf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(qwen3_5_hf).eval()


@pytest.fixture(scope="module")
def arle_model(qwen3_5_hf) -> Qwen3_5:
    from arlec.sources import load_hf_folder

    spec = load_hf_folder(qwen3_5_hf)
    model = build_model(spec.config)
    model.load_state_dict(spec.tensors, strict=False)
    return model.eval()


@pytest.fixture(scope="session")
def qwen3_5_bundle(bundle_dir, qwen3_5_hf) -> Path:
    # Prefill chunks of 32 tokens: longer prompts carry the linear state across chunks.
    return build_bundle(bundle_dir, "qwen3_5-tiny-fp32", "--model", str(qwen3_5_hf), "--quant", "fp32",
                        "--max-batch", "4", "--max-prefill-tokens", "32", "--max-context", "128")


def _prompt(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


@torch.no_grad()
def _hf_greedy(hf_model, prompt: list[int], count: int = NEW_TOKENS) -> list[int]:
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=count, min_new_tokens=count, do_sample=False)
    return out[0, len(prompt):].tolist()


# ------------------------------------------------------------------ eager model


def test_config_reads_layer_types_and_linear_dims(arle_model):
    cfg = arle_model.config
    assert cfg.architecture == "qwen3_5" and cfg.is_hybrid
    assert cfg.full_attention_layers == (3,) and cfg.linear_attention_layers == (0, 1, 2)
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_conv_kernel) == (2, 4, 4)
    assert cfg.partial_rotary_factor == 0.25 and cfg.attn_output_gate
    assert cfg.num_parameters() == sum(p.numel() for p in arle_model.parameters())


def test_logits_match_transformers_over_several_scan_chunks(arle_model, hf_model):
    tokens = torch.tensor([_prompt(150, seed=1), _prompt(150, seed=2)])  # 3 chunks of 64
    with torch.no_grad():
        ours, theirs = arle_model.all_logits(tokens), hf_model(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


@torch.no_grad()
def test_chunked_prefill_then_decode_matches_transformers_generate(arle_model, hf_model):
    prompt = _prompt(45, seed=3)
    k = arle_model.empty_cache(1, 0)
    v, state = k.clone(), arle_model.empty_state(1)
    assert [tuple(s.shape) for s in state] == [(3, 1, 96, 3), (3, 1, 4, 16, 8)]  # conv, recurrent per linear layer
    pos = 0
    for chunk in (prompt[:20], prompt[20:]):
        n = len(chunk)
        logits, nk, nv, *state = arle_model(
            torch.tensor([chunk]), torch.arange(pos, pos + n)[None], k, v, torch.tensor([pos]), torch.tensor([n - 1]),
            *state,
        )
        k, v, pos = torch.cat((k, nk), 3), torch.cat((v, nv), 3), pos + n
    assert k.shape[0] == 1  # only the full-attention layer keeps K/V
    tokens = []
    for _ in range(NEW_TOKENS):
        tokens.append(int(logits[0].argmax()))
        logits, nk, nv, *state = arle_model(
            torch.tensor([[tokens[-1]]]), torch.tensor([[pos]]), k, v, torch.tensor([pos]), torch.tensor([0]), *state
        )
        k, v, pos = torch.cat((k, nk), 3), torch.cat((v, nv), 3), pos + 1
    assert tokens == _hf_greedy(hf_model, prompt)


@torch.no_grad()
def test_paged_decode_step_equals_the_dense_step_with_the_linear_state(arle_model):
    """forward_paged (the cuda target's decode program) against forward at T = 1, on a
    batch of three rows with their own pasts and linear states."""
    from test_paged_decode import paged_copy, shuffled_pages

    g = torch.Generator().manual_seed(9)
    lens = [21, 0, 37]
    P, B = max(lens), len(lens)
    past_k = torch.randn(*arle_model.empty_cache(B, P).shape, generator=g)
    past_v = torch.randn(past_k.shape, generator=g)
    conv, rec = (torch.randn(s.shape, generator=g) for s in arle_model.empty_state(B))
    tokens = torch.randint(0, 1000, (B, 1), generator=g)
    past_lens = torch.tensor(lens)
    dense = arle_model(tokens, past_lens[:, None], past_k, past_v, past_lens, torch.zeros(B, dtype=torch.long), conv, rec)
    table = shuffled_pages(B, -(-P // 16) + 1, g)
    k_pool, v_pool = paged_copy(past_k, lens, table, g), paged_copy(past_v, lens, table, g)
    paged = arle_model.forward_paged(tokens, past_lens[:, None], k_pool, v_pool, table, past_lens.to(torch.int32),
                                     conv, rec)
    torch.testing.assert_close(paged[0], dense[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged[1], dense[1][:, :, :, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(paged[2], dense[2][:, :, :, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(paged[3], dense[3])
    torch.testing.assert_close(paged[4], dense[4], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_right_padding_after_last_index_leaves_the_linear_state_untouched(arle_model):
    short, long = _prompt(7, seed=4), _prompt(11, seed=5)
    padded = torch.tensor([short + [0] * 4, long])
    empty = arle_model.empty_cache(2, 0)
    logits, _, _, conv, rec = arle_model(
        padded, torch.arange(11)[None].expand(2, 11), empty, empty, torch.zeros(2, dtype=torch.long),
        torch.tensor([6, 10]), *arle_model.empty_state(2),
    )
    alone = arle_model.empty_cache(1, 0)
    ref_logits, _, _, ref_conv, ref_rec = arle_model(
        torch.tensor([short]), torch.arange(7)[None], alone, alone, torch.zeros(1, dtype=torch.long),
        torch.tensor([6]), *arle_model.empty_state(1),
    )
    torch.testing.assert_close(conv[:, 0], ref_conv[:, 0])
    torch.testing.assert_close(rec[:, 0], ref_rec[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits[0], ref_logits[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_exported_prefill_handles_a_chunk_exactly_a_multiple_of_the_scan_chunk(arle_model):
    """max_prefill_tokens 64 = one scan chunk: the exported program must still take every
    token count up to 64 (a padding of zero once made export specialise) and match eager."""
    from arle_targets.base import ShapePlan
    from arle_targets.cpu import export_step

    program = export_step(arle_model, ShapePlan(2, (1, 2), 64, 128), prefill=True).module()
    for length in (64, 5):
        tokens = torch.tensor([_prompt(length, seed=length)])
        empty = arle_model.empty_cache(1, 0)
        args = (tokens, torch.arange(length)[None], empty, empty, torch.zeros(1, dtype=torch.long),
                torch.tensor([length - 1]), *arle_model.empty_state(1))
        for ours, eager in zip(program(*args), arle_model(*args)):
            torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ compiled bundle


@pytest.fixture(scope="module")
def session(qwen3_5_bundle):
    from arle_runtime.session import Session

    return Session.open(qwen3_5_bundle)


def test_compiled_generate_matches_transformers_across_prefill_chunks(session, hf_model):
    from arle_runtime.generate import generate
    from arle_runtime.sampler import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for length in (5, 33, 70):  # one, two and three prefill chunks of 32
        prompt = _prompt(length, seed=length)
        result = generate(session.executor, session.tokenizer, prompt, params)
        assert result.token_ids == _hf_greedy(hf_model, prompt), length


def test_engine_batches_hybrid_requests_and_keeps_each_ones_state(session, hf_model):
    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.sampler import SamplingParams

    prompts = [_prompt(n, seed=10 + n) for n in (3, 17, 40, 9, 66, 25)]  # more than max_batch 4
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    engine = Engine(session.executor, session.tokenizer, (), EngineConfig())
    results = engine.generate(prompts, params)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == _hf_greedy(hf_model, prompt)
    # The same prompt again: no prefix reuse for hybrid models (the state is not in the pages).
    again = engine.generate([prompts[4]], params)[0]
    assert again.cached_tokens == 0 and again.token_ids == results[4].token_ids
    assert engine.stats()["prefix_hit_tokens"] == 0 and engine.stats()["kv_pages_in_use"] == 0


def test_preempted_hybrid_requests_recompute_their_state(session, hf_model):
    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.sampler import SamplingParams

    prompts = [_prompt(n, seed=20 + n) for n in (30, 25, 35, 20)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    engine = Engine(session.executor, session.tokenizer, (), EngineConfig(kv_pages=8))
    results = engine.generate(prompts, params)
    assert engine.stats()["preemptions"] > 0
    for prompt, result in zip(prompts, results):
        assert result.token_ids == _hf_greedy(hf_model, prompt)


def test_run_raw_json_token_ids_equal_transformers_greedy(qwen3_5_bundle, hf_model):
    from tokenizers import Tokenizer

    text = ("The quick brown fox jumps over the lazy dog. In a distant land, a small village sat beside a river "
            "where the children played every summer afternoon until dark, and nobody worried.")
    proc = run_cli("arle-runtime", "run", str(qwen3_5_bundle), "--raw", "--json", "--max-tokens", str(NEW_TOKENS),
                   "--prompt", text, env={"ARLE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    prompt_ids = Tokenizer.from_file(str(qwen3_5_bundle / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert out["prompt_tokens"] == len(prompt_ids) > 32  # crosses a prefill chunk
    assert out["token_ids"] == _hf_greedy(hf_model, prompt_ids)[: len(out["token_ids"])]
    assert len(out["token_ids"]) == NEW_TOKENS or out["finish_reason"] == "stop"


def test_verify_checks_the_compiled_steps_against_the_eager_reference(qwen3_5_bundle):
    proc = run_cli("arlec", "verify", str(qwen3_5_bundle), env={"ARLE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "greedy      ok" in proc.stdout


def test_onnx_target_refuses_hybrid_models_with_one_sentence(qwen3_5_hf, tmp_path):
    proc = run_cli("arlec", "build", "--model", str(qwen3_5_hf), "--target", "onnx", "--out", str(tmp_path / "x.arle"))
    assert_clean_error(proc, "hybrid linear attention")


# ------------------------------------------------------------------ Qwen3.5-MoE (eager)


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    """(transformers model, arle model) of a random Qwen3.5-MoE read back from save_pretrained."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    from arlec.sources import load_hf_folder

    kwargs = _config_kwargs(512)
    del kwargs["intermediate_size"]
    config = Qwen3_5MoeTextConfig(**kwargs, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                  num_experts=8, num_experts_per_tok=2)
    torch.manual_seed(1)
    hf = Qwen3_5MoeForCausalLM(config).eval()
    _randomize_norms_and_decay(hf)
    path = tmp_path_factory.mktemp("tiny-qwen3_5-moe")
    hf.save_pretrained(path)  # per-expert tensors on disk: arlec.sources fuses them
    (path / "tokenizer.json").write_text("{}")  # only checked for presence here
    spec = load_hf_folder(path)
    model = build_model(spec.config)
    model.load_state_dict(spec.tensors, strict=False)
    return hf, model.eval()


def test_moe_config_and_parameter_count(moe_pair):
    _, model = moe_pair
    cfg = model.config
    assert cfg.architecture == "qwen3_5_moe" and cfg.is_hybrid and cfg.norm_topk_prob
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.shared_expert_intermediate_size) == (8, 2, 48)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


@torch.no_grad()
def test_moe_logits_and_greedy_decode_match_transformers(moe_pair):
    hf, model = moe_pair
    tokens = torch.tensor([_prompt(100, seed=7), _prompt(100, seed=8)]) % 512
    ours, theirs = model.all_logits(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    prompt = (torch.tensor(_prompt(30, seed=9)) % 512).tolist()
    k = model.empty_cache(1, 0)
    v, state = k.clone(), model.empty_state(1)
    logits, k, v, *state = model(torch.tensor([prompt]), torch.arange(30)[None], k, v, torch.tensor([0]),
                                 torch.tensor([29]), *state)
    model.use_split_attention(True)  # the decode program's path: split-past attention, gathered experts
    try:
        tokens = []
        for pos in range(30, 30 + NEW_TOKENS):
            tokens.append(int(logits[0].argmax()))
            logits, nk, nv, *state = model(torch.tensor([[tokens[-1]]]), torch.tensor([[pos]]), k, v,
                                           torch.tensor([pos]), torch.tensor([0]), *state)
            k, v = torch.cat((k, nk), 3), torch.cat((v, nv), 3)
    finally:
        model.use_split_attention(False)
    assert tokens == _hf_greedy(hf, prompt)


@pytest.fixture(scope="session")
def qwen3_5_moe_hf(tmp_path_factory, tiny_hf_model) -> Path:
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    path = tmp_path_factory.mktemp("tiny-qwen3_5-moe-tok")
    kwargs = _config_kwargs(json.loads((tiny_hf_model / "config.json").read_text())["vocab_size"])
    del kwargs["intermediate_size"]
    torch.manual_seed(3)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**kwargs, moe_intermediate_size=32,
                                                        shared_expert_intermediate_size=48, num_experts=8,
                                                        num_experts_per_tok=2))
    _randomize_norms_and_decay(model)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "chat_template.jinja", "tokenizer_config.json"):
        shutil.copy(tiny_hf_model / name, path / name)
    return path


def test_moe_bundle_run_raw_json_token_ids_equal_transformers_greedy(bundle_dir, qwen3_5_moe_hf):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    bundle = build_bundle(bundle_dir, "qwen3_5-moe-tiny-fp32", "--model", str(qwen3_5_moe_hf), "--quant", "fp32",
                          "--max-batch", "4", "--max-prefill-tokens", "32", "--max-context", "128")
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint("
    proc = run_cli("arle-runtime", "run", str(bundle), "--raw", "--json", "--max-tokens", str(NEW_TOKENS),
                   "--prompt", text, env={"ARLE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    prompt_ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    hf = AutoModelForCausalLM.from_pretrained(qwen3_5_moe_hf).eval()
    assert out["prompt_tokens"] == len(prompt_ids) > 32
    assert out["token_ids"] == _hf_greedy(hf, prompt_ids)[: len(out["token_ids"])]
    assert len(out["token_ids"]) == NEW_TOKENS or out["finish_reason"] == "stop"


# ------------------------------------------------------------------ GGUF (llama.cpp's qwen35 / qwen35moe)

GGUF_CASES = {  # case -> (HF folder fixture, write the experts as one fused gate_up stack)
    "dense": ("qwen3_5_hf", False),
    "moe": ("qwen3_5_moe_hf", False),
    "moe-fused-experts": ("qwen3_5_moe_hf", True),
}
CONFIG_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "tie_word_embeddings", "layer_types",
                 "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_conv_kernel", "partial_rotary_factor", "attn_output_gate", "num_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "shared_expert_intermediate_size")


def _write_gguf(request, case: str, tmp_path: Path, **kwargs) -> tuple[Path, Path, dict]:
    from llama_cpp_gguf import write_qwen3_5_gguf

    fixture, fused = GGUF_CASES[case]
    hf_path = request.getfixturevalue(fixture)
    path = tmp_path / f"{case}.gguf"
    written = write_qwen3_5_gguf(path, hf_path, fused_experts=fused, **kwargs)
    return path, hf_path, written


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_written_as_llama_cpp_does_loads_like_the_hf_folder(case, request, tmp_path):
    import gguf

    from arlec.sources import load_gguf, load_hf_folder

    q8 = {"blk.0.attn_qkv.weight": gguf.GGMLQuantizationType.Q8_0}  # dequantized before the head reorder
    path, hf_path, written = _write_gguf(request, case, tmp_path, quantize=q8)
    ours, theirs = load_gguf(path), load_hf_folder(hf_path)
    fields = {f: getattr(ours.config, f) for f in CONFIG_FIELDS}
    assert fields == {f: getattr(theirs.config, f) for f in CONFIG_FIELDS}
    assert ours.config.rope.theta == theirs.config.rope.theta
    assert ours.config.rms_norm_eps == pytest.approx(theirs.config.rms_norm_eps, rel=1e-6)  # stored as float32
    assert ours.tensors.keys() == theirs.tensors.keys()  # the MTP layer (blk.4) is skipped
    # The file really is rewritten: tiled value heads, -exp(A_log), 1 + w norms.
    assert not torch.equal(written["blk.0.attn_gate.weight"], theirs.tensors["layers.0.linear_attn.in_proj_z.weight"])
    a_log = theirs.tensors["layers.0.linear_attn.A_log"]
    assert torch.equal(written["blk.0.ssm_a"].sort().values, (-a_log.exp()).sort().values)
    for name, expected in theirs.tensors.items():
        got = ours.tensors[name]
        assert got.shape == expected.shape, name
        if name == "layers.0.linear_attn.in_proj_qkv.weight":  # Q8_0: half a step, plus the f16 scale's rounding
            assert (got - expected).abs().max() <= 0.6 * expected.abs().max() / 127, name
        else:
            torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["dense", "moe-fused-experts"])
@torch.no_grad()
def test_model_from_the_gguf_gives_transformers_logits_and_greedy_tokens(case, request, tmp_path):
    from transformers import AutoModelForCausalLM

    from arlec.sources import load_gguf

    path, hf_path, _ = _write_gguf(request, case, tmp_path)
    spec = load_gguf(path)
    model = build_model(spec.config)
    model.load_state_dict(spec.tensors, strict=False)
    model.eval()
    hf = AutoModelForCausalLM.from_pretrained(hf_path).eval()
    tokens = torch.tensor([_prompt(70, seed=31)])  # two scan chunks
    ours, theirs = model.all_logits(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    prompt = _prompt(20, seed=32)
    generated = list(prompt)
    for _ in range(NEW_TOKENS):
        generated.append(int(model.all_logits(torch.tensor([generated]))[0, -1].argmax()))
    assert generated[len(prompt):] == _hf_greedy(hf, prompt)


def test_qwen35_gguf_tokenizer_splits_as_transformers_qwen3_5_tokenizer(request, tmp_path):
    """`tokenizer.ggml.pre = qwen35`: Qwen2's split with combining marks kept in words.
    Texts already in NFC (transformers' tokenizer normalizes to NFC; llama.cpp does not)."""
    from tokenizers import Tokenizer
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    from arlec.sources import _QWEN2_SPLIT, _QWEN35_SPLIT, load_gguf

    path, hf_path, _ = _write_gguf(request, "dense", tmp_path)
    ours_json = load_gguf(path).tokenizer_json
    ours = Tokenizer.from_str(ours_json)
    model = json.loads((hf_path / "tokenizer.json").read_text())["model"]
    theirs = Qwen3_5Tokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                            for m in model["merges"]])
    texts = ["नमस्ते दुनिया, आप कैसे हैं?", "สวัสดีครับ ผมชื่ออเล็กซ์", "Hello world 12345, it's fine.",
             "naïve café — “quotes”", "def f(x):\n    return x  # ok\n"]

    def pieces(tokenizer, text):
        return [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]

    for text in texts:
        assert pieces(ours, text) == pieces(theirs.backend_tokenizer, text), text
        assert ours.encode(text, add_special_tokens=False).ids == theirs(text, add_special_tokens=False)["input_ids"]
    # Qwen2's rule splits a word at each combining mark: the texts above tell the two apart.
    qwen2 = Tokenizer.from_str(ours_json.replace(json.dumps(_QWEN35_SPLIT)[1:-1], json.dumps(_QWEN2_SPLIT)[1:-1]))
    assert sum(pieces(qwen2, t) != pieces(ours, t) for t in texts) == 2  # the Devanagari and the Thai


def test_gguf_of_qwen3_next_is_refused_with_one_sentence(tmp_path):
    import gguf

    from arlec.sources import load_source
    from arle_runtime.errors import ArleError

    path = tmp_path / "next.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen3next")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ArleError, match="'qwen3next' is not supported; supported: llama, qwen3, qwen3moe, qwen35"):
        load_source(str(path))


@torch.no_grad()
def test_vision_language_checkpoint_builds_its_text_decoder(tmp_path):
    """Published Qwen3.5 checkpoints are Qwen3_5ForConditionalGeneration: the text config
    sits under text_config and the decoder under model.language_model; the vision tower
    is skipped."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from arlec.sources import load_hf_folder

    text = _config_kwargs(512)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    torch.manual_seed(2)
    hf = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision)).eval()
    _randomize_norms_and_decay(hf)
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    spec = load_hf_folder(tmp_path)
    assert spec.config.architecture == "qwen3_5" and not any("visual" in n for n in spec.tensors)
    model = build_model(spec.config)
    model.load_state_dict(spec.tensors, strict=False)
    tokens = torch.tensor([_prompt(40, seed=11)]) % 512
    ours, theirs = model.eval().all_logits(tokens), hf(input_ids=tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_training_refuses_hybrid_models_with_one_sentence(qwen3_5_hf, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    proc = run_cli("arle-runtime", "train", "sft", str(qwen3_5_hf), "--data", str(data), "--out", str(tmp_path / "run"))
    assert_clean_error(proc, "hybrid linear attention")
