"""End-to-end `mergekit-yaml`: stock ties / dare_ties versus ties_fused / dare_ties_fused.

A ~100M-parameter Llama (vocab 8192, hidden 768, MLP 2048, 12 layers, untied head) and k = 8
experts (base + small noise per tensor) are built once, in bf16, into --cache-dir. Then:

  end to end   each method runs as `python -m mergekit_plugins CONFIG OUT --no-copy-tokenizer
               --no-write-model-card --quiet [--cuda]`, i.e. mergekit-yaml's own `main` with the
               fused methods registered (what the wheel's .pth hook does on `mergekit-yaml`; this
               way the benchmark also runs from a checkout). Wall time and the child's peak RSS
               and CPU time (user + system, `os.wait4` rusage) per run. CPU time is the steadier
               number on a shared machine: other load stretches wall time, not work done.
  start-up     the same interpreter importing mergekit's CLI and the plugin, nothing else.
  stages       in this process, over every tensor of the same checkpoints: read (safetensors
               `get_tensor` of the base and the k experts, moved to the device), merge
               (`mergekit.merge_methods.api.merge_tensors`, synchronised on CUDA) and write
               (`safetensors.torch.save_file` of all merged tensors). The kernel only speeds up
               the merge stage; `merge share` is that stage over the end-to-end wall time. The
               merge stage also records this process's CPU time (`time.process_time`).
  --repeats    rounds of both, methods interleaved; each number is its minimum over rounds.

Config: `dtype: bfloat16`, weight 1/k, density 0.5, mergekit defaults otherwise (seed 0 for the
fused DARE). The page cache is warm (the checkpoints were just built or read).

Run from the repository root with the project importable (pip install -e . or PYTHONPATH=.):
  python benchmarks/bench_mergekit.py --out mergekit_cpu.json           # CPU: ~10 min, 2 cores
  python benchmarks/bench_mergekit.py --cuda --out mergekit_cuda.json   # mergekit --cuda, Triton
  python benchmarks/bench_mergekit.py --quick                           # 2 layers, ties only
  python benchmarks/bench_mergekit.py --threads 1 --repeats 2           # steadier on a busy host
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from mergekit.merge_methods.api import merge_tensors
from safetensors import safe_open
from safetensors.torch import save_file

import mergekit_plugins  # noqa: F401  (registers the fused methods)

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ties", "ties_fused", "dare_ties", "dare_ties_fused")
DENSITY = 0.5
ARCHITECTURE = dict(
    vocab_size=8192,
    hidden_size=768,
    intermediate_size=2048,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Checkpoints:
    base: Path
    experts: tuple[Path, ...]
    parameters: int


@dataclass
class CliRun:
    method: str
    round: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    load_avg_before: float


@dataclass
class Stages:
    method: str
    read_s: float
    merge_s: float
    merge_cpu_s: float
    write_s: float
    cuda_peak_mb: float | None


def build_checkpoints(cache_dir: Path, layers: int, experts: int) -> Checkpoints:
    """Build (once) a random bf16 Llama base and `experts` noisy copies; reuse them afterwards."""
    from hf_mergelaw.testing import save_noisy_experts, tiny_llama_config

    root = cache_dir / f"llama_{layers}layers_{experts}experts"
    spec = {"architecture": ARCHITECTURE, "layers": layers, "experts": experts, "seed": 0}
    paths = [root / "base", *(root / f"expert{i}" for i in range(experts))]
    spec_file = root / "spec.json"
    if not (spec_file.exists() and json.loads(spec_file.read_text()) == spec):
        config = tiny_llama_config(num_hidden_layers=layers, **ARCHITECTURE)
        save_noisy_experts(root, config, experts, perturb=_fine_tune_like, dtype=torch.bfloat16)
        spec_file.write_text(json.dumps(spec))
    parameters = sum(_tensor_numel(shard) for shard in sorted(paths[0].glob("*.safetensors")))
    return Checkpoints(base=paths[0], experts=tuple(paths[1:]), parameters=parameters)


def _fine_tune_like(base: torch.Tensor) -> torch.Tensor:
    # Deltas a tenth of the weights' spread; norm weights (all ones) get a small absolute one.
    scale = max(0.1 * base.float().std().item(), 1e-3)
    return (base.float() + scale * torch.randn(base.shape)).to(base.dtype)


def _tensor_numel(shard: Path) -> int:
    with safe_open(shard, "pt") as handle:
        names = handle.keys()  # a safe_open handle is not iterable
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in names)


def merge_config(method: str, models: Checkpoints) -> dict:
    k = len(models.experts)
    return {
        "merge_method": method,
        "base_model": str(models.base),
        "models": [
            {"model": str(path), "parameters": {"weight": 1 / k, "density": DENSITY}}
            for path in models.experts
        ],
        "dtype": "bfloat16",
    }


def cli_command(config_path: Path, out: Path, cuda: bool, threads: int | None) -> list[str]:
    flags = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet", *(["--cuda"] * cuda)]
    if threads is not None:
        flags += ["--num-threads", str(threads)]
    return [sys.executable, "-m", "mergekit_plugins", str(config_path), str(out), *flags]


def run_cli(
    method: str, models: Checkpoints, work: Path, args: argparse.Namespace, round_: int
) -> CliRun:
    """One end-to-end merge in a child process: wall time and the child's peak RSS."""
    run_dir = work / f"{method}_{round_}"
    run_dir.mkdir()
    config_path = run_dir / "config.yml"
    config_path.write_text(yaml.safe_dump(merge_config(method, models)))
    load = os.getloadavg()[0]
    with open(run_dir / "log.txt", "w") as log:
        start = time.perf_counter()
        child = subprocess.Popen(
            cli_command(config_path, run_dir / "merged", args.cuda, args.threads),
            cwd=REPO,
            env=_child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # wait4, unlike RUSAGE_CHILDREN, gives this child's own high-water mark.
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{method} failed; see {run_dir / 'log.txt'}")
    cpu = usage.ru_utime + usage.ru_stime
    return CliRun(method, round_, wall, cpu, usage.ru_maxrss / 1024, load)


def _child_env() -> dict[str, str]:
    # The checkout must win over any installed copy; the Hub must not be asked about local paths.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")


def startup_seconds(repeats: int) -> float:
    """What every end-to-end run pays before reading a tensor: importing the CLI and plugin."""
    probe = "import mergekit.scripts.run_yaml, mergekit_plugins"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=_child_env(), check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def time_stages(method: str, models: Checkpoints, work: Path, device: str) -> Stages:
    """Read, merge and write every tensor in this process, timing each stage separately."""
    k = len(models.experts)
    parameters = {"weight": [1 / k] * k, "density": [DENSITY] * k}
    shards = [_open_model(path) for path in (models.base, *models.experts)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    read = merge = merge_cpu = 0.0
    merged = {}
    for name in shards[0]:
        start = time.perf_counter()
        # copy=True: safetensors maps the file lazily, and a read must land in memory.
        tensors = [shard[name].get_tensor(name).to(device, copy=True) for shard in shards]
        _synchronize(device)
        middle, middle_cpu = time.perf_counter(), time.process_time()
        result = merge_tensors(tensors, method, parameters=parameters, base_index=0, name=name)
        _synchronize(device)
        merge += time.perf_counter() - middle
        merge_cpu += time.process_time() - middle_cpu
        merged[name] = result.cpu()
        read += middle - start
    start = time.perf_counter()
    save_file(merged, str(work / f"{method}_stages.safetensors"))
    write = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return Stages(method, read, merge, merge_cpu, write, peak)


def _open_model(path: Path) -> dict[str, object]:
    """Tensor name -> open safetensors handle of the shard holding it."""
    by_name = {}
    for shard in sorted(path.glob("*.safetensors")):
        handle = safe_open(shard, "pt")
        by_name.update(dict.fromkeys(handle.keys(), handle))
    return by_name


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def summary_rows(runs: Sequence[CliRun], stages: Sequence[Stages]) -> list[dict[str, object]]:
    """Per method: best wall time, peak RSS, stages, merge share, speedups over the stock method."""
    best = {m: min(r.wall_s for r in runs if r.method == m) for m in {r.method for r in runs}}
    best_cpu = {m: min(r.cpu_s for r in runs if r.method == m) for m in best}
    stage_of = {m: _fastest_stages([s for s in stages if s.method == m]) for m in best}
    rows = []
    for method in sorted(best, key=METHODS.index):
        stage = stage_of[method]
        stock = method.removesuffix("_fused")
        row = {
            "method": method,
            "e2e_s": best[method],
            "e2e_median_s": statistics.median(r.wall_s for r in runs if r.method == method),
            "e2e_cpu_s": best_cpu[method],
            "peak_rss_mb": max(r.peak_rss_mb for r in runs if r.method == method),
            "read_s": stage.read_s,
            "merge_s": stage.merge_s,
            "merge_cpu_s": stage.merge_cpu_s,
            "write_s": stage.write_s,
            "merge_share": stage.merge_s / best[method],
        }
        if stock != method and stock in best:
            row["e2e_speedup"] = best[stock] / best[method]
            row["merge_speedup"] = stage_of[stock].merge_s / stage.merge_s
            row["e2e_cpu_speedup"] = best_cpu[stock] / best_cpu[method]
            row["merge_cpu_speedup"] = stage_of[stock].merge_cpu_s / stage.merge_cpu_s
        rows.append(row)
    return rows


def _fastest_stages(repeats: Sequence[Stages]) -> Stages:
    """Each stage's minimum over repeats: other load on the machine only ever adds time."""
    return Stages(
        method=repeats[0].method,
        read_s=min(s.read_s for s in repeats),
        merge_s=min(s.merge_s for s in repeats),
        merge_cpu_s=min(s.merge_cpu_s for s in repeats),
        write_s=min(s.write_s for s in repeats),
        cuda_peak_mb=repeats[0].cuda_peak_mb,
    )


def markdown(header: dict[str, object], rows: Sequence[dict[str, object]]) -> str:
    lines = [f"- {key}: {value}" for key, value in header.items()]
    columns = [
        "method",
        "e2e_s",
        "e2e_median_s",
        "e2e_cpu_s",
        "peak_rss_mb",
        "read_s",
        "merge_s",
        "merge_cpu_s",
        "write_s",
        "merge_share",
        "e2e_speedup",
        "merge_speedup",
        "e2e_cpu_speedup",
        "merge_cpu_speedup",
    ]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(column)) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def describe_machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} x {model}, torch threads {torch.get_num_threads()}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="mergekit --cuda; merge stage on GPU")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--layers", type=int, default=12, help="12: ~100M parameters")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every measurement (min)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "hf-mergelaw"
        / "bench_mergekit",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads here and mergekit's --num-threads (default: torch's default)",
    )
    parser.add_argument("--quick", action="store_true", help="--layers 2 --methods ties,ties_fused")
    parser.add_argument("--out", type=Path, help="write the JSON record here")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.methods = 2, "ties,ties_fused"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.cuda else "cpu"
    methods = args.methods.split(",")
    models = build_checkpoints(args.cache_dir, args.layers, args.experts)
    header = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": describe_machine(device),
        "versions": ", ".join(
            f"{name} {importlib.metadata.version(name)}"
            for name in ("torch", "triton", "transformers", "mergekit")
        ),
        "model": f"Llama {args.layers} layers, {models.parameters / 1e6:.1f}M parameters, bf16",
        "experts": len(models.experts),
        "startup_s": round(startup_seconds(repeats=2), 2),
    }
    runs, stages = [], []
    with tempfile.TemporaryDirectory(prefix="bench_mergekit_") as tmp:
        work = Path(tmp)
        for round_ in range(args.repeats):
            for method in methods:
                run = run_cli(method, models, work, args, round_)
                print(json.dumps(asdict(run)), flush=True)
                runs.append(run)
        for _ in range(args.repeats):
            for method in methods:
                stage = time_stages(method, models, work, device)
                print(json.dumps(asdict(stage)), flush=True)
                stages.append(stage)
    rows = summary_rows(runs, stages)
    if args.out:
        record = {
            "header": header,
            "runs": [asdict(r) for r in runs],
            "stages": [asdict(s) for s in stages],
            "summary": rows,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(header, rows))


if __name__ == "__main__":
    main()
