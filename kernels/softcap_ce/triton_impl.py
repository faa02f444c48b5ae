"""The soft-capped cross-entropy's row passes as Triton kernels: one read of a chunk's logits each.

z [N, V] holds the LM head's pre-cap logits of one chunk (rows any stride, columns contiguous),
in the head's dtype; s = cap z / sqrt(z^2 + cap^2) (SPEC §2.1) and every sum run in fp32.

- forward: per row, the logsumexp of s (an online max over column tiles) and s at the label;
- backward: dL/dz = coef (softmax(s) - onehot(label)) cap^3 / (z^2 + cap^2)^(3/2) in z's dtype, for
  per-row weights coef (0 on ignored rows), and its column sums in fp32 (the bias gradient).

With the distillation term, target logits t [N, V] (any of the kernels' dtypes) are read beside z in
the same pass: the forward also gives, per row, the logsumexp of s / tau and of t / tau and
KL(softmax(t / tau) || softmax(s / tau)); the backward adds kl_coef (softmax(s / tau) - softmax(t /
tau)) to dL/ds before the soft-cap's slope (kl_coef is the KL sum's gradient over tau).

The PyTorch path does the same in about a dozen passes over fp32 copies of the logits; these read
the bf16 logits once per pass and the backward writes the gradient once. Both passes are custom ops
(`atma::softcap_ce_fwd` / `_bwd`, with the KL `atma::softcap_ce_kl_fwd` / `_bwd`; fake implementations
registered), so torch.compile keeps them in its graph as single calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import TRITON_DTYPES, check_launch_device, interpreting, patch_interpreter_index

__all__ = ["softcap_ce_rows_triton", "softcap_ce_grad_triton", "softcap_ce_kl_rows_triton", "softcap_ce_kl_grad_triton",
           "triton_rows_fit"]

_INTERPRET = interpreting()
if _INTERPRET:
    patch_interpreter_index()
# Both passes are bandwidth-bound. Forward (column tile, warps): one program per row walks a 50K
# vocabulary in 13 tiles of 4,096. Backward (row tile, column tile, warps): one program per tile, which
# also writes its rows' fp32 column sums (the bias gradient's partial sums, added in PyTorch).
_FWD = (64, 1) if _INTERPRET else (4096, 8)
_BWD = (4, 64, 1) if _INTERPRET else (32, 256, 8)


@triton.jit
def _softcap(z, cap):
    return cap * z / tl.sqrt(z * z + cap * cap)


@triton.jit
def _online_logsumexp(m, acc, b_x):
    """The running (max, sum of exp(x - max)) of a row after one more tile b_x (-inf where masked)."""
    m_new = tl.maximum(m, tl.max(b_x, 0))
    return m_new, acc * tl.exp(m - m_new) + tl.sum(tl.exp(b_x - m_new), 0)


@triton.jit(do_not_specialize=["V"])
def softcap_ce_fwd_kernel(z, labels, lse, picked, t, lse_st, lse_u, kl, V, stride_z, stride_t, cap, inv_tau,
                          HAS_KL: tl.constexpr, BV: tl.constexpr):
    i_n = tl.program_id(0)
    p_z = z + i_n.to(tl.int64) * stride_z
    p_t = t + i_n.to(tl.int64) * stride_t
    m = tl.full([], float("-inf"), tl.float32)
    acc = tl.full([], 0.0, tl.float32)
    # with the KL term: the same for s / tau and for u = t / tau, and sum exp(u - m_u) (u - s / tau)
    m_st, acc_st, m_u, acc_u, acc_w = m, acc, m, acc, acc
    for i_v in range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        m_v = o_v < V
        b_s = _softcap(tl.load(p_z + o_v, mask=m_v, other=0.0).to(tl.float32), cap)
        m, acc = _online_logsumexp(m, acc, tl.where(m_v, b_s, float("-inf")))
        if HAS_KL:
            b_st = b_s * inv_tau
            b_u = tl.load(p_t + o_v, mask=m_v, other=0.0).to(tl.float32) * inv_tau
            m_st, acc_st = _online_logsumexp(m_st, acc_st, tl.where(m_v, b_st, float("-inf")))
            m_u_new = tl.maximum(m_u, tl.max(tl.where(m_v, b_u, float("-inf")), 0))
            b_e = tl.where(m_v, tl.exp(b_u - m_u_new), 0.0)
            rescale = tl.exp(m_u - m_u_new)
            acc_u = acc_u * rescale + tl.sum(b_e, 0)
            acc_w = acc_w * rescale + tl.sum(b_e * (b_u - b_st), 0)
            m_u = m_u_new
    tl.store(lse + i_n, m + tl.log(acc))
    label = tl.load(labels + i_n)
    valid = (label >= 0) & (label < V)  # -100 (ignored) reads nothing; the loader refuses ids >= V
    b_zl = tl.load(p_z + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(picked + i_n, tl.where(valid, _softcap(b_zl, cap), 0.0))
    if HAS_KL:
        row_lse_st = m_st + tl.log(acc_st)
        row_lse_u = m_u + tl.log(acc_u)
        tl.store(lse_st + i_n, row_lse_st)
        tl.store(lse_u + i_n, row_lse_u)
        # KL(q || p) = sum q (u - lse_u - s / tau) + lse_st, with q = exp(u - lse_u) summing to 1
        tl.store(kl + i_n, acc_w / acc_u - row_lse_u + row_lse_st)


@triton.jit(do_not_specialize=["N", "V"])
def softcap_ce_bwd_kernel(z, labels, lse, coef, dz, part_db, t, lse_st, lse_u, kl_coef, N, V, stride_z, stride_d,
                          stride_t, cap, inv_tau, HAS_KL: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr):
    i_n, i_v = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    o_v = i_v * BV + tl.arange(0, BV)
    m_n, m_v = o_n < N, o_v < V
    m_nv = m_n[:, None] & m_v[None, :]
    o_n64 = o_n.to(tl.int64)[:, None]
    b_z = tl.load(z + o_n64 * stride_z + o_v[None, :], mask=m_nv, other=0.0).to(tl.float32)  # [BN, BV]
    b_r = 1.0 / tl.sqrt(b_z * b_z + cap * cap)
    b_s = cap * b_z * b_r
    b_lse = tl.load(lse + o_n, mask=m_n, other=0.0)
    b_label = tl.load(labels + o_n, mask=m_n, other=-1)
    b_coef = tl.load(coef + o_n, mask=m_n, other=0.0)  # 0 on rows past N: they add nothing below
    b_p = tl.exp(b_s - b_lse[:, None])
    b_d = tl.where(o_v[None, :] == b_label[:, None], b_p - 1.0, b_p) * b_coef[:, None]
    if HAS_KL:  # + kl_coef (softmax(s / tau) - softmax(t / tau))
        b_u = tl.load(t + o_n64 * stride_t + o_v[None, :], mask=m_nv, other=0.0).to(tl.float32) * inv_tau
        b_lst = tl.load(lse_st + o_n, mask=m_n, other=0.0)
        b_lu = tl.load(lse_u + o_n, mask=m_n, other=0.0)
        b_kc = tl.load(kl_coef + o_n, mask=m_n, other=0.0)
        b_d += b_kc[:, None] * (tl.exp(b_s * inv_tau - b_lst[:, None]) - tl.exp(b_u - b_lu[:, None]))
    # d softcap(z) / dz = cap^3 r^3 with r = 1 / sqrt(z^2 + cap^2)
    b_d = b_d * (cap * b_r) * (cap * b_r) * (cap * b_r)
    tl.store(dz + o_n64 * stride_d + o_v[None, :], b_d.to(dz.dtype.element_ty), mask=m_nv)
    # this row block's share of the bias gradient, summed in fp32 before the rounding to dz's dtype
    tl.store(part_db + i_n.to(tl.int64) * V + o_v, tl.sum(tl.where(m_nv, b_d, 0.0), 0), mask=m_v)


def triton_rows_fit(z: torch.Tensor) -> bool:
    """Whether the kernels take logits of this dtype and shape (fp64 and empty chunks stay in PyTorch)."""
    return z.dtype in TRITON_DTYPES and z.dim() == 2 and z.shape[0] > 0 and z.shape[1] > 0


def _check(z: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    check_launch_device(z, _INTERPRET, what)
    if not triton_rows_fit(z):
        raise ValueError(f"{what}: logits must be a non-empty (N, V) tensor of {TRITON_DTYPES}, "
                         f"got {tuple(z.shape)} {z.dtype}")
    if z.stride(1) != 1:
        raise ValueError(f"{what}: the logits' columns must be contiguous, got strides {z.stride()}")
    if labels.shape != z.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"{what}: labels must be int64 of shape ({z.shape[0]},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")


def _check_targets(z: torch.Tensor, t: torch.Tensor, tau: float, what: str) -> None:
    if t.shape != z.shape or t.dtype not in TRITON_DTYPES or t.device != z.device or t.stride(1) != 1:
        raise ValueError(f"{what}: target logits must be {tuple(z.shape)} of {TRITON_DTYPES} on {z.device} with "
                         f"contiguous columns, got {tuple(t.shape)} {t.dtype} on {t.device}, strides {t.stride()}")
    if not tau > 0:
        raise ValueError(f"{what}: the temperature must be positive, got {tau}")


def _check_rows(N: int, what: str, **rows: torch.Tensor) -> None:
    for name, t in rows.items():
        if t.shape != (N,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be contiguous fp32 of shape ({N},), got {t.dtype} {tuple(t.shape)}")


def _fwd(z, labels, cap, t=None, tau=1.0):
    """Launch the forward: (lse, picked) and with targets t also (lse_st, lse_u, kl), fp32 [N] each."""
    N, V = z.shape
    rows = [torch.empty(N, device=z.device, dtype=torch.float32) for _ in range(2 if t is None else 5)]
    lse, picked = rows[:2]
    lse_st, lse_u, kl = rows[2:] if t is not None else (lse, lse, lse)  # unread without the KL term
    BV, warps = _FWD
    softcap_ce_fwd_kernel[(N,)](z, labels, lse, picked, z if t is None else t, lse_st, lse_u, kl, V, z.stride(0),
                                0 if t is None else t.stride(0), float(cap), 1.0 / tau, HAS_KL=t is not None,
                                BV=BV, num_warps=warps)
    return tuple(rows)


def _bwd(z, labels, lse, coef, cap, t=None, lse_st=None, lse_u=None, kl_coef=None, tau=1.0):
    """Launch the backward: dz [N, V] in z's dtype and its column sums [V] in fp32."""
    N, V = z.shape
    BN, BV, warps = _BWD
    grid = (triton.cdiv(N, BN), triton.cdiv(V, BV))
    dz = torch.empty((N, V), device=z.device, dtype=z.dtype)
    part_db = torch.empty((grid[0], V), device=z.device, dtype=torch.float32)
    has_kl = t is not None
    softcap_ce_bwd_kernel[grid](
        z, labels, lse, coef, dz, part_db, t if has_kl else z, lse_st if has_kl else lse, lse_u if has_kl else lse,
        kl_coef if has_kl else coef, N, V, z.stride(0), dz.stride(0), t.stride(0) if has_kl else 0, float(cap),
        1.0 / tau, HAS_KL=has_kl, BN=BN, BV=BV, num_warps=warps,
    )
    return dz, part_db.sum(0)


@torch.library.custom_op("atma::softcap_ce_fwd", mutates_args=())
def _rows_fwd(z: torch.Tensor, labels: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp of the capped rows, capped logit at each label or 0 where ignored), fp32 [N] each."""
    return _fwd(z, labels, cap)


@torch.library.custom_op("atma::softcap_ce_bwd", mutates_args=())
def _rows_bwd(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
              cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dz [N, V] in z's dtype for the loss sum_i coef_i CE_i, and its column sums [V] in fp32."""
    return _bwd(z, labels, lse, coef, cap)


@torch.library.custom_op("atma::softcap_ce_kl_fwd", mutates_args=())
def _kl_rows_fwd(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cap: float,
                 tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's rows and, per row, logsumexp(s / tau), logsumexp(t / tau) and the KL, fp32 [N] each."""
    return _fwd(z, labels, cap, t, tau)


@torch.library.custom_op("atma::softcap_ce_kl_bwd", mutates_args=())
def _kl_rows_bwd(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, t: torch.Tensor,
                 lse_st: torch.Tensor, lse_u: torch.Tensor, kl_coef: torch.Tensor, cap: float,
                 tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dz [N, V] for sum_i coef_i CE_i + kl_coef_i tau KL_i, and its column sums [V] in fp32."""
    return _bwd(z, labels, lse, coef, cap, t, lse_st, lse_u, kl_coef, tau)


def _rows_fake(z, count: int):
    return tuple(z.new_empty(z.shape[:1], dtype=torch.float32) for _ in range(count))


def _grad_fake(z):
    return z.new_empty(z.shape), z.new_empty(z.shape[1:], dtype=torch.float32)


_rows_fwd.register_fake(lambda z, labels, cap: _rows_fake(z, 2))
_rows_bwd.register_fake(lambda z, labels, lse, coef, cap: _grad_fake(z))
_kl_rows_fwd.register_fake(lambda z, t, labels, cap, tau: _rows_fake(z, 5))
_kl_rows_bwd.register_fake(lambda z, labels, lse, coef, t, lse_st, lse_u, kl_coef, cap, tau: _grad_fake(z))


def softcap_ce_rows_triton(z: torch.Tensor, labels: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of pre-cap logits z [N, V]: (logsumexp of the capped row, capped logit at the label), fp32."""
    _check(z, labels, "softcap_ce_rows_triton")
    return _rows_fwd(z, labels.contiguous(), float(cap))


def softcap_ce_grad_triton(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                           cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """d(sum_i coef_i CE_i) / dz [N, V] in z's dtype, given each row's logsumexp `lse` (fp32 [N]), and its
    sum over rows [V] in fp32 (the bias gradient, summed before the rounding)."""
    _check(z, labels, "softcap_ce_grad_triton")
    _check_rows(z.shape[0], "softcap_ce_grad_triton", lse=lse, coef=coef)
    return _rows_bwd(z, labels.contiguous(), lse, coef, float(cap))


def softcap_ce_kl_rows_triton(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cap: float,
                              tau: float) -> tuple[torch.Tensor, ...]:
    """Per row of pre-cap logits z and target logits t [N, V]: (lse of s, s at the label, lse of s / tau, lse of
    t / tau, KL(softmax(t / tau) || softmax(s / tau))), fp32 [N] each."""
    _check(z, labels, "softcap_ce_kl_rows_triton")
    _check_targets(z, t, tau, "softcap_ce_kl_rows_triton")
    return _kl_rows_fwd(z, t, labels.contiguous(), float(cap), float(tau))


def softcap_ce_kl_grad_triton(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                              t: torch.Tensor, lse_st: torch.Tensor, lse_u: torch.Tensor, kl_coef: torch.Tensor,
                              cap: float, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """d(sum_i coef_i CE_i + kl_coef_i tau KL_i) / dz [N, V] in z's dtype from the forward's row statistics, and
    its sum over rows [V] in fp32."""
    _check(z, labels, "softcap_ce_kl_grad_triton")
    _check_targets(z, t, tau, "softcap_ce_kl_grad_triton")
    _check_rows(z.shape[0], "softcap_ce_kl_grad_triton", lse=lse, coef=coef, lse_st=lse_st, lse_u=lse_u,
                kl_coef=kl_coef)
    return _kl_rows_bwd(z, labels.contiguous(), lse, coef, t, lse_st, lse_u, kl_coef, float(cap), float(tau))
