"""Bucket choice and shape plans (no compilation)."""

import pytest

from arle_runtime.errors import ArleError
from arle_targets import decode_buckets, get_target
from arlec.build import BuildOptions, shape_plan
from arlec.sources import ModelSpec
from arle_models import ModelConfig


def test_decode_buckets_follow_graph_rule():
    assert decode_buckets(1) == (1,)
    assert decode_buckets(8) == (1, 2, 4, 8)
    assert decode_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert decode_buckets(64)[-3:] == (48, 56, 64)


def _spec(max_pos=2048):
    cfg = ModelConfig("llama", 100, 8, 16, 1, 2, 1, 4, max_pos)
    return ModelSpec(cfg, {}, "", None, {})


def test_shape_plan_defaults_and_limits():
    plan = shape_plan(BuildOptions(), _spec(8192))
    assert plan.max_context == 4096 and plan.max_batch == 8 and plan.max_prefill_tokens == 512
    assert shape_plan(BuildOptions(), _spec(1024)).max_context == 1024
    with pytest.raises(ArleError, match="max-context"):
        shape_plan(BuildOptions(max_context=9999), _spec(2048))
    with pytest.raises(ArleError, match="max-batch"):
        shape_plan(BuildOptions(max_batch=0), _spec())
    with pytest.raises(ArleError, match="max-prefill"):
        shape_plan(BuildOptions(max_prefill_tokens=4096, max_context=1024), _spec())


def test_unknown_targets_and_unsupported_quants_are_refused():
    with pytest.raises(ArleError, match="Unknown target"):
        get_target("tpu")
    with pytest.raises(ArleError, match="supports only"):
        get_target("metal").check("fp16")
    with pytest.raises(ArleError, match="does not support"):
        get_target("cpu").check("fp8")


def test_prefill_chunk_defaults_to_context_when_short():
    assert shape_plan(BuildOptions(), _spec(256)).max_prefill_tokens == 256
