"""Tensor parallelism on the CPU: 2 ranks over gloo stand in for 2 GPUs over NCCL.

The sharding itself (eager, both ranks in their own process) must reproduce the whole
model's logits and greedy tokens; a `--tp 2` cpu bundle must generate the same tokens
as the TP=1 bundle of the same checkpoint, through `arle-runtime run` and the engine
with several sequences at once; workers must not outlive rank 0.

Run as a script, this file is one rank of the eager check (see _eager_rank).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from conftest import assert_clean_error, build_bundle, run_cli  # noqa: E402

TINY_ARGS = ("--quant", "fp32", "--max-batch", "4", "--max-prefill-tokens", "32", "--max-context", "64")


# --- eager sharding, two processes ------------------------------------------------------


def _tiny_models():
    """(name, model) pairs covering both architectures, fused and unfused projections,
    a tied and an untied head, and a vocab that 2 does not divide (padding rows)."""
    import torch

    from arle_models import ModelConfig, build_model

    out = []
    for arch, tied, fuse, vocab in (("qwen3", False, True, 101), ("llama", True, False, 96)):
        cfg = ModelConfig(architecture=arch, vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                          tie_word_embeddings=tied)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        out.append((f"{arch}-{'fused' if fuse else 'plain'}", model.fuse_projections() if fuse else model))
    return out


def _outputs(model) -> dict:
    """Logits of a prompt, 6 greedy tokens through the dense-cache step, and one paged
    decode step (what the cuda target's decode program computes)."""
    import torch

    from arle_models.layers import paged_decode_reference

    with torch.no_grad():
        tokens = torch.tensor([[1, 5, 95, 7, 42], [3, 90, 50, 2, 8]])
        all_logits = model.all_logits(tokens)
        T = tokens.shape[1]
        empty = model.empty_cache(1, 0)
        logits, k, v = model(tokens[:1], torch.arange(T)[None], empty, empty, torch.zeros(1, dtype=torch.long),
                             torch.tensor([T - 1]))
        greedy = []
        for i in range(6):
            tok = int(logits[0].argmax())
            greedy.append(tok)
            pos = T + i
            logits, nk, nv = model(torch.tensor([[tok]]), torch.tensor([[pos]]), k, v, torch.tensor([pos]),
                                   torch.zeros(1, dtype=torch.long))
            k, v = torch.cat((k, nk), 3), torch.cat((v, nv), 3)
        # Paged: the prompt's K/V of row 0 in pages 1 and 0 of a pool, then one decode step.
        _, pk, pv = model(tokens[:1], torch.arange(T)[None], empty, empty, torch.zeros(1, dtype=torch.long),
                          torch.tensor([T - 1]))
        L, _, H, _, D = pk.shape
        k_pool, v_pool = torch.zeros(L, 32, H, D), torch.zeros(L, 32, H, D)
        slots = torch.arange(T) + 16
        k_pool[:, slots], v_pool[:, slots] = pk[:, 0].transpose(1, 2), pv[:, 0].transpose(1, 2)
        model.paged_attention = paged_decode_reference
        paged, _, _ = model.forward_paged(torch.tensor([[7]]), torch.tensor([[T]]), k_pool, v_pool,
                                          torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor([T], dtype=torch.int32))
    return {"all_logits": all_logits.tolist(), "greedy": greedy, "paged": paged.tolist()}


def _eager_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from arle_models.parallel import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {name: _outputs(shard_model(model, rank, world)) for name, model in _tiny_models()}
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(results))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_model_matches_whole_model_logits_and_greedy_tokens(tmp_path):
    import torch

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(port), str(tmp_path / f"rank{r}.json")],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    whole = {name: _outputs(model) for name, model in _tiny_models()}
    for r in range(2):
        ranks = json.loads((tmp_path / f"rank{r}.json").read_text())
        for name, ref in whole.items():
            got = ranks[name]
            torch.testing.assert_close(torch.tensor(got["all_logits"]), torch.tensor(ref["all_logits"]),
                                       atol=1e-5, rtol=1e-5, msg=f"{name} rank {r}")
            torch.testing.assert_close(torch.tensor(got["paged"]), torch.tensor(ref["paged"]), atol=1e-5, rtol=1e-5)
            assert got["greedy"] == ref["greedy"], name


def test_shard_refuses_heads_not_divisible_and_quantized_weights():
    from arle_models.parallel import ShardingError, shard_model
    from arle_models.quant_layers import Int8Linear

    name, model = _tiny_models()[1]
    with pytest.raises(ShardingError, match="divisible by 3"):
        shard_model(model, 0, 3)
    layer = model.layers[0].self_attn
    layer.o_proj = Int8Linear(layer.o_proj.in_features, layer.o_proj.out_features)
    with pytest.raises(ShardingError, match="float weights"):
        shard_model(model, 0, 2)


def test_step_plan_round_trips_through_the_wire_format():
    from arle_runtime.engine.kv_pages import PageCopy
    from arle_runtime.engine.scheduler import PrefillChunk, StepPlan
    from arle_runtime.engine.sequence import Sequence
    from arle_runtime.sampler import SamplingParams
    from arle_runtime.tensor_parallel import decode_plan, encode_plan

    a = Sequence(list(range(40)), SamplingParams())
    a.page_table = [7, 3, 9]
    b = Sequence(list(range(100, 120)), SamplingParams())
    b.page_table = [4, 5]
    plan = StepPlan(decodes=[a], prefills=[PrefillChunk(b, 16, 4)], copies=[PageCopy(2, 6)])
    wire = decode_plan(encode_plan(plan, 16).tolist())
    assert wire.copies == [PageCopy(2, 6)]
    (d,) = wire.decodes
    assert (d.num_tokens, d.last_token, d.page_table) == (40, 39, [7, 3, 9])
    (c,) = wire.prefills
    assert (c.start, c.length, c.token_ids, c.seq.page_table, c.samples) == (16, 4, [116, 117, 118, 119], [4, 5], False)


# --- bundles ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tp2_bundle(bundle_dir, tiny_hf_model) -> Path:
    return build_bundle(bundle_dir, "tiny-fp32-tp2", "--model", str(tiny_hf_model), *TINY_ARGS, "--tp", "2")


def _run_json(bundle: Path, prompt: str) -> dict:
    proc = run_cli("arle-runtime", "run", str(bundle), "--raw", "--json", "--prompt", prompt, "--max-tokens", "16",
                   env={"ARLE_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_tp2_bundle_holds_rank_shards_and_one_program_set(tp2_bundle):
    manifest = json.loads((tp2_bundle / "manifest.json").read_text())
    assert manifest["tensor_parallel"]["size"] == 2
    assert manifest["tensor_parallel"]["weights"] == ["weights/rank0.safetensors", "weights/rank1.safetensors"]
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"weights/rank0.safetensors", "weights/rank1.safetensors", "cpu/prefill.pt2", "cpu/decode.pt2"} <= paths


def test_tp2_bundle_generates_the_tp1_bundles_greedy_tokens(tp2_bundle, tiny_bundle):
    same_source = [json.loads((b / "manifest.json").read_text())["provenance"]["source"]["sha256"]
                   for b in (tp2_bundle, tiny_bundle)]
    assert same_source[0] == same_source[1], "the two bundles were built from different checkpoints"
    prompt = "The capital of France is"
    tp1, tp2 = _run_json(tiny_bundle, prompt), _run_json(tp2_bundle, prompt)
    assert tp2["bundle"] == "tiny-fp32-tp2"
    assert tp2["token_ids"] == tp1["token_ids"]
    assert len(tp2["token_ids"]) == 16


ENGINE_SCRIPT = """
import json, sys
from arle_runtime.sampler import SamplingParams
from arle_runtime.session import Session
s = Session.open(sys.argv[1], verify=False)
prompts = [s.encode(t) for t in ("one two three", "The capital of France is a city", "x" * 40, "one two three four")]
done = s.engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, logprobs=0))
print(json.dumps({"tokens": [c.token_ids for c in done], "logprobs": [c.logprobs for c in done]}))
"""


def test_tp2_engine_batches_several_sequences_like_tp1(tp2_bundle, tiny_bundle):
    """Concurrent sequences: batched decodes, chunked prefill (a 40+ token prompt over
    32-token chunks) and a shared prompt prefix all go through the broadcast plan. The
    chosen tokens' logprobs check the numbers, not only the argmax."""
    import torch

    outs = []
    for bundle in (tiny_bundle, tp2_bundle):
        proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(bundle)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "ARLE_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outs[1]["tokens"] == outs[0]["tokens"]
    for tp1, tp2 in zip(outs[0]["logprobs"], outs[1]["logprobs"]):
        assert len(tp2) == 12
        torch.testing.assert_close(torch.tensor(tp2), torch.tensor(tp1), atol=1e-4, rtol=1e-4)


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren, ...: `serve` runs rank 0 in its engine process, a child of its own."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for kid in (task / "children").read_text().split():
            kids += [int(kid), *_descendants(int(kid))]
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_workers_exit_when_rank0_exits(tp2_bundle, how):
    import httpx

    port = _free_port()
    exe = Path(sys.executable).parent / "arle-runtime"
    server = subprocess.Popen([str(exe), "serve", str(tp2_bundle), "--port", str(port), "--no-verify"],
                              env={**os.environ, "ARLE_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.5)
        body = {"model": "tiny-fp32-tp2", "prompt": "one two", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).status_code == 200
        workers = [p for p in _descendants(server.pid) if "tensor_parallel" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 1
        server.send_signal(how)
        server.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "a worker outlived rank 0"
    finally:
        if server.poll() is None:
            server.kill()


def test_build_refuses_a_tp_that_does_not_divide_the_heads(tiny_hf_model, tmp_path):
    proc = run_cli("arlec", "build", "--model", str(tiny_hf_model), *TINY_ARGS, "--tp", "3", "--out",
                   str(tmp_path / "x.arle"))
    assert_clean_error(proc, "divisible by 3")
    assert not (tmp_path / "x.arle").exists()


def test_build_refuses_tp_with_quantized_weights(tiny_hf_model, tmp_path):
    proc = run_cli("arlec", "build", "--model", str(tiny_hf_model), "--quant", "int8", "--tp", "2", "--out",
                   str(tmp_path / "x.arle"))
    assert_clean_error(proc, "--tp needs float weights")


def test_cuda_bundle_with_more_ranks_than_gpus_is_refused(tp2_bundle, monkeypatch):
    import torch

    from arle_runtime.bundle import Bundle
    from arle_runtime.errors import ArleError
    from arle_runtime.tensor_parallel import check_devices

    manifest = json.loads((tp2_bundle / "manifest.json").read_text())
    manifest["target"]["name"] = "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ArleError, match="split over 2 GPUs.*shows 1"):
        check_devices(Bundle(tp2_bundle, manifest), 2)


if __name__ == "__main__":
    _eager_rank(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
