"""Test configuration shared by every test module.

The Triton interpreter must be selected before anything imports triton: `evaluate`,
`transformers.Trainer` and torch._dynamo all import it indirectly, and `tl.rand` and friends
are bound at import time.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
