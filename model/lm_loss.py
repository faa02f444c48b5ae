"""Cross-entropy of the soft-capped LM head (SPEC §2.1), optionally with the distillation KL to soft targets
from the same pass of the head: a fused, chunked path and its naive reference.

The fused path never holds fp32 logits for more than `chunk_tokens` tokens, recomputes them in
backward instead of saving them, and writes the gradient through the soft-cap analytically into
two buffers per chunk, where autograd of the naive path allocates one per elementwise op (about a
dozen logits-sized tensors per chunk, forward, recomputation and backward). Where the kernel
backend is Triton (CUDA), the cross-entropy's rows run in the kernels of `kernels.softcap_ce`
instead: the logits stay in the head's dtype and each pass reads them once.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels import TRITON_DTYPES, kernel_backend, softcap_ce_grad, softcap_ce_rows

from .layers import softcap

IGNORE_INDEX = -100
# Overrides elementwise="auto": "torch" keeps the PyTorch rows everywhere, "triton" takes the kernels
# wherever they fit (CE without KL, fp32/bf16/fp16) whatever ATMA_KERNELS says.
ROWS_ENV = "ATMA_LOSS_ROWS"
# On the CPU a logits buffer above a few MB is a fresh mapping that page-faults on every op; chunks of
# 2^19 logits (2 MB in fp32) ran fused forward + backward 1.8-2x faster than 8,192-token chunks at a
# vocabulary of 2,048-4,096 (one core). `chunk_tokens` stays the upper bound everywhere.
CPU_LOGITS_PER_CHUNK = 1 << 19


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h_c, weight, bias) -> torch.Tensor:
    """Pre-cap logits z (rows, V) in the dtype of the head's input."""
    return F.linear(h_c, weight.to(h_c.dtype), bias.to(h_c.dtype))


def _logits_and_inverse_radius(h_c, weight, bias, cap: float, acc: torch.dtype):
    """Pre-cap logits z (rows, V) in `acc` and r = 1 / sqrt(z^2 + cap^2), so that softcap(z) = cap * z * r."""
    z = _logits(h_c, weight, bias).to(acc)
    r = torch.mul(z, z).add_(cap * cap).rsqrt_()
    return z, r


def _grad_logits_triton(h_c, weight, bias, labels, lse_c, focus_c, grad_sums, cap: float):
    """dL/dz of a chunk in the head's dtype and its fp32 sum over rows, from the logits recomputed once."""
    # each token's weight in the two sums; 0 for ignored tokens
    coef = (grad_sums[0] + grad_sums[1] * focus_c.to(lse_c.dtype)) * (labels != IGNORE_INDEX)
    return softcap_ce_grad(_logits(h_c, weight, bias), labels, lse_c, coef.contiguous(), cap)


def _picked(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return s.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)


class _SoftcapCrossEntropySums(torch.autograd.Function):
    """(sum of CE over tokens, sum of CE over focused tokens[, sum of KL to soft targets]) of soft-capped
    logits, chunked: with `targets_rows`, one pass of the head per chunk serves both terms. The targets'
    probabilities are kept from forward to backward, or with `recompute_targets` asked for again."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, focus, cap, chunk_tokens, targets_rows=None, temperature=1.0,
                recompute_targets=False, row_kernels=False):
        acc = _accumulation_dtype(h.dtype)
        with_kl = targets_rows is not None
        sums = h.new_zeros(3 if with_kl else 2, dtype=acc)
        lse = h.new_empty(h.shape[0], dtype=acc)
        lse_t = h.new_empty(h.shape[0] if with_kl else 0, dtype=acc)
        probs = []  # the targets' probabilities per chunk, kept for backward unless recomputed there
        for start in range(0, h.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, h.shape[0])
            y = labels[start:end]
            if row_kernels:  # one read of the head-dtype logits (kernels.softcap_ce)
                lse_c, picked = softcap_ce_rows(_logits(h[start:end], weight, bias), y, cap)
                ce = (lse_c - picked) * (y != IGNORE_INDEX)
                sums[0] += ce.sum()
                sums[1] += (ce * focus[start:end]).sum()
                lse[start:end] = lse_c
                continue
            z, r = _logits_and_inverse_radius(h[start:end], weight, bias, cap, acc)
            s = z.mul_(r).mul_(cap)
            lse_c = torch.logsumexp(s, dim=-1)
            ce = (lse_c - _picked(s, y)) * (y != IGNORE_INDEX)
            sums[0] += ce.sum()
            sums[1] += (ce * focus[start:end]).sum()
            lse[start:end] = lse_c
            if with_kl:
                # KL(q || p) = sum q log q - sum q s / tau + logsumexp(s / tau), with sum q = 1.
                log_q_c = _target_log_probs(targets_rows, start, end, temperature, acc)
                q_c = log_q_c.exp()
                s_t = s.div_(temperature)
                lse_t[start:end] = torch.logsumexp(s_t, dim=-1)
                sums[2] += log_q_c.sub_(s_t).mul_(q_c).sum() + lse_t[start:end].sum()
                if not recompute_targets:
                    probs.append(q_c)
        ctx.save_for_backward(h, weight, bias, labels, focus, lse, lse_t)
        ctx.cap, ctx.chunk_tokens, ctx.temperature, ctx.probs = cap, chunk_tokens, temperature, probs
        ctx.targets_rows = targets_rows if with_kl and recompute_targets else None
        ctx.with_kl, ctx.row_kernels = with_kl, row_kernels
        return sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums):
        h, weight, bias, labels, focus, lse, lse_t = ctx.saved_tensors
        cap, chunk_tokens, tau, probs = ctx.cap, ctx.chunk_tokens, ctx.temperature, ctx.probs
        acc = lse.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        w = weight.to(h.dtype)
        for index, start in enumerate(range(0, h.shape[0], chunk_tokens)):
            end = min(start + chunk_tokens, h.shape[0])
            h_c, y = h[start:end], labels[start:end]
            if ctx.row_kernels:
                d_h, d_b = _grad_logits_triton(h_c, weight, bias, y, lse[start:end], focus[start:end], grad_sums,
                                               cap)
                if need_h:
                    torch.mm(d_h, w, out=grad_h[start:end])
                if need_w:
                    grad_w.add_(torch.mm(d_h.t(), h_c).to(acc))
                if need_b:
                    grad_b.add_(d_b)
                continue
            z, r = _logits_and_inverse_radius(h_c, weight, bias, cap, acc)
            s = z.mul_(r).mul_(cap)
            # dKL/ds = (softmax(s / tau) - q) / tau, before s is overwritten by the CE gradient below.
            d_kl = None
            if ctx.with_kl:
                q_c = (probs[index] if ctx.targets_rows is None
                       else _target_log_probs(ctx.targets_rows, start, end, tau, acc).exp_())
                d_kl = (s.div(tau).sub_(lse_t[start:end].unsqueeze(1)).exp_().sub_(q_c)
                        .mul_(grad_sums[2] / tau))
            # dCE/ds = softmax(s) - onehot(y), scaled per token by its weight in the two sums.
            d = s.sub_(lse[start:end].unsqueeze(1)).exp_()
            valid = (y != IGNORE_INDEX).to(acc)
            d.scatter_add_(1, y.clamp_min(0).unsqueeze(1), -valid.unsqueeze(1))
            d.mul_(((grad_sums[0] + grad_sums[1] * focus[start:end].to(acc)) * valid).unsqueeze(1))
            if d_kl is not None:
                d.add_(d_kl)
            # d softcap(z) / dz = cap * r - cap * z^2 * r^3 = cap^3 * r^3, as 1 - z^2 r^2 = cap^2 r^2.
            d.mul_(r.pow_(3).mul_(cap**3))
            d_h = d.to(h.dtype)
            if need_h:
                torch.mm(d_h, w, out=grad_h[start:end])
            if need_w:
                grad_w.add_(torch.mm(d_h.t(), h_c).to(acc))
            if need_b:
                grad_b.add_(d.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None, None, None)


def _target_log_probs(targets_rows, start: int, end: int, temperature: float, acc: torch.dtype) -> torch.Tensor:
    """log softmax(targets / tau) of rows start:end of `targets_rows(start, end)`, without autograd."""
    with torch.no_grad():
        t = targets_rows(start, end)
    if t.shape[0] != end - start:
        raise ValueError(f"target logits have {t.shape[0]} rows for tokens {start}:{end}")
    return torch.log_softmax(t.to(acc) / temperature, dim=-1)


def softcap_cross_entropy_sums(h, weight, bias, labels, focus, *, cap: float, chunk_tokens: int,
                               targets_rows=None, temperature: float = 1.0,
                               recompute_targets: bool = False, elementwise: str = "auto") -> torch.Tensor:
    """Fused sums of CE over rows of `h` (N, D) and over rows weighted by `focus` (N,), -100 labels counting
    0; with `targets_rows(start, end)` -> target logits, a third: the sum of KL(softmax(t/tau) || softmax(s/tau)).

    `recompute_targets` asks `targets_rows` again per chunk in backward instead of keeping the targets'
    fp32 probabilities (N x V) from forward to backward. `elementwise` says what runs the soft-cap and
    the cross-entropy on each chunk's logits: "triton" (the kernels of `kernels.softcap_ce`, CE only),
    "torch", or "auto" (Triton where the kernel backend is, for CE without KL, else PyTorch; the
    environment variable ATMA_LOSS_ROWS=auto|triton|torch overrides that choice)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    row_kernels = uses_row_kernels(h.device, h.dtype, targets_rows is not None, elementwise)
    if h.device.type == "cpu":
        chunk_tokens = min(chunk_tokens, max(1, CPU_LOGITS_PER_CHUNK // weight.shape[0]))
    return _SoftcapCrossEntropySums.apply(h, weight, bias, labels, focus, cap, chunk_tokens, targets_rows,
                                          temperature, recompute_targets, row_kernels)


def uses_row_kernels(device: torch.device, dtype: torch.dtype, with_kl: bool, elementwise: str = "auto") -> bool:
    """Whether the Triton row kernels run the chunks of a head input on `device` in `dtype` (see
    `softcap_cross_entropy_sums`)."""
    choices = ("auto", "triton", "torch")
    if elementwise not in choices:
        raise ValueError(f"elementwise must be auto, triton or torch, got {elementwise!r}")
    fits = dtype in TRITON_DTYPES and not with_kl
    if elementwise == "triton":
        if not fits:
            raise ValueError(f"elementwise='triton' takes the CE without KL on {TRITON_DTYPES} inputs, "
                             f"got {dtype}{' with KL' if with_kl else ''}")
        return True
    if elementwise == "torch":
        return False
    rows = os.environ.get(ROWS_ENV, "auto").strip().lower() or "auto"
    if rows not in choices:
        raise ValueError(f"the environment variable {ROWS_ENV} must be one of {', '.join(choices)}, got {rows!r}")
    if rows == "torch" or not fits:
        return False
    return rows == "triton" or kernel_backend(device) == "triton"


def softcap_cross_entropy_sums_naive(h, weight, bias, labels, focus, *, cap: float) -> torch.Tensor:
    """Reference for `softcap_cross_entropy_sums`: whole logits, autograd through every op."""
    logits = softcap(F.linear(h, weight.to(h.dtype), bias.to(h.dtype)), cap)
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
    return torch.stack([ce.sum(), (ce * focus).sum()])
