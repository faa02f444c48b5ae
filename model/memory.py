"""Gated-delta fast-weight memory: the additive third channel of a global block (SPEC §4)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .layers import head_rms_norm, linear


class GatedDeltaMemory(nn.Module):
    """Titans-MAG style memory read through `kernels.gated_delta_rule` (SPEC §4.1-§4.5)."""

    def __init__(self, hidden: int, num_heads: int, head_dim: int, *, gamma_bias: float, beta_bias: float, chunk: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.gamma_bias = gamma_bias
        self.beta_bias = beta_bias
        self.chunk = chunk
        self.w_gamma = nn.Linear(hidden, num_heads)
        self.w_beta = nn.Linear(hidden, num_heads)
        self.gate = nn.Linear(hidden, num_heads * head_dim)
        self.proj = linear(num_heads * head_dim, hidden, zero=True)

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x: normed block input (B,T,D); q, k, v: (B,T,H,d) head-expanded attention tensors."""
        B, T, _ = x.shape
        # Gates in fp32 (SPEC §4.3): log-decay g = log sigmoid(z_gamma), write strength beta = sigmoid(z_beta).
        g = F.logsigmoid(self.w_gamma(x).float() + self.gamma_bias)
        beta = torch.sigmoid(self.w_beta(x).float() + self.beta_bias)
        # The memory L2-normalises its own q and k: unit keys keep the delta rule contractive (SPEC §4.2).
        # Normalised in fp32, handed over in the activation dtype (bf16 reaches FLA's kernels on GPU;
        # the PyTorch path computes in fp32 either way).
        q_hat = F.normalize(q.float(), dim=-1, eps=1e-12).to(v.dtype)
        k_hat = F.normalize(k.float(), dim=-1, eps=1e-12).to(v.dtype)
        # In training mode every call counts as differentiable, so the kernel choice cannot change
        # between a checkpointed forward and its recomputation.
        r, _ = kernels.gated_delta_rule(
            q_hat, k_hat, v, g, beta, chunk_size=self.chunk, differentiable=True if self.training else None
        )
        r = head_rms_norm(r).reshape(B, T, self.num_heads * self.head_dim).to(x.dtype)
        return self.proj(r * torch.sigmoid(self.gate(x)))
