"""`arle-runtime data ...` and `arle-runtime train ...` (registered in runtime/cli.py).

Heavy imports (torch, the model) happen inside the commands so `--help` stays fast."""

from __future__ import annotations

import json

import click

from ..errors import ArleError

PRESETS = {
    # name: hidden, intermediate, layers, heads, kv heads, context
    "tiny": (64, 192, 2, 4, 2, 512),
    "small": (256, 768, 6, 8, 4, 1024),
}


def summary(title: str, rows: dict) -> None:
    width = max(len(k) for k in rows)
    click.echo(title)
    for k, v in rows.items():
        click.echo(f"  {k:<{width}}  {v}")


@click.group()
def data():
    """Prepare training data."""


@data.command()
@click.option("--format", "fmt", required=True, type=click.Choice(["alpaca", "sharegpt", "dolly", "chat"]),
              help="Layout of IN (JSONL or a JSON array).")
@click.argument("src", metavar="IN", type=click.Path())
@click.argument("dst", metavar="OUT", type=click.Path())
def convert(fmt, src, dst):
    """Convert IN to chat JSONL ({"messages": [...]} a line) in OUT."""
    from .data import convert_file

    n = convert_file(src, dst, fmt)
    click.echo(f"converted {n} records from {fmt} to {dst}")


@click.group()
def train():
    """Fine-tune, evaluate and pretrain models (checkpoints in Hugging Face layout)."""


def train_options(f):
    options = [
        click.option("--data", "data_path", required=True, type=click.Path(), help="Chat JSONL (see `data convert`)."),
        click.option("--out", required=True, type=click.Path(), help="Run folder: checkpoints, metrics.jsonl, latest."),
        click.option("--max-steps", default=100, show_default=True, type=int, help="Optimizer steps in all."),
        click.option("--lr", default=None, type=float, help="Peak learning rate (default: 1e-4 full, 1e-3 LoRA, "
                     "3e-3 pretrain)."),
        click.option("--batch-size", default=4, show_default=True, type=int, help="Sequences per micro-batch."),
        click.option("--grad-accum", default=1, show_default=True, type=int, help="Micro-batches per optimizer step."),
        click.option("--max-length", default=512, show_default=True, type=int, help="Tokens per sequence (longer "
                     "ones are cut)."),
        click.option("--warmup-steps", default=0, show_default=True, type=int, help="Linear learning-rate warmup."),
        click.option("--weight-decay", default=0.0, show_default=True, type=float),
        click.option("--max-grad-norm", default=1.0, show_default=True, type=float, help="Gradient clipping."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seeds data order and initialization."),
        click.option("--save-every", default=0, show_default=True, type=int, help="Checkpoint every N steps "
                     "(0: at the end only; Ctrl-C always saves)."),
        click.option("--compile/--no-compile", "compile_step", default=None,
                     help="torch.compile the train step (default: on with CUDA, off on CPU, where compiling "
                     "takes longer than a short run)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def make_config(out, max_steps, lr, default_lr, batch_size, grad_accum, max_length, warmup_steps, weight_decay,
                max_grad_norm, seed, save_every, compile_step, resume=False, lora_rank=0, lora_alpha=16.0, merge_lora=False):
    import torch

    from .trainer import TrainConfig

    return TrainConfig(out=out, max_steps=max_steps, lr=lr or default_lr, batch_size=batch_size,
                       grad_accum=grad_accum, seed=seed, max_length=max_length, warmup_steps=warmup_steps,
                       weight_decay=weight_decay, max_grad_norm=max_grad_norm, lora_rank=lora_rank,
                       lora_alpha=lora_alpha, merge_lora=merge_lora, save_every=save_every,
                       compile=torch.cuda.is_available() if compile_step is None else compile_step)


def chat_template(source):
    from ..chat import ChatTemplate

    if not source.chat_template:
        raise ArleError(f"{source.description} has no chat template, which chat data needs.")
    return ChatTemplate(source.chat_template, source.bos_token, source.eos_token)


def chat_records(path) -> list[tuple[str, dict]]:
    from .data import check_messages, read_records

    records = read_records(path)
    for where, record in records:
        record["messages"] = check_messages(record.get("messages"), where)
    return records


@train.command()
@click.argument("source")
@train_options
@click.option("--lora-rank", default=0, show_default=True, type=int, help="Train LoRA adapters of this rank "
              "(0: full fine-tuning).")
@click.option("--lora-alpha", default=16.0, show_default=True, type=float, help="LoRA scale numerator (alpha/rank).")
@click.option("--merge-lora", is_flag=True, help="Write merged weights (model.safetensors) into each checkpoint, "
              "so it builds and loads like a plain model.")
def sft(source, data_path, out, lora_rank, lora_alpha, merge_lora, lr, **kw):
    """Supervised fine-tuning of SOURCE (checkpoint folder, float bundle, or `default`) on chat data;
    the loss covers assistant replies only."""
    from .checkpoint import load_source
    from .data import encode_chat
    from .trainer import Trainer

    cfg = make_config(out, lr=lr, default_lr=1e-3 if lora_rank else 1e-4, lora_rank=lora_rank,
                      lora_alpha=lora_alpha, merge_lora=merge_lora, **kw)
    cfg.check()
    records = chat_records(data_path)
    src = load_source(source)
    template, tokenizer = chat_template(src), src.tokenizer()
    examples = [encode_chat(template, tokenizer, r["messages"], src.eos_token, where) for where, r in records]
    result = Trainer(src, source, examples, cfg, "sft").run(resume=kw["resume"])
    summary(f"sft: {len(examples)} conversations, {'LoRA rank ' + str(lora_rank) if lora_rank else 'full'}", result)


@train.command()
@train_options
@click.option("--config", "preset", default="tiny", show_default=True, type=click.Choice(list(PRESETS)),
              help="Model size.")
@click.option("--arch", default="llama", show_default=True, type=click.Choice(["llama", "qwen3"]))
@click.option("--tokenizer", "tokenizer_source", default="default", show_default=True,
              help="Where the tokenizer and chat template come from (a checkpoint, a bundle or `default`).")
def pretrain(data_path, out, preset, arch, tokenizer_source, lr, **kw):
    """Train a model from scratch on text (.txt, or JSONL with "text" or "messages"), packed into
    --max-length blocks."""
    from pathlib import Path

    import torch
    from torch import nn

    from arle_models import ModelConfig, build_model

    from .checkpoint import load_source
    from .data import Example, encode_text, read_records
    from .trainer import Trainer

    cfg = make_config(out, lr=lr, default_lr=3e-3, **kw)
    cfg.check()
    src = load_source(tokenizer_source)
    tokenizer = src.tokenizer()
    eos = (src.config.eos_token_ids or (None,))[0]
    if str(data_path).endswith(".txt"):
        if not Path(data_path).is_file():
            raise ArleError(f"Data file {data_path} does not exist.")
        texts = [Path(data_path).read_text(encoding="utf-8")]
    else:
        texts = []
        for where, record in read_records(data_path):
            if isinstance(record.get("text"), str):
                texts.append(record["text"])
            elif "messages" in record:
                texts.append(chat_template(src).render(record["messages"], add_generation_prompt=False))
            else:
                raise ArleError(f"{where} has neither a 'text' string nor 'messages'.")
    stream = [t for text in texts for t in encode_text(tokenizer, text, eos).ids]
    L = cfg.max_length
    examples = [Example(stream[i:i + L], [True] * len(stream[i:i + L])) for i in range(0, len(stream) - 1, L)]
    hidden, inter, layers, heads, kv_heads, context = PRESETS[preset]
    config = ModelConfig(architecture=arch, vocab_size=src.config.vocab_size, hidden_size=hidden,
                         intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=hidden // heads, max_position_embeddings=max(context, L), tie_word_embeddings=True,
                         bos_token_id=src.config.bos_token_id, eos_token_ids=src.config.eos_token_ids)
    torch.manual_seed(cfg.seed)
    model = build_model(config)
    for module in model.modules():  # GPT-2 style init; nn.Embedding's N(0, 1) is far too large when tied
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    src.config, src.tensors = config, {}
    result = Trainer(src, f"pretrain:{preset}:{arch}", examples, cfg, "pretrain", model=model).run(resume=kw["resume"])
    summary(f"pretrain: {arch} {preset} ({config.num_parameters() / 1e6:.1f}M parameters), "
            f"{len(stream)} tokens in {len(examples)} blocks", result)


@train.command("eval")
@click.argument("source")
@click.option("--data", "data_path", required=True, type=click.Path(), help="Chat JSONL; records may carry "
              "\"answer\" for exact match.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="Most tokens generated per answer.")
@click.option("--show", is_flag=True, help="Print each answer record's prediction.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(source, data_path, max_new_tokens, show, as_json):
    """Perplexity of SOURCE on the assistant replies in --data, and exact-match accuracy."""
    from .checkpoint import load_source
    from .evaluate import evaluate
    from .trainer import model_from_tensors, pick_device

    records = chat_records(data_path)
    src = load_source(source)
    template, tokenizer = chat_template(src), src.tokenizer()
    model = model_from_tensors(src.config, src.tensors, pick_device())
    result = evaluate(model, template, tokenizer, records, src.eos_token, max_new_tokens=max_new_tokens)
    if as_json:
        click.echo(json.dumps(result))
        return
    if show:
        for p in result["predictions"]:
            click.echo(f"{'ok ' if p['exact'] else 'no '} {p['where']}: {p['prediction']!r} (answer {p['answer']!r})")
    rows = {"records": result["records"], "target tokens": result["target_tokens"]}
    if result["loss"] is not None:
        rows.update({"loss": f"{result['loss']:.4f}", "perplexity": f"{result['perplexity']:.3f}"})
    if result["answers"]:
        rows["exact match"] = f"{result['exact_match']:.3f} ({round(result['exact_match'] * result['answers'])}" \
                              f"/{result['answers']})"
    summary(f"eval: {src.description}", rows)


@train.command()
@click.argument("source")
@click.option("--task", default="arithmetic", show_default=True, type=click.Choice(["arithmetic"]),
              help="Prompts and their verifiable reward.")
@click.option("--out", required=True, type=click.Path(), help="Run folder: checkpoints, metrics.jsonl, latest.")
@click.option("--max-steps", default=50, show_default=True, type=int, help="Optimizer steps in all.")
@click.option("--lr", default=None, type=float, help="Learning rate (default: 1e-5 full, 3e-4 LoRA).")
@click.option("--group-size", default=8, show_default=True, type=int, help="Replies sampled per prompt.")
@click.option("--prompts-per-step", default=4, show_default=True, type=int, help="Prompts (groups) per step.")
@click.option("--max-new-tokens", default=8, show_default=True, type=int, help="Longest reply sampled.")
@click.option("--temperature", default=0.7, show_default=True, type=float, help="Sampling temperature (the "
              "policy and the reference are scored at the same temperature).")
@click.option("--beta", default=0.04, show_default=True, type=float, help="Weight of the KL penalty to the "
              "reference (starting) model.")
@click.option("--max-operand", default=9, show_default=True, type=int, help="arithmetic: largest summand.")
@click.option("--lora-rank", default=0, show_default=True, type=int, help="Train LoRA adapters (0: all weights).")
@click.option("--lora-alpha", default=16.0, show_default=True, type=float)
@click.option("--merge-lora", is_flag=True, help="Write merged weights into each checkpoint.")
@click.option("--max-grad-norm", default=1.0, show_default=True, type=float, help="Gradient clipping.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds prompts and sampling.")
@click.option("--save-every", default=0, show_default=True, type=int, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
def grpo(source, task, out, max_steps, lr, group_size, prompts_per_step, max_new_tokens, temperature, beta,
         max_operand, lora_rank, lora_alpha, merge_lora, max_grad_norm, seed, save_every, resume):
    """Reinforcement learning with group-relative advantages (GRPO) on a verifiable task."""
    from .checkpoint import load_source
    from .grpo import GRPOConfig, GRPOTrainer
    from .trainer import TrainConfig

    cfg = TrainConfig(out=out, max_steps=max_steps, lr=lr or (3e-4 if lora_rank else 1e-5), batch_size=group_size,
                      grad_accum=prompts_per_step, seed=seed, max_grad_norm=max_grad_norm, lora_rank=lora_rank,
                      lora_alpha=lora_alpha, merge_lora=merge_lora, save_every=save_every)
    cfg.check()
    g = GRPOConfig(group_size=group_size, prompts_per_step=prompts_per_step, max_new_tokens=max_new_tokens,
                   temperature=temperature, beta=beta, max_operand=max_operand)
    src = load_source(source)
    trainer = GRPOTrainer(src, source, cfg, g, chat_template(src), src.tokenizer(), task)
    result = trainer.run(resume=resume)
    summary(f"grpo: {task}, {group_size} replies x {prompts_per_step} prompts a step", result)
