"""GRPO: the objective favours replies that beat their group, and `train grpo` runs end to end."""

import json

import torch
from click.testing import CliRunner

from arle_runtime.cli import cli
from arle_runtime.train.grpo import arithmetic_reward, completion_logprobs, grpo_loss, sample_group


def test_arithmetic_reward_reads_the_first_number():
    assert arithmetic_reward(" 12, because 5 + 7 = 12", "12") == 1.0
    assert arithmetic_reward("It is 13.", "12") == 0.0
    assert arithmetic_reward("no idea", "12") == 0.0


def test_grpo_step_raises_the_rewarded_reply_and_starts_with_zero_kl(tiny_hf_model):
    from arle_runtime.train.checkpoint import load_source
    from arle_runtime.train.trainer import model_from_tensors

    src = load_source(str(tiny_hf_model))
    model = model_from_tensors(src.config, src.tensors, torch.device("cpu"))
    reference = model_from_tensors(src.config, model.state_dict(), torch.device("cpu")).requires_grad_(False)
    prompt = [1, 100, 200, 300]
    completions, mask = sample_group(model, prompt, 4, 5, 1.0, (2,), torch.Generator().manual_seed(0))
    seq = torch.cat((torch.tensor([prompt]).expand(4, -1), completions), 1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = completion_logprobs(model, len(prompt), seq).detach()
    logp = completion_logprobs(model, len(prompt), seq)
    loss, kl = grpo_loss(logp, completion_logprobs(reference, len(prompt), seq), rewards, mask, beta=0.04)
    assert float(kl) == 0.0
    loss.backward()
    optimizer.step()
    after = completion_logprobs(model, len(prompt), seq).detach()
    gain = ((after - before) * mask).sum(1)
    assert gain[0] > 0 and gain[0] > gain[1:].max()


def test_grpo_cli_logs_reward_and_kl(tiny_hf_model, tmp_path):
    run = tmp_path / "grpo"
    result = CliRunner().invoke(cli, ["train", "grpo", str(tiny_hf_model), "--task", "arithmetic", "--out", str(run),
                                      "--max-steps", "2", "--group-size", "2", "--prompts-per-step", "1",
                                      "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all({"loss", "reward", "kl"} <= r.keys() for r in rows)
    assert (run / "latest" / "model.safetensors").is_file()
