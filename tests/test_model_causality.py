"""Causality of the whole model: tokens after position t never change the logits at positions <= t.

Every core (polar, nope, rope), with and without the gated-delta memory and a sliding window,
in fp32 on the PyTorch paths (the CPU's fp64 depthwise conv is about 50x slower). A leak through
a mask moves the logits by far more than the 1e-6 allowed; without one they agree exactly. The zero-initialised output projections get random weights first,
so that every mixer (conv blocks, attention core, memory) really carries information forward.
"""

import pytest
import torch
from helpers import live_model


T = 24
CUTS = (0, 7, 15, T - 2)  # positions t after which the tokens change
CASES = [(core, memory, window) for core in ("polar", "nope", "rope") for memory in (True, False) for window in (None, 5)]




def logits_of(model, ids):
    with torch.no_grad():
        return model(ids, return_logits=True).logits


@pytest.mark.parametrize("core,memory,window", CASES, ids=[f"{c}-mem{int(m)}-W{w}" for c, m, w in CASES])
def test_future_tokens_leave_past_logits_unchanged(core, memory, window):
    model = live_model(core, memory, window)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, T), generator=gen)
    base = logits_of(model, ids)
    for t in CUTS:
        # Every token after t replaced (each one differs from the original).
        shift = torch.randint(1, vocab, (2, T - t - 1), generator=gen)
        changed = ids.clone()
        changed[:, t + 1:] = (ids[:, t + 1:] + shift) % vocab
        torch.testing.assert_close(logits_of(model, changed)[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        # Only token t + 1 replaced: the past is unchanged, and position t + 2, whose own token is
        # the same, does change, so information does flow forward through the mixers.
        one = ids.clone()
        one[:, t + 1] = (ids[:, t + 1] + 1) % vocab
        logits = logits_of(model, one)
        torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        if t + 2 < T:
            assert (logits[:, t + 2] - base[:, t + 2]).abs().max().item() > 1e-6
