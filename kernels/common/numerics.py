"""Numerics every path of an operation shares: the compute dtype, the clamp constants, and the
Polar visible counts and length terms (SPEC §2.6).

The fp64 oracles, the PyTorch paths, the Triton wrappers and the model's distractor loss all
read these, so each formula and constant is written once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "POLAR_EPS",
    "Q2_FLOOR",
    "compute_dtype",
    "polar_visible_counts",
    "polar_length_features",
    "polar_length_terms",
]

# SPEC §2.6: the F.normalize epsilon of the direction and the floor of the renormalisations.
POLAR_EPS = 1e-6
# SPEC §2.7 / §11 item 5: the Q2 floor of the streaming PyTorch path (1e-6 would corrupt n_eff
# on rows where the null takes nearly all the mass).
Q2_FLOOR = 1e-30


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype reductions run in: fp32 for half types, else the input dtype."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def polar_visible_counts(T: int, window: int | None, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Return n (T,): the count of visible keys each query uses for temperature and null (SPEC §2.6).

    Causal: n_i = i + 1; with a window W the count is min(i + 1, W); never below 1.
    """
    n = torch.arange(1, T + 1, device=device, dtype=dtype)
    if window is not None:
        n = n.clamp(max=window)
    return n.clamp(min=1)


def polar_length_features(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (ln n, sqrt(ln(n + 1))), each shaped like n: what t and nu scale (SPEC §2.6)."""
    return torch.log(n), torch.sqrt(torch.log(n + 1.0))


def polar_length_terms(
    n: torch.Tensor, null_base: torch.Tensor, null_slope_raw: torch.Tensor, len_gain_raw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the temperature t and the null floor nu, each (H, T), for counts n (T,) (SPEC §2.6).

    t = 1 + softplus(len_gain_raw) ln n;  nu = null_base + softplus(null_slope_raw) sqrt(ln(n + 1)).
    Differentiable in the three per-head parameters (H,).
    """
    log_n, root = polar_length_features(n)
    t = 1.0 + F.softplus(len_gain_raw)[:, None] * log_n[None, :]
    nu = null_base[:, None] + F.softplus(null_slope_raw)[:, None] * root[None, :]
    return t, nu
