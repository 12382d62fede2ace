"""Fused merges (triton_ops) versus mergekit's merge_tensors: time, bandwidth and peak extra memory.

Every case feeds the same bf16 inputs (a base and k experts = base + small noise) to

  fused     triton_ops.ties_merge / dare_merge / task_arithmetic, backend "triton" on CUDA and
            "torch" on CPU, the experts passed as one stacked [k, *shape] tensor;
  mergekit  mergekit.merge_methods.api.merge_tensors([base, *experts], method, base_index=0).

Methods: ties (normalize), dare_ties (consensus, L1 rescale), dare_linear (L1 rescale),
task_arithmetic, breadcrumbs and breadcrumbs_ties (gamma 0.01), with weights 1/k, density
--density and mergekit's defaults otherwise.

Load (--load): "quiet" times as the machine is; "busy" starts one other process that keeps one
core busy (a Python spin loop) for the timed calls; "quiet,busy" does both, case by case, so each
row's busy time can be set against its own quiet time in the same run.

Time: one warm-up call (Triton compiles there), then the median. CUDA: the fused call through
triton.testing.do_bench (L2 flushed before each run); mergekit, at seconds per call, the median of
--repeats synchronized calls. CPU: the median wall time of --repeats calls of each, taken in turns
(fused, mergekit, fused, ...) so that both meet the same load on a shared machine; the JSON keeps
every timed call and the 1-minute load average after each case.

Bandwidth: bytes = base + k experts read once + output written once, over the fused time, against
a measured copy (dst.copy_(src) of a large buffer, bytes read + written) on the same device.

Peak extra memory of one call, as a multiple of the output tensor's size (the output counts: an
op that allocates only its output scores 1.0).
  CUDA: torch.cuda.max_memory_allocated() during the call minus memory_allocated() before it.
  CPU: each implementation runs once more in a fresh child process, which builds the inputs, warms
  up, resets the kernel's RSS high-water mark (VmHWM, via /proc/self/clear_refs) and reports its
  growth over the call. The child runs under MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every
  large block on allocation and unmaps it on free, so RSS follows the live allocations instead of
  what the allocator holds on to. (Timing stays in this process, under glibc's defaults.)

delta rel diff: ||fused - mergekit|| / ||mergekit - base|| for ties and task_arithmetic (DARE's
random masks differ by design). For bf16 TIES it is not ~0: many |delta| tie at the trim
threshold, mergekit keeps an arbitrary subset of them and the fused path the lowest indices.

Run from the repository root with the project importable (pip install -e . or PYTHONPATH=.):
  python benchmarks/bench_kernels.py --device cpu --out kernels_cpu.json
  python benchmarks/bench_kernels.py --device cuda --out kernels_cuda.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from mergekit.merge_methods.api import merge_tensors

import triton_ops

METHODS = (
    "ties",
    "dare_ties",
    "dare_linear",
    "task_arithmetic",
    "breadcrumbs",
    "breadcrumbs_ties",
)
LOADS = ("quiet", "busy")
GAMMA = 0.01
DEFAULT_SHAPES = {
    "cuda": "4096x4096,4096x14336,14336x4096,152064x3584",
    "cpu": "1024x4096,4096x4096",
}
DEFAULT_K = {"cuda": "2,4,8", "cpu": "8"}
COPY_BYTES = {"cuda": 2 << 30, "cpu": 256 << 20}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
DTYPE = torch.bfloat16


@dataclass
class Row:
    method: str
    load: str
    shape: str
    k: int
    fused_ms: float
    mergekit_ms: float | None
    speedup: float | None
    fused_gbps: float
    roofline_fraction: float
    fused_extra_mem_x_out: float
    mergekit_extra_mem_x_out: float | None
    delta_rel_diff: float | None
    fused_times_ms: list[float]
    mergekit_times_ms: list[float] | None
    load_average: float
    note: str = ""
    target: str = ""
    slowdown_vs_quiet: float | None = None


# ---------------------------------------------------------------------------------------------
# The two implementations


def fused_merge(
    method: str, base: torch.Tensor, experts: torch.Tensor, density: float
) -> torch.Tensor:
    k = experts.shape[0]
    weights = [1.0 / k] * k
    densities = [density] * k
    backend = "triton" if base.is_cuda else "torch"
    if method == "ties":
        return triton_ops.ties_merge(
            base, experts, weights=weights, densities=densities, backend=backend
        )
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        return triton_ops.breadcrumbs_merge(
            base,
            experts,
            weights=weights,
            densities=densities,
            gammas=[GAMMA] * k,
            consensus=method == "breadcrumbs_ties",
            backend=backend,
        )
    if method in ("dare_ties", "dare_linear"):
        return triton_ops.dare_merge(
            base,
            experts,
            weights=weights,
            densities=densities,
            consensus=method == "dare_ties",
            rescale="l1",
            backend=backend,
        )
    return triton_ops.task_arithmetic(base, experts, weights=weights, backend=backend)


def mergekit_merge(
    method: str, base: torch.Tensor, experts: torch.Tensor, density: float
) -> torch.Tensor:
    k = experts.shape[0]
    parameters: dict[str, list[float]] = {"weight": [1.0 / k] * k}
    if method != "task_arithmetic":
        parameters["density"] = [density] * k
    if method.startswith("breadcrumbs"):
        parameters["gamma"] = [GAMMA] * k
    return merge_tensors([base, *experts], method, parameters=parameters, base_index=0)


IMPLEMENTATIONS = {"fused": fused_merge, "mergekit": mergekit_merge}


def make_inputs(shape: tuple[int, int], k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A base of scale 0.02 and k experts = base + noise of scale 1e-3, without temporaries."""
    torch.manual_seed(0)
    base = torch.randn(shape, dtype=DTYPE, device=device).mul_(0.02)
    experts = torch.randn((k, *shape), dtype=DTYPE, device=device).mul_(1e-3).add_(base)
    return base, experts


# ---------------------------------------------------------------------------------------------
# Time


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_fast(fn: Callable[[], object], device: str, repeats: int) -> list[float]:
    """Seconds per call of a cheap fn: CUDA, do_bench's median (many runs, L2 flushed before
    each); CPU, `repeats` calls."""
    if device == "cuda":
        return [triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3]
    return [time_call(fn, device) for _ in range(repeats)]


def timed_calls(
    fns: dict[str, Callable[[], object]], device: str, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each implementation (already warmed up).

    CUDA: the fused call through bench_fast, mergekit `repeats` times. CPU: each `repeats` times,
    in turns (fused, mergekit, fused, ...), so that both meet the same load from other processes.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    if device == "cuda" and "fused" in fns:
        times["fused"] = bench_fast(fns["fused"], device, repeats)
        fns = {name: fn for name, fn in fns.items() if name != "fused"}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


class BusyCore:
    """One other process keeping one core busy while the block runs (--load busy)."""

    def __enter__(self) -> BusyCore:
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # let it reach the scheduler's steady state
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.kill()
        self.process.wait()


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(COPY_BYTES[device] // 2, dtype=DTYPE, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(bench_fast(lambda: dst.copy_(src), device, repeats))
    return 2 * COPY_BYTES[device] / seconds


# ---------------------------------------------------------------------------------------------
# Memory


def cuda_peak_extra_bytes(fn: Callable[[], torch.Tensor]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - before


def read_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_rss_growth(fn: Callable[[], torch.Tensor]) -> int:
    """Growth of the RSS high-water mark over one call (Linux; run under MALLOC_ENV)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    before = read_status_bytes("VmRSS")
    out = fn()
    del out
    return read_status_bytes("VmHWM") - before


def cpu_peak_extra_bytes(
    implementation: str, method: str, shape: str, k: int, density: float
) -> int:
    """Run the memory probe (below) in a fresh process and return what it measured."""
    probe = f"{implementation}:{method}:{shape}:{k}:{density}"
    threads = str(torch.get_num_threads())
    completed = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-probe", probe, "--threads", threads],
        env={**os.environ, **MALLOC_ENV},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(completed.stdout.split()[-1])


def memory_probe(probe: str) -> None:
    """Child process: build the inputs, warm up, print the call's peak RSS growth in bytes."""
    implementation, method, shape, k, density = probe.split(":")
    base, experts = make_inputs(parse_shape(shape), int(k), "cpu")
    fn = functools.partial(IMPLEMENTATIONS[implementation], method, base, experts, float(density))
    fn()
    print(cpu_peak_rss_growth(fn))


# ---------------------------------------------------------------------------------------------
# One case


def peak_extra_bytes(
    implementation: str,
    fn: Callable[[], torch.Tensor],
    method: str,
    base: torch.Tensor,
    k: int,
    density: float,
) -> int:
    if base.is_cuda:
        return cuda_peak_extra_bytes(fn)
    shape = "x".join(map(str, base.shape))
    return cpu_peak_extra_bytes(implementation, method, shape, k, density)


def delta_rel_diff(fused: torch.Tensor, reference: torch.Tensor, base: torch.Tensor) -> float:
    merged_delta = reference.float() - base.float()
    difference = fused.float() - reference.float()
    return (difference.norm() / merged_delta.norm().clamp_min(1e-30)).item()


CPU_QUIET_SPEEDUP = {"ties": 4.0, "dare_ties": 1.5, "task_arithmetic": 1.5}


def target_check(row: Row, device: str) -> str:
    """The issue's targets for this row: "met", "missed: ...", or "-" where none applies."""
    checks: list[tuple[str, bool]] = []
    if device == "cpu" and row.mergekit_extra_mem_x_out is not None:
        speedup = row.speedup or 0.0
        if row.load == "quiet" and row.method in CPU_QUIET_SPEEDUP:
            floor = CPU_QUIET_SPEEDUP[row.method]
            memory_ratio = row.fused_extra_mem_x_out / row.mergekit_extra_mem_x_out
            checks = [
                (f"speedup >= {floor:g}", speedup >= floor),
                ("memory <= 0.5x mergekit", memory_ratio <= 0.5),
            ]
        if row.load == "busy":
            checks = [("speedup >= 1.5", speedup >= 1.5)]
            if row.slowdown_vs_quiet is not None:
                checks.append(("<= 1.5x own quiet time", row.slowdown_vs_quiet <= 1.5))
    if device == "cuda":
        floor = 0.5 if row.method == "ties" else 0.6
        checks = [
            (f"roofline >= {floor:.0%}", row.roofline_fraction >= floor),
            ("memory <= 1.1x out", row.fused_extra_mem_x_out <= 1.1),
        ]
        if row.method == "ties":
            checks.append(("speedup >= 10", row.speedup is not None and row.speedup >= 10))
    if not checks:
        return "-"
    missed = [name for name, ok in checks if not ok]
    return "missed: " + ", ".join(missed) if missed else "met"


def run_case(
    method: str,
    base: torch.Tensor,
    experts: torch.Tensor,
    args: argparse.Namespace,
    copy_bytes_per_s: float,
    load: str = "quiet",
) -> Row:
    k = experts.shape[0]
    out_bytes = base.numel() * base.element_size()
    bytes_moved = (k + 2) * out_bytes

    fns: dict[str, Callable[[], torch.Tensor]] = {}
    outputs: dict[str, torch.Tensor] = {}
    extra: dict[str, int] = {}
    note = "mergekit not run" if args.no_mergekit else ""
    for name in ("fused",) if args.no_mergekit else ("fused", "mergekit"):
        fn = functools.partial(IMPLEMENTATIONS[name], method, base, experts, args.density)
        try:
            outputs[name] = fn()  # the warm-up (Triton compiles here), kept for the comparison
            extra[name] = peak_extra_bytes(name, fn, method, base, k, args.density)
        except torch.OutOfMemoryError:
            note = f"{name} ran out of memory"
            outputs.pop(name, None)
            torch.cuda.empty_cache()
            continue
        fns[name] = fn
    if "fused" not in fns:
        raise RuntimeError(f"{method} {tuple(base.shape)} k={k}: {note}")
    if load == "busy":
        with BusyCore():
            times = timed_calls(fns, args.device, args.repeats)
            load_average = os.getloadavg()[0]
    else:
        times = timed_calls(fns, args.device, args.repeats)
        load_average = os.getloadavg()[0]

    diff = None
    if "mergekit" in outputs and not method.startswith("dare"):
        diff = delta_rel_diff(outputs["fused"], outputs["mergekit"], base)
    del outputs

    fused_seconds = statistics.median(times["fused"])
    has_mergekit = "mergekit" in fns
    mergekit_seconds = statistics.median(times["mergekit"]) if has_mergekit else None
    row = Row(
        method=method,
        load=load,
        shape="x".join(map(str, base.shape)),
        k=k,
        fused_ms=fused_seconds * 1e3,
        mergekit_ms=mergekit_seconds * 1e3 if has_mergekit else None,
        speedup=mergekit_seconds / fused_seconds if has_mergekit else None,
        fused_gbps=bytes_moved / fused_seconds / 1e9,
        roofline_fraction=bytes_moved / fused_seconds / copy_bytes_per_s,
        fused_extra_mem_x_out=extra["fused"] / out_bytes,
        mergekit_extra_mem_x_out=extra["mergekit"] / out_bytes if has_mergekit else None,
        delta_rel_diff=diff,
        fused_times_ms=[t * 1e3 for t in times["fused"]],
        mergekit_times_ms=[t * 1e3 for t in times["mergekit"]] if has_mergekit else None,
        load_average=load_average,
        note=note,
    )
    return row


# ---------------------------------------------------------------------------------------------
# Reporting


def describe_device(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu: {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def memory_method(device: str) -> str:
    if device == "cuda":
        return "torch.cuda.max_memory_allocated() during one call minus memory_allocated() before"
    return (
        "peak RSS growth of one call in a fresh child process (VmHWM reset through "
        f"/proc/self/clear_refs after a warm-up call), glibc {MALLOC_ENV}"
    )


def format_number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(header: dict[str, object], rows: list[Row]) -> str:
    lines = [f"- {key}: {value}" for key, value in header.items()]
    lines += [
        "",
        "| method | load | shape | k | fused ms | mergekit ms | speedup | fused GB/s | % of copy "
        "| fused extra mem (x out) | mergekit extra mem (x out) | delta rel diff "
        "| fused busy / quiet | load avg | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        cells = [
            row.method,
            row.load,
            row.shape,
            str(row.k),
            format_number(row.fused_ms, ".3f"),
            row.note or format_number(row.mergekit_ms, ".3f"),
            format_number(row.speedup, ".1f"),
            format_number(row.fused_gbps, ".1f"),
            format_number(100 * row.roofline_fraction, ".1f"),
            format_number(row.fused_extra_mem_x_out, ".2f"),
            format_number(row.mergekit_extra_mem_x_out, ".2f"),
            format_number(row.delta_rel_diff, ".1e"),
            format_number(row.slowdown_vs_quiet, ".2f"),
            format_number(row.load_average, ".2f"),
            row.target,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, header: dict[str, object], rows: list[Row]) -> None:
    with open(path, "w") as out:
        json.dump({**header, "rows": [asdict(row) for row in rows]}, out, indent=2)
        out.write("\n")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--shapes", help="comma-separated RxC (default: per device, see source)")
    parser.add_argument("--k", help="comma-separated expert counts (default: cuda 2,4,8; cpu 8)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (CPU; mergekit)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="first shape, largest k, 1 repeat")
    parser.add_argument("--no-mergekit", action="store_true", help="time the fused path only")
    parser.add_argument("--load", default="quiet", help="quiet, busy or quiet,busy (see above)")
    parser.add_argument("--out", help="write the results as JSON here (rewritten after each case)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.shapes = [parse_shape(s) for s in (args.shapes or DEFAULT_SHAPES[args.device]).split(",")]
    args.k = [int(k) for k in (args.k or DEFAULT_K[args.device]).split(",")]
    args.methods = args.methods.split(",")
    args.load = args.load.split(",")
    if set(args.load) - set(LOADS):
        parser.error(f"--load {args.load}: choose from {', '.join(LOADS)}")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.quick:
        args.shapes, args.k, args.repeats = args.shapes[:1], [max(args.k)], 1
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        with torch.no_grad():
            memory_probe(args.memory_probe)
        return
    copy_bytes_per_s = copy_bandwidth(args.device, args.repeats)
    header: dict[str, object] = {
        "device": describe_device(args.device),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.orig_argv),
        "versions": f"torch {torch.__version__}, triton {triton.__version__}, "
        f"mergekit {importlib.metadata.version('mergekit')}",
        "dtype": "bfloat16",
        "density": args.density,
        "copy_bandwidth_GBps": round(copy_bytes_per_s / 1e9, 1),
        "memory_method": memory_method(args.device),
        "load_average_at_start": Path("/proc/loadavg").read_text().strip(),
        "loads": ",".join(args.load),
    }
    print("\n".join(f"{key}: {value}" for key, value in header.items()), flush=True)

    rows: list[Row] = []
    with torch.no_grad():
        for shape in args.shapes:
            for k in args.k:
                base, experts = make_inputs(shape, k, args.device)
                for method in args.methods:
                    case_rows = [
                        run_case(method, base, experts, args, copy_bytes_per_s, load)
                        for load in args.load
                    ]
                    quiet = next((r for r in case_rows if r.load == "quiet"), None)
                    for row in case_rows:
                        if quiet is not None and row.load == "busy":
                            row.slowdown_vs_quiet = row.fused_ms / quiet.fused_ms
                        row.target = target_check(row, args.device)
                        rows.append(row)
                        print(json.dumps(asdict(row)), flush=True)
                    if args.out:
                        write_json(args.out, header, rows)
                del base, experts
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    print()
    print(markdown(header, rows))


if __name__ == "__main__":
    main()
