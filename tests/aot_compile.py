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

from triton_ops import dare, merge_pass, ties

# (triton dtype name, NONFINITE_KEY of that dtype)
DTYPES = {"bf16": 0x7F80, "fp16": 0x7C00, "fp32": 0x7F800000}


def variants(dtype: str, nonfinite_key: int) -> Iterator[tuple[str, object, dict, dict]]:
    """(label, kernel, signature, constexprs) for each code path the launchers compile."""
    tensor = f"*{dtype}"
    yield (
        "radix_histogram",
        ties._radix_histogram_kernel,
        {"base_ptr": tensor, "expert_ptrs": "*i64", "prefix_ptr": "*i64",
         "histogram_ptr": "*i64", "nonfinite_ptr": "*i32", "numel": "i64",
         "num_experts": "i32", "shift": "i32", "high": "i32"},
        {"NONFINITE_KEY": nonfinite_key, "COUNT_NONFINITE": True, "NUM_BINS": ties.NUM_BINS,
         "BLOCK": ties.BLOCK},
    )  # fmt: skip
    yield (
        "threshold_ties",
        ties._threshold_ties_kernel,
        {"base_ptr": tensor, "expert_ptrs": "*i64", "threshold_ptr": "*i64", "ties_ptr": "*i64",
         "numel": "i64", "num_experts": "i32"},
        {"BLOCK": ties.BLOCK},
    )  # fmt: skip
    for break_ties in (False, True):
        yield (
            f"ties_merge(BREAK_TIES={break_ties})",
            ties._ties_merge_kernel,
            {"base_ptr": tensor, "expert_ptrs": "*i64", "out_ptr": tensor, "weight_ptr": "*fp32",
             "threshold_ptr": "*i64", "ties_kept_ptr": "*i64", "ties_before_ptr": "*i64",
             "nonfinite_ptr": "*i32", "numel": "i64", "num_experts": "i32", "lambda_": "fp32"},
            {"NORMALIZE": True, "APPLY_LAMBDA": True, "BREAK_TIES": break_ties,
             "COUNT_NONFINITE": True, "NONFINITE_KEY": nonfinite_key, "BLOCK": ties.BLOCK},
        )  # fmt: skip
    yield (
        "dare_l1",
        dare._dare_l1_kernel,
        {"base_ptr": tensor, "expert_ptrs": "*i64", "key_ptr": "*i64", "threshold_ptr": "*i64",
         "partial_ptr": "*fp32", "nonfinite_ptr": "*i32", "numel": "i64", "num_experts": "i32"},
        {"NONFINITE_KEY": nonfinite_key, "BLOCK": dare.BLOCK},
    )  # fmt: skip
    for drop, task_vectors, consensus in (
        (False, False, False),
        (True, False, False),
        (True, False, True),
        (False, True, True),
    ):
        yield (
            f"merge(DROP={drop}, TASK_VECTORS={task_vectors}, CONSENSUS={consensus})",
            merge_pass._merge_kernel,
            {"base_ptr": tensor, "expert_ptrs": "*i64", "out_ptr": tensor, "key_ptr": "*i64",
             "threshold_ptr": "*i64", "factor_ptr": "*fp32", "weight_ptr": "*fp32",
             "nonfinite_ptr": "*i32", "numel": "i64", "num_experts": "i32", "divisor": "fp32",
             "lambda_": "fp32"},
            {"DROP": drop, "TASK_VECTORS": task_vectors, "CONSENSUS": consensus,
             "NORMALIZE": True, "APPLY_LAMBDA": True,
             "COUNT_NONFINITE": True, "NONFINITE_KEY": nonfinite_key, "BLOCK": merge_pass.BLOCK},
        )  # fmt: skip


def compile_all(arch: int) -> int:
    target = GPUTarget("cuda", arch, 32)
    compiled = 0
    for dtype, nonfinite_key in DTYPES.items():
        for label, kernel, signature, constexprs in variants(dtype, nonfinite_key):
            signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
            binary = triton.compile(
                ASTSource(kernel, signature, constexprs),
                target=target,
                options={"num_warps": ties.NUM_WARPS, "enable_fp_fusion": False},
            )
            print(f"sm_{arch} {dtype} {label}: cubin {len(binary.asm['cubin'])} bytes", flush=True)
            compiled += 1
    return compiled


if __name__ == "__main__":
    print(f"compiled {compile_all(int(sys.argv[1]))} kernel variants")
