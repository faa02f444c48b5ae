"""Cross-entropy of the soft-capped LM head (SPEC §2.1), optionally with the distillation KL to soft targets
from the same pass of the head: a fused, chunked path and its naive reference.

The fused path never holds fp32 logits for more than `chunk_tokens` tokens and writes the gradient
through the soft-cap analytically into two buffers per chunk, where autograd of the naive path
allocates one per elementwise op (about a dozen logits-sized tensors per chunk). Where the kernel
backend is Triton (CUDA), the rows (cross-entropy and KL) run in the kernels of `kernels.softcap_ce`
instead: the logits and the targets stay in their dtypes and each pass reads them once.

When one scalar is the only one that takes a gradient and autograd will ask for one, the forward
already computes the gradients of h, the weight and the bias for a unit gradient of it, from each
chunk's logits while they exist, and the backward only scales them by its gradient: the head's
product runs three times per chunk instead of four, and no targets are kept or asked again. That
scalar is the cross-entropy sum without focus mask and KL, the KL sum without labels, or, for any
combination of the terms, their weighted sum when the caller passes the weights its loss gives them
(`weights`; the trainer does). Otherwise the logits are recomputed in backward instead of being saved.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels import TRITON_DTYPES, kernel_backend, softcap_ce_grad, softcap_ce_rows

from .layers import softcap

IGNORE_INDEX = -100
# Overrides elementwise="auto": "torch" keeps the PyTorch rows everywhere, "triton" takes the kernels
# wherever they fit (fp32/bf16/fp16 heads) whatever ATMA_KERNELS says.
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


def _add_chunk_grads(d_z, d_b, h_c, w, grad_h, grad_w, grad_b, start: int, end: int) -> None:
    """Add one chunk's products of dL/dz (rows, V) to the gradients of h (rows start:end), the weight and the bias."""
    if grad_h is not None:
        torch.mm(d_z, w, out=grad_h[start:end])
    if grad_w is not None:
        grad_w.add_(torch.mm(d_z.t(), h_c).to(grad_w.dtype))
    if grad_b is not None:
        grad_b.add_(d_b)


def _grad_buffers(h, weight, bias, needs, acc: torch.dtype):
    """Empty gradient of h and zeroed fp32 (fp64) sums for the weight and the bias, each only where needed."""
    need_h, need_w, need_b = needs
    return (torch.empty_like(h) if need_h else None,
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None,
            torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None)


def _grad_ce_rows(s, lse_c, labels, coef) -> torch.Tensor:
    """coef (softmax(s) - onehot(labels)) in place of the capped logits s (rows, V); ignored rows 0."""
    d = s.sub_(lse_c.unsqueeze(1)).exp_()
    valid = (labels != IGNORE_INDEX).to(s.dtype)
    d.scatter_add_(1, labels.clamp_min(0).unsqueeze(1), -valid.unsqueeze(1))
    return d.mul_((coef * valid).unsqueeze(1))


def _grad_kl_rows(s_t, lse_t_c, q, scale) -> torch.Tensor:
    """scale (softmax(s_t) - q) in place of s_t = s / tau (rows, V): dKL/ds for scale = 1 / tau."""
    return s_t.sub_(lse_t_c.unsqueeze(1)).exp_().sub_(q).mul_(scale)


def _kernel_kl_args(t_c, lse_st, lse_u, tau: float, kl_coef) -> dict:
    """The KL's inputs of `kernels.softcap_ce_grad` for one chunk; kl_coef (scalar tensor) on every row."""
    return dict(targets=t_c, lse_st=lse_st, lse_u=lse_u, tau=tau, kl_coef=kl_coef.expand(lse_st.shape).contiguous())


def _through_softcap(d, r, cap: float) -> torch.Tensor:
    """dL/dz from dL/ds in place, with r = 1 / sqrt(z^2 + cap^2)."""
    # d softcap(z) / dz = cap * r - cap * z^2 * r^3 = cap^3 * r^3, as 1 - z^2 r^2 = cap^2 r^2.
    return d.mul_(r.pow_(3).mul_(cap**3))


def _picked(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return s.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)


class _SoftcapCrossEntropySums(torch.autograd.Function):
    """(sum of CE over tokens, sum of CE over focused tokens[, sum of KL to soft targets]) of soft-capped
    logits, chunked: with `targets_rows`, one pass of the head per chunk serves both terms. The targets'
    probabilities (their logits, with the kernels) are kept from forward to backward, or with
    `recompute_targets` asked for again. With `grads_now` the forward computes the gradients of one
    differentiable scalar while each chunk's logits exist, and the backward only scales them by its
    gradient: with `coefs` (c_ce, c_focus, c_kl), the extra output sum_i c_i sums_i (the sums then come
    back non-differentiable); without, the one sum that takes a gradient (the CE without focus and
    targets, or the KL with every label ignored)."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, focus, cap, chunk_tokens, targets_rows=None, temperature=1.0,
                recompute_targets=False, row_kernels=False, grads_now=(False, False, False), coefs=None):
        acc = _accumulation_dtype(h.dtype)
        with_kl = targets_rows is not None
        early = any(grads_now)
        weighted = coefs is not None
        # the early gradient's parts: the CE's (every case with labels) and the KL's
        early_ce = early and (weighted or not with_kl)
        early_kl = early and with_kl
        if early and not weighted:  # one sum alone: a unit coefficient on it
            coefs = h.new_tensor([0.0, 0.0, 1.0] if with_kl else [1.0, 0.0], dtype=acc)
        sums = h.new_zeros(3 if with_kl else 2, dtype=acc)
        lse = h.new_empty(0 if early else h.shape[0], dtype=acc)
        lse_t = h.new_empty(h.shape[0] if with_kl else 0, dtype=acc)  # logsumexp of s / tau
        lse_u = h.new_empty(h.shape[0] if with_kl and row_kernels else 0, dtype=acc)  # of targets / tau
        grad_h, grad_w, grad_b = _grad_buffers(h, weight, bias, grads_now, acc)
        w = weight.to(h.dtype) if early else None
        # per chunk, kept for backward unless recomputed there: the targets' probabilities (PyTorch rows) or
        # their logits (the kernels)
        kept = []
        for start in range(0, h.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, h.shape[0])
            h_c, y = h[start:end], labels[start:end]
            valid = (y != IGNORE_INDEX).to(acc)
            if row_kernels:  # one read of the head-dtype logits (and targets) per pass (kernels.softcap_ce)
                z = _logits(h_c, weight, bias)
                if with_kl:
                    t_c = _kernel_targets(targets_rows, start, end)  # what the backward reads again
                    lse_c, picked, lse_t[start:end], lse_u[start:end], kl_c = softcap_ce_rows(
                        z, y, cap, t_c, temperature)
                    sums[2] += kl_c.sum()
                else:
                    lse_c, picked = softcap_ce_rows(z, y, cap)
                ce = (lse_c - picked) * valid
            else:
                z, r = _logits_and_inverse_radius(h_c, weight, bias, cap, acc)
                s = z.mul_(r).mul_(cap)
                lse_c = torch.logsumexp(s, dim=-1)
                ce = (lse_c - _picked(s, y)) * valid
                if with_kl:
                    # KL(q || p) = sum q log q - sum q s / tau + logsumexp(s / tau), with sum q = 1.
                    log_q_c = _target_log_probs(targets_rows, start, end, temperature, acc)
                    t_c = log_q_c.exp()  # q, what the backward reads again
                    s_t = s.div(temperature) if early_ce else s.div_(temperature)  # the CE's gradient reads s
                    lse_t[start:end] = torch.logsumexp(s_t, dim=-1)
                    sums[2] += log_q_c.sub_(s_t).mul_(t_c).sum() + lse_t[start:end].sum()
            sums[0] += ce.sum()
            if focus is not None:
                sums[1] += (ce * focus[start:end]).sum()
            if early:  # the gradient of the differentiable scalar while the logits exist, for a unit weight
                # each token's weight in it: c_ce + c_focus focus for the CE, c_kl for the KL
                coef = valid * coefs[0] if focus is None else valid * (coefs[0] + coefs[1] * focus[start:end].to(acc))
                kl_scale = coefs[2] / temperature if with_kl else None
                if row_kernels:
                    kl = {} if not with_kl else _kernel_kl_args(t_c, lse_t[start:end], lse_u[start:end], temperature,
                                                                kl_scale)
                    d_z, d_b = softcap_ce_grad(z, y, lse_c, coef.contiguous(), cap, **kl)
                else:
                    d = _grad_kl_rows(s_t, lse_t[start:end], t_c, kl_scale) if early_kl else None
                    if early_ce:
                        d_ce = _grad_ce_rows(s, lse_c, y, coef)
                        d = d_ce if d is None else d_ce.add_(d)
                    d = _through_softcap(d, r, cap)
                    d_z, d_b = d.to(h.dtype), d.sum(0)
                _add_chunk_grads(d_z, d_b, h_c, w, grad_h, grad_w, grad_b, start, end)
                continue
            lse[start:end] = lse_c
            if with_kl and not recompute_targets:
                kept.append(t_c)
        if early:
            ctx.save_for_backward(grad_h, grad_w, grad_b)
        else:
            ctx.save_for_backward(h, weight, bias, labels, focus, lse, lse_t, lse_u)
        ctx.cap, ctx.chunk_tokens, ctx.temperature, ctx.kept = cap, chunk_tokens, temperature, kept
        ctx.targets_rows = targets_rows if with_kl and recompute_targets else None
        ctx.with_kl, ctx.row_kernels, ctx.early, ctx.weighted = with_kl, row_kernels, early, weighted
        ctx.early_sum = 2 if with_kl else 0  # the one differentiable sum when the forward computed the gradients
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype)
        if not weighted:
            return sums
        ctx.mark_non_differentiable(sums)
        return sums, (sums * coefs[:sums.numel()]).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums, grad_weighted=None):
        if ctx.early:
            scale = grad_weighted if ctx.weighted else grad_sums[ctx.early_sum]
            return _scaled_early_grads(ctx.saved_tensors, scale, ctx.dtypes) + (None,) * 10
        h, weight, bias, labels, focus, lse, lse_t, lse_u = ctx.saved_tensors
        cap, chunk_tokens, tau, kept = ctx.cap, ctx.chunk_tokens, ctx.temperature, ctx.kept
        acc = lse.dtype
        grad_h, grad_w, grad_b = _grad_buffers(h, weight, bias, ctx.needs_input_grad[:3], acc)
        w = weight.to(h.dtype)
        for index, start in enumerate(range(0, h.shape[0], chunk_tokens)):
            end = min(start + chunk_tokens, h.shape[0])
            h_c, y = h[start:end], labels[start:end]
            # each token's weight in the two sums
            coef = grad_sums[0] if focus is None else grad_sums[0] + grad_sums[1] * focus[start:end].to(acc)
            if ctx.row_kernels:
                coef = (coef * (y != IGNORE_INDEX)).contiguous()
                kl = {}
                if ctx.with_kl:
                    t_c = kept[index] if ctx.targets_rows is None else _kernel_targets(ctx.targets_rows, start, end)
                    kl = _kernel_kl_args(t_c, lse_t[start:end], lse_u[start:end], tau, (grad_sums[2] / tau).to(acc))
                d_z, d_b = softcap_ce_grad(_logits(h_c, weight, bias), y, lse[start:end], coef, cap, **kl)
                _add_chunk_grads(d_z, d_b, h_c, w, grad_h, grad_w, grad_b, start, end)
                continue
            z, r = _logits_and_inverse_radius(h_c, weight, bias, cap, acc)
            s = z.mul_(r).mul_(cap)
            # the KL's part, before s is overwritten by the CE gradient below
            d_kl = None
            if ctx.with_kl:
                q_c = (kept[index] if ctx.targets_rows is None
                       else _target_log_probs(ctx.targets_rows, start, end, tau, acc).exp_())
                d_kl = _grad_kl_rows(s.div(tau), lse_t[start:end], q_c, grad_sums[2] / tau)
            d = _grad_ce_rows(s, lse[start:end], y, coef)
            if d_kl is not None:
                d.add_(d_kl)
            d = _through_softcap(d, r, cap)
            _add_chunk_grads(d.to(h.dtype), d.sum(0), h_c, w, grad_h, grad_w, grad_b, start, end)
        grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                 None if grad_b is None else grad_b.to(bias.dtype))
        return grads + (None,) * 10


def _scaled_early_grads(saved, grad_sum, dtypes):
    """The gradients computed in forward for a unit gradient of one sum, times its actual gradient."""
    return tuple(None if g is None else g.mul(grad_sum).to(dtype) for g, dtype in zip(saved, dtypes))


def _target_logits(targets_rows, start: int, end: int) -> torch.Tensor:
    """Rows start:end of `targets_rows(start, end)`, without autograd."""
    with torch.no_grad():
        t = targets_rows(start, end)
    if t.shape[0] != end - start:
        raise ValueError(f"target logits have {t.shape[0]} rows for tokens {start}:{end}")
    return t


def _target_log_probs(targets_rows, start: int, end: int, temperature: float, acc: torch.dtype) -> torch.Tensor:
    """log softmax(targets / tau) of rows start:end of `targets_rows(start, end)`, without autograd."""
    return torch.log_softmax(_target_logits(targets_rows, start, end).to(acc) / temperature, dim=-1)


def _kernel_targets(targets_rows, start: int, end: int) -> torch.Tensor:
    """Target logits of rows start:end as the kernels read them: their dtype (fp32 if they have none of the
    kernels'), contiguous columns."""
    t = _target_logits(targets_rows, start, end)
    if t.dtype not in TRITON_DTYPES:
        t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def softcap_cross_entropy_sums(h, weight, bias, labels, focus=None, *, cap: float, chunk_tokens: int,
                               targets_rows=None, temperature: float = 1.0,
                               recompute_targets: bool = False, elementwise: str = "auto",
                               grads_in_forward: bool = True, weights=None):
    """Fused sums of CE over rows of `h` (N, D) and over rows weighted by `focus` (N,; None: the second sum is 0),
    -100 labels counting 0 (labels None: every one ignored); with `targets_rows(start, end)` -> target
    logits, a third: the sum of KL(softmax(t/tau) || softmax(s/tau)).

    `recompute_targets` asks `targets_rows` again per chunk in backward instead of keeping the targets'
    probabilities (N x V; with the kernels, the target logits in their dtype) from forward to backward.
    `elementwise` says what runs the soft-cap, the cross-entropy and the KL on each chunk's logits:
    "triton" (the kernels of `kernels.softcap_ce`), "torch", or "auto" (Triton where the kernel backend
    is, else PyTorch; the environment variable ATMA_LOSS_ROWS=auto|triton|torch overrides that choice).
    `grads_in_forward` lets the forward compute the gradients where one sum is the only differentiable
    term (module docstring): the CE without focus and targets, or the KL without labels; then nothing
    is recomputed or kept for the backward. False recomputes the logits in backward in every case.

    `weights` (c_ce, c_focus, c_kl), floats or 0-d tensors: the coefficients with which the caller's
    loss takes the three sums (c_kl unused without targets). The function then returns (sums, their
    weighted sum), and only the weighted sum takes a gradient: one differentiable scalar whatever the
    terms, so the forward computes its gradients (with `grads_in_forward`) for every combination of
    the CE, the focus mask and the KL, and keeps no targets."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if labels is None and targets_rows is None:
        raise ValueError("nothing to compute: no labels and no targets")
    if labels is None:
        labels = torch.full(h.shape[:1], IGNORE_INDEX, dtype=torch.long, device=h.device)
        only_kl = focus is None
    else:
        only_kl = False
    row_kernels = uses_row_kernels(h.device, h.dtype, elementwise)
    if h.device.type == "cpu":
        chunk_tokens = min(chunk_tokens, max(1, CPU_LOGITS_PER_CHUNK // weight.shape[0]))
    needs = tuple(torch.is_grad_enabled() and x.requires_grad for x in (h, weight, bias))
    args = (h, weight, bias, labels, focus, cap, chunk_tokens, targets_rows, temperature, recompute_targets,
            row_kernels)
    if weights is not None:
        if len(weights) != 3:
            raise ValueError(f"weights must be (c_ce, c_focus, c_kl), got {len(weights)} values")
        acc = _accumulation_dtype(h.dtype)
        coefs = torch.stack([torch.as_tensor(c, dtype=acc, device=h.device) for c in weights])
        if grads_in_forward and any(needs):
            return _SoftcapCrossEntropySums.apply(*args, needs, coefs)
        sums = _SoftcapCrossEntropySums.apply(*args, (False, False, False), None)
        return sums.detach(), (sums * coefs[:sums.numel()]).sum()
    only_ce = focus is None and targets_rows is None
    grads_now = needs if grads_in_forward and (only_ce or only_kl) else (False, False, False)
    return _SoftcapCrossEntropySums.apply(*args, grads_now)


def uses_row_kernels(device: torch.device, dtype: torch.dtype, elementwise: str = "auto") -> bool:
    """Whether the Triton row kernels run the chunks of a head input on `device` in `dtype` (see
    `softcap_cross_entropy_sums`)."""
    choices = ("auto", "triton", "torch")
    if elementwise not in choices:
        raise ValueError(f"elementwise must be auto, triton or torch, got {elementwise!r}")
    fits = dtype in TRITON_DTYPES
    if elementwise == "triton":
        if not fits:
            raise ValueError(f"elementwise='triton' takes {TRITON_DTYPES} inputs, got {dtype}")
        return True
    if elementwise == "torch":
        return False
    rows = os.environ.get(ROWS_ENV, "auto").strip().lower() or "auto"
    if rows not in choices:
        raise ValueError(f"the environment variable {ROWS_ENV} must be one of {', '.join(choices)}, got {rows!r}")
    if rows == "torch" or not fits:
        return False
    return rows == "triton" or kernel_backend(device) == "triton"


def softcap_cross_entropy_sums_naive(h, weight, bias, labels, focus=None, *, cap: float, targets=None,
                                     temperature: float = 1.0) -> torch.Tensor:
    """Reference for `softcap_cross_entropy_sums`: whole logits, autograd through every op; with target logits
    `targets` (N, V) the third sum, the KL to them, in fp32 (fp64 for fp64 inputs)."""
    logits = softcap(F.linear(h, weight.to(h.dtype), bias.to(h.dtype)), cap)
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
    sums = [ce.sum(), (ce * focus).sum() if focus is not None else ce.new_zeros(())]
    if targets is not None:
        acc = _accumulation_dtype(h.dtype)
        log_p = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
        log_q = torch.log_softmax(targets.to(acc) / temperature, dim=-1)
        sums = [x.to(acc) for x in sums] + [F.kl_div(log_p, log_q, log_target=True, reduction="sum")]
    return torch.stack(sums)
