"""A loaded bundle ready to answer: executor, tokenizer, chat template, stop tokens, and
the one engine that `run`, the server and the agent all generate through."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .bundle import Bundle, load_bundle
from .chat import ChatTemplate
from .errors import ArleError
from .executor import Executor, load_executor
from .engine import BackgroundEngine, Engine, EngineConfig
from .generate import GenerationResult
from .sampler import SamplingParams


class Tokenizing:
    """Prompt text to token ids, for anything holding a bundle and its chat template."""

    bundle: Bundle
    template: ChatTemplate | None

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


def chat_template(bundle: Bundle) -> ChatTemplate | None:
    tok = bundle.manifest["tokenizer"]
    if not bundle.chat_template:
        return None
    return ChatTemplate(bundle.chat_template, tok.get("bos_token"), tok.get("eos_token"))


@dataclass
class Session(Tokenizing):
    bundle: Bundle
    executor: Executor
    template: ChatTemplate | None
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    _engine: Engine | None = field(default=None, init=False, repr=False)
    _background: BackgroundEngine | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, engine_config: EngineConfig | None = None) -> "Session":
        bundle = load_bundle(path, verify=verify)
        executor = load_executor(bundle)
        return cls(bundle, executor, chat_template(bundle), engine_config or EngineConfig())

    @property
    def limits(self):
        return self.executor.limits

    @property
    def engine(self) -> Engine:
        """The session's engine, made on first use (the KV pool is allocated then)."""
        if self._engine is None:
            self._engine = Engine(self.executor, self.tokenizer, self.bundle.eos_token_ids, self.engine_config)
        return self._engine

    def background(self) -> BackgroundEngine:
        """The engine on its own thread (for the server); from then on generate() goes through it."""
        if self._background is None or not self._background.alive:
            self._background = BackgroundEngine(self.engine)
        return self._background

    def close(self) -> None:
        if self._background is not None:
            self._background.close()
            self._background = None

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_text=None) -> GenerationResult:
        """One request through the engine; `on_text` receives text deltas as they become safe
        to show (held back while they may begin a stop string)."""
        if self._background is not None and self._background.alive:
            outputs = self._follow(self._background, self._background.submit(prompt_ids, params))
        else:
            outputs = self._drive(self.engine.add_request(prompt_ids, params))
        for out in outputs:
            if out.text and on_text is not None:
                on_text(out.text)
            if out.finished:
                if out.error:
                    raise ArleError(out.error)
                return out.result
        raise AssertionError("the engine ended a request without a final output")

    @staticmethod
    def _follow(background: BackgroundEngine, stream):
        try:
            yield from stream
        finally:
            background.cancel(stream.request_id)  # no-op once it finished

    def _drive(self, request_id: int):
        """Step the engine here until `request_id` ends; yields that request's outputs."""
        engine = self.engine
        try:
            while True:
                for out in engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            engine.abort(request_id)  # Ctrl-C or an on_text failure: free its pages
