"""A loaded bundle ready to answer: executor, tokenizer, chat template, stop tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .bundle import Bundle, load_bundle
from .chat import ChatTemplate
from .errors import ArleError
from .executor import Executor, load_executor
from .generate import GenerationResult, generate
from .sampler import SamplingParams


@dataclass
class Session:
    bundle: Bundle
    executor: Executor
    template: ChatTemplate | None

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Session":
        bundle = load_bundle(path, verify=verify)
        executor = load_executor(bundle)
        tok = bundle.manifest["tokenizer"]
        template = None
        if bundle.chat_template:
            template = ChatTemplate(bundle.chat_template, tok.get("bos_token"), tok.get("eos_token"))
        return cls(bundle, executor, template)

    @property
    def tokenizer(self):
        return self.bundle.tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        if self.template is None:
            raise ArleError(f"Bundle {self.bundle.name} has no chat template; use raw completion (--raw).")
        return self.template.render(messages, tools=tools)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, tools))

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_text=None) -> GenerationResult:
        return generate(self.executor, self.tokenizer, prompt_ids, params, self.bundle.eos_token_ids, on_text=on_text)
