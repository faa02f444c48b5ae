"""Causal depthwise conv1d as a sum of shifted copies (SPEC §2.4): the oracle of the PyTorch and Triton paths."""

from __future__ import annotations

import torch

__all__ = ["causal_conv1d_naive"]


def causal_conv1d_naive(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv: x (B,T,C), weight (C,K) -> (B,T,C); weight[:, K-1] hits the current token."""
    B, T, C = x.shape
    K = weight.shape[-1]
    y = torch.zeros_like(x)
    for tap in range(K):
        shift = K - 1 - tap
        if shift >= T:
            continue
        y[:, shift:] = y[:, shift:] + x[:, : T - shift] * weight[:, tap]
    return y
