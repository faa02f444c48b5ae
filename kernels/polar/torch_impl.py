"""Streaming (key-blocked) Polar attention in plain PyTorch, with a hand-written backward.

Works on any device and in any float dtype (fp64 for gradcheck). Peak extra memory is
O(B * H * T * block_size): the (T x T) score matrix is never formed. The forward streams the
sufficient statistics of SPEC §2.7 (running max M, real mass L, squared mass Q2, numerator S)
over key blocks; the backward (SPEC §2.8) recomputes the scores block by block from the saved
M, L, Q2 and unnormalised s. Both passes are the custom ops `atma::polar_torch_fwd` and
`atma::polar_torch_bwd` (with fake implementations and autograd registered), so torch.compile
traces one opaque call per direction instead of unrolling the block loops.

Shape legend: B batch, T positions, H query heads, G key/value heads, r = H // G query heads
per key/value head, d head dim, Tq/Tk rows/columns of one block. Internally queries are laid
out (B, G, T, r, d) so one row slice flattens to (B, G, Tq*r, d) without a copy, and every
key/value head is shared by its r query heads through a plain batched matmul (no
repeat_interleave).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..common import (
    POLAR_EPS,
    Q2_FLOOR,
    compute_dtype,
    polar_length_features,
    polar_length_terms,
    polar_visible_counts,
)

__all__ = ["polar_attention_torch"]


def _row_range(j0: int, j1: int, T: int, window: int | None) -> tuple[int, int]:
    """Return the query rows [i0, i1) that see at least one key of the block [j0, j1)."""
    i1 = T if window is None else min(T, j1 + window - 1)
    return j0, i1


def _visible(i0: int, i1: int, j0: int, j1: int, window: int | None, device) -> torch.Tensor:
    """Return the (1, 1, Tq, 1, Tk) visibility mask of rows [i0, i1) against keys [j0, j1)."""
    i = torch.arange(i0, i1, device=device)[:, None]
    j = torch.arange(j0, j1, device=device)[None, :]
    vis = j <= i
    if window is not None:
        vis = vis & (i - j < window)
    return vis[None, None, :, None, :]


def _length_terms(T, window, G, r, null_base, null_slope_raw, len_gain_raw, *, device, dtype):
    """Return (log n, sqrt(log(n+1))), each (T, 1), and t, nu laid out (G, T, r) (SPEC §2.6)."""
    n = polar_visible_counts(T, window, device=device, dtype=dtype)
    log_n, root = polar_length_features(n)
    t, nu = polar_length_terms(n, null_base, null_slope_raw, len_gain_raw)  # (H, T) each

    def by_group(x):
        return x.view(G, r, T).transpose(1, 2).contiguous()

    return log_n[:, None], root[:, None], by_group(t), by_group(nu)


def _block_scores(qg, kg, i0, i1, j0, j1, scale):
    """Return sigma (B, G, Tq, r, Tk) = q_i . k_j / sqrt(d) for rows [i0, i1) and keys [j0, j1)."""
    B, G, _, r, d = qg.shape
    q_rows = qg[:, :, i0:i1].reshape(B, G, (i1 - i0) * r, d)
    sigma = torch.matmul(q_rows, kg[:, :, j0:j1].transpose(-1, -2)) * scale
    return sigma.view(B, G, i1 - i0, r, j1 - j0)


@torch.library.custom_op("atma::polar_torch_fwd", mutates_args=())
def _polar_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_null: torch.Tensor, null_base: torch.Tensor,
    null_slope_raw: torch.Tensor, len_gain_raw: torch.Tensor, mag_beta_raw: torch.Tensor, window: int | None,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streaming forward (SPEC §2.7): direction, magnitude, and the row statistics m_fin, L, Q2, s of the backward."""
    B, T, H, d = q.shape
    G = k.shape[2]
    r = H // G
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    dev = q.device
    scale = 1.0 / math.sqrt(d)

    qg = q.to(cdt).view(B, T, G, r, d).permute(0, 2, 1, 3, 4).contiguous()  # (B,G,T,r,d)
    kg = k.to(cdt).transpose(1, 2).contiguous()  # (B,G,T,d)
    vg = v.to(cdt).transpose(1, 2).contiguous()
    v_null_, base_, slope_, gain_, beta_ = (
        p.to(cdt) for p in (v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw)
    )
    _, _, t, nu = _length_terms(T, window, G, r, base_, slope_, gain_, device=dev, dtype=cdt)

    M = torch.full((B, G, T, r), float("-inf"), device=dev, dtype=cdt)
    L = torch.zeros((B, G, T, r), device=dev, dtype=cdt)
    Q2 = torch.zeros_like(L)
    S = torch.zeros((B, G, T, r, d), device=dev, dtype=cdt)

    for j0 in range(0, T, block_size):
        j1 = min(j0 + block_size, T)
        i0, i1 = _row_range(j0, j1, T, window)
        vis = _visible(i0, i1, j0, j1, window, dev)
        sigma = _block_scores(qg, kg, i0, i1, j0, j1, scale)
        a = torch.where(vis, t[None, :, i0:i1, :, None] * sigma, float("-inf"))
        # Every row in [i0, i1) sees at least one key of this block, so m_new is finite.
        m_old = M[:, :, i0:i1]
        m_new = torch.maximum(m_old, a.amax(dim=-1))
        alpha = torch.exp(m_old - m_new)
        p = torch.exp(a - m_new[..., None])  # exactly 0 where a = -inf
        L[:, :, i0:i1] = alpha * L[:, :, i0:i1] + p.sum(-1)
        # SPEC §2.7: the squared mass rescales by alpha^2.
        Q2[:, :, i0:i1] = alpha * alpha * Q2[:, :, i0:i1] + (p * p).sum(-1)
        pv = torch.matmul(p.reshape(B, G, (i1 - i0) * r, j1 - j0), vg[:, :, j0:j1])
        S[:, :, i0:i1] = alpha[..., None] * S[:, :, i0:i1] + pv.view(B, G, i1 - i0, r, d)
        M[:, :, i0:i1] = m_new

    # Fold the null entry (logit t * nu, value v_null) into the statistics.
    a_null = (t * nu).expand(B, G, T, r)
    m_fin = torch.maximum(M, a_null)
    alpha = torch.exp(M - m_fin)
    L = alpha * L
    Q2 = alpha * alpha * Q2
    p_null = torch.exp(a_null - m_fin)
    s = alpha[..., None] * S + p_null[..., None] * v_null_.view(1, G, 1, r, d)
    Z = (L + p_null).clamp_min(POLAR_EPS)

    direction = s / torch.linalg.vector_norm(s, dim=-1, keepdim=True).clamp_min(POLAR_EPS)
    m_eff = L * L * L / (Q2.clamp_min(Q2_FLOOR) * Z)
    magnitude = torch.tanh(F.softplus(beta_).view(1, G, 1, r) * torch.log1p(m_eff))

    direction = direction.permute(0, 2, 1, 3, 4).reshape(B, T, H, d).to(out_dtype)
    magnitude = magnitude.permute(0, 2, 1, 3).reshape(B, T, H).to(out_dtype)
    return direction, magnitude, m_fin, L, Q2, s


@torch.library.custom_op("atma::polar_torch_bwd", mutates_args=())
def _polar_bwd(
    grad_dir: torch.Tensor, grad_mag: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    v_null: torch.Tensor, null_base: torch.Tensor, null_slope_raw: torch.Tensor, len_gain_raw: torch.Tensor,
    mag_beta_raw: torch.Tensor, m_fin: torch.Tensor, L: torch.Tensor, Q2: torch.Tensor, s: torch.Tensor,
    window: int | None, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Hand-written backward (SPEC §2.8) from the saved row statistics: the gradients of the eight inputs."""
    B, T, H, d = q.shape
    G = k.shape[2]
    r = H // G
    cdt = m_fin.dtype
    dev = q.device
    scale = 1.0 / math.sqrt(d)

    qg = q.to(cdt).view(B, T, G, r, d).permute(0, 2, 1, 3, 4).contiguous()
    kg = k.to(cdt).transpose(1, 2).contiguous()
    vg = v.to(cdt).transpose(1, 2).contiguous()
    v_null_, base_, slope_, gain_, beta_raw_ = (
        p.to(cdt) for p in (v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw)
    )
    log_n, root, t, nu = _length_terms(T, window, G, r, base_, slope_, gain_, device=dev, dtype=cdt)
    g_c = grad_dir.to(cdt).view(B, T, G, r, d).permute(0, 2, 1, 3, 4)
    g_mu = grad_mag.to(cdt).view(B, T, G, r).permute(0, 2, 1, 3)

    # Recompute the row-wise outputs from the saved statistics (cheap, O(B*H*T*d)).
    a_null = (t * nu).expand(B, G, T, r)
    p_null = torch.exp(a_null - m_fin)
    Z_raw = L + p_null
    Z = Z_raw.clamp_min(POLAR_EPS)
    q2_live = Q2 > Q2_FLOOR
    Q2c = Q2.clamp_min(Q2_FLOOR)
    s_norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    norm_c = s_norm.clamp_min(POLAR_EPS)
    c = s / norm_c
    m_eff = L * L * L / (Q2c * Z)
    beta_eff = F.softplus(beta_raw_).view(1, G, 1, r)
    log1p_m = torch.log1p(m_eff)
    mu = torch.tanh(beta_eff * log1p_m)
    one_minus_mu2 = 1.0 - mu * mu

    # 1. Magnitude path: m = L^3 / (Q2 * Z), Z = L + p_null. m/L is written as L^2/(Q2 Z) so
    #    that an underflowed L (null-dominated row) gives 0 instead of 0/0.
    g_m = g_mu * beta_eff * one_minus_mu2 / (1.0 + m_eff)
    z_live = Z_raw > POLAR_EPS
    m_over_z = torch.where(z_live, m_eff / Z, torch.zeros_like(m_eff))
    g_L = g_m * (3.0 * L * L / (Q2c * Z) - m_over_z)
    g_Q2 = torch.where(q2_live, -g_m * m_eff / Q2c, torch.zeros_like(g_m))
    # 2. Direction path (F.normalize): projection off c while ||s|| > eps, plain 1/eps below.
    g_cc = g_c.contiguous()
    proj = (g_cc * c).sum(-1, keepdim=True) * c
    g_s = torch.where(s_norm > POLAR_EPS, g_cc - proj, g_cc) / norm_c
    # 3. Null entry.
    g_pnull = (g_s * v_null_.view(1, G, 1, r, d)).sum(-1) - g_m * m_over_z
    g_anull = p_null * g_pnull
    g_t = g_anull * nu
    g_nu = g_anull * t

    # 4. Real keys, streamed over key blocks.
    dq = torch.zeros_like(qg)
    dk = torch.zeros_like(kg)
    dv = torch.zeros_like(vg)
    for j0 in range(0, T, block_size):
        j1 = min(j0 + block_size, T)
        i0, i1 = _row_range(j0, j1, T, window)
        Tq, Tk = i1 - i0, j1 - j0
        vis = _visible(i0, i1, j0, j1, window, dev)
        sigma = _block_scores(qg, kg, i0, i1, j0, j1, scale)
        t_rows = t[None, :, i0:i1, :, None]
        p = torch.where(vis, torch.exp(t_rows * sigma - m_fin[:, :, i0:i1, :, None]), 0.0)
        g_s_rows = g_s[:, :, i0:i1].reshape(B, G, Tq * r, d)
        dp = torch.matmul(g_s_rows, vg[:, :, j0:j1].transpose(-1, -2)).view(B, G, Tq, r, Tk)
        dp = dp + g_L[:, :, i0:i1, :, None] + 2.0 * p * g_Q2[:, :, i0:i1, :, None]
        g_a = p * dp
        g_t[:, :, i0:i1] += (g_a * sigma).sum(-1)
        g_sigma = (t_rows * scale * g_a).reshape(B, G, Tq * r, Tk)
        dq[:, :, i0:i1] += torch.matmul(g_sigma, kg[:, :, j0:j1]).view(B, G, Tq, r, d)
        q_rows = qg[:, :, i0:i1].reshape(B, G, Tq * r, d)
        dk[:, :, j0:j1] += torch.matmul(g_sigma.transpose(-1, -2), q_rows)
        dv[:, :, j0:j1] += torch.matmul(p.reshape(B, G, Tq * r, Tk).transpose(-1, -2), g_s_rows)

    # 5. Per-head parameters (softplus' = sigmoid); sums over batch and positions.
    def per_head(x):
        return x.sum(dim=(0, 2)).reshape(H)

    d_len_gain = per_head(g_t * log_n) * torch.sigmoid(gain_)
    d_null_base = per_head(g_nu)
    d_null_slope = per_head(g_nu * root) * torch.sigmoid(slope_)
    d_mag_beta = per_head(g_mu * one_minus_mu2 * log1p_m) * torch.sigmoid(beta_raw_)
    d_v_null = (p_null[..., None] * g_s).sum(dim=(0, 2)).reshape(H, d)

    dq = dq.permute(0, 2, 1, 3, 4).reshape(B, T, H, d)
    return (
        dq.to(q.dtype).contiguous(),
        dk.transpose(1, 2).to(k.dtype).contiguous(),
        dv.transpose(1, 2).to(v.dtype).contiguous(),
        d_v_null.to(v_null.dtype),
        d_null_base.to(null_base.dtype),
        d_null_slope.to(null_slope_raw.dtype),
        d_len_gain.to(len_gain_raw.dtype),
        d_mag_beta.to(mag_beta_raw.dtype),
    )


@_polar_fwd.register_fake
def _polar_fwd_fake(q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw, window, block_size):
    B, T, H, d = q.shape
    G = k.shape[2]
    cdt = compute_dtype(q.dtype)
    stats = (B, G, T, H // G)
    return (q.new_empty((B, T, H, d)), q.new_empty((B, T, H)), q.new_empty(stats, dtype=cdt),
            q.new_empty(stats, dtype=cdt), q.new_empty(stats, dtype=cdt), q.new_empty((*stats, d), dtype=cdt))


@_polar_bwd.register_fake
def _polar_bwd_fake(grad_dir, grad_mag, q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw,
                    m_fin, L, Q2, s, window, block_size):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, v_null, null_base, null_slope_raw, len_gain_raw,
                                                 mag_beta_raw))


def _polar_setup_context(ctx, inputs, output):
    *tensors, window, block_size = inputs
    ctx.save_for_backward(*tensors, *output[2:])
    ctx.window, ctx.block_size = window, block_size
    ctx.mark_non_differentiable(*output[2:])


def _polar_backward(ctx, grad_dir, grad_mag, *_):
    saved = ctx.saved_tensors  # unpack once: activation checkpointing allows one unpack per tensor
    q = saved[0]
    if grad_dir is None:
        grad_dir = torch.zeros_like(q)
    if grad_mag is None:
        grad_mag = q.new_zeros(q.shape[:3])
    return (*_polar_bwd(grad_dir, grad_mag, *saved, ctx.window, ctx.block_size), None, None)


_polar_fwd.register_autograd(_polar_backward, setup_context=_polar_setup_context)


def _check_inputs(q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw, window, block_size):
    """Raise ValueError unless the arguments follow the Polar core contract (DESIGN.md)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, d), got shape {tuple(q.shape)}")
    B, T, H, d = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[1] != T or k.shape[3] != d:
        raise ValueError(f"k must be (B, T, G, d) = ({B}, {T}, G, {d}), got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    G = k.shape[2]
    if G < 1 or H % G != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({G})")
    if tuple(v_null.shape) != (H, d):
        raise ValueError(f"v_null must be (H, d) = ({H}, {d}), got shape {tuple(v_null.shape)}")
    for name, p in (
        ("null_base", null_base),
        ("null_slope_raw", null_slope_raw),
        ("len_gain_raw", len_gain_raw),
        ("mag_beta_raw", mag_beta_raw),
    ):
        if tuple(p.shape) != (H,):
            raise ValueError(f"{name} must be (H,) = ({H},), got shape {tuple(p.shape)}")
    if not q.is_floating_point() or not k.is_floating_point() or not v.is_floating_point():
        raise ValueError("q, k and v must be floating-point tensors")
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")


def polar_attention_torch(
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
    block_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming Polar attention (SPEC §2.6-2.8): q (B,T,H,d), k, v (B,T,G,d) -> direction (B,T,H,d), magnitude (B,T,H)."""
    _check_inputs(q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw, window, block_size)
    window = None if window is None else int(window)
    direction, magnitude, *_ = _polar_fwd(
        q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw, window, int(block_size)
    )
    return direction, magnitude
