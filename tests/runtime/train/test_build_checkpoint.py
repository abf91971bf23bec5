"""A trained checkpoint is an ordinary model source: `arlec build --model DIR/latest` builds it,
and the float bundle that comes out is itself a training source."""

import json

import pytest
import torch
from click.testing import CliRunner

from arle_runtime.cli import cli
from conftest import run_cli


@pytest.mark.slow
def test_arlec_builds_a_trained_checkpoint_and_its_bundle_trains(tiny_hf_model, chat_data, tmp_path):
    from arle_runtime.train.checkpoint import load_source

    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "sft", str(tiny_hf_model), "--data", str(chat_data), "--out", str(run),
                                      "--max-steps", "2", "--lora-rank", "4", "--merge-lora"])
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "trained.arle"
    proc = run_cli("arlec", "build", "--model", str(run / "latest"), "--quant", "fp32", "--out", str(bundle),
                   "--max-context", "64", "--max-batch", "2", env={"ARLE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((bundle / "manifest.json").read_text())["provenance"]["source"]["kind"] == "hf"

    from_bundle, from_checkpoint = load_source(str(bundle)), load_source(str(run / "latest"))
    assert from_bundle.tensors.keys() == from_checkpoint.tensors.keys()
    for name, t in from_checkpoint.tensors.items():
        assert torch.equal(from_bundle.tensors[name], t), name
    result = CliRunner().invoke(cli, ["train", "sft", str(bundle), "--data", str(chat_data), "--out",
                                      str(tmp_path / "again"), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
