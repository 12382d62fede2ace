"""The fused merge kernels on plain tensors: TIES, DARE, task arithmetic / Average.

On CUDA tensors they run as Triton kernels; on CPU the torch path computes the same result.

    python examples/merge_kernels.py
"""

import torch

import triton_ops

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
base = torch.randn(1024, 1024, dtype=torch.bfloat16, device=device)
experts = [base + 0.01 * torch.randn_like(base) for _ in range(4)]
weights = [1 / len(experts)] * len(experts)

ties = triton_ops.ties_merge(base, experts, weights=weights, densities=[0.2] * 4)
dare = triton_ops.dare_merge(
    base, experts, weights=weights, densities=[0.8] * 4, consensus=True, rescale="inverse", seed=0
)
average = triton_ops.task_arithmetic(base, experts, weights=weights)
ta = triton_ops.task_arithmetic(base, experts, weights=weights, lambda_=0.8)

# Sweeps trim or drop each expert once and merge many subsets in one pass each:
trimmed = [triton_ops.trim(e - base, 0.2) for e in experts]
same = triton_ops.merge_task_vectors(base, trimmed, weights=weights, consensus=True, normalize=True)
assert torch.equal(same, ties)

for name, merged in [("ties", ties), ("dare_ties", dare), ("average", average), ("ta", ta)]:
    change = (merged.float() - base.float()).norm() / base.float().norm()
    print(f"{name:10s} relative change from base: {change:.5f}")
