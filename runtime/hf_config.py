"""Hugging Face config.json <-> ModelConfig, shared by the compiler's sources (reading)
and the trainer's checkpoints (reading and writing)."""

from __future__ import annotations

from arle_models import ModelConfig, RopeConfig
from arle_models.config import ROPE_TYPES as ROPE_TYPE_NAMES

from .errors import ArleError

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
HF_NAMES = {"llama": ("LlamaForCausalLM", "llama"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}


def rope_from_hf(cfg: dict) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPE_NAMES:
        raise ArleError(f"RoPE scaling {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPE_NAMES)}.")
    original = params.get("original_max_position_embeddings")
    if rope_type == "yarn" and original is None:
        original = cfg.get("max_position_embeddings")
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(params.get("factor", 1.0) or 1.0),
        original_max_position=original,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def config_from_hf(cfg: dict, where: str) -> ModelConfig:
    names = cfg.get("architectures") or []
    arch = next((HF_ARCHITECTURES[n] for n in names if n in HF_ARCHITECTURES), None)
    if arch is None:
        raise ArleError(
            f"{where}: architecture {names or cfg.get('model_type')!r} is not supported; "
            f"supported: {', '.join(HF_ARCHITECTURES)}."
        )
    try:
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return ModelConfig(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope=rope_from_hf(cfg),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
    except KeyError as missing:
        raise ArleError(f"{where} lacks the field {missing}; it is not a complete model config.") from None


def hf_config(config: ModelConfig) -> dict:
    """config.json in Hugging Face form (what arlec.sources and transformers read)."""
    arch_class, model_type = HF_NAMES[config.architecture]
    r = config.rope
    cfg = {
        "architectures": [arch_class],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "hidden_act": "silu",
        "rope_theta": r.theta,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) != 1 else config.eos_token_ids[0],
        "torch_dtype": "float32",
    }
    if r.type != "default":
        scaling = {"rope_type": r.type, "factor": r.factor}
        if r.original_max_position is not None:
            scaling["original_max_position_embeddings"] = r.original_max_position
        if r.type == "llama3":
            scaling.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
        if r.type == "yarn":
            scaling.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(r, key) is not None:
                    scaling[key] = getattr(r, key)
        cfg["rope_scaling"] = scaling
    return cfg
