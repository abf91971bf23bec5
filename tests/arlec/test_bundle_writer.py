"""Bundles are written atomically: complete or absent, never half-written."""

from __future__ import annotations

import pytest
import torch

from arle_runtime.errors import ArleError
from arlec.bundle import atomic_bundle_dir, model_constants


def test_failure_inside_leaves_no_output_and_no_temp(tmp_path):
    out = tmp_path / "b.arle"
    with pytest.raises(RuntimeError):
        with atomic_bundle_dir(out, force=False) as root:
            (root / "manifest.json").write_text("{}")
            raise RuntimeError("compile failed")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_existing_bundle(tmp_path):
    out = tmp_path / "b.arle"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_bundle_dir(out, force=True) as root:
            (root / "manifest.json").write_text("new")
            raise KeyboardInterrupt
    assert (out / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.arle"]


def test_force_replaces_and_existing_needs_force(tmp_path):
    out = tmp_path / "b.arle"
    out.mkdir()
    with pytest.raises(ArleError, match="--force"):
        with atomic_bundle_dir(out, force=False):
            pass
    with atomic_bundle_dir(out, force=True) as root:
        (root / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.arle"]


def test_tied_weights_are_stored_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"embed": emb, "head": head})
    tensors, tied = model_constants(model)
    assert list(tensors) == ["embed.weight"]
    assert tied == {"head.weight": "embed.weight"}


def test_weights_file_is_standard_safetensors_with_aligned_tensors(tmp_path):
    from safetensors import safe_open

    from arle_runtime.bundle import PAD_PREFIX, WEIGHT_ALIGNMENT
    from arlec.bundle import save_aligned_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.randint(-5, 5, (7,), dtype=torch.int8),
               "c": torch.randn(3).bfloat16(), "d": torch.zeros(0)}
    path = tmp_path / "w.safetensors"
    save_aligned_safetensors(tensors, path)
    with safe_open(str(path), framework="pt") as f:
        names = [n for n in f.keys() if not n.startswith(PAD_PREFIX)]
        assert sorted(names) == sorted(tensors)
        for name in names:
            t = f.get_tensor(name)
            assert torch.equal(t, tensors[name])
            assert t.numel() == 0 or t.data_ptr() % WEIGHT_ALIGNMENT == 0
