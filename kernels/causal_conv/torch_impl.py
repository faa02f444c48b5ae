"""Causal depthwise conv1d in plain PyTorch (left zero padding + grouped conv1d)."""

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_torch"]


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv: x (B,T,C), weight (C,K) -> (B,T,C); weight[:, K-1] hits the current token."""
    C, K = weight.shape
    xt = F.pad(x.transpose(1, 2), (K - 1, 0))
    return F.conv1d(xt, weight.to(x.dtype).unsqueeze(1), groups=C).transpose(1, 2)
