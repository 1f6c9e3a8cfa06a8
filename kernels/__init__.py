"""Kernels under the backbone: each Triton kernel beside a plain-torch reference with the same signature.

- `block_sparse_attention` / `_reference`: FlashAttention-style prefill over a block mask (causal or not, GQA).
- `estimate_block_mask`: per-head vertical-slash or block top-k pattern (MInference, FlexPrefill).
- `SparseAttention`, `register_sparse_attention`, `sparse_by_default`: the backbone's `sparse` attention mode.
- `int8_matmul` / `int4_matmul` (+ `_reference`): weight-only quantized GEMV / GEMM.

Importing this package imports Triton but launches nothing; on CPU the references run
(tests run the Triton kernels through TRITON_INTERPRET=1 in their own process).
"""

import sys as _sys

_handed_over = False
if __name__ == "kernels":
    # Imported by its folder name, not as sieve.kernels: the repo root is on sys.path (`python -m ...` or pytest run
    # from it) and this folder shadows the PyPI `kernels` package, which transformers >= 5.25 imports at start-up
    # (`from kernels import CUDAProperties`). Hand the name to that package when it is installed.
    import importlib.machinery as _machinery
    import importlib.util as _util
    from pathlib import Path as _Path

    _root = _Path(__file__).resolve().parent.parent
    _spec = _machinery.PathFinder.find_spec("kernels", [p for p in _sys.path if _Path(p or ".").resolve() != _root])
    if _spec is not None and _spec.loader is not None:
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds when this file ends
        _spec.loader.exec_module(_real)
        _handed_over = True

if not _handed_over:
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
