"""`arle-runtime train sft / eval / pretrain` on the tiny random Llama (seconds each, CPU)."""

import json

import pytest
import torch
from click.testing import CliRunner

from arle_runtime.cli import cli
from arle_runtime.errors import ArleError


def train(*args):
    result = CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=True)
    if isinstance(result.exception, ArleError):
        raise result.exception
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_loss_falls_and_writes_an_hf_checkpoint(tiny_hf_model, chat_data, tmp_path):
    run = tmp_path / "run"
    out = train("sft", tiny_hf_model, "--data", chat_data, "--out", run, "--max-steps", 8, "--lr", 3e-3)
    curve = losses(run)
    assert len(curve) == 8 and curve[-1] < curve[0] - 1.0
    assert "final loss" in out
    latest = run / "latest"
    assert latest.is_symlink() and latest.resolve().name == "checkpoint-000008"
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in latest.iterdir()}
    assert json.loads((latest / "trainer" / "state.json").read_text())["step"] == 8
    assert not list(run.glob(".*tmp"))


@pytest.mark.parametrize("lora", [0, 4])
def test_resume_continues_the_same_loss_curve(tiny_hf_model, chat_data, tmp_path, lora):
    common = ["--data", chat_data, "--lr", 3e-3, "--batch-size", 2, "--grad-accum", 2, "--lora-rank", lora]
    train("sft", tiny_hf_model, "--out", tmp_path / "whole", "--max-steps", 6, *common)
    train("sft", tiny_hf_model, "--out", tmp_path / "split", "--max-steps", 3, *common)
    train("sft", tiny_hf_model, "--out", tmp_path / "split", "--max-steps", 6, "--resume", *common)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


def test_a_second_run_into_the_same_folder_needs_resume(tiny_hf_model, chat_data, tmp_path):
    train("sft", tiny_hf_model, "--data", chat_data, "--out", tmp_path / "r", "--max-steps", 1)
    with pytest.raises(ArleError, match="pass --resume"):
        train("sft", tiny_hf_model, "--data", chat_data, "--out", tmp_path / "r", "--max-steps", 2)


def test_lora_merge_gives_the_same_logits(tiny_hf_model):
    from arle_runtime.train.checkpoint import load_source
    from arle_runtime.train.lora import apply_lora, base_state, merge_lora
    from arle_runtime.train.trainer import model_from_tensors

    src = load_source(str(tiny_hf_model))
    model = model_from_tensors(src.config, src.tensors, torch.device("cpu"))
    wrapped = apply_lora(model, rank=4, alpha=8.0)
    assert len(wrapped) == 7 * src.config.num_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.05)  # a trained-looking adapter (B starts at zero)
    tokens = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        with_adapter = model.all_logits(tokens)
        merged_copy = model_from_tensors(src.config, base_state(model), torch.device("cpu")).all_logits(tokens)
        merged = merge_lora(model).all_logits(tokens)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_copy, with_adapter, atol=1e-4, rtol=1e-4)


def test_lora_checkpoint_with_merge_loads_as_a_plain_model(tiny_hf_model, chat_data, tmp_path):
    from arle_runtime.train.checkpoint import load_source

    run = tmp_path / "lora"
    train("sft", tiny_hf_model, "--data", chat_data, "--out", run, "--max-steps", 3, "--lora-rank", 4, "--merge-lora")
    assert (run / "latest" / "trainer" / "adapter.safetensors").is_file()
    merged = load_source(str(run / "latest"))
    base = load_source(str(tiny_hf_model))
    assert not torch.equal(merged.tensors["layers.0.self_attn.q_proj.weight"], base.tensors["layers.0.self_attn.q_proj.weight"])


def test_quantized_bundle_is_refused(tmp_path):
    from arle_runtime.train.checkpoint import load_source

    bundle = tmp_path / "q.arle"
    bundle.mkdir()
    manifest = {"schema_version": 1, "quantization": {"scheme": "int4"},
                **{k: {} for k in ("model", "target", "artifacts", "weights", "tokenizer", "buckets", "programs")}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArleError, match="int4 quantized weights, which cannot be trained"):
        load_source(str(bundle))


def test_eval_reports_perplexity_and_exact_match(tiny_hf_model, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                "answer": "Yo"}) + "\n")
    out = CliRunner().invoke(cli, ["train", "eval", str(tiny_hf_model), "--data", str(data), "--json",
                                   "--max-new-tokens", "3"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["target_tokens"] >= 2 and result["perplexity"] > 1
    assert result["answers"] == 1 and result["exact_match"] in (0.0, 1.0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pretrain_from_scratch_loss_falls(tiny_hf_model, tmp_path, arch):
    text = tmp_path / "corpus.txt"
    text.write_text("the red panda sleeps in the tree. " * 60)
    run = tmp_path / arch
    train("pretrain", "--config", "tiny", "--arch", arch, "--tokenizer", tiny_hf_model, "--data", text,
          "--out", run, "--max-steps", 8, "--max-length", 32, "--batch-size", 4)
    curve = losses(run)
    assert curve[-1] < curve[0] - 2.0
    cfg = json.loads((run / "latest" / "config.json").read_text())
    assert cfg["architectures"] == [{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]]


def test_interrupt_saves_the_last_step_and_exits_130(tiny_hf_model, chat_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    run = tmp_path / "run"
    exe = Path(sys.executable).parent / "arle-runtime"
    proc = subprocess.Popen([str(exe), "train", "sft", str(tiny_hf_model), "--data", str(chat_data), "--out", str(run),
                             "--max-steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ARLE_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what Ctrl-C does too (the CLI maps SIGTERM to KeyboardInterrupt)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    state = json.loads((run / "latest" / "trainer" / "state.json").read_text())
    assert state["step"] == len(losses(run)) >= 2
    assert "continue with --resume" in out


def test_hybrid_linear_attention_model_is_refused_with_a_sentence(tiny_hf_model, tmp_path):
    import dataclasses

    from arle_runtime.train.checkpoint import load_source
    from arle_runtime.train.data import Example
    from arle_runtime.train.trainer import TrainConfig, Trainer

    src = load_source(str(tiny_hf_model))
    src.config = dataclasses.replace(src.config, architecture="qwen3_5",
                                     layer_types=("linear_attention", "full_attention"))
    with pytest.raises(ArleError, match="hybrid linear-attention"):
        Trainer(src, "x", [Example([1, 2, 3], [True] * 3)], TrainConfig(out=str(tmp_path / "run")), "sft")
