"""The spine, as a user runs it: build -> inspect -> verify -> run, on the real default model."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_default_bundle_answers_capital_of_france(default_bundle):
    proc = run_cli("arle-runtime", "run", str(default_bundle), "--prompt", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_run_json_reports_tokens_and_finish_reason(default_bundle):
    proc = run_cli("arle-runtime", "run", str(default_bundle), "--prompt", "What is the capital of France?", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "stop"
    assert out["completion_tokens"] == len(out["token_ids"]) > 0
    assert out["prompt_tokens"] > 10  # the chat template adds a system turn


def test_run_reads_stdin_and_raw_mode_skips_template(default_bundle):
    chat = run_cli("arle-runtime", "run", str(default_bundle), "--stdin", "--json", "--max-tokens", "4",
                   stdin="Hello there")
    raw = run_cli("arle-runtime", "run", str(default_bundle), "--stdin", "--json", "--raw", "--max-tokens", "4",
                  stdin="Hello there")
    assert chat.returncode == 0 and raw.returncode == 0, chat.stderr + raw.stderr
    assert json.loads(raw.stdout)["prompt_tokens"] == 2
    assert json.loads(chat.stdout)["prompt_tokens"] > 10


def test_max_tokens_ends_with_length(default_bundle):
    proc = run_cli("arle-runtime", "run", str(default_bundle), "--raw", "--prompt", "Once upon a time",
                   "--max-tokens", "5", "--json")
    out = json.loads(proc.stdout)
    assert out["completion_tokens"] == 5 and out["finish_reason"] == "length"


def test_same_seed_same_text_different_seed_differs(default_bundle):
    def sample(seed):
        proc = run_cli("arle-runtime", "run", str(default_bundle), "--raw", "--prompt", "My favourite animal is",
                       "--temperature", "1.0", "--top-p", "0.95", "--top-k", "50", "--seed", str(seed),
                       "--max-tokens", "24", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["token_ids"]

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again
    assert first != other


def test_inspect_and_verify(default_bundle):
    text = run_cli("arlec", "inspect", str(default_bundle))
    assert text.returncode == 0, text.stderr
    assert "llama" in text.stdout and "int8" in text.stdout and "cpu" in text.stdout
    manifest = json.loads(run_cli("arlec", "inspect", str(default_bundle), "--json").stdout)
    assert manifest["schema_version"] == 1
    assert manifest["model"]["config"]["num_layers"] == 30
    assert {a["path"] for a in manifest["artifacts"]} >= {"cpu/prefill.pt2", "cpu/decode.pt2",
                                                          "weights/model.safetensors", "tokenizer.json"}
    assert all(len(a["sha256"]) == 64 and a["size"] > 0 for a in manifest["artifacts"])
    verify = run_cli("arlec", "verify", str(default_bundle))
    assert verify.returncode == 0, verify.stderr
    assert "verified" in verify.stdout


def test_fp32_bundle_greedy_equals_transformers_on_same_gguf(fp32_bundle):
    """The issue's acceptance check: 64 greedy tokens from the compiled fp32 bundle are
    exactly transformers' on the same GGUF weights, for several prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from arle_runtime.chat import ChatTemplate
    from arlec.sources import default_model_path

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    for question in ("What is the capital of France?", "Write a haiku about the sea.",
                     "List three prime numbers."):
        proc = run_cli("arle-runtime", "run", str(fp32_bundle), "--prompt", question, "--json",
                       "--max-tokens", "64")
        assert proc.returncode == 0, proc.stderr
        ours = json.loads(proc.stdout)
        # Same prompt ids as the bundle used, then HF greedy for as many tokens.
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(fp32_bundle / "tokenizer.json"))
        template = ChatTemplate((fp32_bundle / "chat_template.jinja").read_text(), None, None)
        prompt = template.render([{"role": "user", "content": question}])
        ids = tok.encode(prompt, add_special_tokens=False).ids
        assert len(ids) == ours["prompt_tokens"]
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=2,
                              pad_token_id=2)
        theirs = [t for t in gen[0, len(ids):].tolist()]
        if theirs and theirs[-1] == 2:
            theirs = theirs[:-1]
        assert ours["token_ids"] == theirs[: len(ours["token_ids"])]
        assert len(ours["token_ids"]) == len(theirs)


def test_a_bundle_of_batch_one_builds_and_answers_as_a_wider_one(bundle_dir, tiny_hf_model, tiny_bundle):
    """`--max-batch 1` (torch.export refuses a dynamic dim of one value): the build widens
    the programs' batch dim to hold its example, the manifest keeps 1, and the answers
    are the 4-batch bundle's."""
    from conftest import build_bundle

    narrow = build_bundle(bundle_dir, "tiny-fp32-batch1", "--model", str(tiny_hf_model), "--quant", "fp32",
                          "--max-batch", "1", "--max-prefill-tokens", "32", "--max-context", "64")
    assert json.loads((narrow / "manifest.json").read_text())["buckets"]["max_batch"] == 1
    answers = []
    for bundle in (narrow, tiny_bundle):
        proc = run_cli("arle-runtime", "run", str(bundle), "--raw", "--json", "--prompt", "The sea is",
                       "--max-tokens", "8", env={"ARLE_THREADS": "1"}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers.append(json.loads(proc.stdout)["token_ids"])
    assert answers[0] == answers[1] and len(answers[0]) == 8
