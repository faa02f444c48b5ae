"""Compute cores of the ATMA model with a fast path per device and a pure-PyTorch path everywhere.

Public contracts (DESIGN.md): `polar_attention`, `gated_delta_rule`, `causal_conv1d`; the
backend is chosen per call from the tensors' device and `ATMA_KERNELS=triton|torch|auto`.
`polar_visible_counts` and `polar_length_terms` are the Polar length terms (SPEC §2.6) that
every Polar path uses, for callers that need the same t and nu (the distractor loss);
`POLAR_EPS` and `compute_dtype` are the Polar clamp and dtype rules, for the one-token decoding
step that evaluates the same reduction outside the kernels.
`softcap_ce_rows` / `softcap_ce_grad` are the LM head loss's row passes in Triton (with or without
the distillation KL), which
`model.lm_loss` calls per chunk where the backend is Triton (its PyTorch rows are its own).
`NON_COMPUTING_OPS` names the ATen ops without a kernel of their own, for dispatch counts.
One folder per operation (`polar/`, `gated_delta/`, `causal_conv/`, `softcap_ce/`) holds its
paths and its fp64 oracle (`naive.py`); `common/` holds what they share.
"""

from .common import POLAR_EPS, TRITON_DTYPES, compute_dtype, polar_length_terms, polar_visible_counts
from .common.ops import NON_COMPUTING_OPS
from .dispatch import (causal_conv1d, gated_delta_rule, kernel_backend, kernel_choice, polar_attention, softcap_ce_grad,
                       softcap_ce_rows)

__all__ = [
    "polar_attention",
    "gated_delta_rule",
    "causal_conv1d",
    "softcap_ce_rows",
    "softcap_ce_grad",
    "kernel_backend",
    "kernel_choice",
    "polar_visible_counts",
    "polar_length_terms",
    "POLAR_EPS",
    "compute_dtype",
    "TRITON_DTYPES",
    "NON_COMPUTING_OPS",
]
