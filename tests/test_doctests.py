"""The usage examples in docstrings are specs too: they run, and say what the code returns."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = (
    "hf_mergelaw.k_values",
    "hf_mergelaw.law.fitting",
    "hf_mergelaw.law.formula",
    "hf_mergelaw.law.laws",
    "hf_mergelaw.law.paper",
    "hf_mergelaw.law.planning",
    "hf_mergelaw.law.records",
    "hf_mergelaw.subsets",
    "hf_mergelaw.sweep_methods",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run_as_written(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
