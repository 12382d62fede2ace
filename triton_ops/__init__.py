"""Fused model-merge kernels (TIES, DARE, task arithmetic) with a torch reference/CPU path.

Imports only torch at import time; triton is imported when a Triton backend runs.
"""

from .api import dare_merge, task_arithmetic, ties_merge
from .philox import tensor_stream
from .task_vectors import drop, merge_task_vectors, trim

__all__ = [
    "dare_merge",
    "drop",
    "merge_task_vectors",
    "task_arithmetic",
    "tensor_stream",
    "ties_merge",
    "trim",
]
