"""Safe parsing of user law formulas such as ``"L = c + a / (k + b) ** d"``.

The formula is parsed with :mod:`ast` and only a whitelist of node types is accepted: numbers,
names, ``+ - * / **``, unary ``+``/``-`` and calls of a few numpy functions. The tree is compiled
into nested closures over numpy, so no user text ever reaches ``eval``.

Usage::

    >>> f = compile_formula("L = c + a / (k + b)")
    >>> sorted(f.names)
    ['a', 'b', 'c', 'k']
    >>> float(f({"c": 1.0, "a": 2.0, "b": 0.0, "k": 2.0}))
    2.0
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import FormulaError

FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "exp": np.exp,
    "log": np.log,
    "log10": np.log10,
    "sqrt": np.sqrt,
}

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}

MAX_LENGTH = 1000
Evaluator = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class CompiledFormula:
    """A formula compiled to numpy closures.

    Attributes:
        text: the formula as written by the user.
        target: the left-hand side name (``"L"`` in ``"L = ..."``), or ``None``.
        names: every free name used on the right-hand side (parameters and variables).
    """

    text: str
    target: str | None
    names: frozenset[str]
    _evaluate: Evaluator

    def __call__(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(self._evaluate(values), dtype=float)


def compile_formula(text: str) -> CompiledFormula:
    """Parse ``text`` (``"L = expr"`` or ``"expr"``) into a :class:`CompiledFormula`.

    Raises:
        FormulaError: on a syntax error or any construct outside the whitelist (attribute access,
            subscripts, comparisons, keyword arguments, unknown functions, string constants...).
    """
    target, _, rhs = text.rpartition("=") if "=" in text else ("", "", text)
    target = target.strip() or None
    if target is not None and not target.isidentifier():
        raise FormulaError(
            f"formula {text!r}: the left-hand side must be a single name such as 'L', "
            f"got {target!r}"
        )
    if len(rhs) > MAX_LENGTH:
        raise FormulaError(
            f"the formula is {len(rhs)} characters long; at most {MAX_LENGTH} are accepted "
            "(a law has a handful of terms)"
        )
    try:
        tree = ast.parse(rhs.strip(), mode="eval")
        names: set[str] = set()
        evaluate = _compile(tree.body, text, names)
    except SyntaxError as exc:
        raise FormulaError(f"formula {text!r} is not valid: {exc.msg}") from None
    except RecursionError:
        raise FormulaError(f"formula {text!r} nests too deeply; write a shorter law") from None
    return CompiledFormula(text=text, target=target, names=frozenset(names), _evaluate=evaluate)


def _compile(node: ast.AST, text: str, names: set[str]) -> Evaluator:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise FormulaError(f"formula {text!r}: only numeric constants are allowed")
        try:
            # numpy scalars, so that overflow gives inf (and a poor fit) instead of an error
            value = np.float64(node.value)
        except OverflowError:
            raise FormulaError(f"formula {text!r}: a constant is too large") from None
        return lambda _values: value
    if isinstance(node, ast.Name):
        if node.id in FUNCTIONS:
            raise FormulaError(
                f"formula {text!r}: {node.id!r} is a function; call it as {node.id}(x)"
            )
        name = node.id
        names.add(name)
        return lambda values: values[name]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        op = _BINARY[type(node.op)]
        left, right = _compile(node.left, text, names), _compile(node.right, text, names)
        return lambda values: op(left(values), right(values))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        uop = _UNARY[type(node.op)]
        operand = _compile(node.operand, text, names)
        return lambda values: uop(operand(values))
    if isinstance(node, ast.Call):
        return _compile_call(node, text, names)
    raise FormulaError(
        f"formula {text!r}: {type(node).__name__} is not allowed; use numbers, names, "
        f"+ - * / **, and the functions {', '.join(sorted(FUNCTIONS))}"
    )


def _compile_call(node: ast.Call, text: str, names: set[str]) -> Evaluator:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        shown = ast.unparse(node.func)
        raise FormulaError(
            f"formula {text!r}: function {shown!r} is not allowed; "
            f"allowed: {', '.join(sorted(FUNCTIONS))}"
        )
    if node.keywords or len(node.args) != 1:
        raise FormulaError(f"formula {text!r}: {node.func.id}() takes exactly one argument")
    fn = FUNCTIONS[node.func.id]
    arg = _compile(node.args[0], text, names)
    return lambda values: fn(arg(values))
