"""Training data: converting common dataset layouts to chat JSONL, and turning
conversations into token ids with a loss mask (only assistant tokens are learned).

Chat JSONL is one object a line: {"messages": [{"role": ..., "content": ...}, ...]},
optionally with "answer" (a reference reply, for `train eval` exact match).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArleError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_response": "tool", "observation": "tool"}
FORMATS = ("alpaca", "sharegpt", "dolly", "chat")


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) pairs from a JSONL file or a JSON array; `where` names the line or item."""
    path = Path(path)
    if not path.is_file():
        raise ArleError(f"Data file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArleError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
        records = [(f"{path} item {i + 1}", item) for i, item in enumerate(items)]
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ArleError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}).") from None
    for where, record in records:
        if not isinstance(record, dict):
            raise ArleError(f"{where} is a {type(record).__name__}, not a JSON object.")
    if not records:
        raise ArleError(f"{path} holds no records.")
    return records


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ArleError(f"{where} lacks a non-empty string {key!r}.")
    return value


def _instruction(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def convert_record(record: dict, fmt: str, where: str) -> dict:
    if fmt == "alpaca":
        user = _instruction(_text(record, "instruction", where), _text(record, "input", where, required=False))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output", where)}]
        system = _text(record, "system", where, required=False)
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
    elif fmt == "dolly":
        user = _instruction(_text(record, "instruction", where), _text(record, "context", where, required=False))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "response", where)}]
    elif fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise ArleError(f"{where} lacks a non-empty 'conversations' list.")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                raise ArleError(f"{where}: conversation turn {i + 1} has no known 'from' "
                                f"(one of {', '.join(SHAREGPT_ROLES)}).")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": _text(turn, "value", f"{where} turn {i + 1}")})
    elif fmt == "chat":
        messages = record.get("messages")
    else:
        raise ArleError(f"Unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    out = {"messages": check_messages(messages, where)}
    if "answer" in record:
        out["answer"] = _text(record, "answer", where)
    return out


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ArleError(f"{where} lacks a non-empty 'messages' list.")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ArleError(f"{where}: message {i + 1} has no known role (one of {', '.join(ROLES)}).")
        if not isinstance(m.get("content"), str):
            raise ArleError(f"{where}: message {i + 1} has no string 'content'.")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


def convert_file(src: str | Path, dst: str | Path, fmt: str) -> int:
    """Convert every record (all or nothing: the output is written only if all parse)."""
    if fmt not in FORMATS:
        raise ArleError(f"Unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    converted = [convert_record(record, fmt, where) for where, record in read_records(src)]
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in converted), encoding="utf-8")
    tmp.replace(dst)
    return len(converted)


# ---------------------------------------------------------------- tokenizing


@dataclass
class Example:
    ids: list[int]
    labels: list[bool]  # labels[i]: token i is a training target (predicted from i-1)


def encode_chat(template, tokenizer, messages: list[dict], eos_token: str | None, where: str = "a record") -> Example:
    """Render with the chat template; mark assistant content and its end token as targets.

    Each assistant turn's span is found by rendering the conversation up to it with the
    generation prompt (the prefix) and through it (the prefix plus the reply); the text
    after the end token (a newline in ChatML) is not learned."""
    full = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(through) or not through.startswith(prefix):
            raise ArleError(f"{where}: the chat template does not render turns as prefixes of each other, "
                            "so assistant tokens cannot be located; use a ChatML-style template.")
        end = len(through)
        if eos_token:
            at = through.find(eos_token, len(prefix) + len(m["content"]))
            if at >= 0:
                end = at + len(eos_token)
        spans.append((len(prefix), end))
    if not spans:
        raise ArleError(f"{where} has no assistant message to learn from.")
    enc = tokenizer.encode(full, add_special_tokens=False)
    labels = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    return Example(list(enc.ids), labels)


def encode_text(tokenizer, text: str, eos_id: int | None) -> Example:
    ids = tokenizer.encode(text, add_special_tokens=False).ids + ([eos_id] if eos_id is not None else [])
    return Example(ids, [True] * len(ids))
