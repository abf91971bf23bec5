"""A CPU schedule for TVM's `NT_matmul` (x @ W.T) kernels: the llvm build's hot loop.

Unscheduled, TVM emits a scalar dot product per output (LLVM may not reorder a float sum,
so it cannot vectorize it): SmolLM2's 49152x576 LM head alone took ~50 ms a token. dlight's
CPU GEMV rule needs a batch of 1 fixed at compile time, and our steps keep the batch
symbolic (one program for every decode bucket). This rule splits the reduction into
LANES partial sums (rfactor), so the inner loop is a vector multiply-add over contiguous
rows of x and W, then sums the lanes; no tuning, a deterministic schedule.
"""

from __future__ import annotations

LANES = 16  # one AVX-512 register of fp32, two of AVX2; LLVM legalizes either


def nt_matmul_rule():
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.base import ScheduleRule

    @ScheduleRule.from_callable("NTMatmulCPU")
    def schedule(func: tirx.PrimFunc, target, _tunable):
        if target.kind.name != "llvm" or not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        try:
            block = sch.get_sblock("NT_matmul")
        except Exception:  # not a transposed matmul
            return None
        # A fused int4 dequantization (tvm_lower.dequantize_into_matmul) computes the weight
        # in blocks before the matmul: inline them, so each nibble is decoded where it is read.
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        for producer in reversed(blocks[: [sch.get(b) for b in blocks].index(sch.get(block))]):
            sch.compute_inline(producer)
        weight_ndim = len(sch.get(block).reads[1].region)
        loops = sch.get_loops(block)
        reduction = loops[-1]
        extent = sch.get(reduction).extent
        if not isinstance(extent, tirx.IntImm) or extent.value % LANES:
            return None
        _, lane = sch.split(reduction, factors=[None, LANES])
        partial = sch.rfactor(lane, factor_axis=len(loops) - 1)
        # In the rfactor block the lane loop is data parallel and innermost: a vector FMA.
        *rows, column, k_outer, lane_loop = sch.get_loops(partial)
        sch.vectorize(lane_loop)
        if rows and weight_ndim == 2:
            # A weight matrix: visit each of its rows once for all input rows (prefill),
            # instead of streaming the whole matrix from memory once per input row.
            sch.reorder(column, *rows)
        sch.decompose_reduction(partial, k_outer)
        return sch

    return schedule
