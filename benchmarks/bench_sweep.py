"""Merged-and-evaluated models per minute: hf-mergelaw's sweep versus the paper's pipeline.

Three pipelines merge the same subsets of the same pool with TIES and evaluate each merged model
on the same held-out sequences with the same cross-entropy code, so only the merging differs:

  sweep        hf_mergelaw.sweep_pool: experts loaded once, fused kernels merge into one model.
  paper        the paper's workflow: `mergekit-yaml` writes each merged model to disk, which is
               then loaded with from_pretrained and evaluated.
  mergekit-api an in-process loop: state dicts loaded once, mergekit's merge_state_dicts per
               subset, load_state_dict into one model, evaluate.

The pool (a base plus experts = base + Gaussian deltas, random init) and the data are built
locally. Presets:
  cpu         6 experts of a ~7M-parameter Llama, 64 sequences of 128 tokens (issue target: the
              sweep >= 10x paper and >= 3x mergekit-api).
  gpu-target  9 experts of a ~0.5B Llama, all 511 subsets, 200 sequences of up to 2048 tokens
              (issue target: under 30 minutes in total); the slower pipelines run on a few subsets.

Run from the repository root with the project installed:
  python benchmarks/bench_sweep.py --preset cpu --out benchmarks/results/sweep_cpu.json
  python benchmarks/bench_sweep.py --preset gpu-target --device cuda --out sweep_cuda.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from hf_mergelaw.cross_entropy import EvalSet, cross_entropy
from hf_mergelaw.experts import ExpertPool
from hf_mergelaw.sweep import plan_jobs, sweep_pool
from hf_mergelaw.sweep_config import SamplingConfig
from hf_mergelaw.sweep_methods import MethodSpec
from hf_mergelaw.testing import gaussian_noise, save_noisy_experts, tiny_llama_config

DENSITY = 0.5
METHOD = MethodSpec.from_config({"name": "ties", "density": DENSITY})
PRESETS = {
    "cpu": dict(
        hidden=256, intermediate=688, layers=4, heads=4, vocab=8000, experts=6,
        sequences=64, length=128, subsets=12, slow_subsets=4,
    ),
    "gpu-target": dict(
        hidden=896, intermediate=4864, layers=24, heads=14, vocab=151936, experts=9,
        sequences=200, length=2048, subsets=511, slow_subsets=3,
    ),
}  # fmt: skip


@dataclass
class Measurement:
    pipeline: str
    models: int
    seconds: float

    @property
    def models_per_minute(self) -> float:
        return 60.0 * self.models / self.seconds


def build_pool(root: Path, preset: dict, dtype: torch.dtype) -> tuple[Path, dict[str, Path]]:
    config = tiny_llama_config(
        vocab_size=preset["vocab"],
        hidden_size=preset["hidden"],
        intermediate_size=preset["intermediate"],
        num_hidden_layers=preset["layers"],
        num_attention_heads=preset["heads"],
    )
    return save_noisy_experts(
        root, config, preset["experts"], perturb=gaussian_noise(0.01), dtype=dtype
    )


def random_eval_set(preset: dict) -> EvalSet:
    """Token sequences of random lengths: the merge pipelines, not the data, are compared."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(preset["length"] // 2, preset["length"] + 1, (preset["sequences"],))
    sequences = sorted(
        (torch.randint(0, preset["vocab"], (int(n),), generator=generator) for n in lengths),
        key=len,
        reverse=True,
    )
    return EvalSet(input_ids=tuple(sequences), labels=tuple(sequences), domains=None)


def sweep_plan(names: list[str], subsets: int) -> tuple[list[int], SamplingConfig]:
    """The sweep's ks and sampling: subsets spread over k = 2, M/2+1 and M."""
    ks = sorted({2, len(names) // 2 + 1, len(names)})
    per_k = max(1, subsets // len(ks))
    return ks, SamplingConfig(strategy="uniform", per_k=per_k)


def time_sweep(pool: ExpertPool, eval_set: EvalSet, subsets: int, out: Path) -> Measurement:
    ks, sampling = sweep_plan(pool.names, subsets)
    start = time.perf_counter()
    summary = sweep_pool(
        pool, eval_set, methods=[METHOD], ks=ks, sampling=sampling, output=out, progress=False
    )
    return Measurement("sweep", summary.written, time.perf_counter() - start)


def time_mergekit_api(
    base: Path, experts: dict[str, Path], eval_set: EvalSet, subsets: list[list[str]], device: str
) -> Measurement:
    from mergekit.merge_methods.api import merge_state_dicts

    model = AutoModelForCausalLM.from_pretrained(base).to(device)
    state = {"base": _load(base, device)} | {n: _load(p, device) for n, p in experts.items()}
    start = time.perf_counter()
    for subset in subsets:
        merged = merge_state_dicts(
            {name: state[name] for name in ["base", *subset]}, "ties", base="base",
            parameters={"weight": 1 / len(subset), "density": DENSITY},
        )  # fmt: skip
        model.load_state_dict(merged, strict=False)
        cross_entropy(model, eval_set, device=device)
    return Measurement("mergekit-api", len(subsets), time.perf_counter() - start)


def time_paper_pipeline(
    base: Path, experts: dict[str, Path], eval_set: EvalSet, subsets: list[list[str]],
    device: str, work: Path,
) -> Measurement:  # fmt: skip
    start = time.perf_counter()
    for index, subset in enumerate(subsets):
        config = {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(experts[name]),
                        "parameters": {"weight": 1 / len(subset), "density": DENSITY}}
                       for name in subset],
            "dtype": "bfloat16",
        }  # fmt: skip
        config_path = work / f"paper{index}.yml"
        config_path.write_text(yaml.safe_dump(config))
        out = work / f"merged{index}"
        command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config_path), str(out)]
        if device == "cuda":
            command.append("--cuda")
        subprocess.run(command, check=True, capture_output=True)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device)
        cross_entropy(model, eval_set, device=device)
    return Measurement("paper", len(subsets), time.perf_counter() - start)


def _load(path: Path, device: str) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return {name: t.to(device) for name, t in model.state_dict().items()}


def _timed(label: str, run: Callable[[], Measurement]) -> Measurement:
    print(f"running {label} ...", flush=True)
    result = run()
    print(f"  {result.models} models in {result.seconds:.1f} s: "
          f"{result.models_per_minute:.1f} models/min", flush=True)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"building a pool of {preset['experts']} experts ...", flush=True)
        base, experts = build_pool(work, preset, torch.bfloat16)
        eval_set = random_eval_set(preset)
        pool = ExpertPool(base, experts, device=args.device, dtype=torch.bfloat16)
        names = pool.names
        # The slower pipelines merge an evenly spaced selection of the sweep's own subsets.
        ks, sampling = sweep_plan(names, preset["subsets"])
        jobs = plan_jobs([METHOD], ks, names, sampling)
        stride = max(1, len(jobs) // preset["slow_subsets"])
        slow = [list(job.subset) for job in jobs[::stride]]
        device = args.device
        results = [
            _timed(
                "sweep", lambda: time_sweep(pool, eval_set, preset["subsets"], work / "r.jsonl")
            ),
            _timed(
                "mergekit-api", lambda: time_mergekit_api(base, experts, eval_set, slow, device)
            ),
            _timed(
                "paper", lambda: time_paper_pipeline(base, experts, eval_set, slow, device, work)
            ),
        ]
    rate = {r.pipeline: r.models_per_minute for r in results}
    report = {
        "benchmark": "bench_sweep",
        "date": datetime.date.today().isoformat(),
        "device": _device_name(args.device),
        "preset": args.preset,
        "pool": {"experts": preset["experts"], "parameters": pool.num_parameters_billions * 1e9},
        "eval": {"sequences": preset["sequences"], "max_tokens": preset["length"]},
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "results": [asdict(r) | {"models_per_minute": r.models_per_minute} for r in results],
        "speedup_vs_paper": rate["sweep"] / rate["paper"],
        "speedup_vs_mergekit_api": rate["sweep"] / rate["mergekit-api"],
    }
    print(json.dumps({k: report[k] for k in ("speedup_vs_paper", "speedup_vs_mergekit_api")}))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
