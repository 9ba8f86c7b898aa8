"""Numba kernels: pure functions on arrays that write into caller-owned output buffers.

No globals, no hidden caches: the engine owns every buffer, so a decode step allocates nothing (the
reference-encoding functions of `memory`, run in batches outside decoding, allocate per-call scratch).
Dot products are compiled with `fastmath={"reassoc", "contract"}` only: that lets LLVM vectorize the
reductions and use FMA (a ~8x speedup) while keeping IEEE NaN/inf semantics and accurate `exp`.
"""
from .attention import attention_group, attention_prefill
from .matmul import dot, silu_mul
from .memory import (accumulate_prefix_attention, first_copies, reference_attention, rope_rows_at,
                     select_tokens, selection_scores, selection_softmax, softmax_causal_refs)
from .norm import rmsnorm, rmsnorm_rows
from .rope import rope, rope_rows, rope_tables
from .sampling import sample, sample_kernel

__all__ = [
    "attention_group", "attention_prefill",
    "accumulate_prefix_attention", "first_copies", "reference_attention", "rope_rows_at", "select_tokens", "selection_scores",
    "selection_softmax", "softmax_causal_refs",
    "dot", "silu_mul",
    "rmsnorm", "rmsnorm_rows",
    "rope", "rope_rows", "rope_tables",
    "sample", "sample_kernel",
]
