"""Perplexity of each quantization scheme against fp32 on a fixed text.

    python benchmarks/quant_perplexity.py [--model SRC] [--out FILE]

Loads the model (the embedded default unless --model), builds the float model once and,
for every scheme, quantizes a fresh deep copy with arlec's own `quantize_model` -- the
same modules and kernels a bundle's compiled program runs (only reduction order differs).
The text (benchmarks/data/perplexity.txt by default) is tokenized with the model's own
tokenizer, without special tokens, and cut into non-overlapping windows of --window
tokens; in each window the model predicts tokens 1..n-1 from the ones before them
(a final shorter window counts too). Reported per scheme:

  bits/weight   stored bits of every weight tensor (quantized values, scales and zeros;
                a tied embedding/LM head counted once) over the float model's parameter count
  ppl           exp(mean negative log-likelihood), from fp32 log-softmax of the logits
  delta         ppl - ppl(fp32), absolute and in %
  KL            mean over scored positions of KL(p_fp32 || p_scheme), nats
  top-1         fraction of scored positions whose argmax equals fp32's
  weight err    relative Frobenius error ||w - w_fp32|| / ||w_fp32|| of the values the
                scheme stores (decoder linears together; the embedding), for reading the numbers

Every scheme runs through the real modules and kernels arlec's `quantize_model` puts in
(int8/int4: ATen's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`), in the compute
dtype the scheme selects.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

from machine import cpu_name

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from arle_models import build_model
from arle_models.quant_layers import Fp8Linear, Int4Linear, Int8Embedding, Int8Linear
from arlec.quant import parse_quant, quantize_int4_groups, quantize_model
from arlec.sources import load_source

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "perplexity.txt"
# (label, scheme, group size)
SCHEMES = [
    ("fp32", "fp32", 32),
    ("bf16", "bf16", 32),
    ("fp16", "fp16", 32),
    ("int8", "int8", 32),
    ("int4-g32", "int4", 32),
    ("int4-g64", "int4", 64),
    ("fp8", "fp8", 32),  # the cuda target's scheme; torch._scaled_mm also runs on the CPU
]


def weight_bits(model: torch.nn.Module) -> int:
    """Stored bits of the model's state (parameters and persistent buffers), shared tensors once."""
    seen, bits = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        bits += t.numel() * t.element_size() * 8
    return bits


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def stored_weight(module: torch.nn.Module, float_weight: torch.Tensor) -> torch.Tensor:
    """The float values a (possibly quantized) linear/embedding module stores, as fp32."""
    if isinstance(module, Fp8Linear):
        return module.weight.float() * module.scales.float()[0][:, None]
    if isinstance(module, (Int8Linear, Int8Embedding)):
        return module.weight.float() * module.scales.float()[:, None]
    if isinstance(module, Int4Linear):
        # The packed layout is the kernel's own; re-derive q with arlec's function and check it.
        q, _ = quantize_int4_groups(float_weight, module.group_size)
        if not torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), module.weight):
            raise RuntimeError("re-derived int4 values differ from the ones quantize_model stored")
        sz = module.scales_and_zeros.float()
        N, K = q.shape
        g = module.group_size
        scale = sz[..., 0].t().reshape(N, K // g, 1)
        zero = sz[..., 1].t().reshape(N, K // g, 1)
        return ((q.float().reshape(N, K // g, g) - 8) * scale + zero).reshape(N, K)
    return module.weight.float()


def weight_error(model: torch.nn.Module, base: torch.nn.Module) -> dict:
    """Relative Frobenius error of the stored weights: decoder linears together, and the embedding."""
    mods = dict(model.named_modules())
    num = den = 0.0
    for name, mod in base.named_modules():
        if name.startswith("layers.") and isinstance(mod, torch.nn.Linear):
            w = mod.weight.data
            num += (stored_weight(mods[name], w) - w).pow(2).sum().item()
            den += w.pow(2).sum().item()
    emb = base.embed_tokens.weight.data
    emb_err = (stored_weight(model.embed_tokens, emb) - emb).norm().item() / emb.norm().item()
    return {"decoder_linears": math.sqrt(num / den), "embedding": emb_err}


def windows_of(ids: list[int], window: int) -> list[torch.Tensor]:
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [torch.tensor(c, dtype=torch.long)[None] for c in chunks if len(c) >= 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model source (HF folder or .gguf); default: the embedded model")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text file to score")
    ap.add_argument("--window", type=int, default=512, help="tokens per non-overlapping window")
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (same for all schemes)")
    ap.add_argument("--schemes", default=",".join(s[0] for s in SCHEMES), help="comma-separated labels to run")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [s.strip() for s in args.schemes.split(",") if s.strip()]
    known = {s[0]: s for s in SCHEMES}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        ap.error(f"unknown scheme label(s) {unknown}; choose from {list(known)}")
    if wanted[0] != "fp32":
        wanted = ["fp32"] + [w for w in wanted if w != "fp32"]  # the reference comes first

    spec = load_source(args.model)
    text = args.text.read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_str(spec.tokenizer_json)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    windows = windows_of(ids, args.window)
    total_windows = len(windows)
    if args.max_windows is not None:
        windows = windows[: args.max_windows]
    scored = sum(w.shape[1] - 1 for w in windows)

    base = build_model(spec.config)
    base.load_state_dict(spec.tensors, strict=False)
    base.eval()
    n_params = param_count(base)
    del spec.tensors  # the float model holds its own copy

    print(
        f"model: {spec.source.get('name')} ({spec.config.architecture}, {n_params / 1e6:.1f}M params)\n"
        f"text:  {args.text.name}, {len(text)} chars, {len(ids)} tokens -> {len(windows)}/{total_windows} windows "
        f"of <= {args.window}, {scored} scored tokens\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}",
        file=sys.stderr,
    )

    ref_logp: list[torch.Tensor] = []  # fp32 log-probs per window, [T-1, V]
    results = []
    bar = tqdm(total=len(wanted) * len(windows), unit="win", file=sys.stderr)
    with torch.no_grad():
        for label in wanted:
            _, scheme, group = known[label]
            model = quantize_model(copy.deepcopy(base), parse_quant(scheme, group))
            model.eval()
            bits = weight_bits(model)
            werr = weight_error(model, base)
            nll = kl = 0.0
            agree = 0
            t0 = time.perf_counter()
            for i, tokens in enumerate(windows):
                bar.set_description(label)
                logits = model.all_logits(tokens)[0, :-1].float()  # predictions for tokens 1..n-1
                logp = F.log_softmax(logits, dim=-1)
                target = tokens[0, 1:]
                nll -= logp.gather(-1, target[:, None]).sum().item()
                if label == "fp32":
                    ref_logp.append(logp)
                else:
                    ref = ref_logp[i]
                    kl += (ref.exp() * (ref - logp)).sum().item()
                    agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
                bar.update(1)
            seconds = time.perf_counter() - t0
            if label == "fp32":
                agree = scored
            ppl = math.exp(nll / scored)
            results.append(
                {
                    "label": label,
                    "scheme": scheme,
                    "group_size": group if scheme == "int4" else None,
                    "bits_per_weight": bits / n_params,
                    "weight_mib": bits / 8 / 2**20,
                    "perplexity": ppl,
                    "mean_nll": nll / scored,
                    "mean_kl_vs_fp32": kl / scored,
                    "top1_agreement_vs_fp32": agree / scored,
                    "seconds": seconds,
                    "compute_dtype": str(model.compute_dtype).removeprefix("torch."),
                    "weight_rel_error": werr,
                }
            )
            del model
    bar.close()

    ref_ppl = results[0]["perplexity"]
    for r in results:
        r["delta_ppl"] = r["perplexity"] - ref_ppl
        r["delta_ppl_pct"] = 100.0 * (r["perplexity"] - ref_ppl) / ref_ppl

    header = (
        f"{'scheme':<9} {'compute':>8} {'bits/w':>6} {'MiB':>6} {'ppl':>8} {'delta':>8} {'delta%':>7} "
        f"{'KL nats':>8} {'top-1':>7} {'w-err lin':>9} {'w-err emb':>9} {'sec':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['label']:<9} {r['compute_dtype']:>8} {r['bits_per_weight']:>6.2f} {r['weight_mib']:>6.1f} "
            f"{r['perplexity']:>8.4f} {r['delta_ppl']:>+8.4f} {r['delta_ppl_pct']:>+6.2f}% "
            f"{r['mean_kl_vs_fp32']:>8.5f} {100 * r['top1_agreement_vs_fp32']:>6.2f}% "
            f"{100 * r['weight_rel_error']['decoder_linears']:>8.3f}% {100 * r['weight_rel_error']['embedding']:>8.3f}% "
            f"{r['seconds']:>5.0f}"
        )

    if args.out:
        report = {
            "benchmark": "quant_perplexity",
            "model": {k: v for k, v in spec.source.items() if k != "path"},
            "parameters": n_params,
            "text": {
                "file": args.text.name,
                "sha256": hashlib.sha256(args.text.read_bytes()).hexdigest(),
                "chars": len(text),
                "tokens": len(ids),
            },
            "window": args.window,
            "windows": len(windows),
            "windows_total": total_windows,
            "scored_tokens": scored,
            "special_tokens_added": False,
            "machine": {
                "cpu": cpu_name(),
                "arch": platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
