"""Fused task arithmetic and the paper's Average: one pass, base + lambda * sum_i w_i delta_i.

It is DARE-linear with nothing dropped and no rescale, so it runs dare.py's merge kernel with the
drop compiled out.
"""

from __future__ import annotations

import torch

from .dare import launch_merge
from .inputs import MergeInputs


def task_arithmetic_triton(inputs: MergeInputs, *, normalize: bool, lambda_: float) -> torch.Tensor:
    return launch_merge(
        inputs,
        list(inputs.weights),
        keys=None,
        thresholds=None,
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
        check_finite=True,
    )
