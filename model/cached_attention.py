"""Attention of new queries against cached keys: one decode step or a prefill that continues a cache.

The parallel kernels (`kernels.polar_attention`, causal SDPA) assume the queries start at position 0;
these functions take queries at absolute positions q_start.. and keys at k_start.. instead, with
the visibility of SPEC §2.6 (key j visible to query p iff j <= p and, with a window W, p - j < W)
and, for Polar, the temperature and null floor evaluated at each query's own count
n_p = min(p + 1, W). They form the (queries x keys) scores in row blocks, so use them for a
few queries at a time (a decode step is one).

Shape legend: B batch, Tq queries, Tk keys, H query heads, G key/value heads, r = H // G, d head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kernels
from kernels import POLAR_EPS, compute_dtype

# Rows per block: each (B, H, rows, Tk) intermediate stays near this many elements.
_BLOCK_ELEMENTS = 1 << 24


def visible_keys(q_start: int, num_q: int, k_start: int, num_k: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean (num_q, num_k) mask: key j (from k_start) is visible to query p (from q_start) (SPEC §2.6)."""
    p = torch.arange(q_start, q_start + num_q, device=device)[:, None]
    j = torch.arange(k_start, k_start + num_k, device=device)[None, :]
    visible = j <= p
    if window is not None:
        visible = visible & (p - j < window)
    return visible


def _check_positions(q: torch.Tensor, k: torch.Tensor, q_start: int, k_start: int) -> None:
    if q_start < 0 or k_start < 0 or k_start > q_start:
        raise ValueError(f"positions must satisfy 0 <= k_start <= q_start, got k_start={k_start}, q_start={q_start}")
    if k_start + k.shape[1] != q_start + q.shape[1]:
        raise ValueError(
            f"the last key must be the last query's own: keys cover [{k_start}, {k_start + k.shape[1]}), "
            f"queries [{q_start}, {q_start + q.shape[1]})"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def polar_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    v_null: torch.Tensor,
    null_base: torch.Tensor,
    null_slope_raw: torch.Tensor,
    len_gain_raw: torch.Tensor,
    mag_beta_raw: torch.Tensor,
    *,
    q_start: int,
    k_start: int,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Polar attention (SPEC §2.6) of q (B,Tq,H,d) at positions q_start.. over k, v (B,Tk,G,d) at k_start..

    Returns direction (B,Tq,H,d) and magnitude (B,Tq,H) in q's dtype; reductions run in fp32 or wider,
    also under autocast (SPEC §2.6: the whole reduction in fp32).
    """
    _check_positions(q, k, q_start, k_start)
    with torch.autocast(q.device.type, enabled=False):
        return _polar_reduce(q, k, v, (v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw),
                             q_start=q_start, k_start=k_start, window=window)


def _polar_reduce(q, k, v, params, *, q_start: int, k_start: int, window: int | None):
    """The body of `polar_attention_cached`, in the compute dtype."""
    B, Tq, H, d = q.shape
    Tk, G = k.shape[1], k.shape[2]
    r = H // G
    cdt = compute_dtype(q.dtype)
    v_null_, base_, slope_, gain_, beta_ = (p.to(cdt) for p in params)
    counts = torch.arange(q_start + 1, q_start + Tq + 1, device=q.device, dtype=cdt)
    if window is not None:
        counts = counts.clamp(max=window)
    t, nu = kernels.polar_length_terms(counts, base_, slope_, gain_)  # (H, Tq) each
    t, null_logit = t.view(G, r, Tq), (t * nu).view(G, r, Tq)
    beta_eff = F.softplus(beta_).view(G, r, 1)

    qg = q.to(cdt).view(B, Tq, G, r, d).permute(0, 2, 3, 1, 4)  # (B,G,r,Tq,d)
    kg = k.to(cdt).transpose(1, 2)[:, :, None]  # (B,G,1,Tk,d)
    vg = v.to(cdt).transpose(1, 2)[:, :, None]
    scale = 1.0 / math.sqrt(d)
    rows = max(1, _BLOCK_ELEMENTS // max(1, B * H * Tk))
    directions, magnitudes = [], []
    for i0 in range(0, Tq, rows):
        i1 = min(i0 + rows, Tq)
        # Keys these rows can see: up to the last row's own key, from W - 1 before the first row.
        j1 = q_start + i1 - k_start
        j0 = 0 if window is None else max(0, q_start + i0 - window + 1 - k_start)
        sigma = torch.matmul(qg[:, :, :, i0:i1], kg[..., j0:j1, :].transpose(-1, -2)) * scale  # (B,G,r,tq,tk)
        visible = visible_keys(q_start + i0, i1 - i0, k_start + j0, j1 - j0, window, device=q.device)
        t_rows, null_rows = t[:, :, i0:i1], null_logit[:, :, i0:i1]
        real = torch.where(visible, sigma * t_rows[..., None], float("-inf"))
        # Each query sees its own key, so the running max is finite.
        m = torch.maximum(real.amax(dim=-1), null_rows)
        p = torch.exp(real - m[..., None])
        p_null = torch.exp(null_rows - m)
        z = p.sum(-1) + p_null
        w, w_null = p / z[..., None], p_null / z
        s = torch.matmul(w, vg[..., j0:j1, :]) + w_null[..., None] * v_null_.view(G, r, 1, d)
        directions.append(s / s.norm(dim=-1, keepdim=True).clamp_min(POLAR_EPS))
        w_real = w.sum(-1)
        w_hat = w / w_real[..., None].clamp_min(POLAR_EPS)
        n_eff = 1.0 / (w_hat * w_hat).sum(-1).clamp_min(POLAR_EPS)
        # m_eff = n_eff (1 - w_null), with 1 - w_null summed from the real weights: exact even
        # when the null takes nearly all the mass.
        magnitudes.append(torch.tanh(beta_eff * torch.log1p(n_eff * w_real)))
    direction = torch.cat(directions, dim=3).permute(0, 3, 1, 2, 4).reshape(B, Tq, H, d)
    magnitude = torch.cat(magnitudes, dim=3).permute(0, 3, 1, 2).reshape(B, Tq, H)
    return direction.to(q.dtype), magnitude.to(q.dtype)


def softmax_attention_cached(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_start: int, k_start: int,
    window: int | None = None,
) -> torch.Tensor:
    """Softmax attention of q (B,Tq,H,d) at positions q_start.. over k, v (B,Tk,G,d) at k_start.. -> (B,Tq,H,d)."""
    _check_positions(q, k, q_start, k_start)
    mask = visible_keys(q_start, q.shape[1], k_start, k.shape[1], window, device=q.device)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return o.transpose(1, 2)
