"""The errors a user can fix, under one root.

Every message names what is wrong and what to do about it. The CLI prints a :class:`UserError`
(and an ``OSError``) as one line and exits with status 2; anything else is a bug and keeps its
traceback. ``UserError`` is a ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, files or settings; the message is the explanation."""


class CommandError(UserError):
    """A command-line argument or combination of arguments that cannot run."""


class SweepConfigError(UserError):
    """A sweep YAML (or its eval data) that cannot run; the message names the key and the fix."""


class PoolError(UserError):
    """A base model or expert that cannot join a pool (another architecture, missing tensors)."""


class RecordsFileError(UserError):
    """A JSON-lines file that is not what it should be (a malformed line, not an object)."""


class DemoError(UserError):
    """The demo cannot run with these settings or in this output folder."""


class LawError(UserError):
    """A scaling-law problem: bad records, an unfittable group, a bad plan or formula."""


class RecordsError(LawError):
    """The sweep records cannot be read or do not carry what the requested fit needs."""


class FormulaError(LawError):
    """A user formula uses syntax or names outside the safe whitelist."""


class FitError(LawError):
    """A group cannot be fitted: too few cells, one k value, or no start converged."""


class PlanningError(LawError):
    """A planning question has no answer for this fit (wrong law family, degenerate data)."""
