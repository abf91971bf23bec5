"""Incremental detokenization: turn a growing list of token ids into text deltas.

Only a short window of recent tokens is decoded per step (the text of a token can depend
on its neighbours, e.g. byte-level pieces of one character), so the cost per token stays
constant. A delta is held back while the window ends in U+FFFD: streamed text never shows
half a character.
"""

from __future__ import annotations

CONTEXT_TOKENS = 6  # tokens decoded before the new ones, so joins render as in a full decode


class TextStream:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        window = self._decode(self.ids[self._prefix_offset :])
        if window.endswith("\ufffd") or len(window) <= len(prefix) or not window.startswith(prefix):
            return ""
        delta = window[len(prefix) :]
        self.emitted += delta
        self._read_offset = len(self.ids)
        self._prefix_offset = max(0, self._read_offset - CONTEXT_TOKENS)
        return delta

    @property
    def text(self) -> str:
        return self._decode(self.ids)
