"""Qwen3-MoE against Hugging Face transformers on the same random weights.

Tiny Qwen3-MoE checkpoints are written by transformers' `save_pretrained` (per-expert
tensors on disk, `num_local_experts` in config.json), read through arlec.sources and
compared with the transformers model that wrote them, in float32 on CPU:
- logits at every position, for each expert compute (all experts for prefill, gathered
  experts for decode) and each layer layout (norm_topk_prob on/off, decoder_sparse_step,
  mlp_only_layers);
- 32 greedy tokens through the step contract with an explicit KV cache;
- a compiled cpu bundle (fp32): 32 greedy tokens of `arle-runtime run --raw --json` equal
  transformers' `generate`, and `arlec verify` passes;
- a GGUF (arch qwen3moe, ffn_*_exps tensors) written from the same weights loads to the
  same tensors and config as the HF folder;
- int8 quantizes the experts (per expert row) and stays close to fp32; schemes without
  MoE support refuse with one sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from arle_models import build_model  # noqa: E402
from arle_models.moe import Int8Experts, Qwen3MoeBlock  # noqa: E402
from arle_runtime.errors import ArleError  # noqa: E402
from arlec.quant import parse_quant, quantize_model  # noqa: E402
from arlec.sources import load_gguf, load_hf_folder  # noqa: E402
from conftest import assert_clean_error, build_bundle, run_cli  # noqa: E402

VOCAB = 256
NEW_TOKENS = 32
# Float32 round-off between differently ordered sums (measured: <= 2e-6 on logits of ~3).
LOGIT_RTOL = 1e-4
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    # A larger init than 0.02 spreads logits and router scores, so neither greedy tokens
    # nor top-k expert choices hinge on float32 noise.
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LAYOUTS = {
    "norm-topk-dense-layer-1": dict(norm_topk_prob=True, mlp_only_layers=[1]),
    "no-norm-all-sparse": dict(norm_topk_prob=False, num_hidden_layers=3),
    "sparse-step-2": dict(norm_topk_prob=False, decoder_sparse_step=2, num_hidden_layers=3),
}
BUNDLE_LAYOUT = "norm-topk-dense-layer-1"
PROMPT = [5, 17, 99, 3, 200, 41, 7, 128]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_no_grad():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


def write_hf_model(path: Path, layout: str):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**{**BASE, **LAYOUTS[layout]})
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """layout -> (HF folder, the transformers model that wrote it)."""
    out = {}
    for layout in LAYOUTS:
        path = tmp_path_factory.mktemp(f"qwen3-moe-{layout}")
        out[layout] = (path, write_hf_model(path, layout))
    return out


def ours_from(path: Path):
    spec = load_hf_folder(path)
    model = build_model(spec.config)
    model.load_state_dict(spec.tensors, strict=True)
    return model.eval().fuse_projections()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy_ours(model, prompt: list[int], n: int) -> list[int]:
    """Prefill on an empty cache, then one token per step (decode program's expert path)."""
    cache = model.empty_cache(1, 0)
    T = len(prompt)
    logits, k_cache, v_cache = model(
        torch.tensor([prompt]), torch.arange(T)[None], cache, cache, torch.tensor([0]), torch.tensor([T - 1])
    )
    out = []
    model.use_split_attention(True)
    try:
        while True:
            out.append(int(logits[0].argmax()))
            if len(out) == n:
                return out
            length = k_cache.shape[3]
            logits, k, v = model(
                torch.tensor([[out[-1]]]), torch.tensor([[length]]), k_cache, v_cache,
                torch.tensor([length]), torch.tensor([0]),
            )
            k_cache, v_cache = torch.cat((k_cache, k), dim=3), torch.cat((v_cache, v), dim=3)
    finally:
        model.use_split_attention(False)


def assert_close(ours, theirs, what):
    atol = LOGIT_RTOL * max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= atol, f"{what}: max |diff| {err:.3g} > {atol:.3g}"


# ---------------------------------------------------------------- eager, against transformers


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_and_layer_layout_follow_transformers(checkpoints, layout):
    path, hf = checkpoints[layout]
    model = ours_from(path)
    cfg = model.config
    assert cfg.architecture == "qwen3_moe" and cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    sparse = [isinstance(layer.mlp, Qwen3MoeBlock) for layer in model.layers]
    hf_sparse = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf.model.layers]
    assert sparse == hf_sparse and any(sparse)
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("gather", [False, True], ids=["all-experts", "gathered-experts"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers(checkpoints, layout, gather):
    path, hf = checkpoints[layout]
    model = ours_from(path).use_split_attention(gather)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    assert_close(model.all_logits(tokens), hf(tokens).logits, f"{layout} gather={gather}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_match_transformers(checkpoints, layout):
    path, hf = checkpoints[layout]
    assert greedy_ours(ours_from(path), PROMPT, NEW_TOKENS) == hf_greedy(hf, PROMPT, NEW_TOKENS)


# ---------------------------------------------------------------- quantization


def test_int8_quantizes_experts_and_stays_close(checkpoints):
    path, _ = checkpoints[BUNDLE_LAYOUT]
    reference = ours_from(path)
    model = quantize_model(ours_from(path), parse_quant("int8"))
    experts = model.layers[0].mlp.experts
    assert isinstance(experts, Int8Experts) and experts.gate_up_proj.dtype == torch.int8
    assert experts.down_proj.dtype == torch.int8
    assert model.layers[0].mlp.gate.weight.dtype == torch.bfloat16  # the router is not quantized
    tokens = torch.tensor([PROMPT])
    ours, ref = model.all_logits(tokens), reference.all_logits(tokens)
    # int8 weights and bf16 compute: a few percent of the logit scale.
    assert (ours - ref).abs().max() <= 0.1 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_quant_without_moe_support_refuses(checkpoints, scheme):
    path, _ = checkpoints[BUNDLE_LAYOUT]
    with pytest.raises(ArleError, match="mixture-of-experts"):
        quantize_model(ours_from(path), parse_quant(scheme))


# ---------------------------------------------------------------- GGUF


def write_gguf(path: Path, hf_path: Path) -> None:
    """The HF checkpoint as llama.cpp's convert script lays out a qwen3moe GGUF: per-layer
    expert stacks ffn_{gate,up,down}_exps [E, out, in], router ffn_gate_inp; the experts of
    layer 0 in Q8_0 (3-D quantized tensors), everything else F32."""
    spec = load_hf_folder(hf_path)
    c = spec.config
    t = spec.tensors
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope.theta)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([f"w{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([])

    def add(name, tensor, qtype=gguf.GGMLQuantizationType.F32):
        data = tensor.float().numpy()
        if qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)

    add("token_embd.weight", t["embed_tokens.weight"])
    add("output_norm.weight", t["norm.weight"])
    add("output.weight", t["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp"}
    for i in range(c.num_layers):
        for ours, theirs in names.items():
            if f"layers.{i}.{ours}.weight" in t:
                add(f"blk.{i}.{theirs}.weight", t[f"layers.{i}.{ours}.weight"])
        if f"layers.{i}.mlp.experts.gate_up_proj" in t:
            q8 = gguf.GGMLQuantizationType.Q8_0 if i == 0 else gguf.GGMLQuantizationType.F32
            gate, up = t[f"layers.{i}.mlp.experts.gate_up_proj"].chunk(2, dim=1)
            add(f"blk.{i}.ffn_gate_exps.weight", gate, q8)
            add(f"blk.{i}.ffn_up_exps.weight", up, q8)
            add(f"blk.{i}.ffn_down_exps.weight", t[f"layers.{i}.mlp.experts.down_proj"], q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_loads_like_the_hf_folder(checkpoints, tmp_path):
    hf_path, _ = checkpoints[BUNDLE_LAYOUT]
    path = tmp_path / "tiny-qwen3moe.gguf"
    write_gguf(path, hf_path)
    ours, theirs = load_gguf(path), load_hf_folder(hf_path)
    fields = ("architecture", "num_layers", "hidden_size", "intermediate_size", "num_experts", "num_experts_per_tok",
              "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "head_dim")
    assert {f: getattr(ours.config, f) for f in fields} == {f: getattr(theirs.config, f) for f in fields}
    assert ours.tensors.keys() == theirs.tensors.keys()
    for name, expected in theirs.tensors.items():
        got = ours.tensors[name]
        assert got.shape == expected.shape, name
        if name.startswith("layers.0.mlp.experts."):  # Q8_0: half a step, plus the f16 rounding of the scale
            step = expected.abs().max() / 127
            assert (got - expected).abs().max() <= 0.6 * step, name
        else:
            assert torch.equal(got, expected.float()), name


def test_hf_folder_with_fused_expert_tensors_loads_the_same(checkpoints, tmp_path):
    """Checkpoints saved from transformers' in-memory layout (experts.gate_up_proj [E, 2I, H])."""
    from safetensors.torch import save_file

    src, hf = checkpoints[BUNDLE_LAYOUT]
    dst = tmp_path / "fused"
    dst.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (dst / f).write_text((src / f).read_text())
    state = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    fused, per_expert = load_hf_folder(dst).tensors, load_hf_folder(src).tensors
    assert fused.keys() == per_expert.keys()
    assert all(torch.equal(fused[k], per_expert[k]) for k in fused)


def test_hf_config_with_more_active_than_total_experts_is_one_sentence(checkpoints, tmp_path):
    src, _ = checkpoints[BUNDLE_LAYOUT]
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArleError, match="num_experts_per_tok is 9"):
        load_hf_folder(tmp_path)


def test_hf_folder_missing_an_expert_is_one_sentence(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _ = checkpoints[BUNDLE_LAYOUT]
    dst = tmp_path / "broken"
    dst.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (dst / f).write_text((src / f).read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(ArleError, match="lacks some experts"):
        load_hf_folder(dst)


# ---------------------------------------------------------------- compiled cpu bundle


@pytest.fixture(scope="module")
def moe_bundle(bundle_dir, checkpoints):
    path, _ = checkpoints[BUNDLE_LAYOUT]
    return build_bundle(bundle_dir, "qwen3-moe-fp32", "--model", str(path), "--quant", "fp32", "--max-batch", "2",
                        "--max-prefill-tokens", "16", "--max-context", "64")


@pytest.mark.slow
def test_bundle_greedy_tokens_equal_transformers(moe_bundle, checkpoints):
    _, hf = checkpoints[BUNDLE_LAYOUT]
    prompt = " ".join(f"w{i}" for i in PROMPT)
    proc = run_cli("arle-runtime", "run", str(moe_bundle), "--raw", "--prompt", prompt, "--max-tokens",
                   str(NEW_TOKENS), "--json", env={"ARLE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["prompt_tokens"] == len(PROMPT)
    assert out["token_ids"] == hf_greedy(hf, PROMPT, NEW_TOKENS)


@pytest.mark.slow
def test_bundle_batched_prompts_each_equal_transformers(moe_bundle, checkpoints):
    """Two ragged prompts decoded together (decode batch 2: gathered experts per row)."""
    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.sampler import SamplingParams
    from arle_runtime.session import Session

    _, hf = checkpoints[BUNDLE_LAYOUT]
    prompts = [PROMPT, [9, 250, 33, 61, 2]]
    session = Session.open(moe_bundle)
    try:
        engine = Engine(session.executor, session.tokenizer, session.bundle.eos_token_ids, EngineConfig())
        results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    finally:
        session.close()
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(hf, prompt, 24)


@pytest.mark.slow
def test_bundle_verifies(moe_bundle):
    manifest = json.loads((moe_bundle / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "qwen3_moe"
    assert manifest["model"]["config"]["num_experts"] == 8
    proc = run_cli("arlec", "verify", str(moe_bundle), env={"ARLE_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified" in proc.stdout


def test_build_int4_refuses_moe_in_one_sentence(checkpoints, tmp_path):
    path, _ = checkpoints[BUNDLE_LAYOUT]
    proc = run_cli("arlec", "build", "--model", str(path), "--quant", "int4", "--target", "cpu",
                   "--out", str(tmp_path / "x.arle"), env={"ARLE_THREADS": "1"})
    assert_clean_error(proc, "mixture-of-experts")
    assert not (tmp_path / "x.arle").exists()

