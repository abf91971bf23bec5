"""Writing bundles atomically: everything goes into a hidden temp folder beside the
output, and only a complete bundle is renamed into place. A failure or Ctrl-C leaves
nothing half-written (and an existing bundle untouched)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from arle_runtime.bundle import MANIFEST_NAME, sha256_file
from arle_runtime.errors import ArleError


@contextlib.contextmanager
def atomic_bundle_dir(out: Path, force: bool):
    out = out.resolve()
    if out.exists() and not force:
        raise ArleError(f"{out} already exists; pass --force to replace it or choose another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_constants(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All parameters and buffers by name, each storage once; returns (tensors, tied aliases)."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for name, t in named:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in by_storage:
            tied[name] = by_storage[key]
            continue
        by_storage[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, tied


def write_weights(model: torch.nn.Module, root: Path) -> dict:
    tensors, tied = model_constants(model)
    (root / "weights").mkdir(exist_ok=True)
    save_file(tensors, str(root / "weights" / "model.safetensors"), metadata={"format": "pt"})
    return {"path": "weights/model.safetensors", "tied": tied, "count": len(tensors) + len(tied)}


def artifact_list(root: Path) -> list[dict]:
    arts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(root).as_posix()
        arts.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return arts


def write_manifest(root: Path, manifest: dict) -> None:
    manifest["artifacts"] = artifact_list(root)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
