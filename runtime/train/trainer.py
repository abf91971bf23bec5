"""The training loop shared by `train sft` and `train pretrain`.

Determinism: micro-batch m always holds the same examples (a seeded permutation per
epoch, indexed by m), so resuming from step s needs only s, the weights, the optimizer
state and the RNG state — a resumed run reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from arle_models import CausalLM, build_model

from ..errors import ArleError
from .checkpoint import TRAINER_DIR, Source, point_latest, write_atomically, write_model_files
from .data import Example
from .lora import adapter_state, apply_lora, base_state


@dataclass(frozen=True)
class TrainConfig:
    out: str
    max_steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    max_length: int = 512
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    merge_lora: bool = False
    compile: bool = False
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)

    def check(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ArleError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ArleError(f"--lr must be positive, got {self.lr:g}.")
        if self.lora_rank < 0:
            raise ArleError(f"--lora-rank must be 0 (full fine-tuning) or more, got {self.lora_rank}.")
        if self.merge_lora and not self.lora_rank:
            raise ArleError("--merge-lora needs --lora-rank R (there is no adapter to merge).")


def pick_device() -> torch.device:
    threads = os.environ.get("ARLE_THREADS")  # the same knob the CPU executor reads
    if threads:
        torch.set_num_threads(int(threads))
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def model_from_tensors(config, tensors: dict[str, torch.Tensor], device) -> CausalLM:
    model = build_model(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ArleError(f"The weights do not fit the {config.architecture} config "
                        f"(missing {missing[:1]}, unexpected {unexpected[:1]}).")
    return model.float().to(device)


def token_loss(model: CausalLM, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over target tokens, their count). labels[b, t] marks ids[b, t] as a target.

    Only target positions go through lm_head: with a 49k vocabulary the full [B, T, V]
    logits would dominate memory."""
    B, T = ids.shape
    empty = model.empty_cache(B, 0)
    positions = torch.arange(T, device=ids.device)[None].expand(B, T)
    hidden, _, _ = model.hidden_states(ids, positions, empty, empty, torch.zeros(B, dtype=torch.long, device=ids.device))
    mask = labels[:, 1:]
    logits = model.lm_head(hidden[:, :-1][mask]).float()
    return F.cross_entropy(logits, ids[:, 1:][mask], reduction="sum"), mask.sum()


def collate(examples: list[Example], max_length: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch (causal attention never looks right, so padding needs no mask)."""
    T = min(max_length, max(len(e.ids) for e in examples))
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = min(T, len(e.ids))
        ids[i, :n] = torch.tensor(e.ids[:n])
        labels[i, :n] = torch.tensor(e.labels[:n])
    return ids.to(device), labels.to(device)


def micro_batch_indices(n: int, batch_size: int, m: int, seed: int) -> list[int]:
    """Example indices of micro-batch m: a seeded permutation per epoch, walked in order."""
    out = []
    start = m * batch_size
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return out


class Trainer:
    def __init__(self, source: Source, source_name: str, examples: list[Example], cfg: TrainConfig, kind: str,
                 model: CausalLM | None = None):
        cfg.check()
        if not examples:
            raise ArleError("There are no training examples.")
        if getattr(source.config, "is_hybrid", False):  # the train step threads a KV cache only, no recurrent state
            raise ArleError(f"Training does not support hybrid linear-attention models ({source.config.architecture}) "
                            "yet; train a Llama, Qwen3 or Qwen3-MoE model.")
        self.source, self.source_name, self.examples, self.cfg, self.kind = source, source_name, examples, cfg, kind
        self.out = Path(cfg.out)
        self.device = pick_device()
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device) if model is not None else model_from_tensors(source.config, source.tensors,
                                                                                        self.device)
        source.tensors = {}  # the model owns the weights now
        if cfg.lora_rank:
            apply_lora(self.model, cfg.lora_rank, cfg.lora_alpha)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.pad_id = (source.config.eos_token_ids or (0,))[0]
        self.loss_fn = torch.compile(token_loss) if cfg.compile else token_loss

    # ------------------------------------------------------------ resume / save

    def resume(self) -> None:
        latest = self.out / "latest"
        state_path = latest / TRAINER_DIR / "state.json"
        if not state_path.is_file():
            raise ArleError(f"--resume found no checkpoint at {latest}; run without --resume first.")
        state = json.loads(state_path.read_text())
        was = state["config"]
        for key in ("lora_rank", "batch_size", "grad_accum", "seed", "max_length"):
            if was[key] != getattr(self.cfg, key):
                raise ArleError(f"{latest} was trained with --{key.replace('_', '-')} {was[key]}, this run asks for "
                                f"{getattr(self.cfg, key)}; resume with the same value.")
        from safetensors.torch import load_file

        if self.cfg.lora_rank:
            adapters = load_file(str(latest / TRAINER_DIR / "adapter.safetensors"))
            self.model.load_state_dict(adapters, strict=False)
        else:
            weights = {k.removeprefix("model."): v for k, v in load_file(str(latest / "model.safetensors")).items()}
            self.model.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(torch.load(latest / TRAINER_DIR / "optimizer.pt", weights_only=True))
        rng = torch.load(latest / TRAINER_DIR / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = state["step"]
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file():  # drop steps logged after the checkpoint (an interrupted tail)
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))

    def save(self) -> Path:
        cfg = self.cfg
        final = self.out / f"checkpoint-{self.step:06d}"

        def fill(root: Path):
            from safetensors.torch import save_file

            if cfg.lora_rank:
                weights = base_state(self.model) if cfg.merge_lora else None
            else:
                weights = self.model.state_dict()
            write_model_files(root, self.source, self.model.config, weights)
            state_dir = root / TRAINER_DIR
            state_dir.mkdir()
            if cfg.lora_rank:
                save_file(adapter_state(self.model), str(state_dir / "adapter.safetensors"))
            torch.save(self.optimizer.state_dict(), state_dir / "optimizer.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, state_dir / "rng.pt")
            state = {"kind": self.kind, "step": self.step, "source": self.source_name, "config": asdict(cfg)}
            (state_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")

        write_atomically(final, fill)
        point_latest(self.out, final)
        return final

    # ------------------------------------------------------------ the loop

    def lr_at(self, step: int) -> float:
        if self.cfg.warmup_steps and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    def train_step(self) -> dict:
        cfg = self.cfg
        batches = []
        for j in range(cfg.grad_accum):
            idx = micro_batch_indices(len(self.examples), cfg.batch_size, self.step * cfg.grad_accum + j, cfg.seed)
            batches.append(collate([self.examples[i] for i in idx], cfg.max_length, self.pad_id, self.device))
        targets = sum(int(labels[:, 1:].sum()) for _, labels in batches)
        if targets == 0:
            raise ArleError(f"Step {self.step + 1} has no target tokens (every assistant reply was cut off by "
                            f"--max-length {cfg.max_length}); raise --max-length.")
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        total, tokens = 0.0, 0
        for ids, labels in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                loss_sum, _ = self.loss_fn(self.model, ids, labels)
            (loss_sum / targets).backward()
            total += float(loss_sum.detach())
            tokens += ids.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": total / targets, "lr": self.lr_at(self.step - 1),
                "grad_norm": float(grad_norm), "tokens": tokens, "target_tokens": targets}

    def run(self, resume: bool = False) -> dict:
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        elif (self.out / "latest").exists():
            raise ArleError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out.")
        cfg = self.cfg
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {self.kind}", unit="step")
        started, tokens, last = time.perf_counter(), 0, None
        with open(self.out / "metrics.jsonl", "a" if resume else "w") as metrics:
            try:
                while self.step < cfg.max_steps:
                    t0 = time.perf_counter()
                    row = self.train_step()
                    row["tok_s"] = round(row["tokens"] / (time.perf_counter() - t0), 1)
                    tokens += row["tokens"]
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    shown = {k: f"{row[k]:.4f}" for k in ("loss", "reward") if k in row}
                    bar.set_postfix(**shown, tok_s=f"{row['tok_s']:.0f}")
                    bar.update(1)
                    last = row
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                        self.save()
            except KeyboardInterrupt:
                bar.close()
                self.optimizer.zero_grad(set_to_none=True)
                saved = self.save()
                print(f"interrupted: saved step {self.step} to {saved}; continue with --resume")
                raise
        bar.close()
        checkpoint = self.save()
        elapsed = time.perf_counter() - started
        extra = {"final reward": round(last["reward"], 3)} if last and "reward" in last else {}
        return {"steps": self.step, "final loss": None if last is None else round(last["loss"], 4), **extra,
                "tokens": tokens, "seconds": round(elapsed, 1),
                "tok/s": round(tokens / elapsed, 1) if elapsed else 0.0, "checkpoint": str(checkpoint)}


def perplexity(loss_sum: float, count: int) -> float:
    return math.exp(loss_sum / count) if count else float("nan")
