"""Incremental detokenization: turn a growing list of token ids into text deltas.

Byte-level tokens can split a UTF-8 character; a delta is held back while the decoded
tail ends in U+FFFD, so streamed text never shows half a character.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
