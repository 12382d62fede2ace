"""`hf-mergelaw sweep` and `hf-mergelaw register-metric`.

hf-mergelaw sweep sweep.yml --fit --plot
accelerate launch -m hf_mergelaw sweep sweep.yml          # several GPUs share one sweep
hf-mergelaw register-metric                                # evaluate.load("merge_scaling")
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SWEEP_EPILOG = """\
The YAML names the base model, the experts (checkpoints or PEFT adapter directories), the
held-out data, the methods and k; see hf_mergelaw.sweep_config. Records are appended to
`output` as they are measured, and a re-run skips those already there, so an interrupted sweep
resumes. <records>.provenance.json says what they were measured with (base, experts, eval data,
dtype, device, N, version); a re-run with any of those changed stops and says which. With
`sampling: {strategy: adaptive, budget: N}` each method starts from a small balanced design and
then merges, round by round, what the pool model fitted to its records says settles the best
subset of each size and the pool curve, until N merges or the answer is settled; the summary says
why each method stopped, and a re-run continues from the records. With --fit
the per-size law is fitted per method and domain (<records>.fit.json next to the records); with
--plot the paper-style figure is written next to them (<records>.law.png).
"""


def register(subparsers: Any) -> None:
    sweep = subparsers.add_parser(
        "sweep",
        help="merge many subsets of k experts in memory and measure cross-entropy",
        description="Run a k-sweep described by a YAML file.",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("config", metavar="SWEEP.yml")
    sweep.add_argument("--fit", action="store_true", help="fit the law when the sweep ends")
    sweep.add_argument("--plot", action="store_true", help="write the sweep figure (PNG)")
    sweep.add_argument(
        "--restart",
        action="store_true",
        help="move the records already in `output` aside (<name>.replaced-<time>.jsonl) and "
        "start over; needed when they were measured with another configuration",
    )
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.add_argument("--json", action="store_true", help="print a JSON summary")
    sweep.set_defaults(handler=run_sweep_command)

    metric = subparsers.add_parser(
        "register-metric",
        help="make evaluate.load('merge_scaling') work offline in this environment",
        description="Write the merge_scaling metric shim into evaluate's modules cache.",
    )
    metric.add_argument("--modules-cache", help="HF modules cache (default: evaluate's own)")
    metric.add_argument("--json", action="store_true", help="print JSON")
    metric.set_defaults(handler=_register_metric)


def run_sweep_command(args: argparse.Namespace) -> int:
    from ..sweep import run_sweep
    from ..sweep_config import load_sweep_config

    config = load_sweep_config(args.config)
    summary = run_sweep(config, progress=not args.no_progress, restart=args.restart)
    outputs: dict[str, Any] = {
        "records": str(summary.output),
        "planned": summary.planned,
        "written": summary.written,
        "skipped": summary.skipped,
        "moved_aside": None if summary.moved_aside is None else str(summary.moved_aside),
        "stopped": summary.stopped,
    }
    if args.fit or args.plot:
        outputs.update(_fit_and_plot(summary.output, fit=args.fit, plot=args.plot))
    if args.json:
        print(json.dumps(outputs, indent=2))
    else:
        print(
            f"{summary.written} merged models measured, {summary.skipped} already recorded: "
            f"{summary.output}"
        )
        if summary.moved_aside is not None:
            print(f"earlier records moved to {summary.moved_aside}")
        for method, reason in summary.stopped.items():
            print(f"{method}: stopped, {reason}")
        for key in ("fit", "figure"):
            if key in outputs:
                print(f"{key}: {outputs[key]}")
    return 0


def _fit_and_plot(records_path: Path, *, fit: bool, plot: bool) -> dict[str, str]:
    """Fit per method and domain (in-domain curves and the cross-domain macro curve)."""
    from ..law import fit_sweep, load_records
    from ..law.plotting import plot_sweep
    from ..record_schema import records_by_domain
    from ..record_store import RecordStore

    records = load_records(records_by_domain(list(RecordStore(records_path))))
    by = ("method", "domain")
    report = fit_sweep(records, "per-size", by=by)
    written = {}
    if fit:
        fit_path = records_path.with_suffix(".fit.json")
        report.save(fit_path)
        written["fit"] = str(fit_path)
    if plot:
        figure_path = records_path.with_suffix(".law.png")
        plot_sweep(records, report.fits, by=by, path=figure_path)
        written["figure"] = str(figure_path)
    return written


def _register_metric(args: argparse.Namespace) -> int:
    from ..metric_registration import register_metric_command

    return register_metric_command(args)
