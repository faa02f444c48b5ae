"""Causal depthwise conv1d (SPEC §2.4) as Triton kernels, forward and backward.

Shape legend: B batch, T sequence, C channels, K taps. x is [B, T, C] (any strides), weight is
[C, K] and weight[:, K - 1] multiplies the current token:
    y[b, t, c] = sum_k weight[c, k] * x[b, t - (K - 1) + k, c],   x[b, <0, c] = 0.
Products and sums run in fp32; y and dx come back in x's dtype, dweight in weight's dtype.
The weight gradient is reduced without atomics: each (batch, time tile) program writes its
partial [C, K] sums and PyTorch adds them up. Both passes are the custom ops
`atma::causal_conv1d_triton_fwd` / `_bwd` (fake implementations and autograd registered), so
torch.compile keeps them in the graph as single calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import TRITON_DTYPES, check_launch_device, interpreting, patch_interpreter_index

__all__ = ["causal_conv1d_triton"]

_INTERPRET = interpreting()
if _INTERPRET:
    patch_interpreter_index()
# (BT, BC, num_warps): the conv is bandwidth-bound; wide channel tiles keep loads coalesced.
_BLOCKS = (32, 32, 1) if _INTERPRET else (64, 128, 4)


@triton.jit(do_not_specialize=["T"])
def causal_conv1d_fwd_kernel(
    x, w, y,
    T, C, stride_xb, stride_xt, stride_xc,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    p_x0 = x + i_b.to(tl.int64) * stride_xb
    b_y = tl.zeros([BT, BC], dtype=tl.float32)
    for i_k in tl.static_range(K):
        o_src = o_t - (K - 1) + i_k  # [BT] input positions feeding tap i_k
        m_src = (o_src >= 0) & (o_src < T)
        b_x = tl.load(p_x0 + o_src[:, None] * stride_xt + o_c[None, :] * stride_xc,
                      mask=m_src[:, None] & m_c[None, :], other=0.0).to(tl.float32)  # [BT, BC]
        b_w = tl.load(w + o_c * K + i_k, mask=m_c, other=0.0).to(tl.float32)  # [BC]
        b_y += b_x * b_w[None, :]
    p_y = y + i_b.to(tl.int64) * T * C + o_t[:, None] * C + o_c[None, :]
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=(o_t < T)[:, None] & m_c[None, :])


@triton.jit(do_not_specialize=["T"])
def causal_conv1d_bwd_kernel(
    x, w, dy, dx, dw,
    T, C, NT, stride_xb, stride_xt, stride_xc, stride_yb, stride_yt, stride_yc,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_DW: tl.constexpr,
):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t = o_t < T
    m_c = o_c < C
    p_x0 = x + i_b.to(tl.int64) * stride_xb
    p_dy0 = dy + i_b.to(tl.int64) * stride_yb
    b_dx = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_DW:
        # dy at this tile's own positions, for dweight[c, k] = sum_t dy[t, c] x[t - (K - 1) + k, c]
        b_dy = tl.load(p_dy0 + o_t[:, None] * stride_yt + o_c[None, :] * stride_yc,
                       mask=m_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)  # [BT, BC]
    for i_k in tl.static_range(K):
        # dx[t] = sum_k w[k] dy[t + (K - 1) - k]
        o_dst = o_t + (K - 1) - i_k
        b_dyk = tl.load(p_dy0 + o_dst[:, None] * stride_yt + o_c[None, :] * stride_yc,
                        mask=(o_dst < T)[:, None] & m_c[None, :], other=0.0).to(tl.float32)
        b_w = tl.load(w + o_c * K + i_k, mask=m_c, other=0.0).to(tl.float32)
        b_dx += b_dyk * b_w[None, :]
        if HAS_DW:
            o_src = o_t - (K - 1) + i_k
            m_src = (o_src >= 0) & (o_src < T)
            b_x = tl.load(p_x0 + o_src[:, None] * stride_xt + o_c[None, :] * stride_xc,
                          mask=m_src[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            p_dw = dw + (i_b.to(tl.int64) * NT + i_t) * C * K + o_c * K + i_k
            tl.store(p_dw, tl.sum(b_dy * b_x, 0), mask=m_c)
    p_dx = dx + i_b.to(tl.int64) * T * C + o_t[:, None] * C + o_c[None, :]
    tl.store(p_dx, b_dx.to(dx.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


def _grid(B: int, T: int, C: int):
    BT, BC, _ = _BLOCKS
    return (triton.cdiv(T, BT), triton.cdiv(C, BC), B)


@torch.library.custom_op("atma::causal_conv1d_triton_fwd", mutates_args=())
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y [B,T,C] of x [B,T,C] (any strides) and a contiguous weight [C,K]."""
    B, T, C = x.shape
    K = weight.shape[1]
    BT, BC, warps = _BLOCKS
    y = torch.empty((B, T, C), device=x.device, dtype=x.dtype)
    causal_conv1d_fwd_kernel[_grid(B, T, C)](
        x, weight, y, T, C, *x.stride(), K=K, BT=BT, BC=BC, num_warps=warps,
    )
    return y


@torch.library.custom_op("atma::causal_conv1d_triton_bwd", mutates_args=())
def _conv_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx [B,T,C] and, when `weight_grad`, dweight [C,K] (else an empty tensor)."""
    B, T, C = x.shape
    K = weight.shape[1]
    BT, BC, warps = _BLOCKS
    grid = _grid(B, T, C)
    dx = torch.empty((B, T, C), device=x.device, dtype=x.dtype)
    dw = torch.empty((B * grid[0], C, K), device=x.device, dtype=torch.float32) if weight_grad else dx
    causal_conv1d_bwd_kernel[grid](
        x, weight, dy, dx, dw, T, C, grid[0], *x.stride(), *dy.stride(),
        K=K, BT=BT, BC=BC, HAS_DW=weight_grad, num_warps=warps,
    )
    dweight = dw.sum(0).to(weight.dtype) if weight_grad else weight.new_empty(0)
    return dx, dweight


@_conv_fwd.register_fake
def _conv_fwd_fake(x, weight):
    return x.new_empty(x.shape)


@_conv_bwd.register_fake
def _conv_bwd_fake(dy, x, weight, weight_grad):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if weight_grad else (0,))


def _conv_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[1]
    dx, dweight = _conv_bwd(dy, x, weight, weight_grad)
    return dx, dweight if weight_grad else None


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv1d in Triton: x [B,T,C], weight [C,K] -> [B,T,C], no bias or activation."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"expected x (B, T, C) and weight (C, K); got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in TRITON_DTYPES or weight.dtype not in TRITON_DTYPES:
        raise ValueError(f"x and weight must be fp32/bf16/fp16, got {x.dtype} and {weight.dtype}")
    if weight.shape[1] < 1:
        raise ValueError("weight needs at least one tap")
    check_launch_device(x, _INTERPRET, "causal_conv1d_triton")
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return x * weight[:, -1].to(x.dtype)  # empty result that stays in the autograd graph
    return _conv_fwd(x, weight.contiguous())
