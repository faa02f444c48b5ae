"""Simple, fp64-capable reference oracles for the model's compute cores.

These are the ground truth every fast path (the streaming PyTorch path, the chunked
gated-delta path, the Triton kernels) is tested against. They materialise the full
(T x T) score matrix or run the recurrence token by token, so use them on small shapes only.

Layouts follow the `kernels` contracts (DESIGN.md): tensors are (B, T, heads, d).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "polar_attention_reference",
    "gated_delta_reference",
    "causal_conv1d_reference",
    "compute_dtype",
]

# SPEC §2.6: F.normalize / renormalisation epsilon of the Polar reduction.
POLAR_EPS = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype the reductions run in: fp32 for half types, else the input dtype."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def visible_counts(T: int, window: int | None, *, device, dtype) -> torch.Tensor:
    """Return n_i, the count each query position uses for temperature and null (SPEC §2.6)."""
    n = torch.arange(1, T + 1, device=device, dtype=dtype)
    if window is not None:
        n = n.clamp(max=window)
    return n.clamp(min=1)


def polar_length_terms(n, null_base, null_slope_raw, len_gain_raw):
    """Return (temperature t, null floor nu), each (H, T), for counts n (T,) (SPEC §2.6)."""
    log_n = torch.log(n)[None, :]
    t = 1.0 + F.softplus(len_gain_raw)[:, None] * log_n
    nu = null_base[:, None] + F.softplus(null_slope_raw)[:, None] * torch.sqrt(torch.log(n + 1.0))[None, :]
    return t, nu


def polar_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    v_null: torch.Tensor,
    null_base: torch.Tensor,
    null_slope_raw: torch.Tensor,
    len_gain_raw: torch.Tensor,
    mag_beta_raw: torch.Tensor,
    *,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised Polar attention (SPEC §2.6): returns direction (B,T,H,d) and magnitude (B,T,H)."""
    B, T, H, d = q.shape
    G = k.shape[2]
    if H % G != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({G})")
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    qh = q.to(cdt).transpose(1, 2)  # (B,H,T,d)
    kh = k.to(cdt).transpose(1, 2).repeat_interleave(H // G, dim=1)
    vh = v.to(cdt).transpose(1, 2).repeat_interleave(H // G, dim=1)
    params = [p.to(cdt) for p in (v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw)]
    v_null_, null_base_, null_slope_, len_gain_, mag_beta_ = params

    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    visible = j <= i
    if window is not None:
        visible = visible & (i - j < window)
    n = visible_counts(T, window, device=q.device, dtype=cdt)
    t, nu = polar_length_terms(n, null_base_, null_slope_, len_gain_)

    sigma = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    # Zero masked scores before scaling by t so that d(t*sigma)/dt is never 0*(-inf) (SPEC §2.6).
    real = (sigma.masked_fill(~visible, 0.0) * t[None, :, :, None]).masked_fill(~visible, float("-inf"))
    null = (t * nu)[None, :, :, None].expand(B, H, T, 1)
    w = torch.softmax(torch.cat([real, null], dim=-1), dim=-1)
    w_real, w_null = w[..., :T], w[..., T]

    s = w_real @ vh + w_null[..., None] * v_null_[None, :, None, :]
    direction = s / s.norm(dim=-1, keepdim=True).clamp_min(POLAR_EPS)
    w_hat = w_real / w_real.sum(-1, keepdim=True).clamp_min(POLAR_EPS)
    n_eff = 1.0 / (w_hat * w_hat).sum(-1).clamp_min(POLAR_EPS)
    m_eff = n_eff * (1.0 - w_null)
    magnitude = torch.tanh(F.softplus(mag_beta_)[None, :, None] * torch.log1p(m_eff))
    return direction.transpose(1, 2).to(out_dtype), magnitude.transpose(1, 2).to(out_dtype)


def gated_delta_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule (SPEC §4.4): decay, delta write, self-inclusive readout.

    q, k: (B,T,H,dk) already L2-normalised; v: (B,T,H,dv); g: log-decay (B,T,H); beta: (B,T,H).
    State S is (B,H,dk,dv) (FLA layout, S = M^T). Returns o (B,T,H,dv) and the final state or None.
    """
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    out_dtype = v.dtype
    cdt = compute_dtype(q.dtype)
    q_, k_, v_, g_, b_ = (x.to(cdt) for x in (q, k, v, g, beta))
    if initial_state is None:
        S = q.new_zeros(B, H, dk, dv, dtype=cdt)
    else:
        S = initial_state.to(cdt)
    outs = []
    for step in range(T):
        kt, vt, qt = k_[:, step], v_[:, step], q_[:, step]  # (B,H,dk|dv)
        S = S * torch.exp(g_[:, step])[..., None, None]
        pred = torch.einsum("bhkv,bhk->bhv", S, kt)
        S = S + b_[:, step][..., None, None] * torch.einsum("bhk,bhv->bhkv", kt, vt - pred)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, qt))
    o = torch.stack(outs, dim=1).to(out_dtype) if T else v.new_zeros(B, 0, H, dv)
    return o, (S if output_final_state else None)


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv (SPEC §2.4): x (B,T,C), weight (C,K); weight[:, K-1] hits the current token."""
    B, T, C = x.shape
    K = weight.shape[-1]
    y = torch.zeros_like(x)
    for tap in range(K):
        shift = K - 1 - tap
        if shift >= T:
            continue
        y[:, shift:] = y[:, shift:] + x[:, : T - shift] * weight[:, tap]
    return y
