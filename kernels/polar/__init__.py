"""Polar attention (SPEC §2.6-§2.8): the streaming PyTorch path and the Triton kernels.

The fp64 oracle is `naive.polar_attention_naive`, imported from its module by the tests. The
Triton path is imported on first use: importing Triton fixes its interpreter mode.
"""

from .torch_impl import polar_attention_torch

__all__ = ["polar_attention_torch", "polar_attention_triton"]


def __getattr__(name):
    if name == "polar_attention_triton":
        from .triton_impl import polar_attention_triton

        return polar_attention_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
