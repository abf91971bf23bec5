"""`arlec build`: source -> quantized model -> compiled steps -> bundle."""

from __future__ import annotations

import datetime
import json
import platform
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from arle_models import build_model
from arle_runtime.bundle import SCHEMA_VERSION
from arle_runtime.errors import ArleError
from arle_runtime.generate import greedy_continuation
from arle_targets import ShapePlan, decode_buckets, get_target

from . import __version__
from .bundle import atomic_bundle_dir, write_manifest, write_weights
from .quant import QuantSpec, parse_quant, quantize_model
from .sources import ModelSpec, load_source

REFERENCE_QUESTION = "What is the capital of France?"
REFERENCE_NEW_TOKENS = 8
PAGE_SIZE = 16
DEFAULT_QUANT = {"cpu": "int8", "cuda": "bf16", "onnx": "fp32"}  # each target's fastest well-supported scheme


@dataclass(frozen=True)
class BuildOptions:
    model: str | None = None
    quant: str | None = None  # None: the target's default (DEFAULT_QUANT)
    group_size: int = 32
    target: str = "cpu"
    out: str | None = None
    force: bool = False
    max_batch: int = 8
    max_prefill_tokens: int | None = None  # default min(512, max_context)
    max_context: int | None = None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "model"


def default_out(spec: ModelSpec, quant: QuantSpec, target: str) -> Path:
    name = "smollm2-135m-instruct" if spec.source["kind"] == "default" else slug(Path(spec.source["path"]).stem)
    return Path("build") / f"{name}-{quant.scheme}-{target}.arle"


def shape_plan(opts: BuildOptions, spec: ModelSpec) -> ShapePlan:
    max_context = opts.max_context or min(spec.config.max_position_embeddings, 4096)
    if not 1 <= opts.max_batch <= 256:
        raise ArleError(f"--max-batch must be between 1 and 256, got {opts.max_batch}.")
    if max_context < 2 or max_context > spec.config.max_position_embeddings:
        raise ArleError(
            f"--max-context must be between 2 and the model's {spec.config.max_position_embeddings} positions, "
            f"got {max_context}."
        )
    max_prefill = opts.max_prefill_tokens or min(512, max_context)
    if not 1 <= max_prefill <= max_context:
        raise ArleError(f"--max-prefill-tokens must be between 1 and the context ({max_context}).")
    return ShapePlan(opts.max_batch, decode_buckets(opts.max_batch), max_prefill, max_context)


def chat_prompt_ids(spec: ModelSpec, question: str) -> list[int]:
    from tokenizers import Tokenizer

    from arle_runtime.chat import ChatTemplate

    tok = Tokenizer.from_str(spec.tokenizer_json)
    if spec.chat_template:
        tmpl = ChatTemplate(spec.chat_template, spec.special_tokens.get("bos_token"), spec.special_tokens.get("eos_token"))
        text = tmpl.render([{"role": "user", "content": question}])
    else:
        text = question
    return tok.encode(text, add_special_tokens=False).ids


@torch.no_grad()
def reference_outputs(model, prompt_ids: list[int], new_tokens: int) -> dict[str, torch.Tensor]:
    """Eager logits after the prompt and greedy continuation, on the model's device:
    what `arlec verify` checks against."""
    T = len(prompt_ids)
    device = model.norm.weight.device
    empty = model.empty_cache(1, 0)
    logits, k, v = model(
        torch.tensor([prompt_ids], device=device), torch.arange(T, device=device)[None], empty, empty,
        torch.zeros(1, dtype=torch.long, device=device), torch.tensor([T - 1], device=device),
    )
    greedy = greedy_continuation(model, logits[0], k, v, T, new_tokens)
    return {
        "prompt_ids": torch.tensor(prompt_ids, dtype=torch.long),
        "last_logits": logits[0].float().cpu().clone(),
        "greedy_ids": torch.tensor(greedy, dtype=torch.long),
    }


def logits_tolerance(quant: QuantSpec, reference_logits: torch.Tensor) -> float:
    """Allowed max |compiled - eager| on the reference logits, scaled by their magnitude.

    Compiled and eager differ only in fusion and reduction order: ~1e-6 relative in fp32
    (3.8e-5 on SmolLM2's ~36-magnitude logits); in bf16 a few units in the last place
    compound over the layers (seen 0.75 of 36 on SmolLM2 int8, i.e. 2%).
    """
    relative = {torch.float32: 1e-4, torch.float16: 0.02, torch.bfloat16: 0.05}[quant.compute_dtype]
    return relative * float(reference_logits.abs().max())


def build(opts: BuildOptions, echo=print) -> tuple[Path, dict]:
    started = time.perf_counter()
    target = get_target(opts.target)
    quant = parse_quant(opts.quant or DEFAULT_QUANT.get(target.name, "int8"), opts.group_size)
    target.check(quant.scheme)
    stages = tqdm(total=9, desc="load source", unit="stage", bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}]")
    timings: dict[str, float] = {}
    t, current = time.perf_counter(), "load source"

    def progress(name: str):
        nonlocal t, current
        now = time.perf_counter()
        timings[current] = now - t
        t, current = now, name
        stages.set_description_str(name)
        stages.update(1)

    try:
        spec = load_source(opts.model)
        plan = shape_plan(opts, spec)
        out = Path(opts.out) if opts.out else default_out(spec, quant, target.name)
        if out.exists() and not opts.force:
            raise ArleError(f"{out} already exists; pass --force to replace it or choose another --out.")
        progress("quantize")
        model = build_model(spec.config)
        model.load_state_dict(spec.tensors, strict=False)
        model.eval().fuse_projections()
        quantize_model(model, quant)
        spec.tensors.clear()  # the float copies are no longer needed
        model.to(getattr(target, "device", torch.device("cpu")))
        progress("reference outputs")
        prompt_ids = chat_prompt_ids(spec, REFERENCE_QUESTION)
        reference = reference_outputs(model, prompt_ids, REFERENCE_NEW_TOKENS)
        with atomic_bundle_dir(out, opts.force) as root:
            progress("write weights")
            weights = write_weights(model, root)
            lowered = target.lower(model, plan, root, progress)
            progress("tokenizer + manifest")
            save_file(reference, str(root / "reference.safetensors"))
            (root / "tokenizer.json").write_text(spec.tokenizer_json)
            tokenizer = {
                "path": "tokenizer.json",
                "bos_token": spec.special_tokens.get("bos_token"),
                "eos_token": spec.special_tokens.get("eos_token"),
                "eos_token_ids": list(spec.config.eos_token_ids),
                "chat_template": None,
            }
            if spec.chat_template:
                (root / "chat_template.jinja").write_text(spec.chat_template)
                tokenizer["chat_template"] = "chat_template.jinja"
            generation = {**spec.generation, "eos_token_id": list(spec.config.eos_token_ids)}
            (root / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "name": out.name.removesuffix(".arle"),
                "model": {
                    "architecture": spec.config.architecture,
                    "config": spec.config.to_dict(),
                    "num_parameters": spec.config.num_parameters(),
                },
                "quantization": quant.to_dict(),
                "target": {"name": target.name, "executor": lowered.executor, "requirements": lowered.requirements},
                "buckets": plan.to_dict(),
                "programs": lowered.programs,
                "kv_cache": {
                    "page_size": PAGE_SIZE,
                    "dtype": str(quant.compute_dtype).removeprefix("torch."),
                    "num_layers": spec.config.num_layers,
                    "num_kv_heads": spec.config.num_kv_heads,
                    "head_dim": spec.config.head_dim,
                },
                "weights": weights,
                "tokenizer": tokenizer,
                "reference": {
                    "path": "reference.safetensors",
                    "question": REFERENCE_QUESTION,
                    "logits_atol": logits_tolerance(quant, reference["last_logits"]),
                },
                "provenance": {
                    "source": spec.source,
                    "arlec_version": __version__,
                    "torch": torch.__version__,
                    "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "host": socket.gethostname(),
                    "platform": platform.platform(),
                    "build_seconds": None,
                },
                "performance_baseline": None,
            }
            manifest["provenance"]["build_seconds"] = round(time.perf_counter() - started, 1)
            write_manifest(root, manifest)
            progress("done")
    finally:
        stages.close()
    timings.pop("done", None)
    return out, {"manifest": manifest, "timings": timings, "seconds": time.perf_counter() - started}
