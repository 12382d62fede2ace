"""Fit the merging law to sweep records and plan with it, from Python.

    hf-mergelaw sweep examples/sweep.yml      # writes tiny_pool/sweep/results.jsonl
    python examples/fit_and_plan.py tiny_pool/sweep/results.jsonl

The same from the shell: `hf-mergelaw fit R.jsonl --form per-size --by method -o fit.json`, then
`hf-mergelaw plan fit.json --target-loss 4.1 --min-gain 0.001`.
"""

import sys

from hf_mergelaw.law import fit_sweep, plan

records = sys.argv[1] if len(sys.argv) > 1 else "tiny_pool/sweep/results.jsonl"
report = fit_sweep(records, form="per-size", by=("method",), bootstrap=100)
for fit in report.fits:
    p = fit.params
    print(f"{fit.group}: L_inf={p['L_inf']:.4f} A={p['A']:.4f} b={p['b']:.3f} R2={fit.r2:.3f}")
    prediction = fit.predict(None, [1, 2, 4, 8])  # a per-size fit predicts at its own N
    print(
        "  mean CE at k=1,2,4,8:",
        [
            f"{m:.4f} [{lo:.4f}, {hi:.4f}]"
            for m, lo, hi in zip(prediction.mean, prediction.lo, prediction.hi, strict=True)
        ],
    )
    (answer,) = plan(fit, target_loss=p["L_inf"] + p["A"] / 4, min_gain=1e-3, k_max=8)
    print(f"  experts for the target: {answer.k_for_target}, stop at k={answer.k_stop}, "
          f"k90={answer.k90}")  # fmt: skip
