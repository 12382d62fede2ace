"""mergekit merge methods `ties_fused`, `dare_ties_fused` and `dare_linear_fused`.

Same parameters, scopes and defaults as mergekit's `ties`, `dare_ties` and `dare_linear`; the
per-tensor math is `triton_ops` (Triton kernels on CUDA tensors, i.e. with `--cuda`; the torch
path on CPU). DARE methods take a shared integer `seed` (default 0).

Command line: after `pip install hf-mergelaw`, plain `mergekit-yaml` knows the methods (a `.pth`
import hook registers them when mergekit loads its merge methods); change one word::

    merge_method: ties_fused        # was: ties

Python API: import this package first, which registers the methods::

    import mergekit_plugins  # noqa: F401
    from mergekit.merge_methods.api import merge_state_dicts

    merged = merge_state_dicts(
        {"base": base_sd, "a": a_sd, "b": b_sd},
        "ties_fused",
        base="base",
        parameters={"weight": {"a": 0.5, "b": 0.5}, "density": {"a": 0.3, "b": 0.3}},
    )

Editable installs get the hook as well. Without it (the project on `PYTHONPATH` rather than
installed), run the CLI as `python -m mergekit_plugins CONFIG OUT [mergekit-yaml options]`; see
`_hf_mergelaw_hook`.

DARE masks are counter-based (Philox): an entry's keep decision depends only on (seed, tensor
name, expert index, element index), so output is bit-identical across runs, tensor order,
`--multi-gpu` and devices. They are not mergekit's `torch.bernoulli` draws: fused and stock DARE
keep statistically equivalent, not identical, entries. Ties at the TIES magnitude threshold are
kept lowest index first (mergekit's choice among them is arbitrary).
"""

from .fused_methods import FUSED_METHODS, FusedTaskArithmeticMerge, register, tensor_stream

__all__ = ["FUSED_METHODS", "FusedTaskArithmeticMerge", "register", "tensor_stream"]

register()
