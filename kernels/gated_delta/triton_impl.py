"""The chunked gated delta rule's state carry (SPEC §4.6) as Triton kernels, forward and backward.

The chunked path (`torch_impl`) does every chunk's intra-chunk algebra for all chunks at once;
what stays sequential is the carry of the state S (K x V) from chunk to chunk. In PyTorch that
carry is a loop of small batched matmuls, a few kernel launches per chunk in each direction.
Here it is one program per (batch*head, V tile) that walks the chunks with S in registers:

    u_n     = u_v_n - w_n S_n                           (C x V)
    o_n     = qd_n S_n + A_n u_n                        (C x V)
    S_{n+1} = d_n S_n + ke_n^T u_n                      (K x V)

with u_v, w the WY factors, qd the decayed queries, A the decayed causal q k^T, ke the keys
decayed to the chunk's end and d the chunk's total decay (names as in `torch_impl._chunked`).
The backward walks the chunks in reverse with G_n = dL/dS_n in registers:

    du_n = A_n^T do_n + ke_n G_{n+1}          d(u_v)_n = du_n        dw_n  = -du_n S_n^T
    dqd_n = do_n S_n^T       dA_n = do_n u_n^T       dke_n = u_n G_{n+1}^T       dd_n = <S_n, G_{n+1}>
    G_n  = d_n G_{n+1} + qd_n^T do_n - w_n^T du_n

Terms summed over V are written per V tile and added up in PyTorch (no atomics). Operands and
sums are fp32; the products run in TF32 or 3xTF32 on the GPU (`PRECISIONS`). Both passes
are the custom ops `atma::gated_delta_state_fwd` / `_bwd` (fake implementations and autograd
registered). Shape legend: BH batch*heads, N chunks, C chunk length, K = dk, V = dv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import check_launch_device, device_class, interpreting, patch_interpreter_index

__all__ = ["state_recurrence_triton", "triton_carry_fits"]

_INTERPRET = interpreting()
if _INTERPRET:
    patch_interpreter_index()
# (BV, num_warps, num_stages) of both passes per launch class (`device_class`), chosen by compiling
# at atma-378m's head size (K = V = 128, C = 64): one stage, because software pipelining of the
# chunk loop would buffer every operand tile several times over in shared memory (294,912 B at sm_90).
# "large" (sm_90): 8 warps and 32-wide V tiles keep the spill to a few hundred bytes per thread
# (72 / 104 KB of shared memory, forward / backward, with TF32 products); "mid" parts (99 KB on
# sm_89) take 16-wide tiles (52 / 64 KB). "small" parts keep the PyTorch loop.
_LAUNCH = {"large": (32, 8, 1), "mid": (16, 4, 1)}
# The largest head and chunk sizes those launches were checked for.
MAX_HEAD_DIM = 128
MAX_CHUNK = 64
# Products on tensor cores: TF32 for half-precision callers (10-bit mantissa, finer than the bf16
# products of FLA's kernels), three TF32 products per product ("tf32x3", about fp32's accuracy) for
# fp32 callers. Sums are fp32. The CPU interpreter multiplies in full fp32 either way.
PRECISIONS = ("tf32", "tf32x3")


@triton.jit
def _tile_layout(i_v, C, K, V, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets along C, K and this program's V tile, and the masks of the tiles the kernels load."""
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_c, m_k, m_v = o_c < C, o_k < K, o_v < V
    m_ck = m_c[:, None] & m_k[None, :]
    m_cv = m_c[:, None] & m_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    m_cc = m_c[:, None] & m_c[None, :]
    return o_c, o_k, o_v, m_c, m_k, m_ck, m_cv, m_kv, m_cc


@triton.jit(do_not_specialize=["N"])
def gated_delta_state_fwd_kernel(
    u_v, w, qd, attn, ke, decay, s0, o, s_all, u, s_final,
    N, C, K, V,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh64 = i_bh.to(tl.int64)
    o_c, o_k, o_v, m_c, m_k, m_ck, m_cv, m_kv, m_cc = _tile_layout(i_v, C, K, V, BC, BK, BV)
    off_kv = o_k[:, None] * V + o_v[None, :]
    if HAS_S0:
        b_s = tl.load(s0 + i_bh64 * K * V + off_kv, mask=m_kv, other=0.0)
    else:
        b_s = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(N):
        i_n = i_bh64 * N + n
        b_w = tl.load(w + i_n * C * K + o_c[:, None] * K + o_k[None, :], mask=m_ck, other=0.0)
        b_uv = tl.load(u_v + i_n * C * V + o_c[:, None] * V + o_v[None, :], mask=m_cv, other=0.0)
        b_u = b_uv - tl.dot(b_w, b_s, input_precision=PREC)
        b_q = tl.load(qd + i_n * C * K + o_c[:, None] * K + o_k[None, :], mask=m_ck, other=0.0)
        b_a = tl.load(attn + i_n * C * C + o_c[:, None] * C + o_c[None, :], mask=m_cc, other=0.0)
        b_o = tl.dot(b_q, b_s, input_precision=PREC) + tl.dot(b_a, b_u, input_precision=PREC)
        tl.store(o + i_n * C * V + o_c[:, None] * V + o_v[None, :], b_o, mask=m_cv)
        tl.store(u + i_n * C * V + o_c[:, None] * V + o_v[None, :], b_u, mask=m_cv)
        tl.store(s_all + i_n * K * V + off_kv, b_s, mask=m_kv)
        # ke^T loaded as (K, C) directly
        b_ke_t = tl.load(ke + i_n * C * K + o_k[:, None] + o_c[None, :] * K, mask=m_k[:, None] & m_c[None, :],
                         other=0.0)
        b_d = tl.load(decay + i_n)
        b_s = b_d * b_s + tl.dot(b_ke_t, b_u, input_precision=PREC)
    tl.store(s_final + i_bh64 * K * V + off_kv, b_s, mask=m_kv)


@triton.jit(do_not_specialize=["N"])
def gated_delta_state_bwd_kernel(
    w, qd, attn, ke, decay, s_all, u, do, ds_final,
    du_v, dw, dqd, dattn, dke, ddecay, ds0,
    N, C, K, V, BHN,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DS: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh64 = i_bh.to(tl.int64)
    o_c, o_k, o_v, m_c, m_k, m_ck, m_cv, m_kv, m_cc = _tile_layout(i_v, C, K, V, BC, BK, BV)
    off_kv = o_k[:, None] * V + o_v[None, :]
    off_ck = o_c[:, None] * K + o_k[None, :]
    off_cv = o_c[:, None] * V + o_v[None, :]
    # Per-V-tile partial sums live at [i_v, bh, n, ...] of buffers with BHN = BH * N rows per tile.
    part = i_v.to(tl.int64) * BHN
    if HAS_DS:
        b_g = tl.load(ds_final + i_bh64 * K * V + off_kv, mask=m_kv, other=0.0)
    else:
        b_g = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(N):
        n = N - 1 - i
        i_n = i_bh64 * N + n
        b_do = tl.load(do + i_n * C * V + off_cv, mask=m_cv, other=0.0)
        b_s = tl.load(s_all + i_n * K * V + off_kv, mask=m_kv, other=0.0)
        b_u = tl.load(u + i_n * C * V + off_cv, mask=m_cv, other=0.0)
        b_ke = tl.load(ke + i_n * C * K + off_ck, mask=m_ck, other=0.0)
        # A^T loaded as (C, C) directly
        b_a_t = tl.load(attn + i_n * C * C + o_c[:, None] + o_c[None, :] * C, mask=m_cc, other=0.0)
        b_d = tl.load(decay + i_n)
        b_s_t = tl.trans(b_s)
        b_du = tl.dot(b_a_t, b_do, input_precision=PREC) + tl.dot(b_ke, b_g, input_precision=PREC)
        tl.store(du_v + i_n * C * V + off_cv, b_du, mask=m_cv)
        p_part = part + i_n
        tl.store(dqd + p_part * C * K + off_ck, tl.dot(b_do, b_s_t, input_precision=PREC), mask=m_ck)
        tl.store(dattn + p_part * C * C + o_c[:, None] * C + o_c[None, :],
                 tl.dot(b_do, tl.trans(b_u), input_precision=PREC), mask=m_cc)
        tl.store(dke + p_part * C * K + off_ck, tl.dot(b_u, tl.trans(b_g), input_precision=PREC), mask=m_ck)
        tl.store(dw + p_part * C * K + off_ck, -tl.dot(b_du, b_s_t, input_precision=PREC), mask=m_ck)
        tl.store(ddecay + p_part, tl.sum(tl.sum(b_s * b_g, axis=1), axis=0))
        # qd^T and w^T loaded as (K, C) directly
        b_q_t = tl.load(qd + i_n * C * K + o_k[:, None] + o_c[None, :] * K, mask=m_k[:, None] & m_c[None, :],
                        other=0.0)
        b_w_t = tl.load(w + i_n * C * K + o_k[:, None] + o_c[None, :] * K, mask=m_k[:, None] & m_c[None, :],
                        other=0.0)
        b_g = b_d * b_g + tl.dot(b_q_t, b_do, input_precision=PREC) - tl.dot(b_w_t, b_du, input_precision=PREC)
    tl.store(ds0 + i_bh64 * K * V + off_kv, b_g, mask=m_kv)


def _launch(device: torch.device) -> tuple[int, int, int]:
    """(BV, num_warps, num_stages) for `device` (the "mid" launch under the interpreter)."""
    if _INTERPRET or device.type != "cuda":
        return _LAUNCH["mid"]
    return _LAUNCH.get(device_class(device, "ATMA_DELTA_TRITON_PROFILE"), _LAUNCH["mid"])


def triton_carry_fits(dk: int, dv: int, chunk: int, device: torch.device) -> bool:
    """Whether the Triton state carry was checked to launch for these sizes on `device`'s class."""
    if max(dk, dv) > MAX_HEAD_DIM or chunk > MAX_CHUNK:
        return False
    if _INTERPRET or device.type != "cuda":
        return True
    return device_class(device, "ATMA_DELTA_TRITON_PROFILE") in _LAUNCH


def _tile(n: int) -> int:
    """A power-of-two tile >= 16 (tl.dot's smallest) that covers n."""
    return max(16, triton.next_power_of_2(n))


@torch.library.custom_op("atma::gated_delta_state_fwd", mutates_args=())
def _state_fwd(
    u_v: torch.Tensor, w: torch.Tensor, qd: torch.Tensor, attn: torch.Tensor, ke: torch.Tensor,
    decay: torch.Tensor, s0: torch.Tensor | None, precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """o (BH,N,C,V), the state before each chunk (BH,N,K,V), u (BH,N,C,V) and the final state (BH,K,V)."""
    # The kernels index dense row-major tensors (a compiled caller may hand over other strides).
    u_v, w, qd, attn, ke, decay = (x.contiguous() for x in (u_v, w, qd, attn, ke, decay))
    BH, N, C, V = u_v.shape
    K = w.shape[-1]
    BV, warps, stages = _launch(u_v.device)
    BV = min(BV, _tile(V))
    o, u = (u_v.new_empty((BH, N, C, V)) for _ in range(2))
    s_all = u_v.new_empty((BH, N, K, V))
    s_final = u_v.new_empty((BH, K, V))
    gated_delta_state_fwd_kernel[(triton.cdiv(V, BV), BH)](
        u_v, w, qd, attn, ke, decay, s0.contiguous() if s0 is not None else s_final, o, s_all, u, s_final,
        N, C, K, V, BC=_tile(C), BK=_tile(K), BV=BV, HAS_S0=s0 is not None, PREC=precision,
        num_warps=warps, num_stages=stages,
    )
    return o, s_all, u, s_final


@torch.library.custom_op("atma::gated_delta_state_bwd", mutates_args=())
def _state_bwd(
    grad_o: torch.Tensor, grad_s_final: torch.Tensor | None, w: torch.Tensor, qd: torch.Tensor, attn: torch.Tensor,
    ke: torch.Tensor, decay: torch.Tensor, s_all: torch.Tensor, u: torch.Tensor, precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of u_v, w, qd, attn, ke, decay and the initial state."""
    w, qd, attn, ke, decay, s_all, u = (x.contiguous() for x in (w, qd, attn, ke, decay, s_all, u))
    BH, N, C, V = u.shape
    K = w.shape[-1]
    BV, warps, stages = _launch(u.device)
    BV = min(BV, _tile(V))
    NV = triton.cdiv(V, BV)
    du_v = u.new_empty((BH, N, C, V))
    dw = u.new_empty((NV, BH, N, C, K))
    dqd = u.new_empty((NV, BH, N, C, K))
    dattn = u.new_empty((NV, BH, N, C, C))
    dke = u.new_empty((NV, BH, N, C, K))
    ddecay = u.new_empty((NV, BH, N))
    ds0 = u.new_empty((BH, K, V))
    gated_delta_state_bwd_kernel[(NV, BH)](
        w, qd, attn, ke, decay, s_all, u, grad_o.contiguous(),
        grad_s_final.contiguous() if grad_s_final is not None else ds0,
        du_v, dw, dqd, dattn, dke, ddecay, ds0,
        N, C, K, V, BH * N, BC=_tile(C), BK=_tile(K), BV=BV, HAS_DS=grad_s_final is not None, PREC=precision,
        num_warps=warps, num_stages=stages,
    )
    return du_v, dw.sum(0), dqd.sum(0), dattn.sum(0), dke.sum(0), ddecay.sum(0), ds0


@_state_fwd.register_fake
def _state_fwd_fake(u_v, w, qd, attn, ke, decay, s0, precision):
    BH, N, C, V = u_v.shape
    K = w.shape[-1]
    return u_v.new_empty(u_v.shape), u_v.new_empty((BH, N, K, V)), u_v.new_empty(u_v.shape), u_v.new_empty((BH, K, V))


@_state_bwd.register_fake
def _state_bwd_fake(grad_o, grad_s_final, w, qd, attn, ke, decay, s_all, u, precision):
    BH, N, C, V = u.shape
    K = w.shape[-1]
    return (u.new_empty(u.shape), w.new_empty(w.shape), qd.new_empty(qd.shape), attn.new_empty(attn.shape),
            ke.new_empty(ke.shape), decay.new_empty(decay.shape), u.new_empty((BH, K, V)))


def _state_setup_context(ctx, inputs, output):
    u_v, w, qd, attn, ke, decay, s0, precision = inputs
    _, s_all, u, _ = output
    ctx.save_for_backward(w, qd, attn, ke, decay, s_all, u)
    ctx.has_s0 = s0 is not None
    ctx.precision = precision
    ctx.mark_non_differentiable(s_all, u)


def _state_backward(ctx, grad_o, grad_s_all, grad_u, grad_s_final):
    w, qd, attn, ke, decay, s_all, u = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(u)
    du_v, dw, dqd, dattn, dke, ddecay, ds0 = _state_bwd(grad_o, grad_s_final, w, qd, attn, ke, decay, s_all, u,
                                                         ctx.precision)
    return du_v, dw, dqd, dattn, dke, ddecay, ds0 if ctx.has_s0 else None, None


_state_fwd.register_autograd(_state_backward, setup_context=_state_setup_context)


def state_recurrence_triton(u_v, w, qd, attn, ke, decay, state, *, precision="tf32x3"):
    """Carry the state over the chunks (SPEC §4.6): o (B,H,N,C,V) and the final state (B,H,K,V).

    Inputs are fp32 in the chunked path's layout: u_v (B,H,N,C,V), w, qd, ke (B,H,N,C,K),
    attn (B,H,N,C,C), decay (B,H,N), state (B,H,K,V) or None for zeros. `precision` is that of
    the products on a GPU: "tf32x3" (about fp32) or "tf32".
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    B, H, N, C, V = u_v.shape
    K = w.shape[-1]
    for name, x in (("u_v", u_v), ("w", w), ("qd", qd), ("attn", attn), ("ke", ke), ("decay", decay)):
        if x.dtype != torch.float32:
            raise ValueError(f"state_recurrence_triton: {name} must be fp32, got {x.dtype}")
        check_launch_device(x, _INTERPRET, "state_recurrence_triton")

    def rows(x, *tail):
        return x.reshape(B * H, *tail).contiguous()

    s0 = None if state is None else rows(state.float(), K, V)
    o, _, _, s_final = _state_fwd(rows(u_v, N, C, V), rows(w, N, C, K), rows(qd, N, C, K), rows(attn, N, C, C),
                                  rows(ke, N, C, K), rows(decay, N), s0, precision)
    return o.reshape(B, H, N, C, V), s_final.reshape(B, H, K, V)
