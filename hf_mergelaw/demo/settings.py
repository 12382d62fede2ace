"""The demo's two sizes: `FULL` (the default) and `QUICK` (CI), one code path.

`PoolSettings` decide the pool's weights and key its cache; `SweepSettings` decide what is merged
and measured, and key the records in an output folder (a resumed run must measure the same way).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Literal

from hf_mergelaw.errors import DemoError

from .corpus import DOMAINS

# The plan's defaults: the stop rule's smallest worthwhile gain per added expert (nats), and the
# target loss as a fraction above each method's fitted floor.
DEFAULT_MIN_GAIN = 0.005
TARGET_ABOVE_FLOOR = 0.01


@dataclass(frozen=True)
class PoolSettings:
    """Corpus caps, model shape and training schedule of the base and its experts."""

    domains: tuple[str, ...]
    max_train_chars: int
    max_held_out_chars: int
    held_out_fraction: float
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    seq_len: int
    batch_size: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float
    seed: int = 0


@dataclass(frozen=True)
class SweepSettings:
    """The k-sweep and its held-out evaluation.

    ``strategy`` "balanced": ``per_k`` subsets drawn per k with every expert in equally many
    (seeded; all of them where a k has fewer); "all": every subset (2^M - 1 merges per method).
    ``held_out_per_k``: subsets of each k the sweep left unmerged, merged apart to check the pool
    model on subsets it was not fitted on (none with "all").
    """

    ties_density: float
    per_k: int
    eval_sequences: int
    eval_chars: int
    eval_batch_size: int
    bootstrap: int
    held_out_per_k: int
    strategy: str = "balanced"
    seed: int = 0


@dataclass(frozen=True)
class DemoSettings:
    name: str
    pool: PoolSettings
    sweep: SweepSettings

    def fingerprint(self) -> str:
        return digest({"pool": asdict(self.pool), "sweep": asdict(self.sweep)})

    def describe(self) -> str:
        """``"full, 8 subsets per k"``: enough to tell two runs apart."""
        sweep = self.sweep
        subsets = "all subsets" if sweep.strategy == "all" else f"{sweep.per_k} subsets per k"
        return f"{self.name}, {subsets}"

    def with_subsets(self, subsets: int | Literal["all"] | None) -> DemoSettings:
        """These settings sweeping ``subsets`` per k (a count, "all", or None: unchanged)."""
        if subsets is None:
            return self
        if subsets == "all":
            return replace(self, sweep=replace(self.sweep, strategy="all"))
        if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 2:
            raise DemoError(
                f"subsets={subsets!r}: give a count of at least 2 (a spread needs two) or 'all'."
            )
        return replace(self, sweep=replace(self.sweep, strategy="balanced", per_k=subsets))


def digest(data: object) -> str:
    """Short stable hash of JSON-able settings."""
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


FULL = DemoSettings(
    name="full",
    pool=PoolSettings(
        domains=tuple(d.name for d in DOMAINS),
        max_train_chars=300_000,
        max_held_out_chars=60_000,
        held_out_fraction=0.2,
        vocab_size=2048,
        hidden_size=128,
        num_layers=2,
        intermediate_size=352,
        num_heads=4,
        seq_len=128,
        batch_size=16,
        base_steps=500,
        base_lr=3e-3,
        # Gentle enough that every expert beats the base on its own held-out files and stays
        # near it elsewhere (at 1e-3 or 120 steps experts overfit their ~80k tokens).
        expert_steps=60,
        expert_lr=3e-4,
    ),
    sweep=SweepSettings(
        ties_density=0.5,
        per_k=8,
        eval_sequences=16,
        eval_chars=700,
        eval_batch_size=16,
        bootstrap=100,
        held_out_per_k=4,
    ),
)

QUICK = DemoSettings(
    name="quick",
    pool=PoolSettings(
        domains=tuple(d.name for d in DOMAINS[:6]),
        max_train_chars=60_000,
        max_held_out_chars=12_000,
        held_out_fraction=0.2,
        vocab_size=512,
        hidden_size=32,
        num_layers=1,
        intermediate_size=64,
        num_heads=2,
        seq_len=64,
        batch_size=8,
        base_steps=60,
        base_lr=3e-3,
        expert_steps=20,
        expert_lr=3e-4,
    ),
    sweep=SweepSettings(
        ties_density=0.5,
        per_k=6,
        eval_sequences=4,
        eval_chars=350,
        eval_batch_size=16,
        bootstrap=20,
        held_out_per_k=3,
    ),
)
