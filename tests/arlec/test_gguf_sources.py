"""arlec.sources.load_gguf: tokenizer rebuild, every supported tensor type, clear errors.

The quantized tensors of the tiny test file are built here byte by byte from values we
choose (ggml's block layouts, written from ggml-quants.c's dequantize_row_* loops), so
the expected float weights are known without gguf-py's decoder, which is what both arlec
and transformers use. Then the whole model is compared with transformers loading the
same file, which checks the config mapping and llama.cpp's Q/K row permutation
independently of arlec's code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from arle_models import build_model  # noqa: E402
from arle_runtime.errors import ArleError  # noqa: E402
from arlec.sources import SUPPORTED_GGUF_TYPES, default_model_path, load_gguf, load_source  # noqa: E402

QK_K = 256


@pytest.fixture(scope="module", autouse=True)
def _one_thread_no_grad():
    """One intra-op thread: on a small shared CPU box two OpenMP threads competing with other
    processes spin-wait for each other; it also fixes the reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- tokenizer of the embedded default

# No digits: transformers' GGUF tokenizer conversion does not promise llama.cpp's 'smollm'
# digit split, so digits are checked on their own below. (SmolLM2's vocabulary has no token
# with a digit next to anything else, so its digits come out one by one under any split
# rule; the rule itself is checked on the tiny file, whose merges do join digits.)
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "  leading spaces,\ttabs\n\n\nand  double  spaces  ",
    "Ünïcödé – “quotes” 日本語 🙂 naïve café",
    "def f(x):\n    return x ** two  # comment\n",
    "I'm sure they'll say it's fine, isn't it? We've seen what you'd do.",
    "<|endoftext|>end",
]


@pytest.fixture(scope="module")
def default_spec():
    return load_source(None)


@pytest.fixture(scope="module")
def default_tokenizer(default_spec):
    return Tokenizer.from_str(default_spec.tokenizer_json)


def test_default_spec_metadata(default_spec):
    spec = default_spec
    assert spec.source["kind"] == "default" and spec.source["path"].endswith(".gguf")
    assert spec.config.architecture == "llama" and spec.config.tie_word_embeddings
    assert spec.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    assert "<|im_start|>" in spec.chat_template
    assert spec.config.eos_token_ids == (2,)


def test_tokenizer_matches_transformers(default_tokenizer):
    path = default_model_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ours = default_tokenizer.encode(text).ids
        assert ours == hf.encode(text, add_special_tokens=False), repr(text)
        assert default_tokenizer.decode(ours, skip_special_tokens=False) == text, repr(text)


def test_special_tokens_stay_whole(default_tokenizer):
    tok = default_tokenizer
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == tok.token_to_id("<|im_start|>") == 1
    assert ids[-1] == tok.token_to_id("<|im_end|>") == 2
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_digits_split_one_by_one(default_tokenizer):
    """llama.cpp's 'smollm' pre-tokenizer: every digit is its own pre-token."""
    tok = default_tokenizer
    digit = {str(d): tok.token_to_id(str(d)) for d in range(10)}
    assert None not in digit.values()
    assert tok.encode("1234567890").ids == [digit[c] for c in "1234567890"]
    enc = tok.encode("pi is 3.14159 and 2024")
    assert "".join(enc.tokens) == "piĠisĠ3.14159ĠandĠ2024"  # byte-level: 'Ġ' is the space
    numbers = [t for t in enc.tokens if any(c.isdigit() for c in t)]
    assert numbers == list("314159") + list("2024")
    assert tok.decode(enc.ids) == "pi is 3.14159 and 2024"


# ---------------------------------------------------------------- a tiny llama GGUF, every tensor type


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


ALPHABET = [bytes_to_unicode()[b] for b in range(256)]
MERGES = ["t h", "th e", "Ġ t", "Ġt h", "Ġth e", "Ġ c", "a t", "Ġc at", "i n", "Ġ a", "o n", "1 2", "Ġ 1"] + [
    f"Ġ {c}" for c in "bdefghijklmnopqrsuvwxyz"
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_TOKENS = ALPHABET + ["".join(m.split(" ")) for m in MERGES] + SPECIALS
N_VOCAB = len(VOCAB_TOKENS)
TOKEN_TYPES = [1] * (N_VOCAB - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 normal, 3 control

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS

# Which ggml type stores which weight: K-quants on attention, FFN and output; the rest of the
# supported types on the others. Norms stay F32, as llama.cpp writes them.
TYPES = {
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.Q6_K,
    "blk.0.attn_q.weight": Q.Q4_K,
    "blk.0.attn_k.weight": Q.Q5_K,
    "blk.0.attn_v.weight": Q.Q6_K,
    "blk.0.attn_output.weight": Q.Q8_0,
    "blk.0.ffn_gate.weight": Q.Q4_0,
    "blk.0.ffn_up.weight": Q.Q4_1,
    "blk.0.ffn_down.weight": Q.Q6_K,
    "blk.1.attn_q.weight": Q.Q5_K,
    "blk.1.attn_k.weight": Q.Q6_K,
    "blk.1.attn_v.weight": Q.Q4_K,
    "blk.1.attn_output.weight": Q.BF16,
    "blk.1.ffn_gate.weight": Q.Q4_K,
    "blk.1.ffn_up.weight": Q.Q5_K,
    "blk.1.ffn_down.weight": Q.F16,
}


def weight_shapes() -> dict[str, tuple[int, int]]:
    """numpy shapes [out, in] (ggml's ne reversed) of every linear weight, by GGUF name."""
    shapes = {"token_embd.weight": (N_VOCAB, HIDDEN), "output.weight": (N_VOCAB, HIDDEN)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    return shapes


def _f16(rng, n, lo, hi):
    return rng.uniform(lo, hi, n).astype(np.float16)


def make_q4_k(rng, rows, cols):
    """Random Q4_K tensor: (bytes [rows, cols/256*144], float32 values the blocks encode).

    block_q4_K: f16 d, f16 dmin, u8 scales[12] (eight 6-bit scales and mins), u8 qs[128];
    sub-block s (32 values) = (d * sc[s]) * q - dmin * m[s]; byte l of chunk c holds value
    64c+l in its low nibble and 64c+32+l in its high nibble."""
    nb = rows * cols // QK_K
    d, dmin = _f16(rng, nb, 2e-4, 6e-4), _f16(rng, nb, 1e-3, 3e-3)
    sc, m = rng.integers(0, 64, (nb, 8), dtype=np.uint8), rng.integers(0, 64, (nb, 8), dtype=np.uint8)
    q = rng.integers(0, 16, (nb, QK_K), dtype=np.uint8)
    qs = q.reshape(nb, 4, 2, 32)
    qs = qs[:, :, 0] | (qs[:, :, 1] << 4)
    block = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2),
                            pack_k_scales(sc, m), qs.reshape(nb, 128)], axis=1)
    values = kquant_values(d, sc, q, 32, dmin, m)
    return block.reshape(rows, -1), values.reshape(rows, cols)


def make_q5_k(rng, rows, cols):
    """block_q5_K: f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]; like Q4_K with a
    fifth bit: value 32s+l takes bit s of qh[l]."""
    nb = rows * cols // QK_K
    d, dmin = _f16(rng, nb, 1e-4, 3e-4), _f16(rng, nb, 1e-3, 3e-3)
    sc, m = rng.integers(0, 64, (nb, 8), dtype=np.uint8), rng.integers(0, 64, (nb, 8), dtype=np.uint8)
    q = rng.integers(0, 32, (nb, QK_K), dtype=np.uint8)
    low = (q & 0xF).reshape(nb, 4, 2, 32)
    qs = low[:, :, 0] | (low[:, :, 1] << 4)
    high = (q >> 4).reshape(nb, 8, 32)  # [block, sub-block s, l]
    qh = np.zeros((nb, 32), np.uint8)
    for s in range(8):
        qh |= high[:, s] << s
    block = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2),
                            pack_k_scales(sc, m), qh, qs.reshape(nb, 128)], axis=1)
    values = kquant_values(d, sc, q, 32, dmin, m)
    return block.reshape(rows, -1), values.reshape(rows, cols)


def make_q6_k(rng, rows, cols):
    """block_q6_K: u8 ql[128], u8 qh[64], i8 scales[16], f16 d; value (d * sc[j]) * (u - 32) with
    u 6 bits; in half h, group g (32 values), lane l: low nibble in ql[64h + 32(g%2) + l]
    (high nibble when g >= 2), top two bits at bit 2g of qh[32h + l], scale j = 8h + 2g + l//16."""
    nb = rows * cols // QK_K
    d = _f16(rng, nb, 2e-4, 6e-4)
    sc = rng.integers(-64, 64, (nb, 16), dtype=np.int8)
    u = rng.integers(0, 64, (nb, QK_K), dtype=np.uint8)
    ql, qh = np.zeros((nb, 128), np.uint8), np.zeros((nb, 64), np.uint8)
    for h in range(2):
        for g in range(4):
            part = u[:, 128 * h + 32 * g: 128 * h + 32 * g + 32]
            start = 64 * h + 32 * (g % 2)
            ql[:, start: start + 32] |= (part & 0xF) << (4 * (g // 2))
            qh[:, 32 * h: 32 * h + 32] |= (part >> 4) << (2 * g)
    block = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    values = kquant_values(d, sc, u.astype(np.int16) - 32, 16)
    return block.reshape(rows, -1), values.reshape(rows, cols)


def pack_k_scales(sc, m):
    """Eight 6-bit scales and mins into 12 bytes (ggml's get_scale_min_k4, inverted)."""
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def kquant_values(d, sc, q, sub, dmin=None, m=None):
    """(d * sc) * q [- dmin * m] per sub-block of `sub` values, in float32 as ggml computes it."""
    nb = d.shape[0]
    scale = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # [nb, QK_K // sub]
    v = scale[:, :, None] * q.reshape(nb, -1, sub).astype(np.float32)
    if dmin is not None:
        v = v - (dmin.astype(np.float32)[:, None] * m.astype(np.float32))[:, :, None]
    return v.reshape(nb, QK_K)


def reference_dequant(raw: np.ndarray, qtype, shape) -> np.ndarray:
    """Decode gguf.quants.quantize's output for the legacy 32-value types (ggml-quants.c)."""
    if qtype == Q.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
    if qtype == Q.Q8_0:
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    if qtype == Q.Q4_0:
        qs = blocks[:, 2:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32) - 8
        return (q * d).reshape(shape)
    if qtype == Q.Q4_1:
        mn = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, 4:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)
        return (q * d + mn).reshape(shape)
    raise AssertionError(qtype)


K_MAKERS = {Q.Q4_K: make_q4_k, Q.Q5_K: make_q5_k, Q.Q6_K: make_q6_k}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split Q/K rows to GGUF's order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama(path, *, arch="llama", types=None, tokenizer_model="gpt2", pre="gpt2",
                     rope_scaling=None, extra=(), drop=()) -> dict[str, np.ndarray]:
    """Write the tiny GGUF; returns {GGUF tensor name: float32 values as stored (GGUF layout)}.

    types overrides TYPES; drop leaves tensors out; extra adds (name, array, raw_dtype or None)."""
    types = {**TYPES, **(types or {})}
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny k-quant test model")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(N_VOCAB)
    if rope_scaling:
        w.add_string(f"{arch}.rope.scaling.type", rope_scaling)
        w.add_rope_scaling_factor(2.0)
        w.add_rope_scaling_orig_ctx_len(128)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(VOCAB_TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(VOCAB_TOKENS.index("<|im_start|>"))
    w.add_eos_token_id(VOCAB_TOKENS.index("<|im_end|>"))

    stored: dict[str, np.ndarray] = {}
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_norm", "ffn_norm")]
    for name in norms:
        stored[name] = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        w.add_tensor(name, stored[name])
    for name, shape in weight_shapes().items():
        if name in drop:
            continue
        qtype = types[name]
        if qtype in K_MAKERS:
            raw, values = K_MAKERS[qtype](rng, *shape)
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            dense = (0.05 * rng.standard_normal(shape)).astype(np.float32)
            if qtype == Q.F16:
                raw = dense.astype(np.float16)
                values = raw.astype(np.float32)
                w.add_tensor(name, raw)
            else:
                raw = gguf.quants.quantize(dense, qtype)
                values = reference_dequant(raw, qtype, shape) if qtype in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1) else None
                w.add_tensor(name, raw, raw_dtype=qtype)
        stored[name] = values
    for name, array, raw_dtype in extra:
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-kquant.gguf"
    stored = write_tiny_llama(path)
    return path, stored


@pytest.fixture(scope="module")
def tiny_spec(tiny):
    return load_gguf(tiny[0])


def test_block_layouts_agree_with_gguf_py(tiny):
    """Our byte packing and gguf-py's decoder (ggml's layout) describe the same values."""
    path, stored = tiny
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        assert t.tensor_type == (TYPES.get(t.name, Q.F32)), t.name
        decoded = gguf.quants.dequantize(t.data, t.tensor_type).reshape(stored[t.name].shape)
        np.testing.assert_array_equal(decoded, stored[t.name], err_msg=t.name)


def test_every_type_loads_to_the_stored_values(tiny, tiny_spec):
    path, stored = tiny
    spec = tiny_spec
    covered = {t.name for t in TYPES.values()} | {"F32"}
    assert covered == set(SUPPORTED_GGUF_TYPES), "a newly supported GGUF type needs a tensor in TYPES"
    assert not spec.config.tie_word_embeddings
    assert (spec.config.hidden_size, spec.config.num_heads, spec.config.num_kv_heads) == (HIDDEN, HEADS, KV_HEADS)
    assert spec.config.vocab_size == N_VOCAB and spec.config.rms_norm_eps == pytest.approx(1e-5)
    from arlec.sources import gguf_tensor_name

    for gguf_name, values in stored.items():
        ours = spec.tensors[gguf_tensor_name(gguf_name)]
        assert ours.dtype == torch.float32
        ours = ours.numpy()
        if ".attn_q." in gguf_name:  # arlec undoes llama.cpp's Q/K row order; redo it to compare
            ours = llamacpp_permute(ours, HEADS)
        elif ".attn_k." in gguf_name:
            ours = llamacpp_permute(ours, KV_HEADS)
        np.testing.assert_allclose(ours, values, rtol=1e-6, atol=1e-9, err_msg=gguf_name)


def test_tiny_model_matches_transformers(tiny, tiny_spec):
    """Whole-model logits against transformers' own GGUF loader (config, un-permute, tying)."""
    path, _ = tiny
    ours = build_model(tiny_spec.config).eval()
    result = ours.load_state_dict(tiny_spec.tensors, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf.eval()
    rng = torch.Generator().manual_seed(0)
    for length in (1, 17, 64):
        x = torch.randint(0, N_VOCAB, (2, length), generator=rng)
        theirs = hf(x).logits
        err = (ours.all_logits(x) - theirs).abs().max().item()
        scale = theirs.abs().max().item()
        assert err <= 1e-4 * max(1.0, scale), f"length {length}: max |diff| {err:.3g}, logit scale {scale:.3g}"
        print(f"tiny GGUF length {length}: max |diff| {err:.3g}, logit scale {scale:.3g}")


def test_tiny_tokenizer(tiny_spec):
    tok = Tokenizer.from_str(tiny_spec.tokenizer_json)
    enc = tok.encode("<|im_start|>the cat in a hat<|im_end|>")
    assert enc.tokens == ["<|im_start|>", "the", "Ġcat", "Ġ", "in", "Ġa", "Ġh", "at", "<|im_end|>"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>the cat in a hat<|im_end|>"
    assert tiny_spec.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    assert tiny_spec.config.eos_token_ids == (VOCAB_TOKENS.index("<|im_end|>"),)


@pytest.mark.parametrize(
    "pre, tokens",
    [
        ("gpt2", ["12", "Ġ1", "3", "Ġa"]),  # digits run together, then BPE merges them
        ("smollm", ["1", "2", "Ġ", "1", "3", "Ġa"]),  # llama.cpp's smollm: each digit alone first
    ],
)
def test_pre_tokenizer_digit_rule(tmp_path, pre, tokens):
    path = tmp_path / f"{pre}.gguf"
    write_tiny_llama(path, pre=pre)
    tok = Tokenizer.from_str(load_gguf(path).tokenizer_json)
    enc = tok.encode("12 13 a")
    assert enc.tokens == tokens
    assert tok.decode(enc.ids) == "12 13 a"


# ---------------------------------------------------------------- clear errors


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a GGUF file, just some text\n" * 20)
    with pytest.raises(ArleError, match=r"is not a readable GGUF file"):
        load_gguf(path)
    with pytest.raises(ArleError, match=r"is not a readable GGUF file"):
        load_source(str(path))


def test_truncated_gguf_file(tiny, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny[0].read_bytes()[:5000])
    with pytest.raises(ArleError, match=r"is not a readable GGUF file"):
        load_gguf(cut)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ArleError, match=r"GGUF architecture 'mamba' is not supported; supported: llama, qwen3"):
        load_gguf(path)


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q8_1, Q.F64], ids=lambda t: t.name)
def test_unsupported_tensor_type(tmp_path, qtype):
    path = tmp_path / "odd.gguf"
    name = "blk.0.ffn_up.weight"
    if qtype == Q.Q5_0:  # gguf-py can encode it (and decode it), arlec does not take it
        write_tiny_llama(path, types={name: qtype})
    elif qtype == Q.F64:
        write_tiny_llama(path, drop={name}, extra=[(name, np.zeros((FFN, HIDDEN), np.float64), None)])
    else:  # no encoder in gguf-py: zero blocks of the right size are enough to be rejected
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.zeros((FFN, HIDDEN // block * size), np.uint8)
        write_tiny_llama(path, drop={name}, extra=[(name, raw, qtype)])
    message = rf"tensor {name} is stored as {qtype.name}, which arlec cannot read; supported: F32"
    with pytest.raises(ArleError, match=message):
        load_gguf(path)


def test_unknown_tensor_name(tmp_path):
    path = tmp_path / "extra.gguf"
    write_tiny_llama(path, extra=[("blk.0.attn_qkv.weight", np.zeros((4, HIDDEN), np.float32), None)])
    with pytest.raises(ArleError, match=r"tensor 'blk.0.attn_qkv.weight' has no place in the llama architecture"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny_llama(path, drop={"blk.1.ffn_down.weight"})
    with pytest.raises(ArleError, match=r"lacks 1 tensors .*first: layers.1.mlp.down_proj.weight"):
        load_gguf(path)


def test_unsupported_tokenizer_model(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tiny_llama(path, tokenizer_model="llama")
    with pytest.raises(ArleError, match=r"tokenizer model 'llama' is not supported yet"):
        load_gguf(path)


def test_unknown_pre_tokenizer(tmp_path):
    path = tmp_path / "pre.gguf"
    write_tiny_llama(path, pre="made-up")
    with pytest.raises(ArleError, match=r"pre-tokenizer 'made-up' is not known"):
        load_gguf(path)


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_rope_scaling_read(tmp_path, kind):
    path = tmp_path / f"{kind}.gguf"
    write_tiny_llama(path, rope_scaling=kind)
    rope = load_gguf(path).config.rope
    assert (rope.type, rope.factor, rope.theta) == (kind, 2.0, 10000.0)
    if kind == "yarn":
        assert rope.original_max_position == 128


def test_unsupported_rope_scaling(tmp_path):
    path = tmp_path / "rope.gguf"
    write_tiny_llama(path, rope_scaling="longrope")
    with pytest.raises(ArleError, match=r"RoPE scaling 'longrope' is not supported"):
        load_gguf(path)
