"""Causal depthwise conv1d (SPEC §2.4): the PyTorch path and the Triton kernels.

The oracle is `naive.causal_conv1d_naive`, imported from its module by the tests. The Triton
path is imported on first use: importing Triton fixes its interpreter mode.
"""

from .torch_impl import causal_conv1d_torch

__all__ = ["causal_conv1d_torch", "causal_conv1d_triton"]


def __getattr__(name):
    if name == "causal_conv1d_triton":
        from .triton_impl import causal_conv1d_triton

        return causal_conv1d_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
