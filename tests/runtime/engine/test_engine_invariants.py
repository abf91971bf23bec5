"""Randomized runs (seeded, so failures replay): arrivals with shared prefixes, tiny
pools, aborts at any point. After every step the page bookkeeping must match the page
tables exactly, and every request must end with exactly the unpaged reference output."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from arle_runtime.engine import PageManager, QueueFullError, Scheduler, SchedulerConfig, Sequence, SequenceStatus
from arle_runtime.errors import ArleError
from arle_runtime.sampler import SamplingParams

from .engine_fakes import VOCAB, FakeRunner, reference


def _expected(seq: Sequence, capacity: int) -> list[int]:
    p = seq.params
    out = reference(seq.prompt_ids, min(p.max_tokens, capacity + 1 - seq.num_prompt_tokens))
    stops = [i for i, t in enumerate(out) if t in p.stop_token_ids]
    return out[: stops[0]] if stops else out


@pytest.mark.parametrize("seed", range(40))
def test_random_traffic_keeps_page_bookkeeping_exact_and_outputs_correct(seed):
    rng = random.Random(seed)
    pm = PageManager(rng.randint(3, 12), prefix_cache=rng.random() < 0.8)
    max_batch = rng.randint(1, 4)
    config = SchedulerConfig(
        max_num_batched_tokens=rng.choice([max_batch, 8, 16, 40]) if max_batch <= 8 else 40,
        max_batch=max_batch,
        max_prefill_chunk=rng.choice([3, 8, 16, 64]),
        max_context=rng.choice([40, 1000]),
        max_waiting=rng.randint(1, 6),
    )
    sched, runner = Scheduler(config, pm), FakeRunner(pm)
    bases = [[rng.randrange(VOCAB) for _ in range(48)] for _ in range(3)]
    requests: list[Sequence] = []
    aborted: set[int] = set()

    def abort_one():
        live = [s for s in requests if not s.is_finished]
        if live:
            victim = rng.choice(live)
            sched.abort(victim.seq_id)
            aborted.add(victim.seq_id)

    for step in range(400):
        if step < 250 and rng.random() < 0.35:
            # Page-aligned prompts with no own suffix hit the copy-on-write path.
            aligned = rng.random() < 0.3
            head = rng.choice([16, 32, 48]) if aligned else rng.randint(0, 48)
            tail = 0 if aligned else rng.randint(0, 20)
            prompt = rng.choice(bases)[:head] + [rng.randrange(VOCAB) for _ in range(tail)]
            stop = (rng.randrange(VOCAB),) if rng.random() < 0.3 else ()
            seq = Sequence(prompt, SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 30), stop_token_ids=stop))
            try:
                sched.add(seq)
                requests.append(seq)
            except QueueFullError:
                assert len(sched.waiting) >= config.max_waiting  # preempted requests may overfill it
            except ArleError:
                assert not prompt or len(prompt) > pm.capacity_tokens or len(prompt) >= config.max_context
        if rng.random() < 0.04:
            abort_one()
        if not sched.has_work:
            continue

        plan = sched.schedule()
        assert not plan.is_empty or plan.finished, "the engine stalled"
        assert plan.num_tokens <= config.max_num_batched_tokens
        assert len(plan.decodes) + len(plan.prefills) <= config.max_batch
        assert all(c.length <= config.max_prefill_chunk for c in plan.prefills)
        sampled = runner.step(plan)
        if rng.random() < 0.03:
            abort_one()  # the client went away while the step ran
        sched.postprocess(plan, sampled)

        pm.check_invariants(sched.running)
        assert all(s.status is SequenceStatus.RUNNING for s in sched.running)
        assert all(not s.page_table and s.num_computed == 0 for s in sched.waiting)
        assert pm.num_free + pm.num_evictable + pm.num_in_use == pm.num_pages

    assert not sched.has_work, "requests left unfinished"
    assert pm.num_in_use == 0
    for seq in requests:
        expected = _expected(seq, pm.capacity_tokens)
        expected = expected[: config.max_context - seq.num_prompt_tokens]
        if seq.seq_id in aborted:
            assert seq.output_ids == expected[: seq.num_output_tokens]
        else:
            assert seq.output_ids == expected, seq


def test_engine_modules_import_no_compiler_packages():
    code = (
        "import sys, arle_runtime.engine\n"
        "bad = {'arlec', 'arle_targets', 'tvm', 'onnx', 'onnxruntime', 'transformers'}\n"
        "print(','.join(sorted(bad & {m.split('.')[0] for m in sys.modules})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
