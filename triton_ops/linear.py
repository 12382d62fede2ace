"""Fused task arithmetic and the paper's Average: one pass, base + lambda * sum_i w_i delta_i.

The shared merge pass with nothing dropped and no consensus.
"""

from __future__ import annotations

import torch

from .inputs import MergeInputs
from .merge_pass import launch_merge


def task_arithmetic_triton(inputs: MergeInputs, *, normalize: bool, lambda_: float) -> torch.Tensor:
    return launch_merge(
        inputs,
        list(inputs.weights),
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
        check_finite=True,
    )
