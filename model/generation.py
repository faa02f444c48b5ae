"""Greedy decoding with the decoding cache, and the same by full recomputation (the reference)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    """Greedy tokens (B, n) and, when asked, the fp32 logits (B, n, V) each one was chosen from."""

    tokens: torch.Tensor
    logits: torch.Tensor | None = None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def greedy_generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    stop_id: int | None = None,
    return_logits: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> Generation:
    """Greedily extend input_ids (B,T) by up to `max_new_tokens` tokens.

    With the cache: one prefill, then one `model.extend` step per token. Without it: the full
    forward over the whole sequence at every step (the reference the cache must reproduce).
    Only the trunk runs under autocast; logits are fp32, computed at the last position only.
    Stops early once every sequence has produced `stop_id`.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq_len) with seq_len >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = input_ids.device
    cache = model.new_cache() if use_cache else None
    sequence, step_input = input_ids, input_ids
    tokens, logits = [], []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        with _autocast(device, autocast_dtype):
            hidden = model.extend(step_input, cache) if use_cache else model.trunk(sequence)[0]
        step_logits = model.logits(hidden[:, -1].float()).float()
        token = step_logits.argmax(dim=-1, keepdim=True)
        tokens.append(token)
        if return_logits:
            logits.append(step_logits)
        sequence = torch.cat([sequence, token], dim=1)
        step_input = token
        if stop_id is not None:
            done |= token[:, 0] == stop_id
            if bool(done.all()):
                break
    return Generation(
        tokens=torch.cat(tokens, dim=1), logits=torch.stack(logits, dim=1) if return_logits else None
    )
