"""Reference for the soft-capped cross-entropy's row statistics and logit gradient, whole rows at once,
with and without the distillation KL to target logits.

z [N, V] are the LM head's pre-cap logits, labels [N] (-100: ignored), s = cap z / sqrt(z^2 + cap^2)
(SPEC §2.1), t [N, V] target logits, tau the temperature. Everything runs in fp64 or fp32, whichever
is wider than the input.
"""

from __future__ import annotations

import torch

__all__ = ["softcap_ce_rows_naive", "softcap_ce_grad_naive", "softcap_ce_kl_rows_naive", "softcap_ce_kl_grad_naive"]

IGNORE_INDEX = -100


def _capped(z: torch.Tensor, cap: float) -> torch.Tensor:
    z = z.double() if z.dtype == torch.float64 else z.float()
    return cap * z * torch.rsqrt(z * z + cap * cap)


def softcap_ce_rows_naive(z: torch.Tensor, labels: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp of the capped row, the capped logit at the label; 0 where ignored), both [N]."""
    s = _capped(z, cap)
    picked = s.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.logsumexp(s, dim=-1), picked * (labels != IGNORE_INDEX)


def softcap_ce_grad_naive(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                          cap: float) -> torch.Tensor:
    """d(sum_i coef_i CE_i) / dz [N, V]: coef_i (softmax(s_i) - onehot(label_i)) times the soft-cap's slope."""
    s = _capped(z, cap)
    d = torch.exp(s - lse.to(s.dtype).unsqueeze(1))
    rows = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
    d[rows, labels[rows]] -= 1
    zz = z.to(s.dtype)
    # d softcap(z) / dz = cap^3 / (z^2 + cap^2)^(3/2)
    return d * coef.to(s.dtype).unsqueeze(1) * cap**3 * torch.rsqrt(zz * zz + cap * cap) ** 3


def softcap_ce_kl_rows_naive(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cap: float,
                             tau: float) -> tuple[torch.Tensor, ...]:
    """(lse of s, s at the label, lse of s / tau, lse of t / tau, KL(softmax(t / tau) || softmax(s / tau))), [N]."""
    lse, picked = softcap_ce_rows_naive(z, labels, cap)
    s_tau = _capped(z, cap) / tau
    u = t.to(s_tau.dtype) / tau
    log_p, log_q = torch.log_softmax(s_tau, dim=-1), torch.log_softmax(u, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return lse, picked, torch.logsumexp(s_tau, dim=-1), torch.logsumexp(u, dim=-1), kl


def softcap_ce_kl_grad_naive(z: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, t: torch.Tensor,
                             kl_coef: torch.Tensor, cap: float, tau: float) -> torch.Tensor:
    """d(sum_i coef_i CE_i + kl_coef_i tau KL_i) / dz [N, V] by autograd through whole rows."""
    zz = (z.double() if z.dtype == torch.float64 else z.float()).detach().requires_grad_()
    s = _capped(zz, cap)
    ce = torch.nn.functional.cross_entropy(s, labels, reduction="none", ignore_index=IGNORE_INDEX)
    log_p = torch.log_softmax(s / tau, dim=-1)
    log_q = torch.log_softmax(t.to(s.dtype) / tau, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    loss = (coef.to(s.dtype) * ce).sum() + (kl_coef.to(s.dtype) * tau * kl).sum()
    return torch.autograd.grad(loss, zz)[0]
