"""Hugging Face config.json <-> ModelConfig, shared by the compiler's sources (reading)
and the trainer's checkpoints (reading and writing)."""

from __future__ import annotations

from arle_models import ModelConfig, RopeConfig
from arle_models.config import ROPE_TYPES as ROPE_TYPE_NAMES

from .errors import ArleError

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen3_5ForCausalLM": "qwen3_5",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
}
HF_NAMES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}


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


def moe_from_hf(cfg: dict, where: str) -> dict:
    """ModelConfig's mixture-of-experts fields from a Qwen3-MoE config.json."""
    if cfg.get("use_sliding_window"):
        raise ArleError(f"{where}: sliding-window attention (use_sliding_window) is not supported; set it to false.")
    # transformers writes num_experts under its attribute_map name num_local_experts.
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if experts is None:
        raise KeyError("num_experts")
    top_k = int(cfg["num_experts_per_tok"])
    if not 1 <= top_k <= int(experts):
        raise ArleError(f"{where}: num_experts_per_tok is {top_k}; it must be between 1 and num_experts ({experts}).")
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=top_k,
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(int(n) for n in cfg.get("mlp_only_layers") or ()),
    )


# Qwen3.5 ships as a vision-language model; arle builds its text decoder (text_config).
HF_MULTIMODAL_TEXT = {
    "Qwen3_5ForConditionalGeneration": "Qwen3_5ForCausalLM",
    "Qwen3_5MoeForConditionalGeneration": "Qwen3_5MoeForCausalLM",
}
LAYER_TYPES = ("full_attention", "linear_attention")


def hybrid_from_hf(cfg: dict, where: str) -> dict:
    """ModelConfig's linear-attention fields from a Qwen3.5 (text) config.json; defaults as transformers'."""
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        interval = cfg.get("full_attention_interval", 4)
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    if len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ArleError(
            f"{where}: layer_types must name {layers} layers, each one of {', '.join(LAYER_TYPES)}."
        )
    rope = cfg.get("rope_parameters") or {}
    return dict(
        layer_types=tuple(types),
        linear_num_key_heads=int(cfg.get("linear_num_key_heads", 16)),
        linear_num_value_heads=int(cfg.get("linear_num_value_heads", 32)),
        linear_key_head_dim=int(cfg.get("linear_key_head_dim", 128)),
        linear_value_head_dim=int(cfg.get("linear_value_head_dim", 128)),
        linear_conv_kernel=int(cfg.get("linear_conv_kernel_dim", 4)),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))),
        attn_output_gate=True,  # Qwen3.5's q_proj always carries the output gate
    )


def text_config(cfg: dict) -> dict:
    """The text decoder's config of a vision-language checkpoint, else cfg itself."""
    names = cfg.get("architectures") or []
    text_arch = next((HF_MULTIMODAL_TEXT[n] for n in names if n in HF_MULTIMODAL_TEXT), None)
    if text_arch is None or not isinstance(cfg.get("text_config"), dict):
        return cfg
    text = dict(cfg["text_config"])
    text["architectures"] = [text_arch]
    for key in ("eos_token_id", "bos_token_id"):
        if key in cfg and key not in text:
            text[key] = cfg[key]
    # transformers ties the head by the outer config's flag for these models.
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return text


def qwen3_5_moe_from_hf(cfg: dict, where: str) -> dict:
    """Qwen3.5-MoE: every layer sparse, top-k weights always renormalised, plus a gated shared expert."""
    return {
        **moe_from_hf(cfg, where),
        "norm_topk_prob": True,
        "shared_expert_intermediate_size": int(cfg["shared_expert_intermediate_size"]),
    }


def config_from_hf(cfg: dict, where: str) -> ModelConfig:
    cfg = text_config(cfg)
    if "Qwen3_5MoeForCausalLM" in (cfg.get("architectures") or []):
        cfg = {"intermediate_size": 0, **cfg}  # no dense MLP anywhere
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
            **(moe_from_hf(cfg, where) if arch == "qwen3_moe" else {}),
            **(hybrid_from_hf(cfg, where) if arch in ("qwen3_5", "qwen3_5_moe") else {}),
            **(qwen3_5_moe_from_hf(cfg, where) if arch == "qwen3_5_moe" else {}),
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
    if config.num_experts:
        cfg.update(
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=config.decoder_sparse_step,
            mlp_only_layers=list(config.mlp_only_layers),
        )
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
