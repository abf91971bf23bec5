"""Writing bundles atomically: everything goes into a hidden temp folder beside the
output, and only a complete bundle is renamed into place. A failure or Ctrl-C leaves
nothing half-written (and an existing bundle untouched)."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import torch

from arle_runtime.bundle import MANIFEST_NAME, PAD_PREFIX, WEIGHT_ALIGNMENT, sha256_file
from arle_runtime.atomic import atomic_dir
from arle_runtime.errors import ArleError


@contextlib.contextmanager
def atomic_bundle_dir(out: Path, force: bool):
    out = out.resolve()
    if out.exists() and not force:
        raise ArleError(f"{out} already exists; pass --force to replace it or choose another --out.")
    with atomic_dir(out) as tmp:
        yield tmp


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


def save_aligned_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A standard safetensors file in which every tensor starts on a 64-byte boundary of
    the file (hence of the page-aligned mmap), so compiled kernels can read the weights in
    place. The format allows no holes, so gaps are filled by small u8 tensors named
    PAD_PREFIX*, which readers skip."""
    header: dict = {"__metadata__": {"format": "pt", "alignment": str(WEIGHT_ALIGNMENT)}}
    blobs: list[bytes] = []
    offset = 0
    for i, (name, t) in enumerate(tensors.items()):
        data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        pad = -offset % WEIGHT_ALIGNMENT
        if pad:
            header[f"{PAD_PREFIX}{i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            blobs.append(bytes(pad))
            offset += pad
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % WEIGHT_ALIGNMENT)  # data starts on the boundary too
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
}


def write_weights(model: torch.nn.Module, root: Path) -> dict:
    tensors, tied = model_constants(model)
    (root / "weights").mkdir(exist_ok=True)
    save_aligned_safetensors(tensors, root / "weights" / "model.safetensors")
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
