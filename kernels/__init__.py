"""Kernels under the backbone: each Triton kernel beside a plain-torch reference with the same signature.

- `block_sparse_attention` / `_reference`: FlashAttention-style prefill over a block mask (causal or not, GQA).
- `estimate_block_mask`: per-head vertical-slash or block top-k pattern (MInference, FlexPrefill).
- `SparseAttention`, `register_sparse_attention`, `sparse_by_default`: the backbone's `sparse` attention mode.
- `int8_matmul` / `int4_matmul` (+ `_reference`): weight-only quantized GEMV / GEMM.

Importing this package imports Triton but launches nothing; on CPU the references run
(tests run the Triton kernels through TRITON_INTERPRET=1 in their own process).
"""

from .block_sparse_attention import block_mask_to_index, block_sparse_attention, block_sparse_attention_reference
from .quant_matmul import (
    int4_matmul,
    int4_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    quantize_int4,
    quantize_int8,
)
from .sparse_attention import SparseAttention, SparseStats, register_sparse_attention, sparse_by_default
from .sparse_pattern import SparseConfig, estimate_block_mask

__all__ = [
    "SparseAttention", "SparseConfig", "SparseStats", "block_mask_to_index", "block_sparse_attention",
    "block_sparse_attention_reference", "estimate_block_mask", "int4_matmul", "int4_matmul_reference", "int8_matmul",
    "int8_matmul_reference", "quantize_int4", "quantize_int8", "register_sparse_attention", "sparse_by_default",
]
