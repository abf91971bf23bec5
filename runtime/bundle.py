"""Reading a bundle: manifest, checksums, compatibility, weights (mmap), tokenizer.

The manifest is the only contract between compiler and runtime (docs/bundle-format.md).
Every failure here is one ArleError sentence: what is wrong and what to do.
Bundles hold compiled code; load only bundles you trust, as you would any binary.
Nothing in a bundle is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from arle_models import ModelConfig

from .errors import ArleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PAD_PREFIX = "__arle_pad_"  # alignment filler tensors in weights files
WEIGHT_ALIGNMENT = 64  # bytes; ATen's AVX-512 int8 weight-only matmul faults on less


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: str | Path) -> dict:
    root = Path(path)
    if not root.exists():
        raise ArleError(f"Bundle {root} does not exist; build one with `arlec build`.")
    if not root.is_dir():
        raise ArleError(f"{root} is not a bundle folder; a bundle is a directory holding {MANIFEST_NAME}.")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArleError(f"{root} has no {MANIFEST_NAME}; it is not a bundle, or it was only partly copied.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArleError(f"The manifest of {root} is corrupt ({e}); rebuild the bundle.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema_version"), int):
        raise ArleError(f"The manifest of {root} has no schema_version; rebuild the bundle.")
    version = manifest["schema_version"]
    if version > SCHEMA_VERSION:
        raise ArleError(
            f"Bundle {root} uses manifest schema {version}, newer than this runtime understands "
            f"({SCHEMA_VERSION}); upgrade arle-runtime."
        )
    for key in ("model", "target", "artifacts", "weights", "tokenizer", "buckets", "programs"):
        if key not in manifest:
            raise ArleError(f"The manifest of {root} lacks its {key!r} section; rebuild the bundle.")
    return manifest


def verify_artifacts(root: Path, manifest: dict, *, hashes: bool = True) -> None:
    """Every listed artifact exists with its size and (if hashes) its sha256."""
    for art in manifest["artifacts"]:
        path = root / art["path"]
        if not path.is_file():
            raise ArleError(f"Bundle {root} is missing {art['path']}; rebuild or re-copy the bundle.")
        if path.stat().st_size != art["size"]:
            raise ArleError(
                f"{art['path']} in bundle {root} has {path.stat().st_size} bytes, the manifest says {art['size']}; "
                "the bundle is damaged."
            )
        if hashes and sha256_file(path) != art["sha256"]:
            raise ArleError(f"Checksum mismatch for {art['path']} in bundle {root}; the bundle is damaged or was edited.")


def check_compatibility(root: Path, manifest: dict, expected_target: str | None = None) -> None:
    target = manifest["target"]
    if expected_target and target["name"] != expected_target:
        raise ArleError(f"Bundle {root} was built for target {target['name']!r}, not {expected_target!r}.")
    req = target.get("requirements", {})
    if target["name"] in ("cpu", "cuda"):
        built = req.get("torch", "")
        here = torch.__version__.split("+")[0]
        if built.split(".")[:2] != here.split(".")[:2]:
            raise ArleError(
                f"Bundle {root} was compiled with torch {built}, this runtime has torch {here}; "
                "compiled steps only load on the same torch release, so rebuild the bundle here."
            )
        if req.get("machine") and req["machine"] != platform.machine():
            raise ArleError(f"Bundle {root} was built for {req['machine']} CPUs, this machine is {platform.machine()}.")
    if target["name"] == "cuda" and not torch.cuda.is_available():
        raise ArleError(f"Bundle {root} targets CUDA, but no CUDA GPU is visible to this process.")
    if target["name"] == "metal" and (platform.system(), platform.machine()) != ("Darwin", "arm64"):
        # Off a Mac, the bundle's llvm build of the same Relax module runs (targets/metal.py).
        built = (req.get("llvm_system"), req.get("llvm_machine"))
        if built != (platform.system().lower(), platform.machine()):
            raise ArleError(
                f"Bundle {root} targets Metal (Apple GPUs) and its llvm build is for {built[0]} {built[1]}; "
                f"it cannot run on {platform.system()} {platform.machine()}."
            )


@dataclass
class Bundle:
    root: Path
    manifest: dict
    config: ModelConfig = field(init=False)

    def __post_init__(self):
        self.config = ModelConfig.from_dict(self.manifest["model"]["config"])

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.root.name)

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.manifest["tokenizer"].get("eos_token_ids", self.config.eos_token_ids))

    @cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        """Tensors by parameter name, memory-mapped from the bundle (ties restored)."""
        from safetensors.torch import safe_open

        w = self.manifest["weights"]
        tensors = {}
        with safe_open(str(self.root / w["path"]), framework="pt") as f:
            for name in f.keys():
                if name.startswith(PAD_PREFIX):
                    continue
                t = f.get_tensor(name)
                # Compiled kernels may use aligned vector loads; arlec aligns every tensor,
                # a file written by other tools may not be, and then we copy.
                tensors[name] = t if t.data_ptr() % WEIGHT_ALIGNMENT == 0 else t.clone()
        for alias, source in w.get("tied", {}).items():
            tensors[alias] = tensors[source]
        return tensors

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.root / self.manifest["tokenizer"]["path"]))

    @cached_property
    def chat_template(self) -> str | None:
        rel = self.manifest["tokenizer"].get("chat_template")
        return (self.root / rel).read_text() if rel else None


def load_bundle(path: str | Path, *, verify: bool = True, expected_target: str | None = None) -> Bundle:
    root = Path(path)
    manifest = read_manifest(root)
    check_compatibility(root, manifest, expected_target)
    verify_artifacts(root, manifest, hashes=verify)
    return Bundle(root, manifest)
