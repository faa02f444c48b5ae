"""Token-by-token gated delta rule (SPEC §4.4): the fp64-capable oracle of the chunked and FLA paths.

Layout of the `kernels.gated_delta_rule` contract (DESIGN.md): q, k (B, T, H, dk) already
L2-normalised, v (B, T, H, dv), g log-decay and beta (B, T, H), state (B, H, dk, dv) = M^T.
One step per token, so use it on small shapes only.
"""

from __future__ import annotations

import torch

from ..common import compute_dtype

__all__ = ["gated_delta_rule_naive"]


def gated_delta_rule_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequential gated delta rule (SPEC §4.4): decay, delta write, self-inclusive readout.

    Returns o (B,T,H,dv) and the final state (B,H,dk,dv), or None unless `output_final_state`.
    """
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    out_dtype = v.dtype
    cdt = compute_dtype(q.dtype)
    q_, k_, v_, g_, b_ = (x.to(cdt) for x in (q, k, v, g, beta))
    if initial_state is None:
        S = q.new_zeros(B, H, dk, dv, dtype=cdt)
    else:
        S = initial_state.to(cdt)
    outs = []
    for step in range(T):
        kt, vt, qt = k_[:, step], v_[:, step], q_[:, step]  # (B,H,dk|dv)
        S = S * torch.exp(g_[:, step])[..., None, None]
        pred = torch.einsum("bhkv,bhk->bhv", S, kt)
        S = S + b_[:, step][..., None, None] * torch.einsum("bhk,bhv->bhkv", kt, vt - pred)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, qt))
    o = torch.stack(outs, dim=1).to(out_dtype) if T else v.new_zeros(B, 0, H, dv)
    return o, (S if output_final_state else None)
