"""Parametric laws for merged-model loss (and its variance) as a function of N and k.

N is in billions of parameters, k is the number of merged experts. The built-in laws are the
paper's (arXiv 2509.24244, see ``docs/law.md``)::

    per-size           L_inf + A / (k + b)
    joint              L_star + B * N**-beta + A0 * N**-gamma / (k + b)
    variance           V_star + B_v * N**-beta_v + A0_v * N**-gamma_v / (k + b_v)
    variance-per-size  V_inf + A_v / (k + b_v)
    free-exponent      L_inf + A / (k + b)**delta       (diagnostic for the exponent -1)

User laws come from a formula string or a Python callable, with named parameters and bounds::

    >>> law = Law.from_formula("L = c + a / (k + b)**d",
    ...                        params={"c": (0, 10), "a": (0, None), "b": (0, 10), "d": (0.1, 3)})
    >>> law.param_names
    ('c', 'a', 'b', 'd')
    >>> Law.from_callable(lambda k, c, a: c + a / k, params={"c": None, "a": (0, None)}).variables
    ('k',)

Bounds are ``(lower, upper)`` with ``None`` for unbounded; built-in bounds can be changed with
:meth:`Law.with_bounds`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from ..errors import FormulaError
from .formula import FUNCTIONS, compile_formula

VARIABLES = ("N", "k")
"""Columns a law may use: the cells being fitted are per (N, k)."""

# Exponent and offset ceilings. The paper's variance fits put beta_v at 3.0, i.e. on a bound of 3;
# b is "small" in every reported fit (<= 1.3); a ceiling of 5 keeps noisy fits off the A-b
# ridge (b -> large, A -> large) that otherwise swallows the floor.
EXPONENT_MAX = 3.0
OFFSET_MAX = 5.0

# The zero floors of the tail exponent and the offset are priors, and fits often land on them
# (docs/law.md section 4). Refits for intervals may cross them by this much; b stays above -1, so
# k + b > 0 at k = 1.
PRIOR_FLOORS = ("gamma", "b", "gamma_v", "b_v")
PRIOR_FLOOR_SLACK = 0.5

Bound = tuple[float | None, float | None] | None
Variables = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Param:
    """One named parameter with box bounds and an optional start value for the optimiser."""

    name: str
    lower: float = -np.inf
    upper: float = np.inf
    start: float | None = None

    def __post_init__(self) -> None:
        if not self.lower < self.upper:
            raise FormulaError(
                f"parameter {self.name!r}: lower bound {self.lower} must be below upper "
                f"bound {self.upper}"
            )
        if self.start is not None and not self.lower <= self.start <= self.upper:
            raise FormulaError(
                f"parameter {self.name!r}: start {self.start} lies outside "
                f"[{self.lower}, {self.upper}]"
            )

    @classmethod
    def from_spec(cls, name: str, spec: Param | Bound | tuple) -> Param:
        """Build from ``None`` (unbounded), ``(lo, hi)`` or ``(lo, hi, start)``; ``None`` = open."""
        if isinstance(spec, Param):
            return replace(spec, name=name)
        if spec is None:
            return cls(name)
        if len(spec) not in (2, 3):
            raise FormulaError(f"parameter {name!r}: give (lower, upper) or (lower, upper, start)")
        lo, hi, *rest = (*spec, None) if len(spec) == 2 else spec
        return cls(
            name,
            -np.inf if lo is None else float(lo),
            np.inf if hi is None else float(hi),
            None if not rest or rest[0] is None else float(rest[0]),
        )


@dataclass(frozen=True)
class Separable:
    """How a law splits into linear coefficients times basis functions of the other parameters.

    Used to build good starting points: for each point of ``grid`` the linear coefficients are
    solved in closed form, and only the best few points are refined by the nonlinear optimiser.
    """

    linear: tuple[str, ...]
    grid: Mapping[str, tuple[float, ...]]
    basis: Callable[[Mapping[str, float], Variables], np.ndarray]


@dataclass(frozen=True)
class Law:
    """A parametric law ``y = f(theta; N, k)`` with bounded, named parameters.

    Attributes:
        name: ``"joint"``, ``"per-size"``, ... for built-ins, the formula text for formula laws,
            the function name for callables.
        params: parameters in the order of the parameter vector.
        variables: the record columns the law reads, a subset of ``("N", "k")``.
        expression: the law in readable form.
        kind: ``"builtin"``, ``"formula"`` or ``"callable"``; callables cannot be serialised.
        target: the per-cell statistic the law describes, ``"mean"`` CE or subset ``"var"``.
    """

    name: str
    params: tuple[Param, ...]
    variables: tuple[str, ...]
    expression: str
    kind: Literal["builtin", "formula", "callable"]
    fn: Callable[[np.ndarray, Variables], np.ndarray] = field(repr=False, compare=False)
    jac: Callable[[np.ndarray, Variables], np.ndarray] | None = field(
        default=None, repr=False, compare=False
    )
    separable: Separable | None = field(default=None, repr=False, compare=False)
    tail: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]] | None = field(
        default=None, repr=False, compare=False
    )
    target: Literal["mean", "var"] = "mean"

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def lower(self) -> np.ndarray:
        return np.array([p.lower for p in self.params])

    @property
    def upper(self) -> np.ndarray:
        return np.array([p.upper for p in self.params])

    def evaluate(self, theta: np.ndarray, x: Variables) -> np.ndarray:
        """Law values at the points ``x`` (a mapping of equal-length arrays) for one ``theta``."""
        shape = np.broadcast_shapes(*(np.shape(v) for v in x.values()))
        with np.errstate(all="ignore"):
            values = self.fn(np.asarray(theta, dtype=float), x)
        return np.broadcast_to(values, shape).astype(float)

    def evaluate_many(self, thetas: np.ndarray, x: Variables) -> np.ndarray:
        """Values for a stack of parameter vectors: ``(S, p) -> (S, m)``."""
        return np.stack([self.evaluate(t, x) for t in np.atleast_2d(thetas)])

    def with_bounds(self, bounds: Mapping[str, Param | Bound | tuple]) -> Law:
        """A copy with some parameters' bounds (and optional start) replaced.

        >>> JOINT.with_bounds({"b": (0, 2)}).params[-1].upper
        2.0
        """
        unknown = set(bounds) - set(self.param_names)
        if unknown:
            raise FormulaError(
                f"law {self.name!r} has no parameter(s) {sorted(unknown)}; "
                f"its parameters are {list(self.param_names)}"
            )
        params = tuple(
            Param.from_spec(p.name, bounds[p.name]) if p.name in bounds else p for p in self.params
        )
        return replace(self, params=params)

    def for_intervals(self) -> Law:
        """A copy whose prior floors (``gamma``, ``b`` and their variance twins, when at 0) are
        lowered by :data:`PRIOR_FLOOR_SLACK`, for the bootstrap refits behind intervals.

        Why: an estimate sitting on a bound cannot vary past it in a bootstrap, so the refits
        understate how far the truth may lie on the other side of the estimate (the bootstrap
        is inconsistent at a boundary); at an extrapolated size that makes curve intervals too
        narrow and too low. The point fit keeps the bounds; formula and callable laws keep the
        bounds their user declared.

        >>> JOINT.for_intervals().params[-1].lower
        -0.5
        """
        if self.kind != "builtin":
            return self
        params = tuple(
            replace(p, lower=-PRIOR_FLOOR_SLACK) if p.name in PRIOR_FLOORS and p.lower == 0 else p
            for p in self.params
        )
        return replace(self, params=params)

    @classmethod
    def from_formula(cls, text: str, params: Mapping[str, Param | Bound | tuple]) -> Law:
        """Law from a formula over ``N`` and ``k`` with the given named parameters.

        Every other name in the formula must be a parameter listed in ``params``; functions
        allowed: ``exp``, ``log``, ``log10``, ``sqrt``. Example::

            Law.from_formula("c + a * N**-g / k", {"c": None, "a": (0, None), "g": (0, 3)})
        """
        compiled = compile_formula(text)
        unknown = compiled.names - set(params) - set(VARIABLES)
        if unknown:
            raise FormulaError(
                f"formula {text!r} uses {sorted(unknown)}, which are neither parameters nor "
                f"variables {list(VARIABLES)}; declare parameters with bounds "
                f"(CLI: --param NAME=LO:HI, e.g. --param {sorted(unknown)[0]}=0:10)"
            )
        clash = set(params) & (set(VARIABLES) | set(FUNCTIONS))
        if clash:
            raise FormulaError(f"parameter name(s) {sorted(clash)} are reserved")
        unused = set(params) - compiled.names
        if unused:
            raise FormulaError(f"parameter(s) {sorted(unused)} do not appear in {text!r}")
        plist = tuple(Param.from_spec(n, s) for n, s in params.items())
        names = [p.name for p in plist]

        def fn(theta: np.ndarray, x: Variables) -> np.ndarray:
            return compiled({**x, **dict(zip(names, theta, strict=True))})

        return cls(
            name=text,
            params=plist,
            variables=tuple(v for v in VARIABLES if v in compiled.names),
            expression=text,
            kind="formula",
            fn=fn,
        )

    @classmethod
    def from_callable(
        cls,
        func: Callable[..., Any],
        params: Mapping[str, Param | Bound | tuple],
        name: str | None = None,
    ) -> Law:
        """Law from ``func(**variables, **params)``; variables are the arguments named N or k.

        ``func`` must be vectorised over numpy arrays of N and k. Such a law fits and predicts
        like any other but cannot be written to JSON (pass it again to ``FitResult.from_dict``).
        """
        arg_names = list(inspect.signature(func).parameters)
        missing = set(params) - set(arg_names)
        if missing:
            raise FormulaError(f"callable {func!r} has no argument(s) {sorted(missing)}")
        plist = tuple(Param.from_spec(n, s) for n, s in params.items())
        names = [p.name for p in plist]
        variables = tuple(v for v in VARIABLES if v in arg_names)

        def fn(theta: np.ndarray, x: Variables) -> np.ndarray:
            kwargs = {v: x[v] for v in variables}
            return np.asarray(
                func(**kwargs, **dict(zip(names, theta.tolist(), strict=True))), dtype=float
            )

        label = name or getattr(func, "__name__", "callable")
        return cls(label, plist, variables, label, "callable", fn=fn)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; enough to rebuild built-in and formula laws."""
        return {
            "name": self.name,
            "kind": self.kind,
            "expression": self.expression,
            "bounds": {
                p.name: [_finite_or_none(p.lower), _finite_or_none(p.upper)] for p in self.params
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], callable_law: Law | None = None) -> Law:
        """Inverse of :meth:`to_dict`; callables need ``callable_law`` (the code is not stored)."""
        bounds = {name: tuple(b) for name, b in data["bounds"].items()}
        if data["kind"] == "builtin":
            return BUILTIN_LAWS[data["name"]].with_bounds(bounds)
        if data["kind"] == "formula":
            return cls.from_formula(data["expression"], bounds)
        if callable_law is None:
            raise FormulaError(
                f"law {data['name']!r} was a Python callable; pass it again as callable_law"
            )
        return callable_law


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _split(theta: np.ndarray, n: int) -> list[np.ndarray]:
    # Trailing axis holds the parameters so (S, p) stacks broadcast against (m,) data.
    return [theta[..., i, None] if theta.ndim > 1 else theta[i] for i in range(n)]


# --- per size: L_inf + A / (k + b) ----------------------------------------------------------


def _per_size(theta: np.ndarray, x: Variables) -> np.ndarray:
    floor, a, b = _split(theta, 3)
    return floor + a / (x["k"] + b)


def _per_size_jac(theta: np.ndarray, x: Variables) -> np.ndarray:
    _, a, b = theta
    d = x["k"] + b
    return np.column_stack([np.ones_like(d), 1 / d, -a / d**2])


def _per_size_basis(eta: Mapping[str, float], x: Variables) -> np.ndarray:
    k = x["k"]
    return np.column_stack([np.ones_like(k), 1 / (k + eta[_B])])


def _per_size_tail(theta: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, ...]:
    floor, a, b = np.moveaxis(np.asarray(theta, dtype=float), -1, 0)
    return floor, a, b


# --- joint: L_star + B N^-beta + A0 N^-gamma / (k + b) ----------------------------------------


def _joint(theta: np.ndarray, x: Variables) -> np.ndarray:
    ls, bb, beta, a0, gamma, b = _split(theta, 6)
    n = x["N"]
    return ls + bb * n**-beta + a0 * n**-gamma / (x["k"] + b)


def _joint_jac(theta: np.ndarray, x: Variables) -> np.ndarray:
    _, bb, beta, a0, gamma, b = theta
    n, d = x["N"], x["k"] + b
    floor_term, tail_term, log_n = n**-beta, n**-gamma / d, np.log(n)
    return np.column_stack(
        [
            np.ones_like(d),
            floor_term,
            -bb * floor_term * log_n,
            tail_term,
            -a0 * tail_term * log_n,
            -a0 * tail_term / d,
        ]
    )


def _joint_basis(eta: Mapping[str, float], x: Variables, names: tuple[str, str, str]) -> np.ndarray:
    beta, gamma, b = (eta[n] for n in names)
    n = x["N"]
    return np.column_stack([np.ones_like(n), n**-beta, n**-gamma / (x["k"] + b)])


def _joint_tail(theta: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, ...]:
    ls, bb, beta, a0, gamma, b = (np.asarray(v) for v in np.moveaxis(theta, -1, 0))
    n = np.asarray(n, dtype=float)
    return ls + bb * n**-beta, a0 * n**-gamma, b + 0 * n


# --- free exponent: L_inf + A / (k + b)^delta --------------------------------------------------


def _free(theta: np.ndarray, x: Variables) -> np.ndarray:
    floor, a, b, delta = _split(theta, 4)
    return floor + a * (x["k"] + b) ** -delta


def _free_jac(theta: np.ndarray, x: Variables) -> np.ndarray:
    _, a, b, delta = theta
    d = x["k"] + b
    term = d**-delta
    return np.column_stack([np.ones_like(d), term, -a * delta * term / d, -a * term * np.log(d)])


def _free_basis(eta: Mapping[str, float], x: Variables) -> np.ndarray:
    k = x["k"]
    return np.column_stack([np.ones_like(k), (k + eta["b"]) ** -eta["delta"]])


_B = "b"
_OFFSET_GRID = (0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
_EXPONENT_GRID = (0.05, 0.15, 0.3, 0.45, 0.7, 1.0, 1.5, 2.2, 3.0)
_TAIL_EXPONENT_GRID = (0.0, 0.05, 0.15, 0.3, 0.6, 1.2)


def _nonneg(name: str, upper: float = np.inf) -> Param:
    return Param(name, 0.0, upper)


PER_SIZE = Law(
    name="per-size",
    params=(Param("L_inf"), _nonneg("A"), _nonneg("b", OFFSET_MAX)),
    variables=("k",),
    expression="L_inf + A / (k + b)",
    kind="builtin",
    fn=_per_size,
    jac=_per_size_jac,
    separable=Separable(("L_inf", "A"), {"b": _OFFSET_GRID}, _per_size_basis),
    tail=_per_size_tail,
)

JOINT = Law(
    name="joint",
    params=(
        Param("L_star"),
        _nonneg("B"),
        _nonneg("beta", EXPONENT_MAX),
        _nonneg("A0"),
        _nonneg("gamma", EXPONENT_MAX),
        _nonneg("b", OFFSET_MAX),
    ),
    variables=("N", "k"),
    expression="L_star + B * N**-beta + A0 * N**-gamma / (k + b)",
    kind="builtin",
    fn=_joint,
    jac=_joint_jac,
    separable=Separable(
        ("L_star", "B", "A0"),
        {"beta": _EXPONENT_GRID, "gamma": _TAIL_EXPONENT_GRID, "b": _OFFSET_GRID},
        lambda eta, x: _joint_basis(eta, x, ("beta", "gamma", "b")),
    ),
    tail=_joint_tail,
)

VARIANCE = Law(
    name="variance",
    params=(
        _nonneg("V_star"),
        _nonneg("B_v"),
        _nonneg("beta_v", EXPONENT_MAX),
        _nonneg("A0_v"),
        _nonneg("gamma_v", EXPONENT_MAX),
        _nonneg("b_v", OFFSET_MAX),
    ),
    variables=("N", "k"),
    expression="V_star + B_v * N**-beta_v + A0_v * N**-gamma_v / (k + b_v)",
    kind="builtin",
    target="var",
    fn=_joint,
    jac=_joint_jac,
    separable=Separable(
        ("V_star", "B_v", "A0_v"),
        {"beta_v": _EXPONENT_GRID, "gamma_v": _TAIL_EXPONENT_GRID, "b_v": _OFFSET_GRID},
        lambda eta, x: _joint_basis(eta, x, ("beta_v", "gamma_v", "b_v")),
    ),
)

VARIANCE_PER_SIZE = Law(
    name="variance-per-size",
    params=(_nonneg("V_inf"), _nonneg("A_v"), _nonneg("b_v", OFFSET_MAX)),
    variables=("k",),
    expression="V_inf + A_v / (k + b_v)",
    kind="builtin",
    target="var",
    fn=_per_size,
    jac=_per_size_jac,
    separable=Separable(
        ("V_inf", "A_v"),
        {"b_v": _OFFSET_GRID},
        lambda eta, x: _per_size_basis({_B: eta["b_v"]}, x),
    ),
)

FREE_EXPONENT = Law(
    name="free-exponent",
    params=(Param("L_inf"), _nonneg("A"), _nonneg("b", OFFSET_MAX), Param("delta", 0.0, 10.0)),
    variables=("k",),
    expression="L_inf + A / (k + b)**delta",
    kind="builtin",
    fn=_free,
    jac=_free_jac,
    separable=Separable(
        ("L_inf", "A"),
        {"b": _OFFSET_GRID, "delta": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)},
        _free_basis,
    ),
)


def _ties(theta: np.ndarray, x: Variables) -> np.ndarray:
    floor, a, b, d, q = _split(theta, 5)
    k = x["k"]
    return floor + a / (k + b) + d * k / (k + q)


def _ties_jac(theta: np.ndarray, x: Variables) -> np.ndarray:
    _, a, b, d, q = theta
    k = x["k"]
    return np.column_stack(
        [np.ones_like(k), 1 / (k + b), -a / (k + b) ** 2, k / (k + q), -d * k / (k + q) ** 2]
    )


def _ties_basis(eta: Mapping[str, float], x: Variables) -> np.ndarray:
    k = x["k"]
    return np.column_stack([np.ones_like(k), 1 / (k + eta["b"]), k / (k + eta["q"])])


# The paper's TIES curve at lambda = 1 (docs/law.md section 2): a small bounded rise D k/(k+q)
# on top of the law absorbs the mild non-monotonicity that otherwise pins b on its cap.
TIES_PER_SIZE = Law(
    name="ties-per-size",
    params=(
        Param("L_inf"),
        _nonneg("A"),
        _nonneg("b", OFFSET_MAX),
        _nonneg("D"),
        _nonneg("q", 4 * OFFSET_MAX),
    ),
    variables=("k",),
    expression="L_inf + A / (k + b) + D * k / (k + q)",
    kind="builtin",
    fn=_ties,
    jac=_ties_jac,
    separable=Separable(
        ("L_inf", "A", "D"), {"b": _OFFSET_GRID, "q": (0.5, 2.0, 5.0, 20.0)}, _ties_basis
    ),
)

BUILTIN_LAWS: dict[str, Law] = {
    law.name: law
    for law in (PER_SIZE, JOINT, VARIANCE, VARIANCE_PER_SIZE, FREE_EXPONENT, TIES_PER_SIZE)
}


def get_law(form: str | Law, params: Mapping[str, Param | Bound | tuple] | None = None) -> Law:
    """Resolve a form name (``"joint"``, ``"per-size"``, ...) or formula text to a :class:`Law`.

    For built-ins ``params`` overrides bounds; for formulas it declares the parameters.
    """
    if isinstance(form, Law):
        return form.with_bounds(params) if params else form
    if form in BUILTIN_LAWS:
        return BUILTIN_LAWS[form].with_bounds(params or {})
    if "=" not in form and all(ch.isalnum() or ch in "-_" for ch in form):
        raise FormulaError(
            f"unknown form {form!r}: use one of {sorted(BUILTIN_LAWS)} or a formula "
            f"such as 'L = c + a / (k + b)' with declared parameters"
        )
    return Law.from_formula(form, params or {})


def variance_companion(law: Law, n_sizes: int, finite_pool: bool = False) -> Law:
    """The variance law fitted beside a mean law: joint when sizes vary, per size otherwise.

    Over the subsets of a finite pool of M experts the variance is ``s^2 (M-k) / ((M-1) k)``
    (docs/law.md section 3): an intercept below zero. With ``finite_pool`` it may take one.
    """
    companion = VARIANCE if "N" in law.variables and n_sizes >= 3 else VARIANCE_PER_SIZE
    if not finite_pool:
        return companion
    intercept = companion.param_names[0]
    return companion.with_bounds({intercept: (None, None)})
