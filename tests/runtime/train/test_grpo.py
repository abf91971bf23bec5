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


def tiny_model(path):
    from arle_runtime.train.checkpoint import load_source
    from arle_runtime.train.trainer import model_from_tensors

    src = load_source(str(path))
    return model_from_tensors(src.config, src.tensors, torch.device("cpu")).eval()


def test_cached_sampling_matches_greedy_recompute(tiny_hf_model):
    from arle_runtime.train.evaluate import greedy

    model = tiny_model(tiny_hf_model)
    torch.manual_seed(1)
    with torch.no_grad():  # larger weights than the init: greedy replies then depend on positions and the cache
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    prompt = [1, 100, 200, 300, 400]
    # a near-zero temperature makes sampling greedy; every row must equal the no-cache greedy reply
    completions, mask = sample_group(model, prompt, 3, 8, 1e-6, (), torch.Generator().manual_seed(0))
    expected = greedy(model, prompt, 8, ())
    assert len(set(expected)) > 4  # not one repeated token
    assert completions.tolist() == [expected] * 3
    assert bool(mask.all())


def test_shared_prompt_logprobs_match_full_recompute(tiny_hf_model):
    model = tiny_model(tiny_hf_model)
    torch.manual_seed(0)
    P, N = 7, 5
    seq = torch.cat((torch.randint(0, 1000, (1, P)).expand(3, -1), torch.randint(0, 1000, (3, N))), dim=1)
    with torch.no_grad():
        got = completion_logprobs(model, P, seq, temperature=0.7)
        logits = model.all_logits(seq)[:, P - 1:-1] / 0.7
    expected = torch.gather(torch.log_softmax(logits, -1), 2, seq[:, P:, None])[..., 0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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


def test_grpo_resume_continues_the_same_run(tiny_hf_model, tmp_path, monkeypatch):
    import arle_runtime.train.grpo as grpo

    # a random tiny model never gets a sum right; a reward on the reply's length gives the groups
    # advantages, so the weights (and later samples) really change from step to step
    make_task, _ = grpo.TASKS["arithmetic"]
    monkeypatch.setitem(grpo.TASKS, "arithmetic", (make_task, lambda reply, answer: float(len(reply) % 3 == 0)))

    def run(out, steps, *extra):
        result = CliRunner().invoke(cli, ["train", "grpo", str(tiny_hf_model), "--out", str(out), "--max-steps",
                                          str(steps), "--group-size", "4", "--prompts-per-step", "2",
                                          "--max-new-tokens", "4", "--lr", "1e-2", *extra])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    split = run(tmp_path / "split", 4, "--resume")
    keys = ("step", "loss", "reward", "kl")
    assert [[r[k] for k in keys] for r in split] == [[r[k] for k in keys] for r in whole]
    assert whole[-1]["kl"] > 0  # the policy moved
