"""arle_models against Hugging Face transformers on the same weights.

Random-weight Qwen3 and Llama checkpoints (every RoPE scaling arle supports) are written
with `save_pretrained`, read back through `arlec.sources.load_hf_folder`, and compared with
the transformers model that wrote them; the embedded SmolLM2 GGUF is compared with
transformers loading the same file. Both sides run in float32 on CPU.

Checks:
- logits at every position (`CausalLM.all_logits`) agree to LOGIT_RTOL of the logit scale
  (max |logit|), i.e. float32 round-off of two differently ordered computations;
- 64 greedy tokens agree, ours decoded one token at a time through the step contract with
  an explicit KV cache (prefill with an empty cache, then T=1 steps), theirs with
  transformers' own KV cache; the logits of every decode step are compared too;
- a ragged batch through one preallocated cache (rows masked by past_lens) gives each row's
  single-sequence transformers result;
- RoPE cos/sin tables match transformers' rotary module for every scaling type.
"""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from arle_models import RopeConfig, build_model  # noqa: E402
from arlec.sources import default_model_path, load_gguf, load_hf_folder  # noqa: E402
from arle_runtime.hf_config import rope_from_hf  # noqa: E402

# |ours - transformers| <= LOGIT_RTOL * max(1, max |logit|): float32 round-off only. Measured
# here (one thread): all_logits bit-identical (0); decode-step logits within 2e-6 (random
# models, logits of a few units) and 4e-5 (SmolLM2, logits up to ~40, i.e. 1e-6 of the scale).
LOGIT_RTOL = 1e-4
# SmolLM2 full-prompt logits: absolute bound (both sides dequantize the same Q4_1 file to float32).
SMOL_ATOL = 1e-4
NEW_TOKENS = 64
VOCAB = 512


@pytest.fixture(scope="module", autouse=True)
def _one_thread_no_grad():
    """One intra-op thread: on a small shared CPU box, two OpenMP threads competing with other
    processes spin-wait for each other (10x slower here); it also fixes the reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- helpers


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, what: str, atol: float | None = None) -> float:
    assert ours.shape == theirs.shape, what
    if atol is None:
        atol = LOGIT_RTOL * max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= atol, f"{what}: max |diff| {err:.3g} > {atol:.3g}"
    return err


def greedy_ours(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode through the step contract: prefill on an empty cache, then one token per step."""
    k_cache, v_cache = model.empty_cache(1, 0), model.empty_cache(1, 0)
    tokens = torch.tensor([prompt])
    T = tokens.shape[1]
    positions = torch.arange(T)[None]
    logits, k, v = model(tokens, positions, k_cache, v_cache, torch.tensor([0]), torch.tensor([T - 1]))
    k_cache, v_cache = torch.cat((k_cache, k), dim=3), torch.cat((v_cache, v), dim=3)
    out, step_logits = [], [logits[0]]
    for _ in range(n):
        nxt = int(logits[0].argmax())
        out.append(nxt)
        if len(out) == n:
            break
        length = k_cache.shape[3]
        logits, k, v = model(
            torch.tensor([[nxt]]), torch.tensor([[length]]), k_cache, v_cache,
            torch.tensor([length]), torch.tensor([0]),
        )
        assert k.shape[3] == 1 and v.shape[3] == 1
        k_cache, v_cache = torch.cat((k_cache, k), dim=3), torch.cat((v_cache, v), dim=3)
        step_logits.append(logits[0])
    return out, step_logits


def greedy_ours_batched(model, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy decode of a ragged batch the way an engine runs it: one preallocated cache of
    P slots, row b valid up to past_lens[b], right-padded prefill, new keys written in place."""
    B, lengths = len(prompts), [len(p) for p in prompts]
    T = max(lengths)
    tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    k_cache, v_cache = model.empty_cache(B, T + n), model.empty_cache(B, T + n)
    empty = model.empty_cache(B, 0)
    logits, k, v = model(
        tokens, torch.arange(T)[None].expand(B, T), empty, empty, torch.zeros(B, dtype=torch.long),
        torch.tensor(lengths) - 1,
    )
    k_cache[:, :, :, :T], v_cache[:, :, :, :T] = k, v
    past = torch.tensor(lengths)
    out, step_logits = [[] for _ in range(B)], [logits]
    for step in range(n):
        nxt = logits.argmax(-1)
        for b in range(B):
            out[b].append(int(nxt[b]))
        if step == n - 1:
            break
        logits, k, v = model(nxt[:, None], past[:, None], k_cache, v_cache, past, torch.zeros(B, dtype=torch.long))
        for b in range(B):
            k_cache[:, b, :, past[b]], v_cache[:, b, :, past[b]] = k[:, b, :, 0], v[:, b, :, 0]
        past = past + 1
        step_logits.append(logits)
    return out, step_logits


def _hf_cache_kwarg(model) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns, then goes away).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_hf(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode with transformers' own KV cache (no EOS stop, no logits processors)."""
    name = _hf_cache_kwarg(model)
    out_ = model(torch.tensor([prompt]), use_cache=True)
    cache, logits = getattr(out_, name), out_.logits[0, -1]
    out, step_logits = [], [logits]
    for _ in range(n):
        nxt = int(logits.argmax())
        out.append(nxt)
        if len(out) == n:
            break
        out_ = model(torch.tensor([[nxt]]), use_cache=True, **{name: cache})
        cache, logits = getattr(out_, name), out_.logits[0, -1]
        step_logits.append(logits)
    return out, step_logits


def reset_hf_rope(hf) -> None:
    """transformers' dynamic RoPE keeps the frequencies of the longest call so far and only
    resets them on a call shorter than max_position_embeddings; arle's step is stateless.
    A one-token call puts transformers back to the state of a fresh model."""
    hf(torch.zeros(1, 1, dtype=torch.long))


def compare_generation(ours, hf, prompt: list[int], what: str) -> tuple[float, float]:
    """Returns (max logit error over decode steps, smallest top-1/top-2 gap on the HF side)."""
    reset_hf_rope(hf)
    hf_tokens, hf_logits = greedy_hf(hf, prompt, NEW_TOKENS)
    our_tokens, our_logits = greedy_ours(ours, prompt, NEW_TOKENS)
    errs = [assert_logits_close(a, b, f"{what} step {i}") for i, (a, b) in enumerate(zip(our_logits, hf_logits))]
    gap = min(float(t.topk(2).values[0] - t.topk(2).values[1]) for t in hf_logits)
    assert our_tokens == hf_tokens, f"{what}: greedy tokens differ (smallest HF top-2 gap {gap:.3g})"
    return max(errs), gap


def tiny_tokenizer(vocab: int) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def random_prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------- random-weight checkpoints

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-6,
    # A larger init than the default 0.02 spreads the logits, so greedy choices are not
    # decided by float32 noise between near-equal candidates.
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

CASES = {
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True, max_position_embeddings=512)),
    "qwen3-untied": ("qwen3", dict(tie_word_embeddings=False, max_position_embeddings=512)),
    "llama-default": (
        "llama",
        dict(max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "llama-linear": (
        "llama",
        dict(
            max_position_embeddings=512,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    # max_position_embeddings 64 and prompts up to 100 tokens (plus 64 generated): the NTK
    # rescaling is active and changes with every step.
    "llama-dynamic": (
        "llama",
        dict(
            max_position_embeddings=64,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    "llama-yarn": (
        "llama",
        dict(
            max_position_embeddings=128,  # = factor * original, so transformers does not warn
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama-llama3": (
        "llama",
        dict(
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
            },
        ),
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def random_pair(request, tmp_path_factory):
    """(name, transformers model, arle model, ModelSpec) for one random-weight checkpoint."""
    arch, extra = CASES[request.param]
    if arch == "qwen3":
        config = transformers.Qwen3Config(**BASE, **extra)
        cls = transformers.Qwen3ForCausalLM
    else:
        config = transformers.LlamaConfig(**BASE, tie_word_embeddings=False, **extra)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(1234 + list(CASES).index(request.param))
    hf = cls(config).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(VOCAB).save(str(folder / "tokenizer.json"))

    spec = load_hf_folder(folder)
    ours = build_model(spec.config).eval()
    result = ours.load_state_dict(spec.tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if spec.config.tie_word_embeddings else set()
    assert set(result.missing_keys) <= allowed_missing and not result.unexpected_keys
    return request.param, hf, ours, spec


def test_config_read_back(random_pair):
    name, hf, ours, spec = random_pair
    c, hc = spec.config, hf.config
    assert c.architecture == CASES[name][0]
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (VOCAB, 128, 256, 4)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 32)
    assert c.tie_word_embeddings == hc.tie_word_embeddings
    assert c.max_position_embeddings == hc.max_position_embeddings
    assert c.rope.type == hc.rope_parameters["rope_type"]
    assert c.rope.factor == hc.rope_parameters.get("factor", 1.0)
    if c.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight
    assert Tokenizer.from_str(spec.tokenizer_json).encode("w3 w17 w511").ids == [3, 17, 511]


def test_rope_tables_match(random_pair):
    """cos/sin for the same positions, including past the trained length for dynamic."""
    name, hf, ours, spec = random_pair
    rotary = hf.model.rotary_emb
    for length in (8, 64, 100, 200):
        positions = torch.arange(length)[None]
        reset_hf_rope(hf)
        cos_hf, sin_hf = rotary(torch.zeros(1, dtype=torch.float32), positions)
        cos, sin = ours.rotary(positions, torch.float32)
        torch.testing.assert_close(cos, cos_hf, rtol=0, atol=1e-5, msg=f"{name} cos at length {length}")
        torch.testing.assert_close(sin, sin_hf, rtol=0, atol=1e-5, msg=f"{name} sin at length {length}")


def test_all_logits_match(random_pair):
    name, hf, ours, spec = random_pair
    prompts = random_prompts(7, (1, 9, 33, 100))
    errs = []
    for prompt in prompts:
        x = torch.tensor([prompt])
        reset_hf_rope(hf)
        errs.append(assert_logits_close(ours.all_logits(x), hf(x).logits, f"{name} prompt of {len(prompt)}"))
    # A batch of equal-length prompts goes through the same path.
    batch = torch.tensor(random_prompts(8, (40, 40, 40)))
    reset_hf_rope(hf)
    errs.append(assert_logits_close(ours.all_logits(batch), hf(batch).logits, f"{name} batch"))
    print(f"{name}: all_logits max |diff| {max(errs):.3g}")


def test_greedy_generation_matches(random_pair):
    name, hf, ours, spec = random_pair
    prompts = random_prompts(11, (1, 12, 100))
    results = [compare_generation(ours, hf, p, f"{name} prompt of {len(p)}") for p in prompts]
    err, gap = max(r[0] for r in results), min(r[1] for r in results)
    print(f"{name}: decode max |diff| {err:.3g}, smallest top-2 gap {gap:.3g}")


def test_batched_padded_cache_matches(random_pair):
    """Rows of different lengths in one batch (padding masked through past_lens) give each
    row's own transformers result. Dynamic RoPE takes its frequencies from the longest row of
    the call (transformers too), so there the rows have equal lengths, past the trained 64."""
    name, hf, ours, spec = random_pair
    lengths = (70, 70, 70) if spec.config.rope.type == "dynamic" else (5, 23, 17)
    prompts = random_prompts(13, lengths)
    n = 24
    tokens, logits = greedy_ours_batched(ours, prompts, n)
    for b, prompt in enumerate(prompts):
        reset_hf_rope(hf)
        hf_tokens, hf_logits = greedy_hf(hf, prompt, n)
        for i, (a, ref) in enumerate(zip(logits, hf_logits)):
            assert_logits_close(a[b], ref, f"{name} row {b} step {i}")
        assert tokens[b] == hf_tokens, f"{name} row {b}"


def test_legacy_rope_scaling_field():
    """Pre-v5 config.json files carry `rope_theta` and `rope_scaling` at the top level."""
    legacy = {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    current = {
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        }
    }
    assert rope_from_hf(legacy) == rope_from_hf(current)
    assert rope_from_hf(legacy) == RopeConfig(theta=500000.0, type="llama3", factor=8.0, original_max_position=8192)
    assert rope_from_hf({"rope_scaling": {"type": "linear", "factor": 2.0}}).type == "linear"
    assert rope_from_hf({}) == RopeConfig()


# ---------------------------------------------------------------- SmolLM2 (embedded default GGUF)

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain what a hash table is in two sentences.",
]


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smol_spec():
    return load_gguf(default_model_path())


@pytest.fixture(scope="module")
def smol_ours(smol_spec):
    model = build_model(smol_spec.config).eval()
    result = model.load_state_dict(smol_spec.tensors, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys
    return model


@pytest.fixture(scope="module")
def smol_hf():
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def smol_tokenizer(smol_spec):
    return Tokenizer.from_str(smol_spec.tokenizer_json)


def test_smollm2_logits_match(smol_ours, smol_hf, smol_tokenizer):
    errs = []
    for text in RAW_PROMPTS + [chat(CHAT_PROMPTS[0])]:
        ids = smol_tokenizer.encode(text).ids
        x = torch.tensor([ids])
        errs.append(assert_logits_close(smol_ours.all_logits(x), smol_hf(x).logits, repr(text), atol=SMOL_ATOL))
    print(f"SmolLM2: all_logits max |diff| {max(errs):.3g}")


def test_smollm2_greedy_chat_matches(smol_ours, smol_hf, smol_tokenizer):
    results = []
    for text in CHAT_PROMPTS:
        ids = smol_tokenizer.encode(chat(text)).ids
        assert ids[0] == smol_tokenizer.token_to_id("<|im_start|>")  # special tokens are kept whole
        results.append(compare_generation(smol_ours, smol_hf, ids, repr(text)))
    err, gap = max(r[0] for r in results), min(r[1] for r in results)
    print(f"SmolLM2: decode max |diff| {err:.3g}, smallest top-2 gap {gap:.3g}")
