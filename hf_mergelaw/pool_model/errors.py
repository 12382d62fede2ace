"""The pool model's own error: what a user can fix about the records, the pool or a pool file."""

from __future__ import annotations

from ..errors import UserError


class PoolModelError(UserError):
    """Records that cannot identify a pool model, subsets naming experts outside the pool, a pool
    file that is not one; the message names the problem and the fix."""
