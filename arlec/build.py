"""`arlec build`: source -> quantized model -> compiled steps -> bundle."""

from __future__ import annotations

import dataclasses
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
from .quant import QuantSpec, for_target, parse_quant, quantize_model
from .sources import ModelSpec, load_source

REFERENCE_QUESTION = "What is the capital of France?"
REFERENCE_NEW_TOKENS = 8
PAGE_SIZE = 16
DEFAULT_QUANT = {"cpu": "int8", "cuda": "bf16", "onnx": "fp32", "metal": "fp32"}  # each target's fastest well-supported scheme


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
    kv_dtype: str = "auto"  # auto (the compute dtype) | bf16 | fp16 | fp32 | fp8 (cuda)
    tp: int = 1  # tensor-parallel ranks (GPUs at serve time)


KV_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "float8_e4m3fn"}


def kv_cache_dtype(opts: BuildOptions, quant: QuantSpec, target: str) -> str:
    """The KV pool's dtype name: the compute dtype, or fp8 e4m3 (unit scale) on cuda."""
    compute = str(quant.compute_dtype).removeprefix("torch.")
    if opts.kv_dtype == "auto":
        return compute
    if opts.kv_dtype not in KV_DTYPES:
        raise ArleError(f"Unknown --kv-dtype {opts.kv_dtype!r}; choose auto, {', '.join(KV_DTYPES)}.")
    if opts.kv_dtype == "fp8":
        if target != "cuda":
            raise ArleError(f"--kv-dtype fp8 needs the cuda target (its attention kernel reads fp8); {target} keeps "
                            "the KV cache in the compute dtype.")
        if quant.compute_dtype != torch.bfloat16:
            raise ArleError("--kv-dtype fp8 is built for bf16 compute; use --quant bf16 or fp8 with it.")
        return KV_DTYPES["fp8"]
    if KV_DTYPES[opts.kv_dtype] != compute:
        raise ArleError(f"--kv-dtype {opts.kv_dtype} differs from the compute dtype {compute} of --quant "
                        f"{quant.scheme}; use --kv-dtype auto (or fp8 on cuda).")
    return compute


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


def with_kv_dtype(plan: ShapePlan, kv_dtype: str) -> ShapePlan:
    return dataclasses.replace(plan, kv_dtype=kv_dtype)


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
    logits, k, v, *state = model(
        torch.tensor([prompt_ids], device=device), torch.arange(T, device=device)[None], empty, empty,
        torch.zeros(1, dtype=torch.long, device=device), torch.tensor([T - 1], device=device),
        *model.empty_state(1),
    )
    margins: list[float] = []
    greedy = greedy_continuation(model, logits[0], k, v, T, new_tokens, state, margins)
    return {
        "prompt_ids": torch.tensor(prompt_ids, dtype=torch.long),
        "last_logits": logits[0].float().cpu().clone(),
        "greedy_ids": torch.tensor(greedy, dtype=torch.long),
        "greedy_margins": torch.tensor(margins, dtype=torch.float32),  # top-1 minus top-2 logit per step
    }


def logits_tolerance(quant: QuantSpec, reference_logits: torch.Tensor) -> float:
    """Allowed max |compiled - eager| on the reference logits, scaled by their magnitude.

    Compiled and eager differ only in fusion and reduction order: ~1e-6 relative in fp32
    (3.8e-5 on SmolLM2's ~36-magnitude logits); in bf16 a few units in the last place
    compound over the layers (seen 0.75 of 36 on SmolLM2 int8, i.e. 2%).
    """
    relative = {torch.float32: 1e-4, torch.float16: 0.02, torch.bfloat16: 0.05}[quant.compute_dtype]
    return relative * float(reference_logits.abs().max())


TP_QUANTS = ("fp32", "bf16", "fp16")  # sharding slices float weights; quantized layouts are not split yet
TP_DEFAULT_QUANT = {"cpu": "fp32", "cuda": "bf16"}


def lower_tensor_parallel(model, target, plan: ShapePlan, root: Path, tp: int, progress):
    """Weight shards weights/rank{r}.safetensors, and one set of compiled programs that
    every rank runs with its own shard: the programs do not depend on the rank (see
    arle_models.parallel), so they are compiled once, inside a process group of tp ranks
    that Inductor resolves the collectives' group against."""
    import copy

    from arle_models.parallel import DEFAULT_GROUP, shard_model
    from arle_runtime.tensor_parallel import compile_group

    from .bundle import model_constants, save_aligned_safetensors

    (root / "weights").mkdir(exist_ok=True)
    paths, first, weights = [], None, None
    for rank in range(tp):
        shard = shard_model(copy.deepcopy(model), rank, tp, DEFAULT_GROUP)
        tensors, tied = model_constants(shard)
        paths.append(f"weights/rank{rank}.safetensors")
        save_aligned_safetensors(tensors, root / paths[-1])
        if rank == 0:
            first = shard
            weights = {"path": paths[0], "tied": tied, "count": len(tensors) + len(tied)}
        del shard, tensors
    with compile_group(tp, DEFAULT_GROUP):
        lowered = target.lower(first, plan, root, progress)
    return weights, lowered, {"size": tp, "group": DEFAULT_GROUP, "weights": paths}


def build(opts: BuildOptions, echo=print) -> tuple[Path, dict]:
    started = time.perf_counter()
    target = get_target(opts.target)
    if opts.tp < 1:
        raise ArleError(f"--tp must be at least 1, got {opts.tp}.")
    default_quant = (TP_DEFAULT_QUANT if opts.tp > 1 else DEFAULT_QUANT).get(target.name, "int8")
    quant = parse_quant(opts.quant or default_quant, opts.group_size)
    if opts.tp > 1 and quant.scheme not in TP_QUANTS:
        raise ArleError(f"--tp needs float weights; choose --quant {' or '.join(TP_QUANTS)} (got {quant.scheme}).")
    least = getattr(target, "min_max_batch", 1)
    if opts.max_batch < least:
        raise ArleError(f"The {target.name} target needs --max-batch {least} or more, got {opts.max_batch}.")
    target.check(quant.scheme)
    quant = for_target(quant, target.name)
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
        if spec.config.is_hybrid and not getattr(target, "supports_hybrid", False):
            raise ArleError(
                f"The {target.name} target cannot build {spec.config.architecture} yet (hybrid linear attention); "
                "use --target cpu."
            )
        if opts.tp > 1:
            from arle_models.parallel import ShardingError, check_shardable

            try:
                check_shardable(spec.config, opts.tp)
            except ShardingError as e:
                raise ArleError(str(e)) from None
        plan = with_kv_dtype(shape_plan(opts, spec), kv_cache_dtype(opts, quant, target.name))
        out = Path(opts.out) if opts.out else default_out(spec, quant, target.name)
        if out.exists() and not opts.force:
            raise ArleError(f"{out} already exists; pass --force to replace it or choose another --out.")
        progress("quantize")
        model = build_model(spec.config)
        model.load_state_dict(spec.tensors, strict=False)
        model.eval().fuse_projections()
        quantize_model(model, quant, kernels=target.name if target.name in ("cuda", "metal") else "cpu")
        spec.tensors.clear()  # the float copies are no longer needed
        model.to(getattr(target, "device", torch.device("cpu")))
        progress("reference outputs")
        prompt_ids = chat_prompt_ids(spec, REFERENCE_QUESTION)
        reference = reference_outputs(model, prompt_ids, REFERENCE_NEW_TOKENS)
        with atomic_bundle_dir(out, opts.force) as root:
            progress("write weights")
            if opts.tp > 1:
                weights, lowered, tensor_parallel = lower_tensor_parallel(model, target, plan, root, opts.tp, progress)
            else:
                weights, tensor_parallel = write_weights(model, root), None
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
                    "dtype": plan.kv_dtype,
                    "scale": 1.0,  # fp8 pools store K/V unscaled (clamped to +-448)
                    "num_layers": len(spec.config.full_attention_layers),  # hybrid models: full-attention layers only
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
            if tensor_parallel:
                manifest["tensor_parallel"] = tensor_parallel
            manifest["provenance"]["build_seconds"] = round(time.perf_counter() - started, 1)
            write_manifest(root, manifest)
            progress("done")
    finally:
        stages.close()
    timings.pop("done", None)
    return out, {"manifest": manifest, "timings": timings, "seconds": time.perf_counter() - started}
