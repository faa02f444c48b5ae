"""Building blocks shared by every ATMA block: RMSNorm, the gated MLP, the LFM2 gated short conv."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


class ZeroInitLinear(nn.Linear):
    """nn.Linear whose weight and bias start at zero.

    Zeroing inside the module's own constructor keeps the init intact under
    `deepspeed.zero.Init`, which partitions each module's parameters as soon as it is built.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        with torch.no_grad():
            self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()


def linear(in_features: int, out_features: int, *, zero: bool = False) -> nn.Linear:
    """A biased Linear, zero-initialised when `zero` (SPEC §2.9)."""
    return ZeroInitLinear(in_features, out_features) if zero else nn.Linear(in_features, out_features)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight (init 1), computed by `F.rms_norm` (SPEC §2.2)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def head_rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless RMS norm over the last dim with PyTorch's default epsilon (SPEC §2.2)."""
    return F.rms_norm(x, (x.shape[-1],))


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal conv with a (C, 1, K) weight, as nn.Conv1d stores it; no bias (SPEC §2.4)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for fan_in = K
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.causal_conv1d(x, self.weight.squeeze(1).to(x.dtype))

    def extend(self, x: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv of x (B,T,C) continuing after `history`, the last K-1 earlier inputs (None: none yet).

        Returns the output (B,T,C) and the new history (B,K-1,C). Without history this is `forward`.
        """
        K = self.weight.shape[-1]
        weight = self.weight.squeeze(1).to(x.dtype)
        if history is None:
            y = self(x)
            inputs = F.pad(x, (0, 0, K - 1, 0))
        else:
            inputs = torch.cat([history.to(x.dtype), x], dim=1)
            if x.shape[1] == 1:
                # One decode step: the K taps against the last K inputs, without a conv launch.
                y = torch.einsum("bkc,ck->bc", inputs, weight)[:, None]
            else:
                y = kernels.causal_conv1d(inputs, weight)[:, K - 1 :]
        # A copy, so that the history does not keep the whole input alive.
        return y, inputs[:, inputs.shape[1] - (K - 1) :].clone()


class MLP(nn.Module):
    """Squared-ReLU gated MLP: proj(g * relu(a)^2) with [a, g] = split(fc(x)) (SPEC §2.3)."""

    def __init__(self, hidden: int, ratio: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 2 * ratio * hidden)
        self.proj = linear(ratio * hidden, hidden, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.fc(x).chunk(2, dim=-1)
        return self.proj(g * F.relu(a).square())


class LFM2Conv(nn.Module):
    """LFM2 gated short convolution: out_proj(C * conv(B * U)) with [B, C, U] = split(in_proj(x)) (SPEC §2.4)."""

    def __init__(self, hidden: int, kernel_size: int, *, zero_in_proj: bool = False):
        super().__init__()
        # zero_in_proj reproduces the reference's substring-"proj" zero-init, which leaves
        # these blocks without gradients forever (SPEC §2.9, DESIGN departure 1).
        self.in_proj = linear(hidden, 3 * hidden, zero=zero_in_proj)
        self.conv = CausalDepthwiseConv(hidden, kernel_size)
        self.out_proj = linear(hidden, hidden, zero=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b_gate, c_gate, u = self.in_proj(x).chunk(3, dim=-1)
        y = self.conv(b_gate * u)
        return self.out_proj(c_gate * y), x.new_zeros((), dtype=torch.float32)

    def extend(self, x: torch.Tensor, state, offset: int) -> torch.Tensor:
        """Mixer output for x (B,T,D) after the tokens in `state` (a `ConvBlockState`, updated in place)."""
        b_gate, c_gate, u = self.in_proj(x).chunk(3, dim=-1)
        y, state.conv = self.conv.extend(b_gate * u, state.conv)
        return self.out_proj(c_gate * y)


def softcap(z: torch.Tensor, cap: float = 15.0) -> torch.Tensor:
    """Algebraic soft-cap cap * z / sqrt(z^2 + cap^2) in fp32 or wider (SPEC §2.1); not tanh."""
    z = z.double() if z.dtype == torch.float64 else z.float()
    return cap * z * torch.rsqrt(z * z + cap * cap)
