"""The composite pretraining loss: LM cross-entropy, copy targets, signature regularizer, distractor, distillation.

The LM and distillation terms are computed by the model's LM head (chunked, `model.modeling`).

Every term is a per-token (or per-row) mean so its weight means what it says (DESIGN departure 2).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import torch

SKETCH_GRID = 17  # SPEC §5.2 strong mode: tau = linspace(-5, 5, 17)


# ---------------------------------------------------------------------- signature regularizer
def _sketch(x: torch.Tensor, k: int) -> torch.Tensor:
    """Project rows of x (N, D) to k dims with a fresh N(0,1)/sqrt(D) sketch when D > k."""
    D = x.shape[1]
    if D <= k:
        return x
    s = torch.randn(k, D, device=x.device, dtype=x.dtype) / math.sqrt(D)
    return x @ s.T


def sig_weak(x: torch.Tensor, k: int) -> torch.Tensor:
    """Weak-SIGReg: ||cov(sketch(x)) - I||_F over centred columns (SPEC §5.2)."""
    y = _sketch(x, k)
    y = y - y.mean(dim=0, keepdim=True)
    n = y.shape[0]
    cov = y.T @ y / (n - 1 + 1e-6)
    return torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=x.device, dtype=x.dtype))


def sig_discrete(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rows projected to the sphere of radius sqrt(D), then the weak loss (SPEC §5.2)."""
    D = x.shape[1]
    x = math.sqrt(D) * x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return sig_weak(x, k)


def sig_strong(x: torch.Tensor, k: int) -> torch.Tensor:
    """Characteristic-function matching to N(0,1) on k unit-norm random projections (SPEC §5.2).

    The reference multiplies by the row count N (a token sum); this keeps the mean, which is the
    same ratio to a mean cross-entropy as the reference's ratio to its summed cross-entropy.
    """
    D = x.shape[1]
    a = torch.randn(D, k, device=x.device, dtype=x.dtype)
    a = a / (a.norm(dim=0, keepdim=True) + 1e-6)
    p = x @ a  # (N, k)
    tau = torch.linspace(-5, 5, SKETCH_GRID, device=x.device, dtype=x.dtype)
    phi = torch.exp(-0.5 * tau * tau)
    arg = p[:, :, None] * tau[None, None, :]  # (N, k, grid)
    e_cos, e_sin = torch.cos(arg).mean(0), torch.sin(arg).mean(0)
    err = ((e_cos - phi) ** 2 + e_sin**2) * phi
    return torch.trapezoid(err, tau, dim=-1).mean()


def sig_zipfian(x: torch.Tensor, k: int) -> torch.Tensor:
    """Angular decorrelation of sketched rows plus a Zipf (s=1) target on sorted row norms (SPEC §5.2)."""
    y = _sketch(x, k)
    y = y - y.mean(dim=0, keepdim=True)
    n = y.shape[0]
    r = y.norm(dim=1).clamp_min(1e-6)
    u = y / r[:, None]
    gram = u.T @ u / (n - 1 + 1e-6)
    ang = torch.linalg.matrix_norm(gram - torch.diag(torch.diagonal(gram)))
    r_sorted = torch.sort(r, descending=True).values
    r_sorted = r_sorted / (r_sorted.sum() + 1e-6)
    ranks = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()
    return ang + torch.linalg.vector_norm(r_sorted - zipf)


SIG_LOSSES = {"weak": sig_weak, "discrete": sig_discrete, "strong": sig_strong, "zipfian": sig_zipfian}


def signature_loss(hidden_states: list[torch.Tensor], mode: str, sketch_dim: int = 64) -> torch.Tensor:
    """Mean over blocks of the signature regularizer of each block's residual output (SPEC §5.2)."""
    if mode == "baseline" or not hidden_states:
        ref = hidden_states[0] if hidden_states else torch.zeros(())
        return ref.new_zeros((), dtype=torch.float32)
    fn = SIG_LOSSES[mode]
    terms = [fn(h.reshape(-1, h.shape[-1]).float(), sketch_dim) for h in hidden_states]
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------- copy targets
_COPY_HASH_SEED = 20261201


@functools.lru_cache(maxsize=None)
def _gram_multipliers(n: int) -> tuple[int, ...]:
    """n fixed odd 62-bit multipliers, one per position of a gram."""
    rng = random.Random(_COPY_HASH_SEED)
    return tuple(rng.getrandbits(62) | 1 for _ in range(n))


def copy_targets(input_ids: torch.Tensor, labels: torch.Tensor, context: int) -> torch.Tensor:
    """Boolean (B,T) mask of the labels that repeat an earlier (context + 1)-gram of their row.

    Position t is a copy target when the `context` tokens ending at input t, followed by labels[t],
    appeared together earlier in the same row: exactly the targets an induction (copy) mechanism can
    predict. Each gram is hashed to one int64 (random odd multipliers, wrapping arithmetic); a stable
    sort per row puts equal grams together in position order, so every one but the first is a repeat.
    """
    rows, length = input_ids.shape
    n = context + 1
    pad = input_ids.new_full((rows, n - 1), -1)  # no real gram matches a padded one
    stream = torch.cat([pad, input_ids, labels[:, -1:]], dim=1).long()
    multipliers = _gram_multipliers(n)
    grams = torch.zeros(rows, length, dtype=torch.long, device=input_ids.device)
    for back, multiplier in enumerate(multipliers):
        # the gram of target t ends at stream index t + n (the label) and starts n - 1 tokens earlier
        grams = grams + stream[:, n - back : n - back + length] * multiplier
    ordered = torch.sort(grams, dim=1, stable=True)
    repeat = torch.zeros_like(grams, dtype=torch.bool)
    repeat[:, 1:] = ordered.values[:, 1:] == ordered.values[:, :-1]
    return torch.zeros_like(repeat).scatter(1, ordered.indices, repeat)


# ---------------------------------------------------------------------- composition
@dataclass
class LossWeights:
    """Weights of each term; zero switches a term off (it is then not even computed)."""

    lm: float = 1.0
    sig: float = 0.0
    distractor: float = 0.0
    distill: float = 0.0
    copy: float = 0.0


HEAD_TERMS = ("lm", "copy", "distill")


def combine_losses(terms: dict[str, torch.Tensor], weights: LossWeights,
                   head: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of the loss terms present in `terms` (keys lm, copy, sig, distractor, distill).

    `head`: the LM head's terms (lm, copy, distill) already weighted and summed by the model; those keys of
    `terms` then serve logging only."""
    total = head
    for name in ("lm", "copy", "sig", "distractor", "distill"):
        w = getattr(weights, name)
        if head is not None and name in HEAD_TERMS:
            continue
        if name in terms and w != 0:
            part = w * terms[name]
            total = part if total is None else total + part
    if total is None:
        raise ValueError("every loss weight is zero: nothing to train on")
    return total
