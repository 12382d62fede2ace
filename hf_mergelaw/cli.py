"""The ``hf-mergelaw`` command line.

Each command family registers its subcommands on the shared parser; a new family adds one
entry to :func:`_registrars`. Handlers return an exit code and raise :class:`CommandError` (or
any :class:`hf_mergelaw.law.LawError`) for problems the user can fix: those are printed to
stderr as one line and exit with status 2, without a traceback.

Usage::

    hf-mergelaw fit sweep.jsonl --form joint --by method,domain --bootstrap 200 -o fit.json
    hf-mergelaw predict fit.json --N 72 --k 1-9 --json
    hf-mergelaw plan fit.json --target-loss 0.45 --min-gain 0.002 --N 72
    hf-mergelaw plot sweep.jsonl --fit fit.json -o fig.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from hf_mergelaw.law.errors import LawError

USER_ERROR_EXIT = 2

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


class CommandError(Exception):
    """A problem with the user's input or files; printed without a traceback."""


def _registrars() -> list[Registrar]:
    from hf_mergelaw import sweep_commands
    from hf_mergelaw.demo import cli as demo_commands
    from hf_mergelaw.law import commands as law_commands

    return [law_commands.register, sweep_commands.register, demo_commands.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-mergelaw",
        description="Merging scaling laws for Hugging Face experts: fit, predict, plan, plot.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (CommandError, LawError, OSError) as exc:
        print(f"hf-mergelaw {args.command}: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
