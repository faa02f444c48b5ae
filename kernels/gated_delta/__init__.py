"""Gated delta rule (SPEC §4.4-§4.7): the chunked path (its state carried by a PyTorch loop or, from
`triton_impl`, by Triton kernels) and the flash-linear-attention bridge.

The fp64 oracle is `naive.gated_delta_rule_naive`, imported from its module by the tests.
"""

from .fla_bridge import (
    fla_gated_delta_rule,
    fla_guard_reason,
    fla_is_usable,
    fla_refusal,
    fla_tilelang_fix,
    fla_timing_only,
    fla_timing_only_active,
)
from .torch_impl import chunk_gated_delta_rule_torch

__all__ = [
    "chunk_gated_delta_rule_torch",
    "fla_gated_delta_rule",
    "fla_guard_reason",
    "fla_is_usable",
    "fla_refusal",
    "fla_tilelang_fix",
    "fla_timing_only",
    "fla_timing_only_active",
]
