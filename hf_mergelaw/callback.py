"""`MergeScalingCallback`: training runs that produce experts keep the merging law up to date.

When a run finishes (and, with `at_save=True`, at every checkpoint), the trained weights join the
expert pool, a sweep of the pool runs (only new subsets are merged: earlier records are reused),
the law `L_inf + A/(k+b)` is fitted, and `eval_merge_*` values reach `log_history` and the
trackers through `trainer.log`. Main process only; results go to `<output_dir>/merge_scaling/`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .cross_entropy import EvalSet
from .errors import UserError
from .experts import ExpertPool
from .law import LawError, fit_sweep, marginal_gain, plan
from .provenance import read_provenance
from .record_store import RecordStore
from .subsets import STRATEGIES
from .sweep import sweep_pool
from .sweep_config import SamplingConfig
from .sweep_methods import MethodSpec

logger = logging.getLogger(__name__)


class MergeScalingCallback(TrainerCallback):
    """Add the trained model to `pool`, sweep, fit the law and log `eval_merge_*` values.

    >>> pool = ExpertPool("base/", {"math": "ft/math", "code": "ft/code"})
    >>> eval_set = build_eval_set(tokenizer, texts=held_out_texts)
    >>> trainer = Trainer(model=model, args=args, train_dataset=train)
    >>> trainer.add_callback(MergeScalingCallback(trainer, pool, eval_set, target_loss=2.1))
    >>> trainer.train()
    >>> [row for row in trainer.state.log_history if "eval_merge_floor" in row]

    Logged: `eval_merge_floor` (L_inf), `eval_merge_tail` (A), `eval_merge_b`, `eval_merge_r2`,
    `eval_merge_pool_size`, `eval_merge_next_expert_gain` (predicted CE drop from one more
    expert), `eval_merge_k_for_target` (experts needed for `target_loss`; -1 when the target is
    at or below the floor), and `eval_merge_ce_k{k}` (the measured mean CE per k) always, so a
    pool too small to fit the law still reports something.

    Arguments are checked here, the model against the pool at `on_train_begin`; a failure while
    measuring after training is logged, never raised. Records in `output_dir/merge_scaling/` of
    experts this pool does not have (an earlier run's) stop the run at its start unless
    `restart=True`, which moves them aside.
    """

    def __init__(
        self,
        trainer: Any,
        pool: ExpertPool,
        eval_data: EvalSet,
        *,
        expert_name: str | None = None,
        method: Mapping[str, Any] | None = None,
        per_k: int = 8,
        strategy: str = "balanced",
        seed: int = 0,
        batch_size: int = 8,
        target_loss: float | None = None,
        at_save: bool = False,
        restart: bool = False,
    ) -> None:
        _check_arguments(pool, eval_data, per_k, strategy, seed, batch_size, target_loss)
        self.trainer = trainer
        self.pool = pool
        self.eval_set = eval_data
        self.expert_name = expert_name
        self.method = MethodSpec.from_config(method or {"name": "average"})
        self.sampling = SamplingConfig(strategy=strategy, per_k=per_k, seed=seed)
        self.batch_size = batch_size
        self.target_loss = target_loss
        self.at_save = at_save
        self.restart = restart

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Fail now, not after training: the model must fit the pool, and the results folder must
        not hold an earlier run's experts (their records would mix with this run's)."""
        if not state.is_world_process_zero:
            return
        self.pool.check_model(self.expert_name or self._run_name(args), _unwrap(model))
        output = self._output(args)
        earlier = read_provenance(output)
        unknown = sorted(set(earlier.experts) - set(self.pool.names)) if earlier else []
        if unknown and not self.restart:
            raise UserError(
                f"{output} holds records of experts this pool does not have ({', '.join(unknown)}"
                "), from an earlier run in this output_dir. Use a new output_dir, or pass "
                "restart=True to move those records aside."
            )

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.at_save and state.is_world_process_zero:
            self._add_and_measure(args, model, f"{self._run_name(args)}-step{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._add_and_measure(args, model, self.expert_name or self._run_name(args))

    def _add_and_measure(self, args: Any, model: Any, name: str) -> None:
        """Measure the pool with the new expert; a failure is logged, never raised, so the
        training run (and saving its model afterwards) goes on."""
        try:
            self.pool.add_expert(_unique(name, self.pool.names), _unwrap(model))
            output = self._output(args)
            sweep_pool(
                self.pool,
                self.eval_set,
                methods=[self.method],
                ks=range(1, len(self.pool.names) + 1),
                sampling=self.sampling,
                output=output,
                batch_size=self.batch_size,
                progress=False,
                restart=self.restart,
            )
            self.restart = False  # the first sweep of this run moved earlier records aside
            records = [
                r
                for r in RecordStore(output)
                if r["method"] == self.method.label and set(r["subset"]) <= set(self.pool.names)
            ]
            self.trainer.log(self._metrics(records))
        except Exception:
            logger.exception("merge_scaling: the merge law was not measured for %r", name)

    def _metrics(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        metrics: dict[str, float] = {"eval_merge_pool_size": float(len(self.pool.names))}
        by_k: dict[int, list[float]] = {}
        for record in records:
            by_k.setdefault(record["k"], []).append(record["ce"])
        for k, values in sorted(by_k.items()):
            metrics[f"eval_merge_ce_k{k}"] = sum(values) / len(values)
        try:
            fit = fit_sweep(list(records), form="per-size").fits[0]
        except LawError as error:
            # Typically fewer distinct k than parameters (a pool of one or two experts).
            logger.warning("merge law not fitted yet: %s", error)
            return metrics
        floor, tail, b = fit.params["L_inf"], fit.params["A"], fit.params["b"]
        metrics.update(
            eval_merge_floor=floor,
            eval_merge_tail=tail,
            eval_merge_b=b,
            eval_merge_r2=fit.r2,
            eval_merge_next_expert_gain=float(marginal_gain(len(self.pool.names), tail, b)),
        )
        if self.target_loss is not None:
            answer = plan(fit, target_loss=self.target_loss)[0].k_for_target
            metrics["eval_merge_k_for_target"] = float(answer if answer is not None else -1)
        return metrics

    @staticmethod
    def _run_name(args: Any) -> str:
        return args.run_name or Path(args.output_dir).name

    @staticmethod
    def _output(args: Any) -> Path:
        return Path(args.output_dir) / "merge_scaling" / "results.jsonl"


def _check_arguments(
    pool: Any,
    eval_data: Any,
    per_k: Any,
    strategy: Any,
    seed: Any,
    batch_size: Any,
    target_loss: Any,
) -> None:
    if not isinstance(pool, ExpertPool):
        raise UserError(
            f"pool must be an ExpertPool, got {type(pool).__name__}: "
            "ExpertPool('base/', {'math': 'ft/math', ...})."
        )
    if not isinstance(eval_data, EvalSet):
        raise UserError(
            f"eval_data must be an EvalSet, got {type(eval_data).__name__}: build it with "
            "build_eval_set(tokenizer, texts=held_out_texts)."
        )
    for name, value in (("per_k", per_k), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name}={value!r} must be a positive integer.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"seed={seed!r} must be an integer.")
    if strategy not in STRATEGIES:
        raise UserError(f"strategy={strategy!r}; use one of {', '.join(STRATEGIES)}.")
    if target_loss is not None and (
        not isinstance(target_loss, int | float) or not math.isfinite(target_loss)
    ):
        raise UserError(f"target_loss={target_loss!r} must be a finite number (nats) or None.")


def _unique(name: str, taken: Sequence[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        suffix += 1
        candidate = f"{name}-{suffix}"
    return candidate


def _unwrap(model: Any) -> Any:
    """The plain transformers model under DDP/accelerate wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
