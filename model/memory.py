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

    def _rule_inputs(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Unit q, k in v's dtype and the fp32 log-decay g and write strength beta (SPEC §4.2, §4.3)."""
        # Gates in fp32 (SPEC §4.3): log-decay g = log sigmoid(z_gamma), write strength beta = sigmoid(z_beta).
        g = F.logsigmoid(self.w_gamma(x).float() + self.gamma_bias)
        beta = torch.sigmoid(self.w_beta(x).float() + self.beta_bias)
        # The memory L2-normalises its own q and k: unit keys keep the delta rule contractive (SPEC §4.2).
        # Normalised in fp32, handed over in the activation dtype (bf16 reaches FLA's kernels on GPU;
        # the PyTorch path computes in fp32 either way).
        q_hat = F.normalize(q.float(), dim=-1, eps=1e-12).to(v.dtype)
        k_hat = F.normalize(k.float(), dim=-1, eps=1e-12).to(v.dtype)
        return q_hat, k_hat, g, beta

    def _readout(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """proj(rmsnorm_d(r) * sigmoid(gate(x))) for r (B,T,H,d) (SPEC §4.5)."""
        B, T, _ = x.shape
        r = head_rms_norm(r).reshape(B, T, self.num_heads * self.head_dim).to(x.dtype)
        return self.proj(r * torch.sigmoid(self.gate(x)))

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x: normed block input (B,T,D); q, k, v: (B,T,H,d) head-expanded attention tensors."""
        q_hat, k_hat, g, beta = self._rule_inputs(x, q, k, v)
        # In training mode every call counts as differentiable, so the kernel choice cannot change
        # between a checkpointed forward and its recomputation.
        r, _ = kernels.gated_delta_rule(
            q_hat, k_hat, v, g, beta, chunk_size=self.chunk, differentiable=True if self.training else None
        )
        return self._readout(x, r)

    def extend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state) -> torch.Tensor:
        """`forward` for tokens after those in `state` (a `GlobalBlockState`; its memory is updated in place).

        The first call runs the parallel (chunked) rule and keeps its final state; later single
        tokens take one recurrent step (O(1) per token), longer continuations the chunked rule
        started from the state.
        """
        q_hat, k_hat, g, beta = self._rule_inputs(x, q, k, v)
        if state.memory is not None and q.shape[1] == 1:
            r, state.memory = gated_delta_step(q_hat, k_hat, v, g, beta, state.memory)
        else:
            r, state.memory = kernels.gated_delta_rule(
                q_hat, k_hat, v, g, beta, initial_state=state.memory, output_final_state=True, chunk_size=self.chunk
            )
        return self._readout(x, r)


def gated_delta_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule in its recurrent form (SPEC §4.4, §4.8).

    q, k (B,1,H,dk) unit-norm, v (B,1,H,dv), g, beta (B,1,H), state (B,H,dk,dv) = M^T.
    Decay first, delta write on the decayed state, self-inclusive readout; returns o (B,1,H,dv)
    in v's dtype and the new state in fp32 or wider.
    """
    if q.shape[1] != 1:
        raise ValueError(f"gated_delta_step takes one token, got {q.shape[1]}")
    cdt = torch.promote_types(state.dtype, torch.float32)
    # The state stays in fp32 under autocast too (SPEC §4.8).
    with torch.autocast(q.device.type, enabled=False):
        q_, k_, v_ = q[:, 0].to(cdt), k[:, 0].to(cdt), v[:, 0].to(cdt)  # (B,H,d)
        decayed = state.to(cdt) * torch.exp(g[:, 0].to(cdt))[..., None, None]
        prediction = torch.einsum("bhkv,bhk->bhv", decayed, k_)
        new_state = decayed + beta[:, 0].to(cdt)[..., None, None] * k_[..., :, None] * (v_ - prediction)[..., None, :]
        o = torch.einsum("bhkv,bhk->bhv", new_state, q_)
    return o[:, None].to(v.dtype), new_state
