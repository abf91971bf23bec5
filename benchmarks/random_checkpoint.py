"""Random-weight checkpoints in Hugging Face layout, for shapes we have no weights for here
(Qwen3-0.6B and others): transformers' own model class and initialisation, saved with
a word-level tokenizer ("w<id>" per token) and a ChatML template.

    python benchmarks/random_checkpoint.py --shape qwen3-0.6b --out build/qwen3-0.6b-random
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = {
    # Qwen3-0.6B's published config (28 layers, 16 query / 8 KV heads of 128, tied embeddings).
    "qwen3-0.6b": dict(
        arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    # Llama-3-8B's published shape (32 layers, 32 query / 8 KV heads of 128, untied head):
    # a model that needs its two GPUs' bandwidth (16 GB of bf16 weights per token).
    "llama3-8b": dict(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    # A small Llama for quick GPU tests (head dim 64, 4 query heads per KV head).
    "llama-tiny": dict(
        arch="llama", vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32 * 2, max_position_embeddings=2048,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    # Qwen3-30B-A3B's published shape (48 layers, 32 query / 4 KV heads of 128, 128 experts of
    # 768, 8 active): ~61 GB in bf16 (`--layers` builds fewer layers of the same shape).
    "qwen3-30b-a3b": dict(
        arch="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
    ),
    # A small Qwen3-MoE for quick GPU tests (head dim 64, 16 experts, 4 active).
    "qwen3-moe-tiny": dict(
        arch="qwen3_moe", vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=128, norm_topk_prob=True,
    ),
    # A small Qwen3.5 (3 Gated DeltaNet layers, then gated full attention with partial RoPE).
    "qwen3_5-tiny": dict(
        arch="qwen3_5", vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
        max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.1,
    ),
    # The same with every MLP routed (16 experts of 128, 4 active) plus a gated shared expert.
    "qwen3_5-moe-tiny": dict(
        arch="qwen3_5_moe", vocab_size=4096, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
        max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.1, num_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=256,
    ),
}

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return tok.to_str()


def write_checkpoint(shape: str, out: Path, seed: int = 0, dtype: str = "bfloat16", layers: int | None = None) -> Path:
    import torch
    import transformers

    dims = dict(SHAPES[shape])
    arch = dims.pop("arch")
    if layers:
        dims["num_hidden_layers"] = layers
    config_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "qwen3_5": (getattr(transformers, "Qwen3_5TextConfig", None), getattr(transformers, "Qwen3_5ForCausalLM", None)),
        "qwen3_5_moe": (getattr(transformers, "Qwen3_5MoeTextConfig", None),
                        getattr(transformers, "Qwen3_5MoeForCausalLM", None)),
    }[arch]
    config = config_cls(**dims, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_cls(config).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "tokenizer.json").write_text(word_tokenizer_json(config.vocab_size))
    (out / "chat_template.jinja").write_text(CHATML)
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers of the same shape")
    args = parser.parse_args()
    print(write_checkpoint(args.shape, Path(args.out), args.seed, layers=args.layers))


if __name__ == "__main__":
    main()
