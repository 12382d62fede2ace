"""Fused model-merge kernels (TIES, Breadcrumbs, DARE, task arithmetic), torch reference/CPU path.

Imports only torch at import time; triton is imported when a Triton backend runs.
"""

from .api import breadcrumbs_merge, dare_merge, task_arithmetic, ties_merge
from .keep_hash import tensor_stream
from .task_vectors import drop, merge_task_vectors, trim

__all__ = [
    "breadcrumbs_merge",
    "dare_merge",
    "drop",
    "merge_task_vectors",
    "task_arithmetic",
    "tensor_stream",
    "ties_merge",
    "trim",
]
