"""Choose the implementation of each core: Triton on CUDA (or when forced), PyTorch elsewhere."""

from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "triton", "torch")


def kernel_choice() -> str:
    """The ATMA_KERNELS setting (auto when unset); ValueError when it is none of auto, triton, torch."""
    choice = os.environ.get("ATMA_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"the environment variable ATMA_KERNELS must be one of {', '.join(_CHOICES)}, got {choice!r}")
    return choice


def kernel_backend(device: torch.device | None = None) -> str:
    """Return "triton" or "torch" for tensors on `device`, honouring ATMA_KERNELS."""
    choice = kernel_choice()
    if choice != "auto":
        return choice
    return "triton" if device is not None and device.type == "cuda" else "torch"


def polar_attention(q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw, *, window=None):
    """Polar attention core (SPEC §2.6): (B,T,H,d) queries over (B,T,G,d) keys -> (direction, magnitude)."""
    if kernel_backend(q.device) == "triton":
        from .polar.triton_impl import polar_attention_triton as impl
    else:
        from .polar.torch_impl import polar_attention_torch as impl
    return impl(q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw, window=window)


def gated_delta_rule(
    q, k, v, g, beta, *, initial_state=None, output_final_state=False, chunk_size=64, differentiable=None
):
    """Gated delta rule (SPEC §4.4) in FLA layout; flash-linear-attention on CUDA when safe.

    Elsewhere the chunked path runs, its state carried by Triton kernels on the Triton backend and
    by a PyTorch loop otherwise. `chunk_size` only affects the chunked path (FLA chunks
    internally). `differentiable` says whether a backward may follow; None infers it from autograd
    (grad mode and requires_grad). Pass True in training so a no-grad first pass (reentrant
    checkpointing) takes the same path as its recomputation.
    """
    if q.device.type == "cuda" and kernel_backend(q.device) == "triton":
        from .gated_delta.fla_bridge import fla_gated_delta_rule, fla_is_usable

        if differentiable is None:
            tensors = (q, k, v, g, beta) + ((initial_state,) if initial_state is not None else ())
            differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if fla_is_usable(q.device, backward=differentiable):
            return fla_gated_delta_rule(
                q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state
            )
    from .gated_delta.torch_impl import chunk_gated_delta_rule_torch

    return chunk_gated_delta_rule_torch(
        q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state, chunk_size=chunk_size,
        carry=kernel_backend(q.device),
    )


def causal_conv1d(x, weight):
    """Causal depthwise conv1d (SPEC §2.4): x (B,T,C), weight (C,K), no bias, no activation."""
    if kernel_backend(x.device) == "triton":
        from .causal_conv.triton_impl import causal_conv1d_triton as impl
    else:
        from .causal_conv.torch_impl import causal_conv1d_torch as impl
    return impl(x, weight)


def softcap_ce_rows(z, labels, cap: float, targets=None, tau: float = 1.0):
    """Triton: per row of pre-cap logits z (N, V), the logsumexp of the soft-capped row and the capped
    logit at the label (0 where -100), fp32 (SPEC §2.1, §5.1); with target logits `targets` (N, V) also
    the logsumexp of s / tau and of targets / tau and KL(softmax(targets / tau) || softmax(s / tau))."""
    from .softcap_ce.triton_impl import softcap_ce_kl_rows_triton, softcap_ce_rows_triton

    if targets is None:
        return softcap_ce_rows_triton(z, labels, cap)
    return softcap_ce_kl_rows_triton(z, targets, labels, cap, tau)


def softcap_ce_grad(z, labels, lse, coef, cap: float, *, targets=None, lse_st=None, lse_u=None, kl_coef=None,
                    tau: float = 1.0):
    """Triton: d(sum_i coef_i CE_i) / dz (N, V) in z's dtype and its fp32 sum over rows, given each row's
    logsumexp `lse`; with `targets`, plus kl_coef_i tau KL_i, given the forward's lse_st and lse_u."""
    from .softcap_ce.triton_impl import softcap_ce_grad_triton, softcap_ce_kl_grad_triton

    if targets is None:
        return softcap_ce_grad_triton(z, labels, lse, coef, cap)
    return softcap_ce_kl_grad_triton(z, labels, lse, coef, targets, lse_st, lse_u, kl_coef, cap, tau)
