"""The soft-capped cross-entropy's row passes as Triton kernels: one read of a chunk's logits each.

z [N, V] holds the LM head's pre-cap logits of one chunk (rows any stride, columns contiguous),
in the head's dtype; s = cap z / sqrt(z^2 + cap^2) (SPEC §2.1) and every sum run in fp32.

- forward: per row, the logsumexp of s (an online max over column tiles) and s at the label;
- backward: dL/dz = coef (softmax(s) - onehot(label)) cap^3 / (z^2 + cap^2)^(3/2) in z's dtype, for
  per-row weights coef (0 on ignored rows), and its column sums in fp32 (the bias gradient).

The PyTorch path does the same in about a dozen passes over fp32 copies of the logits; these read
the bf16 logits once per pass and the backward writes the gradient once. Both are custom ops
(`atma::softcap_ce_fwd` / `_bwd`, fake implementations registered), so torch.compile keeps them in
its graph as single calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import TRITON_DTYPES, check_launch_device, interpreting, patch_interpreter_index

__all__ = ["softcap_ce_rows_triton", "softcap_ce_grad_triton", "triton_rows_fit"]

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


@triton.jit(do_not_specialize=["V"])
def softcap_ce_fwd_kernel(z, labels, lse, picked, V, stride_z, cap, BV: tl.constexpr):
    i_n = tl.program_id(0)
    p_z = z + i_n.to(tl.int64) * stride_z
    m = tl.full([], float("-inf"), tl.float32)
    acc = tl.full([], 0.0, tl.float32)
    for i_v in range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        m_v = o_v < V
        b_s = _softcap(tl.load(p_z + o_v, mask=m_v, other=0.0).to(tl.float32), cap)
        b_s = tl.where(m_v, b_s, float("-inf"))
        m_new = tl.maximum(m, tl.max(b_s, 0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(b_s - m_new), 0)
        m = m_new
    tl.store(lse + i_n, m + tl.log(acc))
    label = tl.load(labels + i_n)
    valid = (label >= 0) & (label < V)  # -100 (ignored) reads nothing; the loader refuses ids >= V
    b_zl = tl.load(p_z + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(picked + i_n, tl.where(valid, _softcap(b_zl, cap), 0.0))


@triton.jit(do_not_specialize=["N", "V"])
def softcap_ce_bwd_kernel(z, labels, lse, coef, dz, part_db, N, V, stride_z, stride_d, cap,
                          BN: tl.constexpr, BV: tl.constexpr):
    i_n, i_v = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    o_v = i_v * BV + tl.arange(0, BV)
    m_n, m_v = o_n < N, o_v < V
    m_nv = m_n[:, None] & m_v[None, :]
    o_n64 = o_n.to(tl.int64)[:, None]
    b_z = tl.load(z + o_n64 * stride_z + o_v[None, :], mask=m_nv, other=0.0).to(tl.float32)  # [BN, BV]
    b_r = 1.0 / tl.sqrt(b_z * b_z + cap * cap)
    b_lse = tl.load(lse + o_n, mask=m_n, other=0.0)
    b_label = tl.load(labels + o_n, mask=m_n, other=-1)
    b_coef = tl.load(coef + o_n, mask=m_n, other=0.0)  # 0 on rows past N: they add nothing below
    b_p = tl.exp(cap * b_z * b_r - b_lse[:, None])
    b_d = tl.where(o_v[None, :] == b_label[:, None], b_p - 1.0, b_p) * b_coef[:, None]
    # d softcap(z) / dz = cap^3 r^3 with r = 1 / sqrt(z^2 + cap^2)
    b_d = b_d * (cap * b_r) * (cap * b_r) * (cap * b_r)
    tl.store(dz + o_n64 * stride_d + o_v[None, :], b_d.to(dz.dtype.element_ty), mask=m_nv)
    # this row block's share of the bias gradient, summed in fp32 before the rounding to dz's dtype
    tl.store(part_db + i_n.to(tl.int64) * V + o_v, tl.sum(b_d, 0), mask=m_v)


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


@torch.library.custom_op("atma::softcap_ce_fwd", mutates_args=())
def _rows_fwd(z: torch.Tensor, labels: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp of the capped rows, capped logit at each label or 0 where ignored), fp32 [N] each."""
    N, V = z.shape
    lse = torch.empty(N, device=z.device, dtype=torch.float32)
    picked = torch.empty(N, device=z.device, dtype=torch.float32)
    BV, warps = _FWD
    softcap_ce_fwd_kernel[(N,)](z, labels, lse, picked, V, z.stride(0), float(cap), BV=BV, num_warps=warps)
    return lse, picked


@torch.library.custom_op("atma::softcap_ce_bwd", mutates_args=())
def _rows_bwd(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
              cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dz [N, V] in z's dtype for the loss sum_i coef_i CE_i, and its column sums [V] in fp32."""
    N, V = z.shape
    BN, BV, warps = _BWD
    grid = (triton.cdiv(N, BN), triton.cdiv(V, BV))
    dz = torch.empty((N, V), device=z.device, dtype=z.dtype)
    part_db = torch.empty((grid[0], V), device=z.device, dtype=torch.float32)
    softcap_ce_bwd_kernel[grid](
        z, labels, lse, coef, dz, part_db, N, V, z.stride(0), dz.stride(0), float(cap), BN=BN, BV=BV, num_warps=warps,
    )
    return dz, part_db.sum(0)


@_rows_fwd.register_fake
def _rows_fwd_fake(z, labels, cap):
    return z.new_empty(z.shape[:1], dtype=torch.float32), z.new_empty(z.shape[:1], dtype=torch.float32)


@_rows_bwd.register_fake
def _rows_bwd_fake(z, labels, lse, coef, cap):
    return z.new_empty(z.shape), z.new_empty(z.shape[1:], dtype=torch.float32)


def softcap_ce_rows_triton(z: torch.Tensor, labels: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of pre-cap logits z [N, V]: (logsumexp of the capped row, capped logit at the label), fp32."""
    _check(z, labels, "softcap_ce_rows_triton")
    return _rows_fwd(z, labels.contiguous(), float(cap))


def softcap_ce_grad_triton(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                           cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """d(sum_i coef_i CE_i) / dz [N, V] in z's dtype, given each row's logsumexp `lse` (fp32 [N]), and its
    sum over rows [V] in fp32 (the bias gradient, summed before the rounding)."""
    _check(z, labels, "softcap_ce_grad_triton")
    N = z.shape[0]
    for name, t in (("lse", lse), ("coef", coef)):
        if t.shape != (N,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"softcap_ce_grad_triton: {name} must be contiguous fp32 of shape ({N},), got "
                             f"{t.dtype} {tuple(t.shape)}")
    return _rows_bwd(z, labels.contiguous(), lse, coef, float(cap))
