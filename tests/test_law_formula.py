"""Safe formula parsing and user-defined laws."""

from __future__ import annotations

import numpy as np
import pytest

from hf_mergelaw.errors import FormulaError
from hf_mergelaw.law import Law, fit_law, get_law
from hf_mergelaw.law.formula import compile_formula


def test_formula_evaluates_with_numpy() -> None:
    f = compile_formula("L = c + a * exp(-k) / sqrt(N) - log(k) + log10(N) ** 2")
    k, n = np.array([1.0, 3.0]), np.array([4.0, 100.0])
    expected = 0.5 + 2.0 * np.exp(-k) / np.sqrt(n) - np.log(k) + np.log10(n) ** 2
    np.testing.assert_allclose(f({"c": 0.5, "a": 2.0, "k": k, "N": n}), expected)
    assert f.target == "L"
    assert f.names == {"c", "a", "k", "N"}


def test_unary_minus_and_power_precedence() -> None:
    f = compile_formula("-x ** 2 + +y")
    assert float(f({"x": 3.0, "y": 1.0})) == -8.0


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "k.__class__",
        "k[0]",
        "(lambda: 1)()",
        "'a' + k",
        "k if k else 1",
        "k < 1",
        "exp(k, 2)",
        "exp(x=k)",
        "open('f')",
        "np.exp(k)",
        "[k]",
        "True + k",
        "exp + 1",
        "a.b = k",
        "k +",
    ],
)
def test_unsafe_or_invalid_formulas_are_rejected(text: str) -> None:
    with pytest.raises(FormulaError):
        compile_formula(text)


def test_law_from_formula_checks_names() -> None:
    with pytest.raises(FormulaError, match=r"\['c'\].*--param c="):
        Law.from_formula("c + a / k", {"a": (0, None)})
    with pytest.raises(FormulaError, match="do not appear"):
        Law.from_formula("c + a / k", {"a": None, "c": None, "z": None})
    with pytest.raises(FormulaError, match="reserved"):
        Law.from_formula("k + N", {"k": None})
    with pytest.raises(FormulaError, match="lower bound"):
        Law.from_formula("c + a / k", {"a": (1, 0), "c": None})


def test_unknown_form_name_is_explained() -> None:
    with pytest.raises(FormulaError, match="unknown form 'jiont'"):
        get_law("jiont")


def _per_size_records(floor: float, a: float, b: float) -> list[dict[str, float]]:
    return [{"k": k, "ce": floor + a / (k + b)} for k in range(1, 10)]


def test_formula_law_matches_builtin_per_size() -> None:
    records = _per_size_records(0.7, 0.08, 0.4)
    builtin = fit_law(records, "per-size", variance=False)
    formula = fit_law(
        records,
        "L = floor + amp / (k + off)",
        params={"floor": None, "amp": (0, None), "off": (0, 5)},
        variance=False,
    )
    np.testing.assert_allclose(
        [formula.params[n] for n in ("floor", "amp", "off")],
        [builtin.params[n] for n in ("L_inf", "A", "b")],
        rtol=1e-5,
    )
    np.testing.assert_allclose(builtin.theta, [0.7, 0.08, 0.4], rtol=1e-6)


def test_formula_with_free_exponent_and_start() -> None:
    records = [{"k": k, "ce": 0.3 + 0.2 / (k + 0.5) ** 1.7} for k in range(1, 13)]
    fit = fit_law(
        records,
        "c + a / (k + b) ** d",
        params={"c": (0, 10), "a": (0, None), "b": (0, 5), "d": (0.1, 3, 1.0)},
        variance=False,
    )
    np.testing.assert_allclose(fit.theta, [0.3, 0.2, 0.5, 1.7], rtol=1e-4)


def test_callable_law() -> None:
    def power(k, c, a, d):
        return c + a * k**-d

    records = [{"k": k, "ce": 0.5 + 0.1 * k**-0.8} for k in range(1, 10)]
    law = Law.from_callable(power, {"c": None, "a": (0, None), "d": (0, 3)})
    fit = fit_law(records, law, variance=False)
    assert law.variables == ("k",)
    np.testing.assert_allclose(fit.theta, [0.5, 0.1, 0.8], rtol=1e-5)


def test_builtin_bounds_can_be_overridden() -> None:
    records = _per_size_records(0.7, 0.08, 2.0)
    fit = fit_law(records, "per-size", params={"b": (0, 1)}, variance=False)
    assert fit.params["b"] == pytest.approx(1.0)
    with pytest.raises(FormulaError, match="no parameter"):
        get_law("joint", {"delta": (0, 1)})
