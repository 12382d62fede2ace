"""Compile every Triton kernel ahead of time for a CUDA architecture, on a machine without a GPU.

Run as a script with TRITON_INTERPRET unset (the interpreter replaces kernels by Python objects
that cannot be compiled): `python tests/aot_compile.py 90`. Prints one line per compiled variant
and exits non-zero on the first compiler error. `tests/test_aot_compile.py` runs it for sm_90 and
sm_80, so GPU compiler errors surface in CI.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton.language as tl

from triton_ops import dare, magnitude, merge_pass

# triton dtype name -> (NONFINITE_KEY of that dtype, the kernels' ACC)
DTYPES = {
    "bf16": (0x7F80, tl.float32),
    "fp16": (0x7C00, tl.float32),
    "fp32": (0x7F800000, tl.float32),
    "fp64": (0x7FF0000000000000, tl.float64),
}
# (KEEP, BREAK_TIES, TWO_SIDED, TASK_VECTORS, CONSENSUS) of each merge-pass launch the code makes:
# task arithmetic; DARE-linear and DARE-TIES; TIES without and with split ties; Breadcrumbs and
# Breadcrumbs-TIES with split ties; a sweep's merge of prepared task vectors.
MERGE_VARIANTS = [
    (merge_pass.KEEP_ALL, False, False, False, False),
    (merge_pass.KEEP_RANDOM, False, False, False, False),
    (merge_pass.KEEP_RANDOM, False, False, False, True),
    (merge_pass.KEEP_WINDOW, False, False, False, True),
    (merge_pass.KEEP_WINDOW, True, False, False, True),
    (merge_pass.KEEP_WINDOW, True, True, False, False),
    (merge_pass.KEEP_WINDOW, True, True, False, True),
    (merge_pass.KEEP_ALL, False, False, True, True),
]


def variants(dtype: str) -> Iterator[tuple[str, object, dict, dict]]:
    """(label, kernel, signature, constexprs) for each code path the launchers compile."""
    tensor = f"*{dtype}"
    nonfinite_key, acc = DTYPES[dtype]
    acc_ptr = "*fp64" if acc == tl.float64 else "*fp32"
    yield (
        "radix_histogram",
        magnitude._radix_histogram_kernel,
        {"base_ptr": tensor, "expert_ptrs": "*i64", "prefix_ptr": "*i64",
         "histogram_ptr": "*i64", "nonfinite_ptr": "*i32", "numel": "i64",
         "num_bounds": "i32", "shift": "i32", "high": "i32"},
        {"ACC": acc, "NONFINITE_KEY": nonfinite_key, "COUNT_NONFINITE": True,
         "NUM_BINS": magnitude.NUM_BINS, "BLOCK": magnitude.BLOCK},
    )  # fmt: skip
    yield (
        "bound_ties",
        magnitude._bound_ties_kernel,
        {"base_ptr": tensor, "expert_ptrs": "*i64", "bound_ptr": "*i64", "ties_ptr": "*i64",
         "numel": "i64", "num_bounds": "i32"},
        {"ACC": acc, "BLOCK": magnitude.BLOCK},
    )  # fmt: skip
    for break_ties, two_sided in ((False, False), (True, True)):
        yield (
            f"window_l1(BREAK_TIES={break_ties}, TWO_SIDED={two_sided})",
            magnitude._window_l1_kernel,
            {"base_ptr": tensor, "expert_ptrs": "*i64", "lower_ptr": "*i64",
             "lower_keep_ptr": "*i64", "lower_before_ptr": "*i64", "upper_ptr": "*i64",
             "upper_skip_ptr": "*i64", "upper_before_ptr": "*i64", "partial_ptr": acc_ptr,
             "numel": "i64", "num_experts": "i32"},
            {"ACC": acc, "BREAK_TIES": break_ties, "TWO_SIDED": two_sided,
             "BLOCK": magnitude.BLOCK},
        )  # fmt: skip
    yield (
        "dare_l1",
        dare._dare_l1_kernel,
        {"base_ptr": tensor, "expert_ptrs": "*i64", "word_key_ptr": "*i64",
         "threshold_ptr": "*i64", "partial_ptr": acc_ptr, "nonfinite_ptr": "*i32",
         "numel": "i64", "num_experts": "i32", "num_words": "i32"},
        {"ACC": acc, "NONFINITE_KEY": nonfinite_key, "BLOCK": dare.BLOCK},
    )  # fmt: skip
    for keep, break_ties, two_sided, task_vectors, consensus in MERGE_VARIANTS:
        yield (
            f"merge(KEEP={keep}, BREAK_TIES={break_ties}, TWO_SIDED={two_sided}, "
            f"TASK_VECTORS={task_vectors}, CONSENSUS={consensus})",
            merge_pass._merge_kernel,
            {"base_ptr": tensor, "expert_ptrs": "*i64", "out_ptr": tensor,
             "word_key_ptr": "*i64", "threshold_ptr": "*i64", "lower_ptr": "*i64",
             "lower_keep_ptr": "*i64", "lower_before_ptr": "*i64", "upper_ptr": "*i64",
             "upper_skip_ptr": "*i64", "upper_before_ptr": "*i64", "factor_ptr": acc_ptr,
             "weight_ptr": acc_ptr, "scalar_ptr": acc_ptr, "nonfinite_ptr": "*i32",
             "numel": "i64", "num_experts": "i32", "num_words": "i32"},
            {"ACC": acc, "KEEP": keep, "BREAK_TIES": break_ties, "TWO_SIDED": two_sided,
             "TASK_VECTORS": task_vectors, "CONSENSUS": consensus, "NORMALIZE": True,
             "APPLY_LAMBDA": True, "COUNT_NONFINITE": True, "NONFINITE_KEY": nonfinite_key,
             "BLOCK": merge_pass.BLOCK},
        )  # fmt: skip


def compile_all(arch: int) -> int:
    target = GPUTarget("cuda", arch, 32)
    compiled = 0
    for dtype in DTYPES:
        for label, kernel, signature, constexprs in variants(dtype):
            signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
            binary = triton.compile(
                ASTSource(kernel, signature, constexprs),
                target=target,
                options={"num_warps": merge_pass.NUM_WARPS, "enable_fp_fusion": False},
            )
            print(f"sm_{arch} {dtype} {label}: cubin {len(binary.asm['cubin'])} bytes", flush=True)
            compiled += 1
    return compiled


if __name__ == "__main__":
    print(f"compiled {compile_all(int(sys.argv[1]))} kernel variants")
