"""Test helper: a Qwen3.5 Hugging Face folder written as a GGUF the way llama.cpp's
convert_hf_to_gguf.py writes one (its Qwen3_5TextModel / Qwen3_5MoeTextModel: the
linear-attention V-head reorder, Qwen3Next's tensor rewrites, Qwen2Moe's expert stacks,
gguf-py's TensorNameMap for the names, the same metadata keys), plus one
multi-token-prediction layer after the decoder as published Qwen3.5 files carry.

Re-implemented from the converter's documented steps so that arlec's reader, which undoes
them, is checked against an independent writer (and, through the loaded model, against
transformers on the original folder)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file

MTP_LAYERS = 1


def _tile_v_heads(t: torch.Tensor, dim: int, k_heads: int, per_k: int, head_dim: int) -> torch.Tensor:
    """Value heads grouped by key head (HF) -> tiled (v index major), along dim."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], k_heads, per_k, head_dim, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


def _reorder_linear_attention(name: str, t: torch.Tensor, cfg: dict) -> torch.Tensor:
    k, v = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    if k == v or "linear_attn." not in name:
        return t
    per_k, dv, key_rows = v // k, cfg["linear_value_head_dim"], 2 * k * cfg["linear_key_head_dim"]
    if ".in_proj_qkv." in name or ".conv1d." in name:
        t = t.squeeze() if ".conv1d." in name else t
        return torch.cat([t[:key_rows], _tile_v_heads(t[key_rows:], 0, k, per_k, dv)])
    if ".in_proj_z." in name:
        return _tile_v_heads(t, 0, k, per_k, dv)
    if ".in_proj_a." in name or ".in_proj_b." in name or name.endswith((".A_log", ".dt_bias")):
        return _tile_v_heads(t, 0, k, per_k, 1)
    if ".out_proj." in name:
        return _tile_v_heads(t, 1, k, per_k, dv)
    return t


def _rewrite(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Qwen3Next's per-tensor rewrites."""
    if name.endswith(".A_log"):
        return name, -torch.exp(t)
    if name.endswith(".dt_bias"):
        return name.removesuffix(".dt_bias") + ".dt_proj.bias", t
    if "conv1d" in name:
        return name, t.squeeze()
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        return name, t + 1
    return name, t


def converted_tensors(hf_path: Path, fused_experts: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(text config, GGUF name -> tensor) for the folder, MTP layer included."""
    cfg = json.loads((hf_path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    moe = "num_experts" in cfg and cfg.get("num_experts")
    arch = gguf.MODEL_ARCH.QWEN35MOE if moe else gguf.MODEL_ARCH.QWEN35
    n = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, n + MTP_LAYERS)
    hf = {k: v.float() for f in sorted(hf_path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    # A multi-token-prediction block as published checkpoints carry (mtp.*): a copy of the last
    # (full-attention) layer plus the projection and norms llama.cpp names nextn.*.
    last = f"model.layers.{n - 1}."
    for key in [k for k in hf if k.startswith(last)]:
        hf[f"model.layers.{n}." + key.removeprefix(last)] = hf[key].clone() * 0.5
    h = cfg["hidden_size"]
    # gguf-py 0.19 has no QWEN35 entries for these yet: the names are its NEXTN_* ones.
    out: dict[str, torch.Tensor] = {f"blk.{n}.nextn.eh_proj.weight": torch.randn(h, 2 * h)}
    for norm in ("enorm", "hnorm", "shared_head_norm"):
        out[f"blk.{n}.nextn.{norm}.weight"] = torch.randn(h) + 1
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in hf.items():
        if cfg.get("tie_word_embeddings") and name == "lm_head.weight":
            continue
        t = _reorder_linear_attention(name, t, cfg)
        name, t = _rewrite(name, t)
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+_proj)\.weight", name)
        if m:
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = t
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert mapped is not None, name
        out[mapped] = t
    for (layer, proj), by_index in experts.items():  # Qwen2Moe's per-layer stacks [E, out, in]
        mapped = names.get_name(f"model.layers.{layer}.mlp.experts.{proj}.weight", try_suffixes=(".weight",))
        out[mapped] = torch.stack([by_index[i] for i in range(len(by_index))])
    if fused_experts:
        for layer in range(n + MTP_LAYERS):
            gate = out.pop(f"blk.{layer}.ffn_gate_exps.weight", None)
            if gate is not None:
                up = out.pop(f"blk.{layer}.ffn_up_exps.weight")
                out[f"blk.{layer}.ffn_gate_up_exps.weight"] = torch.cat([gate, up], dim=1)
    return cfg, out


def _tokenizer(w: gguf.GGUFWriter, tokenizer_json: Path) -> None:
    tok = json.loads(tokenizer_json.read_text())
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen35")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)


def write_qwen3_5_gguf(path: Path, hf_path: Path, *, fused_experts: bool = False,
                       quantize: dict[str, gguf.GGMLQuantizationType] | None = None) -> dict[str, torch.Tensor]:
    """Write the GGUF; returns what was written (GGUF name -> float tensor before quantizing).
    quantize: GGUF name -> type for tensors to store quantized (the rest F32)."""
    cfg, tensors = converted_tensors(hf_path, fused_experts)
    moe = bool(cfg.get("num_experts"))
    w = gguf.GGUFWriter(str(path), "qwen35moe" if moe else "qwen35")
    n = cfg["num_hidden_layers"]
    rope = cfg.get("rope_parameters") or {}
    w.add_block_count(n + MTP_LAYERS)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    if not moe:
        w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if moe:
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
    w.add_ssm_state_size(cfg["linear_key_head_dim"])
    w.add_ssm_group_count(cfg["linear_num_key_heads"])
    w.add_ssm_time_step_rank(cfg["linear_num_value_heads"])
    w.add_ssm_inner_size(cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"])
    w.add_full_attention_interval(cfg.get("full_attention_interval") or 4)
    w.add_rope_dimension_count(int(cfg["head_dim"] * rope.get("partial_rotary_factor", 0.25)))
    w.add_rope_dimension_sections([11, 11, 10, 0])
    w.add_nextn_predict_layers(MTP_LAYERS)
    _tokenizer(w, hf_path / "tokenizer.json")
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    for name, t in tensors.items():
        qtype = (quantize or {}).get(name, gguf.GGMLQuantizationType.F32)
        data = t.float().numpy()
        if qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors
