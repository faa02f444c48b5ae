"""Incremental decoding: the cache reproduces the full forward, and each cached path its oracle.

Whole model, every core (polar, nope, rope) with and without memory and a sliding window, fp32 on
the PyTorch paths: greedy decoding with the cache picks the same tokens from the same logits as
recomputing the full forward at every step, and a prefill split anywhere leaves the same state
as one prefill. The pieces: the single- and multi-query Polar reduction against the fp64 oracle
(`kernels/polar/naive.py`) at every offset, with and without a window; the recurrent gated-delta
step against the sequential oracle and SPEC §10.2; the conv histories against the plain conv.
"""

import math

import pytest
import torch

from helpers import (GATED_DELTA_GOLDEN, assert_golden, gated_delta_case, gated_delta_golden_inputs, live_model,
                     polar_case)
from kernels.gated_delta.naive import gated_delta_rule_naive
from kernels.polar.naive import polar_attention_naive
from model import AtmaForCausalLM
from model.attention import sliding_causal_mask
from model.cache import KVCache
from model.cached_attention import polar_attention_cached, softmax_attention_cached
from model.generation import greedy_generate
from model.layers import CausalDepthwiseConv
from model.memory import gated_delta_step

CASES = [(core, memory, window) for core in ("polar", "nope", "rope") for memory in (True, False) for window in (None, 5)]
IDS = [f"{c}-mem{int(m)}-W{w}" for c, m, w in CASES]
# Cached paths reassociate sums (one query against the cache, recurrent memory); logits are O(1).
LOGIT_TOL = 2e-5




def prompt(model, batch=2, length=13, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)


# ---------------------------------------------------------------------- whole model
@pytest.mark.parametrize("core,memory,window", CASES, ids=IDS)
def test_cached_greedy_decoding_matches_full_recomputation(core, memory, window):
    model = live_model(core, memory, window)
    ids = prompt(model)  # 13 tokens: past a memory chunk boundary and the window
    cached = greedy_generate(model, ids, 12, return_logits=True)
    full = greedy_generate(model, ids, 12, use_cache=False, return_logits=True)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.logits, full.logits, rtol=0, atol=LOGIT_TOL)
    # The logits are far from flat, so equal tokens are not a coincidence of ties.
    assert full.logits.std(dim=-1).min().item() > 0.1


@pytest.mark.parametrize("core,memory,window", CASES, ids=IDS)
def test_split_prefill_gives_the_same_state_and_next_logits(core, memory, window):
    model = live_model(core, memory, window)
    ids = prompt(model, length=21)
    with torch.no_grad():
        whole = model.new_cache()
        logits = model.logits(model.extend(ids, whole)[:, -1])
        for cut in (1, 2, 3, 5, 8, 13, 20):
            split = model.new_cache()
            model.extend(ids[:, :cut], split)
            split_logits = model.logits(model.extend(ids[:, cut:], split)[:, -1])
            assert split.seq_len == whole.seq_len == 21
            expected, got = whole.tensors(), split.tensors()
            assert got.keys() == expected.keys()
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=f"cut {cut}: {name}")
            torch.testing.assert_close(split_logits, logits, rtol=0, atol=LOGIT_TOL)


def test_prefill_equals_the_training_forward_exactly():
    model = live_model("polar", True, None)
    ids = prompt(model, length=19)
    with torch.no_grad():
        hidden = model.extend(ids, model.new_cache())
        torch.testing.assert_close(hidden, model.trunk(ids)[0], rtol=0, atol=0)


@pytest.mark.parametrize("window", [None, 4])
def test_conv_and_memory_state_do_not_grow_with_length(window):
    model = live_model("polar", True, window)
    ids = prompt(model, batch=1, length=40)
    with torch.no_grad():
        cache = model.new_cache()
        model.extend(ids[:, :8], cache)
        early = {name: t.shape for name, t in cache.tensors().items()}
        for t in range(8, 40):
            model.extend(ids[:, t : t + 1], cache)
    late = {name: t.shape for name, t in cache.tensors().items()}
    for name, shape in late.items():
        if name.endswith(("keys", "values")):
            assert shape[1] == (40 if window is None else window - 1), name
        else:
            assert shape == early[name], name  # conv histories and the memory state keep their size
    assert late["blocks.2.memory"] == (1, 4, 32, 32)
    assert late["blocks.0.conv"] == (1, 2, 128) and late["blocks.2.canon_k"] == (1, 3, 32)


def test_extend_rejects_a_mismatched_cache():
    model = live_model("polar", True, None)
    cache = model.new_cache()
    with torch.no_grad():
        model.extend(prompt(model, batch=2, length=3), cache)
        with pytest.raises(ValueError, match="holds 2 sequences"):
            model.extend(prompt(model, batch=3, length=1), cache)
        with pytest.raises(ValueError, match="seq_len >= 1"):
            model.extend(torch.zeros(2, 0, dtype=torch.long), cache)
        other = live_model("polar", True, None)
        other.config.num_hidden_layers = 8
        with pytest.raises(ValueError, match="layers"):
            model.extend(prompt(model, length=1), AtmaForCausalLM.new_cache(other))


# ---------------------------------------------------------------------- Polar against the fp64 oracle
@pytest.mark.parametrize("window", [None, 1, 3, 6])
@pytest.mark.parametrize("case", ["random", "null-heavy"])
def test_polar_attention_cached_matches_oracle_at_every_offset(window, case):
    T, H, G, d = 11, 4, 2, 8
    inputs, _, _ = polar_case(2, T, H, G, d, seed=3, qk_scale=2.0, null_base=6.0 if case == "null-heavy" else None)
    q, k, v, *params = inputs
    direction, magnitude = polar_attention_naive(q, k, v, *params, window=window)
    keep = T if window is None else window - 1
    for q_start in range(T):
        for num_q in sorted({1, min(3, T - q_start), T - q_start}):
            end = q_start + num_q
            # What a cache holds before these queries (the last `keep` keys), then the new keys.
            k_start = max(0, q_start - keep)
            got_dir, got_mag = polar_attention_cached(
                q[:, q_start:end], k[:, k_start:end], v[:, k_start:end], *params,
                q_start=q_start, k_start=k_start, window=window,
            )
            torch.testing.assert_close(got_dir, direction[:, q_start:end], rtol=0, atol=1e-12)
            # The oracle forms 1 - w_null, which cancels when the null takes nearly all the mass;
            # the cached path sums the real weights instead, so the magnitudes agree to 1e-9.
            torch.testing.assert_close(got_mag, magnitude[:, q_start:end], rtol=0, atol=1e-9)


def test_polar_attention_cached_keeps_the_input_dtype_and_computes_in_fp32():
    inputs, _, _ = polar_case(1, 9, 4, 1, 16, seed=5)
    q, k, v, *params = inputs
    expected_dir, expected_mag = polar_attention_naive(q, k, v, *params)
    got_dir, got_mag = polar_attention_cached(
        q[:, 8:].bfloat16(), k.bfloat16(), v.bfloat16(), *[p.float() for p in params], q_start=8, k_start=0
    )
    assert got_dir.dtype == got_mag.dtype == torch.bfloat16
    torch.testing.assert_close(got_dir.double(), expected_dir[:, 8:], rtol=0, atol=3e-2)
    torch.testing.assert_close(got_mag.double(), expected_mag[:, 8:], rtol=0, atol=3e-2)


def test_cached_reductions_stay_fp32_under_autocast():
    inputs, _, _ = polar_case(1, 7, 4, 2, 8, seed=6)
    q, k, v, *params = (x.float() for x in inputs)
    state = torch.randn(1, 4, 8, 8)
    gq, gk, gv, gg, gbeta, _ = (x.float() if x is not None else None for x in gated_delta_case(1, 1, 4, 8, 8, seed=1))
    plain = polar_attention_cached(q[:, 6:], k, v, *params, q_start=6, k_start=0), gated_delta_step(gq, gk, gv, gg, gbeta, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = polar_attention_cached(q[:, 6:], k, v, *params, q_start=6, k_start=0), gated_delta_step(gq, gk, gv, gg, gbeta, state)
    for expected, got in zip(plain, autocast):
        for e, g in zip(expected, got):
            assert g.dtype == torch.float32 and torch.equal(g, e)


def test_cached_attention_rejects_keys_that_do_not_end_at_the_last_query():
    q = torch.zeros(1, 2, 2, 4)
    k = torch.zeros(1, 5, 1, 4)
    params = [torch.zeros(2, 4)] + [torch.zeros(2)] * 4
    with pytest.raises(ValueError, match="last query's own"):
        polar_attention_cached(q, k, k, *params, q_start=4, k_start=0)
    with pytest.raises(ValueError, match="k_start <= q_start"):
        softmax_attention_cached(q, k, k, scale=0.5, q_start=1, k_start=3)


@pytest.mark.parametrize("window", [None, 2, 5])
def test_softmax_attention_cached_matches_masked_sdpa(window):
    gen = torch.Generator().manual_seed(0)
    T, H, G, d = 10, 4, 2, 8
    q = torch.randn(1, T, H, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, T, G, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, T, G, d, generator=gen, dtype=torch.float64)
    mask = sliding_causal_mask(T, T, window)
    kh, vh = (x.transpose(1, 2).repeat_interleave(H // G, dim=1) for x in (k, v))
    scores = (q.transpose(1, 2) @ kh.transpose(-1, -2) * 0.3).masked_fill(~mask, -math.inf)
    expected = (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)
    for q_start in (0, 4, 9):
        k_start = 0 if window is None else max(0, q_start - window + 1)
        got = softmax_attention_cached(
            q[:, q_start:], k[:, k_start:], v[:, k_start:], scale=0.3, q_start=q_start, k_start=k_start, window=window
        )
        torch.testing.assert_close(got, expected[:, q_start:], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- gated delta, conv, KV buffer
def test_gated_delta_step_reproduces_spec_golden_vectors():
    q, k, v, g, beta = gated_delta_golden_inputs()
    state = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    outputs = []
    for t in range(6):
        o, state = gated_delta_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], beta[:, t : t + 1], state)
        outputs.append(o[0, 0, 0])
    assert_golden(torch.stack(outputs), GATED_DELTA_GOLDEN["o"])
    assert_golden(state[0, 0].T, GATED_DELTA_GOLDEN["final_M"])  # the state is M^T


def test_gated_delta_steps_match_the_sequential_oracle_from_a_state():
    q, k, v, g, beta, h0 = gated_delta_case(2, 7, 3, 4, 5, seed=2)
    expected, final = gated_delta_rule_naive(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    state, outputs = h0, []
    for t in range(7):
        step = slice(t, t + 1)
        o, state = gated_delta_step(q[:, step], k[:, step], v[:, step], g[:, step], beta[:, step], state)
        outputs.append(o)
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one token"):
        gated_delta_step(q, k, v, g, beta, h0)


@pytest.mark.parametrize("kernel_size", [1, 3, 4])
def test_conv_extend_continues_the_plain_conv(kernel_size):
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(6, kernel_size).double()
    x = torch.randn(2, 12, 6, dtype=torch.float64)
    expected = conv(x)
    for pieces in ([12], [1, 11], [2, 1, 1, 8], [5, 7], [1] * 12):
        history, outputs, start = None, [], 0
        for n in pieces:
            y, history = conv.extend(x[:, start : start + n], history)
            outputs.append(y)
            start += n
            assert history.shape == (2, kernel_size - 1, 6)
        torch.testing.assert_close(torch.cat(outputs, dim=1), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("keep", [None, 0, 3])
def test_kv_cache_keeps_what_later_queries_can_see(keep):
    cache = KVCache(keep)
    keys = torch.arange(40.0).view(1, 40, 1, 1)
    seen, start = [], 0
    for n in (5, 1, 1, 20, 1, 13):
        got_k, got_v = cache.append(keys[:, start : start + n], -keys[:, start : start + n])
        first = 0 if keep is None else max(0, start - keep)
        # The new queries read every kept key plus the new ones.
        assert torch.equal(got_k, keys[:, first : start + n]) and torch.equal(got_v, -keys[:, first : start + n])
        start += n
        seen.append(len(cache))
    assert seen[-1] == (40 if keep is None else keep)
    assert torch.equal(cache.keys, keys[:, 40 - len(cache) :])
