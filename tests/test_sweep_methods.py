"""Sweep methods: the fused family on the fast path, every other mergekit method through
mergekit's own merge_tensors, names and parameters checked before any model is read."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from hf_mergelaw.errors import SweepConfigError
from hf_mergelaw.sweep_methods import MethodSpec


@pytest.mark.parametrize("name", ["ties_fused", "breadcrumbs", "breadcrumbs_ties_fused"])
def test_the_fused_family_takes_the_fast_path(name: str) -> None:
    spec = MethodSpec.from_config({"name": name, "density": 0.5})
    assert spec.fused and spec.prepares_experts
    assert spec.label == name and spec.name == name.removesuffix("_fused")


@pytest.mark.parametrize(
    ("entry", "parameters"),
    [
        ({"name": "model_stock"}, {}),
        ({"name": "linear"}, {"weight": [0.5, 0.5]}),
        ({"name": "della", "density": 0.9, "epsilon": 0.05}, None),
    ],
)
def test_other_mergekit_methods_merge_through_mergekit(entry: dict, parameters) -> None:
    spec = MethodSpec.from_config(entry)
    assert not spec.fused and not spec.prepares_experts
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=generator)
    vectors = [0.1 * torch.randn(16, 8, generator=generator) for _ in range(2)]
    torch.manual_seed(1)
    ours = spec.merge(base, vectors, [1.0, 1.0], tensor_name="w")
    if parameters is None:  # della draws from the global generator: only its shape is checked
        assert ours.shape == base.shape and torch.isfinite(ours).all()
        return
    experts = [base + v for v in vectors]
    with_base = entry["name"] != "linear"
    tensors = [base, *experts] if with_base else experts
    expected = merge_tensors(
        tensors, entry["name"], parameters=parameters, base_index=0 if with_base else None
    )
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize(
    ("entry", "phrase"),
    [
        ({"name": "dare-ties"}, "unknown merge method 'dare-ties'; Did you mean 'dare_ties'"),
        ({"name": "slerpp"}, "model_stock"),
        ({"name": "slerp"}, "needs 't'"),
        ({"name": "model_stock", "filterwise": True}, "takes: filter_wise"),
        ({"name": "karcher", "max_iter": "many"}, "max_iter='many' is invalid"),
        ({"name": "breadcrumbs", "gamma": 2.0}, "gamma is 2.0"),
    ],
)
def test_bad_names_and_parameters_name_the_valid_ones(entry: dict, phrase: str) -> None:
    with pytest.raises(SweepConfigError, match=phrase.replace("(", r"\(")):
        MethodSpec.from_config(entry)


def test_existing_configs_keep_their_parameters() -> None:
    # Records are keyed by the resolved parameters: they must not change for old entries.
    assert dict(MethodSpec.from_config({"name": "ties", "density": 0.5}).params) == {
        "density": 0.5,
        "lambda": 1.0,
        "normalize": True,
    }
    assert dict(MethodSpec.from_config({"name": "average"}).params) == {}
