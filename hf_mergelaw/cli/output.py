"""How commands print: a human-readable table, or ``--json``; ``-o`` writes the JSON atomically."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Any

from ..files import json_text, write_atomic


def add_json_options(parser: argparse.ArgumentParser, written: str = "the JSON") -> None:
    """``-o`` (write ``written`` there, atomically) and ``--json`` (print it instead of a table)."""
    parser.add_argument("-o", "--output", help=f"write {written} here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def emit(args: argparse.Namespace, payload: Mapping[str, Any], table: str) -> None:
    text = json_text(payload)
    if getattr(args, "output", None):
        write_atomic(args.output, text)
    print(text if args.json else table, end="" if args.json else "\n")


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def group_label(group: Mapping[str, Any]) -> str:
    parts = (f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in group.items())
    return ",".join(parts) or "all"
