"""Materialised Polar attention (SPEC §2.6): the fp64-capable oracle of the streaming and Triton paths.

It forms the full (T x T) score matrix and lets autograd differentiate it, so use it on small
shapes only. Layout of the `kernels.polar_attention` contract (DESIGN.md): q (B, T, H, d),
k, v (B, T, G, d), H % G == 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..common import POLAR_EPS, compute_dtype, polar_length_terms, polar_visible_counts

__all__ = ["polar_attention_naive"]


def polar_attention_naive(
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
    n = polar_visible_counts(T, window, device=q.device, dtype=cdt)
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
