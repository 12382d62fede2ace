"""The ``hf-mergelaw demo``: the whole method on a pool built offline on the CPU.

    from hf_mergelaw.demo import run_demo
    result = run_demo(Path("demo-out"), quick=False)
    print(result.report.read_text())

Modules: ``corpus`` (the domains: parts of the Python standard library), ``tokenizer``,
``training`` (a small Llama and its training loop), ``pool`` (build once, cache), ``run`` (sweep,
fit, plan), ``science`` (the paper's findings, measured), ``figures``, ``report``. The command is
:mod:`hf_mergelaw.cli.demo`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DemoResult", "run_demo"]


def __getattr__(name: str) -> Any:
    # run_demo pulls in torch and transformers; the CLI imports this package for its settings.
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'hf_mergelaw.demo' has no attribute {name!r}")
