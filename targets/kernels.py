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


def check_heads(kernel: str, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """The head shapes the attention kernels tile: whole GQA groups, tl.dot-sized head dims."""
    if num_heads % num_kv_heads:
        raise ArleError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads.")
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ArleError(f"The {kernel} kernel needs a power-of-two head dim in 16..256, got {head_dim}.")


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
        check_heads("paged attention", self.num_heads, self.num_kv_heads, self.head_dim)
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


PREFILL_ATTENTION_TEMPLATE = "prefill_attention.py.j2"


@dataclass(frozen=True)
class PrefillAttentionSpec:
    """What the prefill attention kernel is specialised on (templates/prefill_attention.py.j2).
    The past it reads is the dense [B, Hkv, P, D] the runtime gathers from the pool."""

    head_dim: int
    num_heads: int
    num_kv_heads: int
    kv_dtype: str  # the gathered past's dtype (converted to q's on load)
    block_m: int = 64  # new tokens per program
    block_n: int = 64  # key positions per step of the online softmax
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_heads("prefill attention", self.num_heads, self.num_kv_heads, self.head_dim)

    def variables(self) -> dict:
        return {
            "head_dim": self.head_dim,
            "num_heads": self.num_heads,
            "group": self.num_heads // self.num_kv_heads,
            "kv_dtype": self.kv_dtype,
            "block_m": self.block_m,
            "block_n": self.block_n,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "scale": repr(self.head_dim**-0.5),
        }


def render_prefill_attention(spec: PrefillAttentionSpec) -> str:
    return render_op(PREFILL_ATTENTION_TEMPLATE, spec.variables(), "prefill_attention")


FUSED_DECODE_TEMPLATE = "fused_decode.py.j2"


@dataclass(frozen=True)
class FusedDecodeSpec:
    """What the fused small-batch decode kernels are specialised on (templates/fused_decode.py.j2)."""

    head_dim: int
    num_heads: int
    num_kv_heads: int
    page_size: int
    kv_dtype: str
    qk_norm: bool
    num_sms: int  # the build GPU's multiprocessors: the matmuls spread a weight over about this many programs
    # Pool positions per attention step: 128 beat 32 and 64 at past lengths 128-2048 on an
    # H100 (5.2 vs 5.6 us at 128, 37 vs 45 us at 2048; docs/perf/fused-decode-kernels-h100.json).
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2
    configs: tuple = ()  # ((N, K, gated), (BLOCK_N, BLOCK_K, warps, stages)) pairs that override the rule

    def __post_init__(self):
        self.paged_spec()  # the paged kernel's shape rules hold here too
        if self.head_dim < 32:
            raise ArleError(f"The fused decode kernels need a head dim of at least 32, got {self.head_dim}.")

    def paged_spec(self) -> PagedDecodeSpec:
        return PagedDecodeSpec(self.head_dim, self.num_heads, self.num_kv_heads, self.page_size, self.kv_dtype,
                               block_n=self.block_n)

    def variables(self) -> dict:
        return {
            **self.paged_spec().variables(),
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "qk_norm": self.qk_norm,
            "num_sms": self.num_sms,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "configs": sorted(self.configs),
        }


def render_fused_decode(spec: FusedDecodeSpec) -> str:
    return render_op(FUSED_DECODE_TEMPLATE, spec.variables(), "fused_decode")


FUSED_MOE_TEMPLATE = "fused_moe.py.j2"


@dataclass(frozen=True)
class FusedMoeSpec:
    """What the fused mixture-of-experts kernels are specialised on (templates/fused_moe.py.j2)."""

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int

    def variables(self) -> dict:
        return {"hidden": self.hidden, "intermediate": self.intermediate, "num_experts": self.num_experts,
                "top_k": self.top_k, "block_m": "16 (decode), 64 (prefill)"}


def render_fused_moe(spec: FusedMoeSpec) -> str:
    return render_op(FUSED_MOE_TEMPLATE, spec.variables(), "fused_moe")


INT8_MATMUL_TEMPLATE = "int8_matmul.py.j2"


@dataclass(frozen=True)
class Int8MatmulSpec:
    """The weight-only int8 matmul's tiles (templates/int8_matmul.py.j2). Decode takes 16 rows
    per program (tl.dot's least) and spreads a weight over the multiprocessors by output
    channels; prefill takes 64 x 64 tiles. Not yet timed on a GPU."""

    num_sms: int
    decode: tuple = (16, 256, 4, 3)  # block_m, block_k, warps, stages (block_n from the weight's rows)
    prefill: tuple = (64, 64, 64, 4, 3)  # block_m, block_n, block_k, warps, stages

    def variables(self) -> dict:
        decode = dict(zip(("block_m", "block_k", "num_warps", "num_stages"), self.decode))
        prefill = dict(zip(("block_m", "block_n", "block_k", "num_warps", "num_stages"), self.prefill))
        return {"num_sms": self.num_sms, "decode": decode, "prefill": prefill}


def render_int8_matmul(spec: Int8MatmulSpec) -> str:
    return render_op(INT8_MATMUL_TEMPLATE, spec.variables(), "int8_linear")
