"""GRPO (group relative policy optimization, DeepSeekMath): sample a group of replies per
prompt, score each with a verifiable reward, and push up the log-probability of replies
that beat their group's mean, with a KL penalty that keeps the policy near the reference
(the starting model, frozen).

One policy update per sampled batch, so the PPO ratio is exactly 1 and needs no clipping;
the KL term uses the k3 estimator exp(ref - logp) - (ref - logp) - 1 (always >= 0).
"""

from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from arle_models import CausalLM

from ..errors import ArleError
from .trainer import Trainer



@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 8
    temperature: float = 0.7
    beta: float = 0.04
    max_operand: int = 9

    def check(self) -> None:
        if self.group_size < 2:
            raise ArleError(f"--group-size must be at least 2 (advantages compare replies), got {self.group_size}.")
        if self.prompts_per_step < 1 or self.max_new_tokens < 1 or self.temperature <= 0:
            raise ArleError("--prompts-per-step and --max-new-tokens must be at least 1 and --temperature positive.")


def arithmetic_task(rng: random.Random, max_operand: int) -> tuple[str, str]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def arithmetic_reward(completion: str, answer: str) -> float:
    """1 when the first number in the reply is the answer, else 0 (verifiable: no judge model)."""
    found = re.search(r"-?\d+", completion)
    return 1.0 if found and found.group() == answer else 0.0


# name -> (make a (question, answer) from a Random and the config, reward(reply, answer) in [0, 1])
TASKS = {"arithmetic": (lambda rng, g: arithmetic_task(rng, g.max_operand), arithmetic_reward)}


def prompt_cache(model: CausalLM, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the prompt once (batch 1): (hidden [1, P, H], keys, values [L, 1, Hkv, P, D])."""
    device = model.norm.weight.device
    P = len(prompt)
    empty = model.empty_cache(1, 0)
    return model.hidden_states(torch.tensor([prompt], device=device), torch.arange(P, device=device)[None],
                               empty, empty, torch.zeros(1, dtype=torch.long, device=device))


@torch.no_grad()
def sample_group(model: CausalLM, prompt: list[int], group: int, max_new: int, temperature: float,
                 stop: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(completions [G, N], mask [G, N]: True up to and including each reply's end token).

    The prompt is prefilled once and its KV cache shared by the group (expanded, not
    copied); then one decode step per token for all G rows. Recomputing the whole
    sequence per token instead took 11.6 s of CPU for 8 x 8 tokens of SmolLM2-135M, the
    cache 1.1 s (docs/training.md)."""
    device = model.norm.weight.device
    P = len(prompt)
    hidden, k, v = prompt_cache(model, prompt)
    logits = model.lm_head(hidden[:, -1]).float().expand(group, -1)
    past_k, past_v = k.expand(-1, group, -1, -1, -1), v.expand(-1, group, -1, -1, -1)
    stop_ids = torch.tensor(stop, device=device)
    alive = torch.ones(group, dtype=torch.bool, device=device)
    last = torch.zeros(group, dtype=torch.long, device=device)
    out, mask = [], []
    for i in range(max_new):
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)[:, 0]
        out.append(nxt)
        mask.append(alive.clone())
        alive = alive & ~torch.isin(nxt, stop_ids)
        if not alive.any() or i == max_new - 1:
            break
        past_lens = torch.full((group,), P + i, dtype=torch.long, device=device)
        logits, k, v = model(nxt[:, None], past_lens[:, None], past_k, past_v, past_lens, last)
        past_k, past_v = torch.cat((past_k, k), dim=3), torch.cat((past_v, v), dim=3)
    return torch.stack(out, 1), torch.stack(mask, 1)


def completion_logprobs(model: CausalLM, prompt_len: int, seq: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) for every completion token of seq [G, P+N] -> [G, N], under the
    distribution the replies were sampled from (logits / temperature).

    Every row starts with the same prompt: it goes through the model once (batch 1) and
    the group reads its KV cache, so the backward pass covers P + G*(N-1) tokens, not G*(P+N)."""
    G, N = seq.shape[0], seq.shape[1] - prompt_len
    hidden, k, v = prompt_cache(model, seq[0, :prompt_len].tolist())
    hidden = hidden[:, -1:].expand(G, -1, -1)  # predicts the first completion token
    if N > 1:
        tokens = seq[:, prompt_len:-1]
        positions = torch.arange(prompt_len, prompt_len + N - 1, device=seq.device)[None].expand(G, -1)
        past_lens = torch.full((G,), prompt_len, dtype=torch.long, device=seq.device)
        rest, _, _ = model.hidden_states(tokens, positions, k.expand(-1, G, -1, -1, -1), v.expand(-1, G, -1, -1, -1),
                                         past_lens)
        hidden = torch.cat((hidden, rest), dim=1)
    logits = model.lm_head(hidden).float() / temperature
    return torch.gather(F.log_softmax(logits, dim=-1), 2, seq[:, prompt_len:, None])[..., 0]


def grpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean KL). Advantages are rewards standardized within the group."""
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    ratio = torch.exp(logp - logp.detach())  # 1, with the policy gradient attached
    delta = ref_logp - logp
    kl = torch.exp(delta) - delta - 1
    per_token = -(ratio * advantages[:, None]) + beta * kl
    m = mask.float()
    per_reply = (per_token * m).sum(1) / m.sum(1).clamp(min=1)
    return per_reply.mean(), ((kl * m).sum() / m.sum().clamp(min=1)).detach()


class GRPOTrainer(Trainer):
    def __init__(self, source, source_name, cfg, grpo: GRPOConfig, template, tokenizer, task: str):
        if task not in TASKS:
            raise ArleError(f"Unknown task {task!r}; available: {', '.join(TASKS)}.")
        grpo.check()
        super().__init__(source, source_name, [None], cfg, "grpo")
        self.grpo, self.template, self.tokenizer = grpo, template, tokenizer
        self.make_task, self.reward = TASKS[task]
        # the reference policy: the starting weights, frozen (adapters included, at zero)
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.stop = tuple(self.model.config.eos_token_ids)

    def train_step(self) -> dict:
        g, cfg = self.grpo, self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + self.step)  # the prompts of step s never change
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        total_loss, total_kl, rewards_seen, tokens = 0.0, 0.0, [], 0
        for _ in range(g.prompts_per_step):
            question, answer = self.make_task(rng, g)
            prompt = self.tokenizer.encode(self.template.render([{"role": "user", "content": question}]),
                                           add_special_tokens=False).ids
            self.model.eval()
            completions, mask = sample_group(self.model, prompt, g.group_size, g.max_new_tokens, g.temperature,
                                             self.stop, generator)
            self.model.train()
            texts = [self.tokenizer.decode([t for t, keep in zip(row.tolist(), m.tolist()) if keep])
                     for row, m in zip(completions, mask)]
            rewards = torch.tensor([self.reward(t, answer) for t in texts], device=completions.device)
            seq = torch.cat((torch.tensor([prompt], device=completions.device).expand(g.group_size, -1),
                             completions), dim=1)
            with torch.no_grad():
                ref_logp = completion_logprobs(self.reference, len(prompt), seq, g.temperature)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logp = completion_logprobs(self.model, len(prompt), seq, g.temperature)
            loss, kl = grpo_loss(logp.float(), ref_logp.float(), rewards, mask, g.beta)
            (loss / g.prompts_per_step).backward()
            total_loss += float(loss.detach())
            total_kl += float(kl)
            rewards_seen += rewards.tolist()
            tokens += seq.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": total_loss / g.prompts_per_step,
                "reward": sum(rewards_seen) / len(rewards_seen), "kl": total_kl / g.prompts_per_step,
                "lr": self.lr_at(self.step - 1), "grad_norm": float(grad_norm), "tokens": tokens}
