"""``hf-mergelaw demo``: its options and handler, kept light (torch loads only when it runs).

hf-mergelaw demo -o demo-out          # ~4 min from nothing on 2 CPU cores, ~1.5 min cached
hf-mergelaw demo --quick              # the CI size
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..demo.settings import DEFAULT_MIN_GAIN
from .arguments import count

DEFAULT_OUTPUT = Path("mergelaw-demo")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"output folder for records, fit, plan, figures and report.md (default "
        f"{DEFAULT_OUTPUT}); a re-run resumes it",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced size for CI and smoke tests (6 domains, a tiny model; under a minute); "
        "too small to show the law",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the trained pool is cached (default ~/.cache/hf-mergelaw/demo)",
    )
    parser.add_argument(
        "--threads",
        type=count(1, "--threads"),
        default=None,
        help="torch CPU threads (default: the cores the load average leaves idle)",
    )
    parser.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="the plan's target cross-domain CE (default: 1%% above each method's floor)",
    )
    parser.add_argument(
        "--min-gain",
        type=float,
        default=DEFAULT_MIN_GAIN,
        help="the stop rule's smallest worthwhile gain per added expert, nats "
        f"(default {DEFAULT_MIN_GAIN})",
    )
    parser.add_argument(
        "--subsets",
        type=_subsets,
        default=None,
        help="subsets merged per k: a count, drawn with every expert in equally many (default 8; "
        "6 with --quick), or 'all' (every subset: exact per-k means, about 4x the sweep's time)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _subsets(text: str) -> int | str:
    """A count of subsets per k (at least 2: a spread needs two), or "all"."""
    return text if text == "all" else count(2, "--subsets")(text)


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo; 0 whether or not the science check passes (the report says which)."""
    from ..demo.run import run_demo

    result = run_demo(
        args.output,
        quick=args.quick,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        threads=args.threads,
        target_loss=args.target_loss,
        min_gain=args.min_gain,
        subsets=args.subsets,
    )
    print(result.summary)
    return 0


def register(subparsers: Any) -> None:
    """Add ``demo`` to the ``hf-mergelaw`` parser."""
    parser = subparsers.add_parser(
        "demo",
        help="build a small pool on the CPU, sweep k, fit the law, plan, write figures + report",
        description="End to end on an embedded default: a small Llama base and one expert per "
        "part of the Python standard library, trained locally (nothing downloaded) and cached; "
        "a k-sweep of average and ties_fused; the law fitted in- and cross-domain; a plan; "
        "figures and report.md in the output folder.",
    )
    add_demo_arguments(parser)
    parser.set_defaults(handler=demo_command)
