"""Polar attention (SPEC §2.6-§2.8) as FlashAttention-style Triton kernels, forward and backward.

Shape legend: B batch, T sequence, H query heads, G key/value heads (H % G == 0), D head dim.
q is [B, T, H, D]; k and v are [B, T, G, D]; query head h reads key/value head h // (H // G)
directly from k and v (no repeated copy).

Forward (one program per BM queries of one (b, h)): stream the key tiles inside the causal /
window band and keep, per query row, the running max M, the real-key mass L, the squared mass
Q2 and the direction numerator S (SPEC §2.7), fold in the null sink, then write the unit
direction and the magnitude. Logits are kept in log2 units (exp2), so the saved M is too.

Saved for the backward, fp32: M, L, Q2 [B, T, H] (after the null fold) and the unnormalised
direction s = S + p_N v_null [B, T, H, D]. The backward is a PyTorch preamble over rows
(SPEC §2.8 steps 1-3) plus a query-parallel dq kernel and a key-parallel dk/dv kernel; the
dk/dv program owns one key tile of one KV head and loops over that head's H // G query heads,
so GQA gradients are summed in registers, without atomics.

The normalisation clamps follow the materialised oracle (`naive.py`, beside this file) exactly,
written in running-max units: with Z = L + p_N, c = s / max(|s|, eps Z) and
n_eff = Lc^2 / max(Q2, eps Lc^2) with Lc = max(L, eps Z), eps = 1e-6.

Launch configurations: autotuned among the candidates of the device's launch class;
ATMA_POLAR_AUTOTUNE=0 keeps each class default, and ATMA_POLAR_CONFIG forces one configuration
per kernel (`forced_config`), e.g. to compare every candidate with the oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..common import (
    POLAR_EPS,
    TRITON_DTYPES,
    autotune_enabled,
    check_launch_device,
    device_class,
    forced_launch_configs,
    interpreting,
    patch_interpreter_index,
    polar_length_terms,
    polar_visible_counts,
)

__all__ = [
    "polar_attention_triton",
    "launch_candidates",
    "autotune_candidates",
    "forced_config",
    "KERNELS",
    "FORCE_ENV",
]

# Whether the JIT functions below were defined for the CPU interpreter (read once, at import).
_INTERPRET = interpreting()
if _INTERPRET:
    patch_interpreter_index()
_LOG2E = 1.4426950408889634
# The same constants as compile-time values of the JIT functions.
_EPS_C = tl.constexpr(POLAR_EPS)
_LOG2E_C = tl.constexpr(_LOG2E)


@triton.jit
def _mma(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # The CPU interpreter multiplies bf16 operands wrongly; it runs every product in fp32 instead.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _log1p_pos(x):
    # log(1 + x) for x >= 0 without losing the low bits of 1 + x (log(u) * x / (u - 1), u = fl(1 + x)).
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _tanh_pos(x):
    # tanh for x >= 0; the odd series below 0.02 keeps the relative accuracy of tiny magnitudes.
    e = tl.exp(-2.0 * x)
    x2 = x * x
    return tl.where(x < 0.02, x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0))), (1.0 - e) / (1.0 + e))


@triton.jit
def _load_kv_tile(p_k0, p_v0, o_n, o_d, T, stride_kv, MASK: tl.constexpr):
    # One [BN, D] tile of keys and of values for key rows o_n; rows past T read as zero when MASK.
    p_k = p_k0 + o_n[:, None] * stride_kv + o_d[None, :]
    p_v = p_v0 + o_n[:, None] * stride_kv + o_d[None, :]
    if MASK:
        m_n = (o_n < T)[:, None]
        return tl.load(p_k, mask=m_n, other=0.0), tl.load(p_v, mask=m_n, other=0.0)
    return tl.load(p_k), tl.load(p_v)


@triton.jit
def _visible(o_m, o_n, T, WINDOW, HAS_WINDOW: tl.constexpr):
    # [BM, BN] causal (and windowed) visibility of key o_n to query o_m; keys past T never visible.
    m_vis = (o_n[None, :] <= o_m[:, None]) & (o_n[None, :] < T)
    if HAS_WINDOW:
        m_vis = m_vis & (o_m[:, None] - o_n[None, :] < WINDOW)
    return m_vis


@triton.jit
def _query_tile(k, v, T, H, G, D: tl.constexpr, BM: tl.constexpr):
    # The query tile of this program (grid (ceil(T / BM), B * H)): its head, first row, rows and
    # their mask, the K/V base pointers of the head's KV group, and the offsets of the tile in
    # [B, T, H, D] and of its rows in [B, T, H].
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos = i_b.to(tl.int64) * T
    kv0 = (bos * G + i_h // (H // G)) * D
    start_m = i_m * BM
    o_m = start_m + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    o_tile = (bos * H + i_h) * D + o_m[:, None] * (H * D) + o_d[None, :]
    o_row = (bos + o_m) * H + i_h
    return i_h, start_m, o_m, o_m < T, k + kv0, v + kv0, o_tile, o_row


@triton.jit
def _window_key_tiles(start_m, WINDOW, BM: tl.constexpr, BN: tl.constexpr):
    # Key tiles [lo, mid) are cut by the window's lower edge, [mid, start_m) are fully visible.
    lo = tl.maximum(start_m - WINDOW + 1, 0) // BN * BN
    mid = tl.minimum(tl.cdiv(tl.maximum(start_m + BM - WINDOW, 0), BN) * BN, start_m)
    return lo, mid


@triton.jit
def polar_fwd_kernel_inner(
    b_q, b_scale, b_m, b_l, b_q2, b_acc,
    p_k0, p_v0, o_m, start, end, T, WINDOW, stride_kv,
    D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    o_d = tl.arange(0, D)
    for i_n in range(start, end, BN):
        o_n = i_n + tl.arange(0, BN)
        b_k, b_v = _load_kv_tile(p_k0, p_v0, o_n, o_d, T, stride_kv, MASK)  # [BN, D] each
        # logits t * q.k / sqrt(D), in log2 units  [BM, BN]
        b_a = _mma(b_q, tl.trans(b_k), DOT_PREC, UPCAST) * b_scale[:, None]
        if MASK:
            b_a = tl.where(_visible(o_m, o_n, T, WINDOW, HAS_WINDOW), b_a, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_a, 1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_a - b_m_new[:, None])  # [BM, BN]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        # Q2 is a sum of squares: its rescale is alpha^2 (SPEC §2.7).
        b_q2 = b_q2 * b_alpha * b_alpha + tl.sum(b_p * b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + _mma(b_p.to(b_v.dtype), b_v, DOT_PREC, UPCAST)
        b_m = b_m_new
    return b_m, b_l, b_q2, b_acc


@triton.jit(do_not_specialize=["T", "WINDOW", "T_BUCKET"])
def polar_fwd_kernel(
    q, k, v, v_null, temp, nu, beta,
    o, mu, s, m, l, q2,
    T, H, G, WINDOW, qk_scale, T_BUCKET,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SAVE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    i_h, start_m, o_m, m_m, p_k0, p_v0, o_tile, o_row = _query_tile(k, v, T, H, G, D, BM)
    b_q = tl.load(q + o_tile, mask=m_m[:, None], other=0.0)  # [BM, D]
    b_t = tl.load(temp + i_h * T + o_m, mask=m_m, other=1.0)  # [BM]
    b_scale = b_t * qk_scale

    b_m = tl.full([BM], -1e38, dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_q2 = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)

    # Key tiles: [lo, mid) cut by the window's lower edge, [mid, start_m) fully visible,
    # [start_m, start_m + BM) the diagonal tiles.
    if HAS_WINDOW:
        lo, mid = _window_key_tiles(start_m, WINDOW, BM, BN)
        b_m, b_l, b_q2, b_acc = polar_fwd_kernel_inner(
            b_q, b_scale, b_m, b_l, b_q2, b_acc, p_k0, p_v0, o_m, lo, mid, T, WINDOW, G * D,
            D, BN, True, HAS_WINDOW, DOT_PREC, UPCAST,
        )
    else:
        mid = 0
    b_m, b_l, b_q2, b_acc = polar_fwd_kernel_inner(
        b_q, b_scale, b_m, b_l, b_q2, b_acc, p_k0, p_v0, o_m, mid, start_m, T, WINDOW, G * D,
        D, BN, False, HAS_WINDOW, DOT_PREC, UPCAST,
    )
    b_m, b_l, b_q2, b_acc = polar_fwd_kernel_inner(
        b_q, b_scale, b_m, b_l, b_q2, b_acc, p_k0, p_v0, o_m, start_m, tl.minimum(start_m + BM, T), T,
        WINDOW, G * D, D, BN, True, HAS_WINDOW, DOT_PREC, UPCAST,
    )

    # Null fold (SPEC §2.7): the null logit t * nu joins the running max like one more key.
    b_an = b_t * tl.load(nu + i_h * T + o_m, mask=m_m, other=0.0) * _LOG2E_C
    b_m_new = tl.maximum(b_m, b_an)
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha
    b_q2 = b_q2 * b_alpha * b_alpha
    b_acc = b_acc * b_alpha[:, None]
    b_pn = tl.exp2(b_an - b_m_new)
    b_z = b_l + b_pn
    b_vn = tl.load(v_null + i_h * D + tl.arange(0, D)).to(tl.float32)  # [D]
    b_s = b_acc + b_pn[:, None] * b_vn[None, :]  # [BM, D]
    b_norm = tl.sqrt(tl.sum(b_s * b_s, 1))
    b_c = b_s / tl.maximum(b_norm, _EPS_C * b_z)[:, None]
    b_lc = tl.maximum(b_l, _EPS_C * b_z)
    b_neff = b_lc * b_lc / tl.maximum(b_q2, _EPS_C * b_lc * b_lc)
    b_meff = b_neff * (b_l / b_z)
    b_mu = _tanh_pos(tl.load(beta + i_h) * _log1p_pos(b_meff))

    tl.store(o + o_tile, b_c.to(o.dtype.element_ty), mask=m_m[:, None])
    tl.store(mu + o_row, b_mu.to(mu.dtype.element_ty), mask=m_m)
    if SAVE:
        tl.store(s + o_tile, b_s, mask=m_m[:, None])
        tl.store(m + o_row, b_m_new, mask=m_m)
        tl.store(l + o_row, b_l, mask=m_m)
        tl.store(q2 + o_row, b_q2, mask=m_m)


@triton.jit
def polar_bwd_kernel_dq_inner(
    b_q, b_gs, b_scale, b_mr, b_gl, b_gq2, b_dq, b_gt, b_gsum,
    p_k0, p_v0, o_m, start, end, T, WINDOW, stride_kv,
    D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    o_d = tl.arange(0, D)
    for i_n in range(start, end, BN):
        o_n = i_n + tl.arange(0, BN)
        b_k, b_v = _load_kv_tile(p_k0, p_v0, o_n, o_d, T, stride_kv, MASK)  # [BN, D] each
        b_qk = _mma(b_q, tl.trans(b_k), DOT_PREC, UPCAST)  # [BM, BN] raw q.k
        # p_j = exp(a_j - M), recomputed from the saved max (no second max pass)
        b_p = tl.exp2(b_qk * b_scale[:, None] - b_mr[:, None])
        if MASK:
            b_p = tl.where(_visible(o_m, o_n, T, WINDOW, HAS_WINDOW), b_p, 0.0)
        b_dp = _mma(b_gs, tl.trans(b_v), DOT_PREC, UPCAST)  # [BM, BN] g_s . v_j
        # dL/da_j = p_j (g_s . v_j + g_L + 2 p_j g_Q2)   (SPEC §2.8 step 4)
        b_ga = b_p * (b_dp + b_gl[:, None] + 2.0 * b_p * b_gq2[:, None])
        b_dq += _mma(b_ga.to(b_k.dtype), b_k, DOT_PREC, UPCAST)
        b_gt += tl.sum(b_ga * b_qk, 1)
        b_gsum += tl.sum(b_ga, 1)
    return b_dq, b_gt, b_gsum


@triton.jit(do_not_specialize=["T", "WINDOW", "T_BUCKET"])
def polar_bwd_kernel_dq(
    q, k, v, gs, temp, m, gl, gq2, dq, gt, gsum,
    T, H, G, WINDOW, qk_scale, inv_sqrt_d, T_BUCKET,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    i_h, start_m, o_m, m_m, p_k0, p_v0, o_tile, o_row = _query_tile(k, v, T, H, G, D, BM)
    b_q = tl.load(q + o_tile, mask=m_m[:, None], other=0.0)  # [BM, D]
    b_gs = tl.load(gs + o_tile, mask=m_m[:, None], other=0.0)  # [BM, D]
    b_t = tl.load(temp + i_h * T + o_m, mask=m_m, other=1.0)
    b_scale = b_t * qk_scale
    b_mr = tl.load(m + o_row, mask=m_m, other=float("inf"))
    b_gl = tl.load(gl + o_row, mask=m_m, other=0.0)
    b_gq2 = tl.load(gq2 + o_row, mask=m_m, other=0.0)
    b_dq = tl.zeros([BM, D], dtype=tl.float32)
    b_gt = tl.zeros([BM], dtype=tl.float32)
    b_gsum = tl.zeros([BM], dtype=tl.float32)

    if HAS_WINDOW:
        lo, mid = _window_key_tiles(start_m, WINDOW, BM, BN)
        b_dq, b_gt, b_gsum = polar_bwd_kernel_dq_inner(
            b_q, b_gs, b_scale, b_mr, b_gl, b_gq2, b_dq, b_gt, b_gsum, p_k0, p_v0, o_m, lo, mid, T, WINDOW,
            G * D, D, BN, True, HAS_WINDOW, DOT_PREC, UPCAST,
        )
    else:
        mid = 0
    b_dq, b_gt, b_gsum = polar_bwd_kernel_dq_inner(
        b_q, b_gs, b_scale, b_mr, b_gl, b_gq2, b_dq, b_gt, b_gsum, p_k0, p_v0, o_m, mid, start_m, T, WINDOW,
        G * D, D, BN, False, HAS_WINDOW, DOT_PREC, UPCAST,
    )
    b_dq, b_gt, b_gsum = polar_bwd_kernel_dq_inner(
        b_q, b_gs, b_scale, b_mr, b_gl, b_gq2, b_dq, b_gt, b_gsum, p_k0, p_v0, o_m, start_m,
        tl.minimum(start_m + BM, T), T, WINDOW, G * D, D, BN, True, HAS_WINDOW, DOT_PREC, UPCAST,
    )
    # a_j = t sigma_j with sigma_j = q.k_j / sqrt(D): dq = t / sqrt(D) sum_j g_a,j k_j,
    # and the real-key part of dL/dt is sum_j g_a,j sigma_j.
    b_dq = b_dq * (b_t * inv_sqrt_d)[:, None]
    tl.store(dq + o_tile, b_dq.to(dq.dtype.element_ty), mask=m_m[:, None])
    tl.store(gt + o_row, b_gt * inv_sqrt_d, mask=m_m)
    tl.store(gsum + o_row, b_gsum, mask=m_m)


@triton.jit
def polar_bwd_kernel_dkdv_inner(
    b_k, b_v, b_dk, b_dv,
    p_q0, p_gs0, p_t0, p_m0, p_gl0, p_gq20, o_n, start, end, T, H, WINDOW, qk_scale, inv_sqrt_d,
    D: tl.constexpr, BM: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    o_d = tl.arange(0, D)
    for i_m in range(start, end, BM):
        o_m = i_m + tl.arange(0, BM)
        m_m = o_m < T
        b_q = tl.load(p_q0 + o_m[:, None] * (H * D) + o_d[None, :], mask=m_m[:, None], other=0.0)  # [BM, D]
        b_gs = tl.load(p_gs0 + o_m[:, None] * (H * D) + o_d[None, :], mask=m_m[:, None], other=0.0)  # [BM, D]
        b_t = tl.load(p_t0 + o_m, mask=m_m, other=1.0)  # [BM]
        # rows past T get M = +inf, hence p = 0 and no contribution
        b_mr = tl.load(p_m0 + o_m * H, mask=m_m, other=float("inf"))
        b_gl = tl.load(p_gl0 + o_m * H, mask=m_m, other=0.0)
        b_gq2 = tl.load(p_gq20 + o_m * H, mask=m_m, other=0.0)
        b_qkT = _mma(b_k, tl.trans(b_q), DOT_PREC, UPCAST)  # [BN, BM]
        b_pT = tl.exp2(b_qkT * (b_t * qk_scale)[None, :] - b_mr[None, :])
        if MASK:
            m_vis = o_m[None, :] >= o_n[:, None]
            if HAS_WINDOW:
                m_vis = m_vis & (o_m[None, :] - o_n[:, None] < WINDOW)
            b_pT = tl.where(m_vis, b_pT, 0.0)
        b_dv += _mma(b_pT.to(b_gs.dtype), b_gs, DOT_PREC, UPCAST)  # [BN, D]
        b_dpT = _mma(b_v, tl.trans(b_gs), DOT_PREC, UPCAST)  # [BN, BM]
        b_gaT = b_pT * (b_dpT + b_gl[None, :] + 2.0 * b_pT * b_gq2[None, :])
        b_dsT = b_gaT * (b_t * inv_sqrt_d)[None, :]
        b_dk += _mma(b_dsT.to(b_q.dtype), b_q, DOT_PREC, UPCAST)  # [BN, D]
    return b_dk, b_dv


@triton.jit(do_not_specialize=["T", "WINDOW", "T_BUCKET"])
def polar_bwd_kernel_dkdv(
    q, k, v, gs, temp, m, gl, gq2, dk, dv,
    T, H, G, WINDOW, qk_scale, inv_sqrt_d, T_BUCKET,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    i_n, i_bg = tl.program_id(0), tl.program_id(1)
    i_b, i_g = i_bg // G, i_bg % G
    R = H // G
    bos = i_b.to(tl.int64) * T

    start_n = i_n * BN
    o_n = start_n + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_n = o_n < T
    o_tile = (bos * G + i_g) * D + o_n[:, None] * (G * D) + o_d[None, :]
    b_k = tl.load(k + o_tile, mask=m_n[:, None], other=0.0)  # [BN, D]
    b_v = tl.load(v + o_tile, mask=m_n[:, None], other=0.0)  # [BN, D]
    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, D], dtype=tl.float32)

    # Query tiles: [start_n, start_n + BN) the diagonal, then fully visible tiles, then (window
    # only) the tiles cut by the window's upper edge, ending at the last query that sees the tile.
    if HAS_WINDOW:
        hi = tl.minimum(start_n + BN + WINDOW - 1, T)
        full = tl.minimum(start_n + BN + tl.maximum(WINDOW - BN, 0) // BM * BM, hi)
    else:
        hi = T
        full = T
    for i_r in range(0, R):
        i_h = i_g * R + i_r
        p_q0 = q + (bos * H + i_h) * D
        p_gs0 = gs + (bos * H + i_h) * D
        p_t0 = temp + i_h * T
        p_m0 = m + bos * H + i_h
        p_gl0 = gl + bos * H + i_h
        p_gq20 = gq2 + bos * H + i_h
        b_dk, b_dv = polar_bwd_kernel_dkdv_inner(
            b_k, b_v, b_dk, b_dv, p_q0, p_gs0, p_t0, p_m0, p_gl0, p_gq20, o_n,
            start_n, tl.minimum(start_n + BN, T), T, H, WINDOW, qk_scale, inv_sqrt_d,
            D, BM, True, HAS_WINDOW, DOT_PREC, UPCAST,
        )
        b_dk, b_dv = polar_bwd_kernel_dkdv_inner(
            b_k, b_v, b_dk, b_dv, p_q0, p_gs0, p_t0, p_m0, p_gl0, p_gq20, o_n,
            start_n + BN, full, T, H, WINDOW, qk_scale, inv_sqrt_d,
            D, BM, False, HAS_WINDOW, DOT_PREC, UPCAST,
        )
        if HAS_WINDOW:
            b_dk, b_dv = polar_bwd_kernel_dkdv_inner(
                b_k, b_v, b_dk, b_dv, p_q0, p_gs0, p_t0, p_m0, p_gl0, p_gq20, o_n,
                full, hi, T, H, WINDOW, qk_scale, inv_sqrt_d,
                D, BM, True, HAS_WINDOW, DOT_PREC, UPCAST,
            )
    tl.store(dk + o_tile, b_dk.to(dk.dtype.element_ty), mask=m_n[:, None])
    tl.store(dv + o_tile, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None])


# ---------------------------------------------------------------------------------------------
# Launch configurations: (BM, BN, num_warps, num_stages). The forward and dq kernels need
# BM % BN == 0 and the dk/dv kernel BN % BM == 0 (their tile loops start on those boundaries).
# The first entry of each list is the class default; the rest are autotuning candidates.
_CONFIGS_HALF = {
    "large": {
        "fwd": [(128, 64, 8, 2), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2),
                (64, 64, 4, 2)],
        "dq": [(64, 32, 8, 2), (128, 32, 8, 2), (128, 32, 4, 3), (128, 64, 8, 2), (32, 32, 4, 2),
               (64, 64, 8, 2)],
        "dkdv": [(32, 64, 8, 1), (16, 64, 8, 2), (32, 128, 8, 2), (32, 128, 4, 3), (64, 128, 8, 2),
                 (16, 32, 4, 2)],
    },
    "mid": {
        "fwd": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
        "dq": [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2)],
        "dkdv": [(32, 64, 8, 1), (16, 64, 8, 2), (16, 32, 4, 2)],
    },
    "small": {
        "fwd": [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        "dq": [(32, 32, 4, 2), (64, 32, 8, 2)],
        "dkdv": [(16, 32, 4, 2), (32, 64, 8, 1)],
    },
}
# fp32 operands take twice the registers and shared memory of bf16 ones.
_CONFIGS_FP32 = {
    "fwd": [(32, 32, 4, 2), (64, 32, 4, 2)],
    "dq": [(32, 16, 4, 2), (32, 32, 4, 2)],
    "dkdv": [(16, 32, 8, 1), (16, 32, 4, 2)],
}
# One small configuration under the interpreter: tiles smaller than the test sequences, with
# BM != BN so that every loop boundary case is exercised.
_CONFIG_INTERPRET = {"fwd": (32, 16, 1, 1), "dq": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1)}
KERNELS = ("fwd", "dq", "dkdv")
# Forces one launch configuration per named kernel, in place of autotuning (or of the interpreter's
# configuration), e.g. ATMA_POLAR_CONFIG="fwd=128,64,8,2;dq=64,32,8,2;dkdv=32,64,8,1".
FORCE_ENV = "ATMA_POLAR_CONFIG"
_TUNED: dict = {}


def _tiles_fit(kind: str, bm: int, bn: int) -> bool:
    """Whether the tile loops of `kind` can start on these boundaries (see the launch tables above)."""
    return (bm % bn == 0) if kind != "dkdv" else (bn % bm == 0)


def launch_candidates(kind: str, device: torch.device, dtype: torch.dtype, d: int) -> list:
    """Return every autotuning candidate (BM, BN, warps, stages) of one kernel, the class default first."""
    if dtype == torch.float32:
        cands = _CONFIGS_FP32[kind]
    else:
        cls = device_class(device, "ATMA_POLAR_TRITON_PROFILE")
        cands = _CONFIGS_HALF["small" if d > 128 else cls][kind]
    if d > 128:  # [BM, D] / [BN, D] tiles with D = 256 need half the rows
        cands = [(max(bm // 2, 16), max(bn // 2, 16), w, s) for bm, bn, w, s in cands]
    for bm, bn, _, _ in cands:
        assert _tiles_fit(kind, bm, bn), (kind, bm, bn)
    return list(cands)


def autotune_candidates(kind: str, device: torch.device, dtype: torch.dtype, d: int) -> tuple:
    """The candidates autotuning runs: all of them, or the class default alone when ATMA_POLAR_AUTOTUNE=0."""
    cands = launch_candidates(kind, device, dtype, d)
    return tuple(cands if autotune_enabled("ATMA_POLAR_AUTOTUNE") else cands[:1])


def forced_config(kind: str) -> tuple[int, int, int, int] | None:
    """Return the launch configuration ATMA_POLAR_CONFIG forces on `kind`, or None."""
    config = forced_launch_configs(FORCE_ENV, KERNELS).get(kind)
    if config is None:
        return None
    bm, bn, warps, _ = config
    if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1) or warps & (warps - 1) or not _tiles_fit(kind, bm, bn):
        need = "BM % BN == 0" if kind != "dkdv" else "BN % BM == 0"
        raise ValueError(
            f"{FORCE_ENV}: {kind}={','.join(map(str, config))} needs BM, BN powers of two >= 16 with {need} "
            "and a power-of-two warp count"
        )
    return config


def _launcher(kernel, name: str, device: torch.device, dtype: torch.dtype, d: int):
    """Return a callable kernel[grid](...) that picks the block sizes: autotuned on a GPU unless forced."""
    config = forced_config(name) or (_CONFIG_INTERPRET[name] if _INTERPRET else None)
    if config is not None:
        bm, bn, w, s = config

        def run(grid, *args, **kw):
            g = grid({"BM": bm, "BN": bn})
            kernel[g](*args, BM=bm, BN=bn, num_warps=w, num_stages=s, **kw)

        return run
    cands = autotune_candidates(name, device, dtype, d)
    key = (name, cands)
    tuned = _TUNED.get(key)
    if tuned is None:
        configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in cands]
        tuned = triton.autotune(configs=configs, key=["D", "HAS_WINDOW", "T_BUCKET"])(kernel)
        _TUNED[key] = tuned

    def run(grid, *args, **kw):
        tuned[grid](*args, **kw)

    return run


def _t_bucket(T: int) -> int:
    """Autotuning key for the sequence length: the next power of two (min 256)."""
    return max(256, triton.next_power_of_2(T))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get fp32-accurate products: three TF32 tensor-core passes (no plain TF32)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _polar_fwd(q, k, v, v_null, temp, nu, beta, window: int | None, save: bool):
    """Launch the forward kernel; returns (direction, magnitude, s, m, l, q2)."""
    B, T, H, D = q.shape
    G = k.shape[2]
    direction = torch.empty_like(q)
    magnitude = torch.empty((B, T, H), device=q.device, dtype=q.dtype)
    if save:
        s = torch.empty((B, T, H, D), device=q.device, dtype=torch.float32)
        m, l, q2 = (torch.empty((B, T, H), device=q.device, dtype=torch.float32) for _ in range(3))
    else:
        s = m = l = q2 = direction  # never written when SAVE is off
    run = _launcher(polar_fwd_kernel, "fwd", q.device, q.dtype, D)
    run(
        lambda meta: (triton.cdiv(T, meta["BM"]), B * H),
        q, k, v, v_null, temp, nu, beta, direction, magnitude, s, m, l, q2,
        T, H, G, window or 0, _LOG2E / math.sqrt(D), _t_bucket(T),
        D=D, HAS_WINDOW=window is not None, SAVE=save,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_INTERPRET,
    )
    if not save:
        s = m = l = q2 = None
    return direction, magnitude, s, m, l, q2


def _bwd_row_terms(s, m, l, q2, temp, nu, beta, v_null, g_dir, g_mag, io_dtype):
    """SPEC §2.8 steps 1-3 per query row, in fp32.

    Returns g_s [B,T,H,D] (io dtype, for the kernels), g_L, g_Q2 and the null-logit gradient
    g_aN [B,T,H], and the per-head gradients that need no O(T^2) work: d beta [H], d v_null [H,D].
    """
    p_n = torch.exp2(temp.t() * nu.t() * _LOG2E - m)  # [B, T, H]
    z = l + p_n
    # direction: c = s / max(|s|, eps Z)
    ns = torch.linalg.vector_norm(s, dim=-1)
    den = torch.maximum(ns, POLAR_EPS * z)
    use_s = ns >= POLAR_EPS * z
    gc = g_dir.to(torch.float32).contiguous()
    if gc.data_ptr() == g_dir.data_ptr():
        gc = gc.clone()
    inv = 1.0 / den
    proj = torch.linalg.vecdot(gc, s) * inv  # g_c . c
    # |s| >= eps Z: g_s = (g_c - (g_c.c) c) / |s|; else c = s / (eps Z): g_s = g_c / (eps Z), dc/dZ = -c/Z
    coef = torch.where(use_s, proj * inv * inv, 0.0)
    g_s = gc.mul_(inv[..., None]).addcmul_(s, coef[..., None], value=-1.0)
    g_z = torch.where(use_s, 0.0, -proj / z)
    # magnitude: m_eff = n_eff L / Z with n_eff = Lc^2 / max(Q2, eps Lc^2), Lc = max(L, eps Z);
    # d log m = [Q2 unclamped] (2 d log Lc - d log Q2) + d log L - d log Z
    lc = torch.maximum(l, POLAR_EPS * z)
    use_l = l >= POLAR_EPS * z
    den_q = torch.maximum(q2, POLAR_EPS * lc * lc)
    use_q2 = q2 >= POLAR_EPS * lc * lc
    n_eff = lc * lc / den_q
    m_eff = n_eff * l / z
    log1p_m = torch.log1p(m_eff)
    mu = torch.tanh(beta * log1p_m)
    g_mag = g_mag.to(torch.float32)
    g_m = g_mag * beta * (1.0 - mu * mu) / (1.0 + m_eff)
    g_logm = g_m * m_eff  # dL/d(log m)
    r = g_m * n_eff / z  # = g_logm / L, without dividing by L
    g_l = r - g_logm / z + torch.where(use_q2, 2.0 * torch.where(use_l, r, g_logm / z), 0.0) + g_z
    g_q2 = torch.where(use_q2, -g_logm / den_q, 0.0)
    # null entry (SPEC §2.8 step 3): dL/da_N = p_N (g_s . v_null + dL/dp_N through Z and the clamps)
    g_pn = -g_logm / z + torch.where(use_q2 & ~use_l, 2.0 * g_logm / z, 0.0) + g_z
    g_an = p_n * (g_pn + torch.einsum("bthd,hd->bth", g_s, v_null.to(torch.float32)))
    grad_beta = (g_mag * (1.0 - mu * mu) * log1p_m).sum((0, 1))
    grad_v_null = torch.einsum("bth,bthd->hd", p_n, g_s)
    return g_s.to(io_dtype), g_l.contiguous(), g_q2.contiguous(), g_an, grad_beta, grad_v_null


class _PolarAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, v_null, temp, nu, beta, window, save):
        direction, magnitude, s, m, l, q2 = _polar_fwd(q, k, v, v_null, temp, nu, beta, window, save)
        if save:
            ctx.save_for_backward(q, k, v, v_null, temp, nu, beta, s, m, l, q2)
        ctx.window = window
        return direction, magnitude

    @staticmethod
    def backward(ctx, g_dir, g_mag):
        q, k, v, v_null, temp, nu, beta, s, m, l, q2 = ctx.saved_tensors
        window = ctx.window
        B, T, H, D = q.shape
        G = k.shape[2]
        g_s, g_l, g_q2, g_an, grad_beta, grad_v_null = _bwd_row_terms(
            s, m, l, q2, temp, nu, beta, v_null, g_dir, g_mag, q.dtype
        )
        common = dict(D=D, HAS_WINDOW=window is not None, DOT_PREC=_dot_precision(q.dtype), UPCAST=_INTERPRET)
        scalars = (T, H, G, window or 0, _LOG2E / math.sqrt(D), 1.0 / math.sqrt(D), _t_bucket(T))
        dq = dk = dv = grad_temp = grad_nu = None
        need = ctx.needs_input_grad
        if need[0] or need[4] or need[5]:
            dq = torch.empty_like(q)
            gt, gsum = (torch.empty((B, T, H), device=q.device, dtype=torch.float32) for _ in range(2))
            run = _launcher(polar_bwd_kernel_dq, "dq", q.device, q.dtype, D)
            run(lambda meta: (triton.cdiv(T, meta["BM"]), B * H),
                q, k, v, g_s, temp, m, g_l, g_q2, dq, gt, gsum, *scalars, **common)
            # dL/dt = sum_j g_a,j sigma_j + g_aN nu. Adding one constant to every logit (null
            # included) changes neither c nor mu, so g_aN = -sum_j g_a,j exactly; the form
            # sum_j g_a,j (sigma_j - nu) uses that to cancel the bf16 error the kernel's g_a,j share.
            grad_temp = (gt - gsum * nu.t()).sum(0).t()
            grad_nu = (g_an * temp.t()).sum(0).t()
            if not need[0]:
                dq = None
        if need[1] or need[2]:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            run = _launcher(polar_bwd_kernel_dkdv, "dkdv", q.device, q.dtype, D)
            run(lambda meta: (triton.cdiv(T, meta["BN"]), B * G),
                q, k, v, g_s, temp, m, g_l, g_q2, dk, dv, *scalars, **common)
        return dq, dk, dv, grad_v_null.to(v_null.dtype), grad_temp, grad_nu, grad_beta, None, None


def _check_inputs(q, k, v, v_null, params, window) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q must be (B, T, H, d) and k, v (B, T, G, d)")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(
            f"k and v must be (B, T, G, d) matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    G = k.shape[2]
    if G == 0 or H % G != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({G})")
    if D < 16 or D & (D - 1):
        raise ValueError(f"the Triton Polar kernel needs a head dim that is a power of two >= 16, got {D}")
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among fp32/bf16/fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if tuple(v_null.shape) != (H, D) or any(tuple(p.shape) != (H,) for p in params):
        raise ValueError(f"v_null must be ({H}, {D}) and the four per-head scalars ({H},)")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be a positive integer or None, got {window}")
    check_launch_device(q, _INTERPRET, "polar_attention_triton")


@torch.compiler.disable
def polar_attention_triton(
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
    """Polar attention (SPEC §2.6) in Triton: q [B,T,H,d], k, v [B,T,G,d] -> (direction [B,T,H,d], mu [B,T,H])."""
    params = (null_base, null_slope_raw, len_gain_raw, mag_beta_raw)
    _check_inputs(q, k, v, v_null, params, window)
    B, T, H, D = q.shape
    if q.numel() == 0:
        return q.new_empty(q.shape), q.new_empty((B, T, H))
    if window is not None and int(window) >= T:
        window = None  # a window covering the whole sequence changes neither the band nor the count
    window = None if window is None else int(window)
    # Length terms (SPEC §2.6) in fp32 as [H, T]; autograd carries their gradients to the raw scalars.
    n = polar_visible_counts(T, window, device=q.device, dtype=torch.float32)
    temp, nu = polar_length_terms(n, null_base.float(), null_slope_raw.float(), len_gain_raw.float())
    beta = F.softplus(mag_beta_raw.float())
    inputs = (q.contiguous(), k.contiguous(), v.contiguous(), v_null.contiguous(), temp, nu, beta)
    # Statistics for the backward are written only when a gradient can be asked for.
    save = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    return _PolarAttention.apply(*inputs, window, save)
