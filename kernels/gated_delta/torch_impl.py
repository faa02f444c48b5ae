"""Chunked (UT-transform / WY) gated delta rule in plain PyTorch, differentiable by autograd.

FLA layout: q, k (B, T, H, dk) already L2-normalised, v (B, T, H, dv), g log-decay (B, T, H),
beta (B, T, H); the state S (B, H, dk, dv) is M^T of SPEC §4.4. Every chunk's intra-chunk
algebra (the triangular solve of SPEC §4.6) runs for all chunks at once; only the state carry
is sequential across chunks. `carry="torch"` carries it in a PyTorch loop over chunks,
`carry="triton"` in the two Triton kernels of `triton_impl` (one launch per pass).

Eager calls run the chunked code under autograd. Inside torch.compile, with the Triton carry the
chunked code is traced like any other (the carry is a custom op); with the PyTorch loop it runs as
the custom op `atma::gated_delta_torch_fwd`, whose backward `atma::gated_delta_torch_bwd`
recomputes the forward under autograd (one extra forward, the same gradients), so a compiled
block holds one opaque call instead of the unrolled loop over chunks.

Shape legend: N chunks, C chunk length, K = dk, V = dv.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..common import compute_dtype

__all__ = ["chunk_gated_delta_rule_torch"]

# How the state is carried from chunk to chunk: a PyTorch loop, or the Triton kernels of
# `triton_impl` (fp32 compute only, and for the sizes their launches were checked for:
# `triton_impl.triton_carry_fits`; otherwise the loop).
_CARRIES = ("torch", "triton")


def _solve_unit_lower(a: torch.Tensor, b: torch.Tensor, *, upper: bool = False) -> torch.Tensor:
    """Solve A X = B for batched unit-triangular A; single-threaded on the CPU.

    Multi-threaded CPU trsm on many small (C x C) systems is dramatically slower than one
    thread (measured about 50x for 128 systems of 64 x 64), so the thread pool is narrowed here.
    """
    if a.device.type != "cpu":
        return torch.linalg.solve_triangular(a, b, upper=upper, unitriangular=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.solve_triangular(a, b, upper=upper, unitriangular=True)
    finally:
        torch.set_num_threads(threads)


class _UnitLowerSolve(torch.autograd.Function):
    """X = A^{-1} B for unit-lower-triangular A, with both passes using `_solve_unit_lower`."""

    @staticmethod
    def forward(ctx, a, b):
        x = _solve_unit_lower(a, b)
        ctx.save_for_backward(a, x)
        return x

    @staticmethod
    def backward(ctx, grad_x):
        a, x = ctx.saved_tensors
        # dB = A^{-T} dX; dA = -dB X^T restricted to the strictly lower part (the unit diagonal is fixed).
        grad_b = _solve_unit_lower(a.transpose(-1, -2), grad_x, upper=True)
        grad_a = -(grad_b @ x.transpose(-1, -2)).tril(-1) if ctx.needs_input_grad[0] else None
        return grad_a, grad_b


def _check_inputs(q, k, v, g, beta, initial_state, chunk_size):
    """Raise ValueError unless the arguments follow the gated-delta contract (DESIGN.md)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, dk), got shape {tuple(q.shape)}")
    B, T, H, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be (B, T, H, dv) = ({B}, {T}, {H}, dv), got shape {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, T, H):
            raise ValueError(f"{name} must be (B, T, H) = ({B}, {T}, {H}), got shape {tuple(x.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, dk, v.shape[-1]):
        raise ValueError(
            f"initial_state must be (B, H, dk, dv) = ({B}, {H}, {dk}, {v.shape[-1]}), "
            f"got shape {tuple(initial_state.shape)}"
        )
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    carry: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule (SPEC §4.4, §4.6) in FLA layout: returns o (B,T,H,dv) and the final state or None.

    `carry` says how the state passes between chunks: "torch" (a loop) or "triton" (kernels; fp32
    compute, so fp64 inputs keep the loop).
    """
    _check_inputs(q, k, v, g, beta, initial_state, chunk_size)
    if carry not in _CARRIES:
        raise ValueError(f"carry must be one of {', '.join(_CARRIES)}, got {carry!r}")
    if torch.compiler.is_compiling() and q.shape[1] > 0:
        if _uses_triton_carry(carry, q, v.shape[-1], int(chunk_size)):
            # With the Triton carry there is no loop to unroll: the chunked path is traced, so the
            # compiler fuses its elementwise work and its backward needs no second forward.
            return _chunked(q, k, v, g, beta, initial_state, output_final_state, int(chunk_size), carry)
        # One opaque op in a compiled graph: tracing would unroll the loop over chunks (SPEC §4.6).
        o, state = _gated_delta_fwd(q, k, v, g, beta, initial_state, int(chunk_size), carry)
        return o, (state if output_final_state else None)
    return _chunked(q, k, v, g, beta, initial_state, output_final_state, int(chunk_size), carry)


def _chunked(q, k, v, g, beta, initial_state, output_final_state, chunk_size, carry="torch"):
    """The chunked forward, differentiable by autograd (eager training keeps its saved intermediates)."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    C = int(chunk_size)
    out_dtype = v.dtype
    cdt = compute_dtype(q.dtype)

    if initial_state is None:
        state = torch.zeros((B, H, dk, dv), device=q.device, dtype=cdt)
    else:
        state = initial_state.to(cdt)
    if T == 0:
        return v.new_zeros((B, 0, H, dv)), (state if output_final_state else None)

    # Zero padding is exact: a step with k = v = 0, beta = 0 and g = 0 leaves the state unchanged.
    N = -(-T // C)
    pad = N * C - T

    def chunked(x):
        # (B, T, H, *) -> (B, H, N, C, *)
        x = x.to(cdt).transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])

    q_c, k_c, v_c, g_c, b_c = (chunked(x) for x in (q, k, v, g, beta))

    # Inclusive cumulative log-decay lambda_p within each chunk (SPEC §4.6).
    lam = g_c.cumsum(dim=-1)  # (B,H,N,C)
    idx = torch.arange(C, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    diff = lam[..., :, None] - lam[..., None, :]
    # Mask before exp: above the diagonal lambda_p - lambda_s > 0 could overflow, and inf * 0 is NaN.
    decay_incl = torch.exp(diff.masked_fill(~causal, float("-inf")))
    decay_strict = decay_incl * strict

    # Unit-lower-triangular system (I + diag(beta) D) U = beta (V - e^lambda K S0), split (WY form)
    # into U = U_v - W S0 with U_v = solve(beta V) and W = solve(beta e^lambda K).
    kk = torch.matmul(k_c, k_c.transpose(-1, -2))
    eye = torch.eye(C, device=q.device, dtype=cdt)
    system = eye + b_c[..., None] * kk * decay_strict
    rhs = torch.cat([b_c[..., None] * v_c, (b_c * torch.exp(lam))[..., None] * k_c], dim=-1)
    if torch.compiler.is_compiling():
        sol = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    else:
        sol = _UnitLowerSolve.apply(system, rhs)
    u_v, w = sol[..., :dv], sol[..., dv:]

    attn = torch.matmul(q_c, k_c.transpose(-1, -2)) * decay_incl  # A[p, s], s <= p
    q_decayed = torch.exp(lam)[..., None] * q_c
    lam_last = lam[..., -1]  # (B,H,N)
    k_to_end = torch.exp(lam_last[..., None] - lam)[..., None] * k_c

    decay = torch.exp(lam_last)
    if _uses_triton_carry(carry, q, dv, C):
        from .triton_impl import state_recurrence_triton

        # fp32 callers get about fp32's products, half-precision ones TF32 (triton_impl.PRECISIONS).
        precision = "tf32x3" if q.dtype == torch.float32 else "tf32"
        o_chunks, state = state_recurrence_triton(u_v, w, q_decayed, attn, k_to_end, decay,
                                                  None if initial_state is None else state, precision=precision)
    else:
        o_chunks, state = _state_recurrence_torch(u_v, w, q_decayed, attn, k_to_end, decay, state)
    o = o_chunks.reshape(B, H, N * C, dv)[:, :, :T].transpose(1, 2).to(out_dtype)
    return o, (state if output_final_state else None)


def _uses_triton_carry(carry: str, q: torch.Tensor, dv: int, chunk: int) -> bool:
    """Whether the Triton kernels carry the state: asked for, fp32 compute, and sizes they were checked for."""
    return (carry == "triton" and compute_dtype(q.dtype) == torch.float32
            and _triton_carry_fits(q.shape[-1], dv, chunk, q.device))


@torch.compiler.assume_constant_result
def _triton_carry_fits(dk: int, dv: int, chunk: int, device: torch.device) -> bool:
    """`triton_impl.triton_carry_fits`, a constant to the compiler (it reads the device's launch class)."""
    from .triton_impl import triton_carry_fits

    return triton_carry_fits(dk, dv, chunk, device)


def _state_recurrence_torch(u_v, w, q_decayed, attn, k_to_end, decay, state):
    """Carry the state over the chunks one chunk at a time: o (B,H,N,C,V) and the final state (B,H,K,V)."""
    # Split per chunk with unbind: its backward is one stack, where indexing [:, :, n] inside the
    # loop would give every chunk's gradient a zero-filled full-size buffer (O(N^2) memory traffic).
    chunks = zip(
        u_v.unbind(2), w.unbind(2), q_decayed.unbind(2), attn.unbind(2),
        k_to_end.transpose(-1, -2).unbind(2), decay[..., None, None].unbind(2),
    )
    outs = []
    for u_v_n, w_n, q_n, attn_n, k_end_t_n, decay_n in chunks:
        u = u_v_n - torch.matmul(w_n, state)  # (B,H,C,V)
        outs.append(torch.matmul(q_n, state) + torch.matmul(attn_n, u))
        state = decay_n * state + torch.matmul(k_end_t_n, u)
    return torch.stack(outs, dim=2), state


@contextlib.contextmanager
def _autograd_inside_op():
    """Record autograd inside a custom op's kernel, which the dispatcher runs below the autograd keys."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


@torch.library.custom_op("atma::gated_delta_torch_fwd", mutates_args=())
def _gated_delta_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None, chunk_size: int, carry: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked forward as one op: o (B,T,H,dv) and the final state (B,H,dk,dv), without autograd."""
    o, state = _chunked(q, k, v, g, beta, initial_state, True, chunk_size, carry)
    return o.contiguous(), state


@torch.library.custom_op("atma::gated_delta_torch_bwd", mutates_args=())
def _gated_delta_bwd(
    grad_o: torch.Tensor, grad_state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    g: torch.Tensor, beta: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int, carry: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v, g, beta and the initial state (empty when None), by recomputing the forward."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    state0 = None if initial_state is None else initial_state.detach().requires_grad_()
    with _autograd_inside_op():
        o, state = _chunked(*leaves, state0, True, chunk_size, carry)
        outputs, upstream = [o], [grad_o]
        if grad_state is not None:
            outputs.append(state)
            upstream.append(grad_state)
        wrt = leaves + ([state0] if state0 is not None else [])
        grads = torch.autograd.grad(outputs, wrt, upstream, allow_unused=True)
    grads = [x.new_zeros(x.shape) if gr is None else gr.contiguous() for x, gr in zip(wrt, grads)]
    d_state0 = grads[5] if state0 is not None else q.new_empty(0)
    return (*grads[:5], d_state0)


@_gated_delta_fwd.register_fake
def _gated_delta_fwd_fake(q, k, v, g, beta, initial_state, chunk_size, carry):
    B, T, H, dk = q.shape
    return v.new_empty((B, T, H, v.shape[-1])), q.new_empty((B, H, dk, v.shape[-1]), dtype=compute_dtype(q.dtype))


@_gated_delta_bwd.register_fake
def _gated_delta_bwd_fake(grad_o, grad_state, q, k, v, g, beta, initial_state, chunk_size, carry):
    d_state0 = q.new_empty(0) if initial_state is None else initial_state.new_empty(initial_state.shape)
    return (*(x.new_empty(x.shape) for x in (q, k, v, g, beta)), d_state0)


def _gated_delta_setup_context(ctx, inputs, output):
    q, k, v, g, beta, initial_state, chunk_size, carry = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state)
    ctx.chunk_size = chunk_size
    ctx.carry = carry


def _gated_delta_backward(ctx, grad_o, grad_state):
    q, k, v, g, beta, initial_state = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros((*q.shape[:3], v.shape[-1]), device=q.device, dtype=v.dtype)
    *grads, d_state0 = _gated_delta_bwd(grad_o, grad_state, q, k, v, g, beta, initial_state, ctx.chunk_size, ctx.carry)
    return (*grads, d_state0 if initial_state is not None else None, None, None)


_gated_delta_fwd.register_autograd(_gated_delta_backward, setup_context=_gated_delta_setup_context)
