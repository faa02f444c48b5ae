"""Compute cores of the ATMA model with a fast path per device and a pure-PyTorch path everywhere.

Public contracts (DESIGN.md): `polar_attention`, `gated_delta_rule`, `causal_conv1d`.
The backend is chosen per call from the tensors' device and `ATMA_KERNELS=triton|torch|auto`.
"""

from .dispatch import causal_conv1d, gated_delta_rule, kernel_backend, polar_attention

__all__ = ["polar_attention", "gated_delta_rule", "causal_conv1d", "kernel_backend"]
