"""The ``hf-mergelaw`` command line: one module per command group.

- :mod:`.law`: ``fit``, ``predict``, ``plan``, ``plot`` (the scaling law on sweep records);
- :mod:`.sweep`: ``sweep`` (merge and measure) and ``register-metric``;
- :mod:`.demo`: ``demo`` (the whole method on a pool built offline);
- :mod:`.pool`: ``pool fit``, ``pool predict``, ``pool select``, ``pool plot`` (the pool model:
  any subset's CE, which experts to merge).

Each module's ``register`` adds its subcommands; handlers import what they run only when they
run, so ``--help`` stays fast. A handler returns an exit code. A :class:`~hf_mergelaw.errors.
UserError` or an ``OSError`` is printed as one line and exits with status 2; any other exception
is a bug and keeps its traceback.

Usage::

    hf-mergelaw sweep sweep.yml --fit --plot
    hf-mergelaw fit sweep.jsonl --form joint --by method,domain --bootstrap 200 -o fit.json
    hf-mergelaw predict fit.json --N 72 --k 1-9 --json
    hf-mergelaw plan fit.json --target-loss 0.45 --min-gain 0.002 --N 72
    hf-mergelaw plot sweep.jsonl --fit fit.json -o fig.png
    hf-mergelaw demo -o mergelaw-demo
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import UserError
from . import demo, law, pool, sweep

USER_ERROR_EXIT = 2
COMMAND_GROUPS = (law, sweep, demo, pool)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-mergelaw",
        description="Merging scaling laws for Hugging Face experts: sweep, fit, predict, plan, "
        "plot, demo.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (UserError, OSError) as error:
        print(f"hf-mergelaw {args.command}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
