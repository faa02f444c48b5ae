"""Polar attention (SPEC §2.6-§2.8): the Triton JIT kernels. The host side (launches, launch
configurations, custom ops) is `triton_impl.py`, beside this file.

Shape legend: B batch, T sequence, H query heads, G key/value heads (H % G == 0), D head dim.
q is [B, T, H, D]; k and v are [B, T, G, D]; query head h reads key/value head h // (H // G)
directly from k and v. Logits are kept in log2 units (exp2), so the saved running max M is too.

Every kernel takes the four raw per-head scalars (null_base, null_slope_raw, len_gain_raw,
mag_beta_raw) and computes the length terms of its rows itself (`_length_terms`, the formula of
`kernels.common.numerics.polar_length_terms` restated in Triton).

- `polar_fwd_kernel`, one program per BM queries of one (b, h): streams the key tiles of the
  causal / window band, keeps per row the running max M, the real-key mass L, the squared mass
  Q2 and the direction numerator S (SPEC §2.7), folds in the null sink, writes the unit
  direction and the magnitude, and saves M, L, Q2 [B, T, H] and s = S + p_N v_null [B, T, H, D].
- `polar_bwd_kernel_dq`, query-parallel: the row terms of SPEC §2.8 steps 1-3 (g_s, g_L, g_Q2,
  g_aN) in its prologue, written out for the key-parallel kernel; then (DQ_LOOP) the dq loop over
  key tiles; then its rows' share of the per-head sums (step 5), one slot per program.
- `polar_bwd_kernel_dkdv`, key-parallel: one key tile of one KV head, looping over the head's
  H // G query heads (GQA sums in registers). With ONE_PASS it also adds each tile pair's dq into
  an fp32 buffer (atomic adds) and writes its share of the temperature sum: the one-pass backward.
- `polar_bwd_kernel_heads`, one program per head: adds the slots up in a fixed order and applies
  the softplus chain rule: the gradients of v_null and of the four raw scalars.

The forward, dq and dk/dv kernels run a 1-D grid whose program ids go over the tiles in
longest-first order by default (`_program_tile`): the tiles with the most causal work start first.

The normalisation clamps follow the materialised oracle (`naive.py`) exactly, written in
running-max units: with Z = L + p_N, c = s / max(|s|, eps Z) and n_eff = Lc^2 / max(Q2, eps Lc^2)
with Lc = max(L, eps Z), eps = 1e-6.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common import POLAR_EPS, interpreting, patch_interpreter_index

__all__ = [
    "polar_fwd_kernel",
    "polar_bwd_kernel_dq",
    "polar_bwd_kernel_dkdv",
    "polar_bwd_kernel_heads",
    "polar_length_terms_kernel",
    "polar_program_order_kernel",
    "LOG2E",
]

if interpreting():
    patch_interpreter_index()
LOG2E = 1.4426950408889634
# The same constants as compile-time values of the JIT functions. In products they stand right of a
# tensor (`b_z * _EPS_C`): with the constant first, triton 3.8's interpreter wraps the product in a
# constexpr that tl.maximum then refuses. Compiled kernels are the same either way.
_EPS_C = tl.constexpr(POLAR_EPS)
_LOG2E_C = tl.constexpr(LOG2E)


# ------------------------------------------------------------------------------ scalar helpers
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
def _softplus(x):
    # F.softplus (beta 1, threshold 20): x above 20, else log(1 + e^x).
    return tl.where(x > 20.0, x, _log1p_pos(tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _softplus_grad(x):
    # d softplus / dx as F.softplus's backward computes it: 1 above the threshold, else e^x / (e^x + 1).
    z = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, 1.0, z / (z + 1.0))


@triton.jit
def _head_scalars(null_base, null_slope_raw, len_gain_raw, mag_beta_raw, i_h):
    # Effective per-head scalars (SPEC §2.6): a = softplus(len_gain_raw), s = softplus(null_slope_raw),
    # b = null_base, beta = softplus(mag_beta_raw), in fp32.
    a = _softplus(tl.load(len_gain_raw + i_h).to(tl.float32))
    s = _softplus(tl.load(null_slope_raw + i_h).to(tl.float32))
    b = tl.load(null_base + i_h).to(tl.float32)
    beta = _softplus(tl.load(mag_beta_raw + i_h).to(tl.float32))
    return a, s, b, beta


@triton.jit
def _visible_count(o_m, WINDOW, HAS_WINDOW: tl.constexpr):
    # SPEC §2.6: the count n = min(i + 1, W) (>= 1) of query rows o_m, in fp32.
    n = o_m + 1
    if HAS_WINDOW:
        n = tl.minimum(n, WINDOW)
    return n.to(tl.float32)


@triton.jit
def _temperature(o_m, WINDOW, a, HAS_WINDOW: tl.constexpr):
    # t = 1 + a ln n (SPEC §2.6) for query rows o_m. Returns (ln n, t).
    log_n = tl.log(_visible_count(o_m, WINDOW, HAS_WINDOW))
    return log_n, 1.0 + a * log_n


@triton.jit
def _null_floor(o_m, WINDOW, s, b, HAS_WINDOW: tl.constexpr):
    # nu = b + s sqrt(ln(n + 1)) (SPEC §2.6) for query rows o_m. Returns (sqrt(ln(n + 1)), nu).
    root = tl.sqrt_rn(tl.log(_visible_count(o_m, WINDOW, HAS_WINDOW) + 1.0))
    return root, b + s * root


@triton.jit
def _length_terms(o_m, WINDOW, a, s, b, HAS_WINDOW: tl.constexpr):
    # Both length terms, as kernels.common.numerics.polar_length_terms computes them:
    # (ln n, sqrt(ln(n + 1)), t, nu).
    log_n, t = _temperature(o_m, WINDOW, a, HAS_WINDOW)
    root, nu = _null_floor(o_m, WINDOW, s, b, HAS_WINDOW)
    return log_n, root, t, nu


# ------------------------------------------------------------------------------ tiles and masks
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
def _program_tile(T, TILE: tl.constexpr, LAST_HEAVIEST: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    # The (tile along T, slice) this program owns in a 1-D grid of ceil(T / TILE) * slices programs;
    # also returns the tile count. A GPU starts programs in the order of their id. Under the causal
    # mask a tile's work grows with its distance from the sequence's light end (query tiles: the
    # last one sees every key; key tiles: the first one is seen by every query). With LONGEST_FIRST
    # the ids run over every slice of the heaviest tile first, then the next heaviest, so the short
    # programs fill the last wave (longest-processing-time-first order); else tile-major per slice.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(T, TILE)
    if LONGEST_FIRST:
        slices = tl.num_programs(0) // n_tiles
        i_tile = pid // slices
        i_slice = pid % slices
        if LAST_HEAVIEST:
            i_tile = n_tiles - 1 - i_tile
    else:
        i_tile = pid % n_tiles
        i_slice = pid // n_tiles
    return i_tile, i_slice, n_tiles


@triton.jit
def _query_program(T, BM: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    # (query tile, b * H + h, tile count) of this program: the last query tile sees the most keys.
    return _program_tile(T, BM, True, LONGEST_FIRST)


@triton.jit
def _key_program(T, BN: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    # (key tile, b * G + g, tile count) of this program: the first key tile is seen by the most queries.
    return _program_tile(T, BN, False, LONGEST_FIRST)


@triton.jit
def _query_tile(k, v, T, H, G, D: tl.constexpr, BM: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    # The query tile of this program (ceil(T / BM) * B * H programs, `_program_tile`): its batch,
    # head, tile index and first row, rows and their mask, the K/V base pointers of the head's KV
    # group, the offsets of the (b, h) slice in [B, T, H, D] and in [B, T, H] (int64 scalars), and
    # the int32 offsets of the tile and of its rows within that slice (int32 keeps the per-element
    # offsets in one register); last, the number of query tiles.
    i_m, i_bh, n_tiles = _query_program(T, BM, LONGEST_FIRST)
    i_b, i_h = i_bh // H, i_bh % H
    bos = i_b.to(tl.int64) * T
    kv0 = (bos * G + i_h // (H // G)) * D
    start_m = i_m * BM
    o_m = start_m + tl.arange(0, BM)
    o_tile = o_m[:, None] * (H * D) + tl.arange(0, D)[None, :]
    return (i_b, i_h, i_m, start_m, o_m, o_m < T, k + kv0, v + kv0, (bos * H + i_h) * D, bos * H + i_h, o_tile,
            o_m * H, n_tiles)


@triton.jit
def _window_key_tiles(start_m, WINDOW, BM: tl.constexpr, BN: tl.constexpr):
    # Key tiles [lo, mid) are cut by the window's lower edge, [mid, start_m) are fully visible.
    lo = tl.maximum(start_m - WINDOW + 1, 0) // BN * BN
    mid = tl.minimum(tl.cdiv(tl.maximum(start_m + BM - WINDOW, 0), BN) * BN, start_m)
    return lo, mid


# ------------------------------------------------------------------------------ forward
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
    q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw,
    o, mu, s, m, l, q2,
    T, H, G, WINDOW, qk_scale, T_BUCKET,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SAVE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, LONGEST_FIRST: tl.constexpr,
):
    i_b, i_h, _, start_m, o_m, m_m, p_k0, p_v0, tile0, row0, o_tile, o_row, _ = _query_tile(
        k, v, T, H, G, D, BM, LONGEST_FIRST
    )
    a_len, s_null, b_null, beta = _head_scalars(null_base, null_slope_raw, len_gain_raw, mag_beta_raw, i_h)
    _, _, b_t, b_nu = _length_terms(o_m, WINDOW, a_len, s_null, b_null, HAS_WINDOW)
    b_q = tl.load(q + tile0 + o_tile, mask=m_m[:, None], other=0.0)  # [BM, D]
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
    b_an = b_t * b_nu * _LOG2E_C
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
    b_c = b_s / tl.maximum(b_norm, b_z * _EPS_C)[:, None]
    b_lc = tl.maximum(b_l, b_z * _EPS_C)
    b_neff = b_lc * b_lc / tl.maximum(b_q2, b_lc * _EPS_C * b_lc)
    b_meff = b_neff * (b_l / b_z)
    b_mu = _tanh_pos(beta * _log1p_pos(b_meff))

    tl.store(o + tile0 + o_tile, b_c.to(o.dtype.element_ty), mask=m_m[:, None])
    tl.store(mu + row0 + o_row, b_mu.to(mu.dtype.element_ty), mask=m_m)
    if SAVE:
        tl.store(s + tile0 + o_tile, b_s, mask=m_m[:, None])
        tl.store(m + row0 + o_row, b_m_new, mask=m_m)
        tl.store(l + row0 + o_row, b_l, mask=m_m)
        tl.store(q2 + row0 + o_row, b_q2, mask=m_m)


# ------------------------------------------------------------------------------ backward
@triton.jit
def _row_grads(b_s, b_mr, b_l, b_q2, b_an, b_vn, beta, b_gc, b_gmag):
    # SPEC §2.8 steps 1-3 for a tile of rows, from the saved s, M, L, Q2 and the upstream g_c,
    # g_mu. Returns g_s [BM, D], g_L, g_Q2, the null-logit gradient g_aN and p_N [BM], and the
    # rows' terms of d beta, g_mu (1 - mu^2) ln(1 + m_eff).
    b_pn = tl.exp2(b_an - b_mr)
    b_z = b_l + b_pn
    # direction: c = s / max(|s|, eps Z). |s| >= eps Z: g_s = (g_c - (g_c.c) c) / |s|;
    # else c = s / (eps Z): g_s = g_c / (eps Z) and dc/dZ = -c / Z.
    b_ns = tl.sqrt(tl.sum(b_s * b_s, 1))
    use_s = b_ns >= b_z * _EPS_C
    b_inv = 1.0 / tl.maximum(b_ns, b_z * _EPS_C)
    b_proj = tl.sum(b_gc * b_s, 1) * b_inv  # g_c . c
    b_coef = tl.where(use_s, b_proj * b_inv * b_inv, 0.0)
    b_gs = b_gc * b_inv[:, None] - b_s * b_coef[:, None]
    b_gz = tl.where(use_s, 0.0, -b_proj / b_z)
    # magnitude: m_eff = n_eff L / Z with n_eff = Lc^2 / max(Q2, eps Lc^2), Lc = max(L, eps Z);
    # d log m = [Q2 unclamped] (2 d log Lc - d log Q2) + d log L - d log Z
    b_lc = tl.maximum(b_l, b_z * _EPS_C)
    use_l = b_l >= b_z * _EPS_C
    b_den_q = tl.maximum(b_q2, b_lc * _EPS_C * b_lc)
    use_q2 = b_q2 >= b_lc * _EPS_C * b_lc
    b_neff = b_lc * b_lc / b_den_q
    b_meff = b_neff * b_l / b_z
    b_log1p_m = _log1p_pos(b_meff)
    b_mu = _tanh_pos(beta * b_log1p_m)
    b_gm = b_gmag * beta * (1.0 - b_mu * b_mu) / (1.0 + b_meff)
    b_glogm = b_gm * b_meff  # dL/d(log m)
    b_r = b_gm * b_neff / b_z  # = g_logm / L, without dividing by L
    b_gl = b_r - b_glogm / b_z + tl.where(use_q2, 2.0 * tl.where(use_l, b_r, b_glogm / b_z), 0.0) + b_gz
    b_gq2 = tl.where(use_q2, -b_glogm / b_den_q, 0.0)
    # null entry (step 3): dL/da_N = p_N (g_s . v_null + dL/dp_N through Z and the clamps)
    b_gpn = -b_glogm / b_z + tl.where(use_q2 & (b_l < b_z * _EPS_C), 2.0 * b_glogm / b_z, 0.0) + b_gz
    b_gan = b_pn * (b_gpn + tl.sum(b_gs * b_vn[None, :], 1))
    b_gbeta = b_gmag * (1.0 - b_mu * b_mu) * b_log1p_m
    return b_gs, b_gl, b_gq2, b_gan, b_pn, b_gbeta


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
    q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw,
    s, m, l, q2, g_dir, g_mag,
    gs, gl, gq2, dq, part_s, part_v,
    T, H, G, WINDOW, qk_scale, inv_sqrt_d, T_BUCKET,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr, DQ_LOOP: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ROW_TERMS: tl.constexpr, LONGEST_FIRST: tl.constexpr,
):
    i_b, i_h, i_m, start_m, o_m, m_m, p_k0, p_v0, tile0, row0, o_tile, o_row, n_tiles = _query_tile(
        k, v, T, H, G, D, BM, LONGEST_FIRST
    )
    o_d = tl.arange(0, D)
    a_len, s_null, b_null, beta = _head_scalars(null_base, null_slope_raw, len_gain_raw, mag_beta_raw, i_h)
    log_n, root, b_t, b_nu = _length_terms(o_m, WINDOW, a_len, s_null, b_null, HAS_WINDOW)
    # This program's slot of the per-head sums (SPEC §2.8 step 5, before the softplus factors):
    # [g_t ln n, g_nu, g_nu sqrt(ln(n + 1)), d beta] and d v_null = sum p_N g_s, with g_nu = g_aN t.
    slot = (i_b * n_tiles + i_m) * H + i_h
    # Rows past T read values that keep every term finite (M = +inf gives p_N = 0 and p_j = 0,
    # L = Q2 = 1) and are excluded from every sum below.
    b_mr = tl.load(m + row0 + o_row, mask=m_m, other=float("inf"))

    if ROW_TERMS:
        # Row terms (SPEC §2.8 steps 1-3).
        b_s = tl.load(s + tile0 + o_tile, mask=m_m[:, None], other=0.0)
        b_l = tl.load(l + row0 + o_row, mask=m_m, other=1.0)
        b_q2 = tl.load(q2 + row0 + o_row, mask=m_m, other=1.0)
        b_gc = tl.load(g_dir + tile0 + o_tile, mask=m_m[:, None], other=0.0).to(tl.float32)
        b_gmag = tl.load(g_mag + row0 + o_row, mask=m_m, other=0.0).to(tl.float32)
        b_vn = tl.load(v_null + i_h * D + o_d).to(tl.float32)  # [D]
        b_gs, b_gl, b_gq2, b_gan, b_pn, b_gbeta = _row_grads(
            b_s, b_mr, b_l, b_q2, b_t * b_nu * _LOG2E_C, b_vn, beta, b_gc, b_gmag
        )
        # The O(T^2) loops take g_s in the io dtype (tensor-core operands), as stored for dk/dv.
        b_gs_io = b_gs.to(gs.dtype.element_ty)
        tl.store(gs + tile0 + o_tile, b_gs_io, mask=m_m[:, None])
        tl.store(gl + row0 + o_row, b_gl, mask=m_m)
        tl.store(gq2 + row0 + o_row, b_gq2, mask=m_m)
        # All sums but the first are written before the dq loop, so that g_s in fp32 dies here.
        b_gnu = tl.where(m_m, b_gan * b_t, 0.0)
        tl.store(part_s + slot * 4 + 1, tl.sum(b_gnu, 0))
        tl.store(part_s + slot * 4 + 2, tl.sum(b_gnu * root, 0))
        tl.store(part_s + slot * 4 + 3, tl.sum(tl.where(m_m, b_gbeta, 0.0), 0))
        tl.store(part_v + slot * D + o_d, tl.sum(tl.where(m_m[:, None], b_pn[:, None] * b_gs, 0.0), 0))
    else:
        # The row terms were written by an earlier launch of this kernel (the split backward).
        b_gs_io = tl.load(gs + tile0 + o_tile, mask=m_m[:, None], other=0.0)
        b_gl = tl.load(gl + row0 + o_row, mask=m_m, other=0.0)
        b_gq2 = tl.load(gq2 + row0 + o_row, mask=m_m, other=0.0)

    # dL/dt = sum_j g_a,j sigma_j + g_aN nu. Adding one constant to every logit (null included)
    # changes neither c nor mu, so g_aN = -sum_j g_a,j exactly; the form sum_j g_a,j (sigma_j - nu)
    # uses that to cancel the bf16 error the g_a,j share. Without DQ_LOOP the key-parallel
    # one-pass kernel adds that sum instead.
    if DQ_LOOP:
        b_scale = b_t * qk_scale
        b_q = tl.load(q + tile0 + o_tile, mask=m_m[:, None], other=0.0)  # [BM, D]
        b_dq = tl.zeros([BM, D], dtype=tl.float32)
        b_gt = tl.zeros([BM], dtype=tl.float32)
        b_gsum = tl.zeros([BM], dtype=tl.float32)
        if HAS_WINDOW:
            lo, mid = _window_key_tiles(start_m, WINDOW, BM, BN)
            b_dq, b_gt, b_gsum = polar_bwd_kernel_dq_inner(
                b_q, b_gs_io, b_scale, b_mr, b_gl, b_gq2, b_dq, b_gt, b_gsum, p_k0, p_v0, o_m, lo, mid, T,
                WINDOW, G * D, D, BN, True, HAS_WINDOW, DOT_PREC, UPCAST,
            )
        else:
            mid = 0
        b_dq, b_gt, b_gsum = polar_bwd_kernel_dq_inner(
            b_q, b_gs_io, b_scale, b_mr, b_gl, b_gq2, b_dq, b_gt, b_gsum, p_k0, p_v0, o_m, mid, start_m, T,
            WINDOW, G * D, D, BN, False, HAS_WINDOW, DOT_PREC, UPCAST,
        )
        b_dq, b_gt, b_gsum = polar_bwd_kernel_dq_inner(
            b_q, b_gs_io, b_scale, b_mr, b_gl, b_gq2, b_dq, b_gt, b_gsum, p_k0, p_v0, o_m, start_m,
            tl.minimum(start_m + BM, T), T, WINDOW, G * D, D, BN, True, HAS_WINDOW, DOT_PREC, UPCAST,
        )
        # a_j = t sigma_j with sigma_j = q.k_j / sqrt(D): dq = t / sqrt(D) sum_j g_a,j k_j.
        b_dq = b_dq * (b_t * inv_sqrt_d)[:, None]
        tl.store(dq + tile0 + o_tile, b_dq.to(dq.dtype.element_ty), mask=m_m[:, None])
        b_gtemp = tl.where(m_m, (b_gt * inv_sqrt_d - b_gsum * b_nu) * log_n, 0.0)
        if ROW_TERMS:
            tl.store(part_s + slot * 4 + 0, tl.sum(b_gtemp, 0))
        else:  # the split backward: part_s holds only this sum, one slot per (batch, query tile, head)
            tl.store(part_s + slot, tl.sum(b_gtemp, 0))
    else:
        tl.store(part_s + slot * 4 + 0, 0.0)


@triton.jit
def polar_bwd_kernel_dkdv_inner(
    b_k, b_v, b_dk, b_dv, b_gtk,
    p_q0, p_gs0, p_m0, p_gl0, p_gq20, p_dq0, o_n, start, end, T, H, WINDOW, a_len, s_null, b_null,
    qk_scale, inv_sqrt_d,
    D: tl.constexpr, BM: tl.constexpr, MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, ONE_PASS: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    o_d = tl.arange(0, D)
    for i_m in range(start, end, BM):
        o_m = i_m + tl.arange(0, BM)
        m_m = o_m < T
        b_q = tl.load(p_q0 + o_m[:, None] * (H * D) + o_d[None, :], mask=m_m[:, None], other=0.0)  # [BM, D]
        b_gs = tl.load(p_gs0 + o_m[:, None] * (H * D) + o_d[None, :], mask=m_m[:, None], other=0.0)  # [BM, D]
        log_n, b_t = _temperature(o_m, WINDOW, a_len, HAS_WINDOW)  # [BM]
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
        b_dsT = (b_gaT * (b_t * inv_sqrt_d)[None, :]).to(b_q.dtype)
        b_dk += _mma(b_dsT, b_q, DOT_PREC, UPCAST)  # [BN, D]
        if ONE_PASS:
            # this tile pair's share of dq (fp32 atomic adds) and of sum_j g_a,j (sigma_j - nu) ln n
            b_dq = _mma(tl.trans(b_dsT), b_k, DOT_PREC, UPCAST)  # [BM, D]
            tl.atomic_add(p_dq0 + o_m[:, None] * (H * D) + o_d[None, :], b_dq, mask=m_m[:, None], sem="relaxed")
            _, b_nu = _null_floor(o_m, WINDOW, s_null, b_null, HAS_WINDOW)
            b_gtk += tl.sum(b_gaT * (b_qkT * inv_sqrt_d - b_nu[None, :]) * log_n[None, :], 1)
    return b_dk, b_dv, b_gtk


@triton.jit(do_not_specialize=["T", "WINDOW", "T_BUCKET"])
def polar_bwd_kernel_dkdv(
    q, k, v, null_base, null_slope_raw, len_gain_raw, gs, m, gl, gq2, dk, dv, dq_acc, part_t,
    T, H, G, WINDOW, qk_scale, inv_sqrt_d, T_BUCKET,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr, ONE_PASS: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, LONGEST_FIRST: tl.constexpr,
):
    i_n, i_bg, n_tiles = _key_program(T, BN, LONGEST_FIRST)
    i_b, i_g = i_bg // G, i_bg % G
    R = H // G
    bos = i_b.to(tl.int64) * T

    start_n = i_n * BN
    o_n = start_n + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_n = o_n < T
    kv0 = (bos * G + i_g) * D
    o_tile = o_n[:, None] * (G * D) + o_d[None, :]
    b_k = tl.load(k + kv0 + o_tile, mask=m_n[:, None], other=0.0)  # [BN, D]
    b_v = tl.load(v + kv0 + o_tile, mask=m_n[:, None], other=0.0)  # [BN, D]
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
        a_len = _softplus(tl.load(len_gain_raw + i_h).to(tl.float32))
        s_null = _softplus(tl.load(null_slope_raw + i_h).to(tl.float32))
        b_null = tl.load(null_base + i_h).to(tl.float32)
        p_q0 = q + (bos * H + i_h) * D
        p_gs0 = gs + (bos * H + i_h) * D
        p_dq0 = dq_acc + (bos * H + i_h) * D
        p_m0 = m + bos * H + i_h
        p_gl0 = gl + bos * H + i_h
        p_gq20 = gq2 + bos * H + i_h
        b_gtk = tl.zeros([BN], dtype=tl.float32)
        b_dk, b_dv, b_gtk = polar_bwd_kernel_dkdv_inner(
            b_k, b_v, b_dk, b_dv, b_gtk, p_q0, p_gs0, p_m0, p_gl0, p_gq20, p_dq0, o_n,
            start_n, tl.minimum(start_n + BN, T), T, H, WINDOW, a_len, s_null, b_null, qk_scale, inv_sqrt_d,
            D, BM, True, HAS_WINDOW, ONE_PASS, DOT_PREC, UPCAST,
        )
        b_dk, b_dv, b_gtk = polar_bwd_kernel_dkdv_inner(
            b_k, b_v, b_dk, b_dv, b_gtk, p_q0, p_gs0, p_m0, p_gl0, p_gq20, p_dq0, o_n,
            start_n + BN, full, T, H, WINDOW, a_len, s_null, b_null, qk_scale, inv_sqrt_d,
            D, BM, False, HAS_WINDOW, ONE_PASS, DOT_PREC, UPCAST,
        )
        if HAS_WINDOW:
            b_dk, b_dv, b_gtk = polar_bwd_kernel_dkdv_inner(
                b_k, b_v, b_dk, b_dv, b_gtk, p_q0, p_gs0, p_m0, p_gl0, p_gq20, p_dq0, o_n,
                full, hi, T, H, WINDOW, a_len, s_null, b_null, qk_scale, inv_sqrt_d,
                D, BM, True, HAS_WINDOW, ONE_PASS, DOT_PREC, UPCAST,
            )
        if ONE_PASS:
            # this key tile's slot of the temperature sum of head i_h
            tl.store(part_t + (i_b * n_tiles + i_n) * H + i_h, tl.sum(b_gtk, 0))
    tl.store(dk + kv0 + o_tile, b_dk.to(dk.dtype.element_ty), mask=m_n[:, None])
    tl.store(dv + kv0 + o_tile, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None])


@triton.jit(do_not_specialize=["R", "R_T"])
def polar_bwd_kernel_heads(
    part_s, part_v, part_t, null_slope_raw, len_gain_raw, mag_beta_raw,
    d_v_null, d_null_base, d_null_slope_raw, d_len_gain_raw, d_mag_beta_raw,
    R, R_T, H, D: tl.constexpr, RB: tl.constexpr,
):
    # One program per head: the slots [R, H, 4] and [R, H, D] of the query-parallel kernel and
    # [R_T, H] of the one-pass kernel, added in a fixed order; then SPEC §2.8 step 5.
    i_h = tl.program_id(0)
    o_r = tl.arange(0, RB)
    o_d = tl.arange(0, D)
    o_4 = tl.arange(0, 4)
    b_sums = tl.zeros([4], dtype=tl.float32)
    b_vn = tl.zeros([D], dtype=tl.float32)
    for r0 in range(0, R, RB):
        m_r = (r0 + o_r) < R
        o_slot = (r0 + o_r) * H + i_h
        b_sums += tl.sum(tl.load(part_s + o_slot[:, None] * 4 + o_4[None, :], mask=m_r[:, None], other=0.0), 0)
        b_vn += tl.sum(tl.load(part_v + o_slot[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.0), 0)
    b_gt = tl.zeros([RB], dtype=tl.float32)
    for r0 in range(0, R_T, RB):
        b_gt += tl.load(part_t + (r0 + o_r) * H + i_h, mask=(r0 + o_r) < R_T, other=0.0)
    g_lg = tl.sum(b_gt, 0) + tl.sum(tl.where(o_4 == 0, b_sums, 0.0), 0)
    g_nb = tl.sum(tl.where(o_4 == 1, b_sums, 0.0), 0)
    g_ns = tl.sum(tl.where(o_4 == 2, b_sums, 0.0), 0)
    g_mb = tl.sum(tl.where(o_4 == 3, b_sums, 0.0), 0)
    # t = 1 + softplus(len_gain_raw) ln n, nu = null_base + softplus(null_slope_raw) sqrt(ln(n + 1)),
    # beta = softplus(mag_beta_raw): the chain rule through each softplus.
    g_lg = g_lg * _softplus_grad(tl.load(len_gain_raw + i_h).to(tl.float32))
    g_ns = g_ns * _softplus_grad(tl.load(null_slope_raw + i_h).to(tl.float32))
    g_mb = g_mb * _softplus_grad(tl.load(mag_beta_raw + i_h).to(tl.float32))
    tl.store(d_v_null + i_h * D + o_d, b_vn.to(d_v_null.dtype.element_ty))
    tl.store(d_null_base + i_h, g_nb.to(d_null_base.dtype.element_ty))
    tl.store(d_null_slope_raw + i_h, g_ns.to(d_null_slope_raw.dtype.element_ty))
    tl.store(d_len_gain_raw + i_h, g_lg.to(d_len_gain_raw.dtype.element_ty))
    tl.store(d_mag_beta_raw + i_h, g_mb.to(d_mag_beta_raw.dtype.element_ty))


@triton.jit(do_not_specialize=["T"])
def polar_program_order_kernel(out, T, TILE: tl.constexpr, KEY_TILES: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    # Writes (tile, slice) [programs, 2] of each program id through `_key_program` or `_query_program`,
    # the mappings the kernels above use, so a test can check the order in which their programs start.
    pid = tl.program_id(0)
    if KEY_TILES:
        i_tile, i_slice, _ = _key_program(T, TILE, LONGEST_FIRST)
    else:
        i_tile, i_slice, _ = _query_program(T, TILE, LONGEST_FIRST)
    tl.store(out + pid * 2, i_tile)
    tl.store(out + pid * 2 + 1, i_slice)


@triton.jit(do_not_specialize=["T", "WINDOW"])
def polar_length_terms_kernel(
    null_base, null_slope_raw, len_gain_raw, t, nu, T, H, WINDOW,
    HAS_WINDOW: tl.constexpr, BT: tl.constexpr,
):
    # Writes t and nu [H, T] through `_length_terms`, the code every kernel above runs, so a test
    # can compare them with kernels.common.numerics.polar_length_terms.
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    a_len = _softplus(tl.load(len_gain_raw + i_h).to(tl.float32))
    s_null = _softplus(tl.load(null_slope_raw + i_h).to(tl.float32))
    b_null = tl.load(null_base + i_h).to(tl.float32)
    _, _, b_t, b_nu = _length_terms(o_t, WINDOW, a_len, s_null, b_null, HAS_WINDOW)
    tl.store(t + i_h * T + o_t, b_t, mask=o_t < T)
    tl.store(nu + i_h * T + o_t, b_nu, mask=o_t < T)
