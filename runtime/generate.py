"""One request, start to finish, on an executor with a contiguous KV cache.

Prefill in chunks of the bundle's largest prefill bucket, then decode token by token.
This is the reference loop; the batching engine (scheduler + paged KV) builds on the
same executor contract.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .detokenize import TextStream
from .errors import ArleError
from .executor import Executor
from .sampler import SamplerState, SamplingParams, sample


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # stop | length
    ttft_s: float
    total_s: float
    logprobs: list[float] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tok_s(self) -> float:
        n = self.completion_tokens - 1
        return n / (self.total_s - self.ttft_s) if n > 0 and self.total_s > self.ttft_s else 0.0


def check_prompt(prompt_ids: list[int], max_context: int) -> None:
    if not prompt_ids:
        raise ArleError("The prompt is empty; give some text to complete.", param="prompt")
    if len(prompt_ids) >= max_context:
        raise ArleError(
            f"The prompt has {len(prompt_ids)} tokens, but this bundle's context holds {max_context} "
            "(prompt plus at least one new token); shorten it.",
            param="prompt",
            code="context_length_exceeded",
        )


def empty_state(executor: Executor, batch: int) -> tuple[torch.Tensor, ...]:
    """The executor's per-sequence state beyond the KV cache (a hybrid model's
    linear-attention state; none for pure-attention models and executors without it)."""
    make = getattr(executor, "empty_state", None)
    return make(batch) if make is not None else ()


def prefill(executor: Executor, prompt_ids: list[int]):
    """Run the prompt through the prefill program chunk by chunk; return last logits, the
    cache and, for hybrid models, the linear-attention state: (logits, k, v, *state)."""
    k = torch.zeros(executor.cache_shape(batch=1, length=0), dtype=executor.kv_dtype, device=executor.device)
    v = torch.zeros_like(k)
    state = empty_state(executor, 1)
    chunk = executor.limits.max_prefill_tokens
    logits = None
    for start in range(0, len(prompt_ids), chunk):
        ids = prompt_ids[start : start + chunk]
        tokens = torch.tensor([ids], dtype=torch.long, device=executor.device)
        positions = torch.arange(start, start + len(ids), device=executor.device)[None]
        past_lens = torch.tensor([start], dtype=torch.long, device=executor.device)
        last = torch.tensor([len(ids) - 1], dtype=torch.long, device=executor.device)
        logits, new_k, new_v, *state = executor.prefill(tokens, positions, k, v, past_lens, last, *state)
        k, v = torch.cat((k, new_k), dim=3), torch.cat((v, new_v), dim=3)
    return (logits[0], k, v, *state)


class StopChecker:
    """Finds stop strings in the generated text and holds back text that may begin one."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self._searched = 0  # text length already searched: no stop string starts before it - hold

    def find(self, text: str) -> int | None:
        """Where the first stop string begins in `text` (which only grows between calls),
        or None. Searches only the tail a new match could touch, so a long generation
        costs O(new text) per call, not O(all text)."""
        if not self.stop:
            return None
        start, self._searched = max(0, self._searched - self.hold), len(text)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None


def generate(
    executor: Executor,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: tuple[int, ...] = (),
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    limits = executor.limits
    check_prompt(prompt_ids, limits.max_context)
    start = time.perf_counter()
    state = SamplerState.create(params, prompt_ids, executor.device)
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    checker = StopChecker(params.stop)
    stream = TextStream(tokenizer)
    shown = 0  # characters of stream text already passed to on_text

    logits, k, v, *linear = prefill(executor, prompt_ids)
    ttft = 0.0
    out: list[int] = []
    logprobs: list[float] = []
    finish = "length"
    stopped_by_string = False
    text = ""
    while True:
        token, lp = sample(logits, state)
        if not out:
            ttft = time.perf_counter() - start
        if token in stops:
            finish = "stop"
            break
        out.append(token)
        if lp is not None:
            logprobs.append(float(lp[token]))
        state.observe(token)
        stream.push(token)
        text = stream.emitted
        cut = checker.find(text)
        if cut is not None:
            text, finish, stopped_by_string = text[:cut], "stop", True
            break
        if on_text is not None:
            safe = len(text) - checker.hold if checker.stop else len(text)
            if safe > shown:
                on_text(text[shown:safe])
                shown = safe
        pos = len(prompt_ids) + len(out) - 1
        if len(out) >= params.max_tokens or pos + 1 >= limits.max_context:
            break
        tokens = torch.tensor([[token]], dtype=torch.long, device=executor.device)
        positions = torch.tensor([[pos]], dtype=torch.long, device=executor.device)
        past_lens = torch.tensor([pos], dtype=torch.long, device=executor.device)
        last = torch.zeros(1, dtype=torch.long, device=executor.device)
        logits, new_k, new_v, *linear = executor.decode(tokens, positions, k, v, past_lens, last, *linear)
        logits = logits[0]
        k, v = torch.cat((k, new_k), dim=3), torch.cat((v, new_v), dim=3)
    if not stopped_by_string:
        text = stream.text
    if on_text is not None and len(text) > shown:
        on_text(text[shown:])
    return GenerationResult(
        text=text,
        token_ids=out,
        prompt_tokens=len(prompt_ids),
        finish_reason=finish,
        ttft_s=ttft,
        total_s=time.perf_counter() - start,
        logprobs=logprobs,
    )


@torch.no_grad()
def greedy_continuation(decode_step, logits, k, v, next_pos: int, count: int, state=(),
                        margins: list[float] | None = None) -> list[int]:
    """Greedy tokens from first-step logits [V] using any callable with the step contract
    (an executor's decode or an eager model): the shared check of compiled vs reference.
    `state`: a hybrid model's linear-attention state after the prompt. `margins`, if given,
    gets each step's gap between the top two logits (how close that choice was to a tie)."""
    tokens = []
    device = k.device
    for i in range(count):
        tok = int(logits.argmax())
        tokens.append(tok)
        if margins is not None:
            top = logits.float().topk(2).values
            margins.append(float(top[0] - top[1]))
        if i == count - 1:
            break
        pos = next_pos + i
        out, nk, nv, *state = decode_step(
            torch.tensor([[tok]], device=device),
            torch.tensor([[pos]], device=device),
            k,
            v,
            torch.tensor([pos], device=device),
            torch.zeros(1, dtype=torch.long, device=device),
            *state,
        )
        logits = out[0]
        k, v = torch.cat((k, nk), 3), torch.cat((v, nv), 3)
    return tokens
