"""`train eval`: perplexity on assistant tokens, and exact match for records with an "answer"."""

from __future__ import annotations

import torch

from arle_models import CausalLM

from .data import Example, encode_chat
from .trainer import collate, token_loss


@torch.no_grad()
def greedy(model: CausalLM, prompt: list[int], max_new: int, stop: tuple[int, ...]) -> list[int]:
    """Greedy continuation without a KV cache (eval prompts are short; clarity over speed)."""
    device = model.norm.weight.device
    ids = list(prompt)
    for _ in range(max_new):
        nxt = int(model.all_logits(torch.tensor([ids], device=device))[0, -1].argmax())
        if nxt in stop:
            break
        ids.append(nxt)
    return ids[len(prompt):]


@torch.no_grad()
def evaluate(model: CausalLM, template, tokenizer, records: list[tuple[str, dict]], eos_token: str | None,
             max_length: int = 2048, max_new_tokens: int = 64) -> dict:
    model.eval()
    device = model.norm.weight.device
    loss_sum, count, scored, answers, correct, predictions = 0.0, 0, 0, 0, 0, []
    stop = tuple(model.config.eos_token_ids)
    for where, record in records:
        messages = record["messages"]
        if any(m["role"] == "assistant" for m in messages):
            example: Example = encode_chat(template, tokenizer, messages, eos_token, where)
            ids, labels = collate([example], max_length, 0, device)
            s, n = token_loss(model, ids, labels)
            loss_sum, count, scored = loss_sum + float(s), count + int(n), scored + 1
        if "answer" in record:
            prompt_messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            prompt = tokenizer.encode(template.render(prompt_messages, add_generation_prompt=True),
                                      add_special_tokens=False).ids
            text = tokenizer.decode(greedy(model, prompt, max_new_tokens, stop)).strip()
            ok = text == record["answer"].strip()
            answers, correct = answers + 1, correct + int(ok)
            predictions.append({"where": where, "answer": record["answer"], "prediction": text, "exact": ok})
    return {"records": len(records), "scored": scored, "target_tokens": count,
            "loss": loss_sum / count if count else None,
            "perplexity": float(torch.tensor(loss_sum / count).exp()) if count else None,
            "answers": answers, "exact_match": correct / answers if answers else None, "predictions": predictions}
