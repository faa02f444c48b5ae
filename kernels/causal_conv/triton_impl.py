"""Causal depthwise conv1d (SPEC §2.4) as Triton kernels, forward and backward.

Shape legend: B batch, T sequence, C channels, K taps. x is [B, T, C] (any strides), weight is
[C, K] and weight[:, K - 1] multiplies the current token:
    y[b, t, c] = sum_k weight[c, k] * x[b, t - (K - 1) + k, c],   x[b, <0, c] = 0.
Products and sums run in fp32; y and dx come back in x's dtype, dweight in weight's dtype.
The weight gradient is reduced without atomics: each (batch, time tile) program writes its
partial [C, K] sums and PyTorch adds them up. Tiles: triton.autotune picks each pass's (BT, BC,
warps) among CANDIDATES on first use per power-of-two bucket of T, C and K (ATMA_CONV_AUTOTUNE=0
keeps the first; ATMA_CONV_CONFIG="fwd=BT,BC,WARPS,STAGES;bwd=..." forces one). Both passes are the custom ops
`atma::causal_conv1d_triton_fwd` / `_bwd` (fake implementations and autograd registered), so
torch.compile keeps them in the graph as single calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import (
    TRITON_DTYPES,
    autotune_enabled,
    check_launch_device,
    forced_launch_configs,
    interpreting,
    patch_interpreter_index,
    tile_launcher,
)

__all__ = ["causal_conv1d_triton", "forced_config", "last_launch_configs", "CANDIDATES", "CONFIG_ENV", "KINDS"]

_INTERPRET = interpreting()
if _INTERPRET:
    patch_interpreter_index()
# (BT, BC, num_warps, num_stages). The conv is bandwidth-bound and wide channel tiles keep its loads
# coalesced; fewer time rows per program hold fewer values per thread, so more programs fit on an SM
# at once. The first is the tile every launch used before autotuning.
CANDIDATES = ((64, 128, 4, 1), (32, 128, 4, 1), (16, 128, 4, 1), (16, 256, 8, 1), (32, 128, 8, 1))
_CONFIG_INTERPRET = (32, 32, 1, 1)
KINDS = ("fwd", "bwd")
CONFIG_ENV = "ATMA_CONV_CONFIG"
_TUNED: dict = {}
_LAST_CONFIGS: dict[str, tuple[int, int, int, int]] = {}


def forced_config(kind: str) -> tuple[int, int, int, int] | None:
    """The (BT, BC, warps, stages) ATMA_CONV_CONFIG forces on `kind` ("fwd" or "bwd"), or None."""
    config = forced_launch_configs(CONFIG_ENV, KINDS).get(kind)
    if config is not None and any(v & (v - 1) for v in config[:3]):
        raise ValueError(f"{CONFIG_ENV}: {kind}={','.join(map(str, config))} needs BT, BC and the warp count "
                         "powers of two")
    return config


def last_launch_configs() -> dict[str, tuple[int, int, int, int]]:
    """The (BT, BC, warps, stages) each pass ran with last in this process."""
    return dict(_LAST_CONFIGS)


def _configs(kind: str) -> tuple[tuple | None, tuple]:
    """(the fixed configuration of `kind`, forced or the interpreter's, or None; the candidates to autotune)."""
    fixed = forced_config(kind) or (_CONFIG_INTERPRET if _INTERPRET else None)
    if fixed is not None:
        return fixed, ()
    return None, CANDIDATES if autotune_enabled("ATMA_CONV_AUTOTUNE") else CANDIDATES[:1]


def _launch(kernel, kind: str, B: int, T: int, C: int, *args, **kw) -> tuple[int, int, int, int]:
    """Launch `kernel` over (time tiles, channel tiles, B); returns the configuration it ran with."""
    fixed, cands = _configs(kind)
    run = tile_launcher(kernel, ("BT", "BC"), fixed, cands, key=["T_BUCKET", "C", "K"], cache=_TUNED,
                        cache_key=(kind, cands))
    config = run(lambda meta: (triton.cdiv(T, meta["BT"]), triton.cdiv(C, meta["BC"]), B), *args,
                 max(64, triton.next_power_of_2(T)), **kw)
    _LAST_CONFIGS[kind] = tuple(config)
    return config


@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def causal_conv1d_fwd_kernel(
    x, w, y,
    T, C, stride_xb, stride_xt, stride_xc, T_BUCKET,
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


@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def causal_conv1d_bwd_kernel(
    x, w, dy, dx, dw,
    T, C, stride_xb, stride_xt, stride_xc, stride_yb, stride_yt, stride_yc, T_BUCKET,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_DW: tl.constexpr,
):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NT = tl.num_programs(0)  # time tiles: one [C, K] slot of partial weight sums per (batch, time tile)
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


@torch.library.custom_op("atma::causal_conv1d_triton_fwd", mutates_args=())
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y [B,T,C] of x [B,T,C] (any strides) and a contiguous weight [C,K]."""
    B, T, C = x.shape
    y = torch.empty((B, T, C), device=x.device, dtype=x.dtype)
    _launch(causal_conv1d_fwd_kernel, "fwd", B, T, C, x, weight, y, T, C, *x.stride(), K=weight.shape[1])
    return y


@torch.library.custom_op("atma::causal_conv1d_triton_bwd", mutates_args=())
def _conv_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx [B,T,C] and, when `weight_grad`, dweight [C,K] (else an empty tensor)."""
    B, T, C = x.shape
    K = weight.shape[1]
    dx = torch.empty((B, T, C), device=x.device, dtype=x.dtype)
    # One slot per (batch, time tile), sized for the shortest time tile the launch may pick.
    fixed, cands = _configs("bwd")
    slots = B * triton.cdiv(T, min(c[0] for c in ([fixed] if fixed else cands)))
    dw = torch.empty((slots, C, K), device=x.device, dtype=torch.float32) if weight_grad else dx
    bt = _launch(causal_conv1d_bwd_kernel, "bwd", B, T, C, x, weight, dy, dx, dw, T, C, *x.stride(), *dy.stride(),
                 K=K, HAS_DW=weight_grad)[0]
    dweight = dw[: B * triton.cdiv(T, bt)].sum(0).to(weight.dtype) if weight_grad else weight.new_empty(0)
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
