"""Generated kernels: jinja2 templates in arle_templates rendered for one model shape.

The build renders each kernel for the model's head dim, GQA ratio, page size and KV
dtype, writes the source into the bundle (kernels/*.py, for inspection and rebuilds)
and imports it so torch.export can trace the op; AOTInductor then compiles it into the
step program. The runtime never imports these files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2

from arle_runtime.errors import ArleError

PAGED_DECODE_TEMPLATE = "paged_decode_attention.py.j2"
_loaded: dict[str, object] = {}  # source hash -> module (an op name may be registered once per process)


@dataclass(frozen=True)
class PagedDecodeSpec:
    """What the paged decode kernel is specialised on."""

    head_dim: int
    num_heads: int
    num_kv_heads: int
    page_size: int
    kv_dtype: str  # "bfloat16", "float16", "float32", "float8_e4m3fn" (converted to q's dtype on load)
    block_n: int = 64
    splits: int = 1  # programs per (sequence, KV head), each over a share of the past (flash-decoding)
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ArleError(f"{self.num_heads} query heads do not divide into {self.num_kv_heads} KV heads.")
        if self.head_dim & (self.head_dim - 1) or not 16 <= self.head_dim <= 256:
            raise ArleError(f"The paged attention kernel needs a power-of-two head dim in 16..256, got {self.head_dim}.")
        if self.block_n % self.page_size and self.page_size % self.block_n:
            raise ArleError(f"Block of {self.block_n} positions does not tile pages of {self.page_size}.")

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def block_g(self) -> int:
        """Query heads per program padded to 16: tl.dot needs at least 16 rows."""
        return max(16, 1 << (self.group - 1).bit_length())

    def variables(self) -> dict:
        return {
            "head_dim": self.head_dim,
            "group": self.group,
            "block_g": self.block_g,
            "page_size": self.page_size,
            "kv_dtype": self.kv_dtype,
            "block_n": self.block_n,
            "splits": self.splits,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "scale": repr(self.head_dim**-0.5),
        }


def template_source(name: str) -> str:
    return resources.files("arle_templates").joinpath(name).read_text()


def render(name: str, variables: dict) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    body = env.from_string(template_source(name)).render(**variables)
    return body


def render_op(name: str, variables: dict, op_prefix: str) -> str:
    """Kernel source whose op name carries a hash of the source, so two specialisations
    (or two versions of the template) never collide in one process."""
    draft = render(name, {**variables, "op_name": op_prefix})
    digest = hashlib.sha256(draft.encode()).hexdigest()[:12]
    return render(name, {**variables, "op_name": f"{op_prefix}_{digest}"})


def render_paged_decode(spec: PagedDecodeSpec) -> str:
    return render_op(PAGED_DECODE_TEMPLATE, spec.variables(), "paged_decode")


def load_kernel_module(path: Path):
    """Import a rendered kernel file (needs triton); reuse it if this source was loaded before."""
    source = path.read_text()
    key = hashlib.sha256(source.encode()).hexdigest()
    if key in _loaded:
        return _loaded[key]
    if importlib.util.find_spec("triton") is None:
        raise ArleError("Generated kernels need Triton, which this Python does not have (pip install triton).")
    name = f"arle_generated_{key[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _loaded[key] = module
    return module
