"""Exceptions raised by the scaling-law engine.

Every message names what was wrong and what to do about it; the CLI prints the message and exits
non-zero without a traceback, so the text is the whole user-facing explanation.
"""

from __future__ import annotations


class LawError(ValueError):
    """Base class for problems the user can fix (bad records, an unfittable group, a bad plan)."""


class RecordsError(LawError):
    """The sweep records cannot be read or do not carry what the requested fit needs."""


class FormulaError(LawError):
    """A user formula uses syntax or names outside the safe whitelist."""


class FitError(LawError):
    """A group cannot be fitted: too few cells, one k value, or no start converged."""


class PlanningError(LawError):
    """A planning question has no answer for this fit (wrong law family, degenerate data)."""
