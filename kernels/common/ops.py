"""ATen ops by what they cost, for counting what a path dispatches (`kernels.bench --count-ops`,
`model.bench_loss --count-bytes`)."""

from __future__ import annotations

__all__ = ["NON_COMPUTING_OPS"]

# ATen ops that only describe or allocate memory: no kernel of their own.
NON_COMPUTING_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "transpose", "t", "permute", "expand", "unsqueeze",
    "squeeze", "select", "slice", "unbind", "split", "split_with_sizes", "alias", "as_strided", "detach",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "diagonal", "unfold",
})
