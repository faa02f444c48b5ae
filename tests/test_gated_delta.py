"""Chunked PyTorch gated delta rule vs the SPEC §10.2 golden vectors and the sequential oracle."""

import pytest
import torch
import torch.nn.functional as F

from helpers import F64, GATED_DELTA_GOLDEN, assert_golden, gated_delta_case, gated_delta_golden_inputs, rel_rmse
from kernels.gated_delta.naive import gated_delta_rule_naive
from kernels.gated_delta.torch_impl import chunk_gated_delta_rule_torch

pytestmark = pytest.mark.nan_poison


def test_golden_vectors():
    o, state = chunk_gated_delta_rule_torch(*gated_delta_golden_inputs(), output_final_state=True, chunk_size=4)
    assert_golden(o[0, :, 0], GATED_DELTA_GOLDEN["o"])
    assert_golden(state[0, 0].transpose(-1, -2), GATED_DELTA_GOLDEN["final_M"])


CASES = [(1, 4), (5, 4), (8, 4), (13, 4), (37, 16), (64, 64), (70, 64), (50, 1)]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T,chunk", CASES, ids=[f"T{T}-C{c}" for T, c in CASES])
def test_chunked_matches_sequential_fp64(T, chunk, with_state):
    q, k, v, g, beta, h0 = gated_delta_case(2, T, 3, 5, 4, seed=T + chunk, with_state=with_state)
    o_ref, s_ref = gated_delta_rule_naive(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk)
    assert o.shape == (2, T, 3, 4) and s.shape == (2, 3, 5, 4)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=1e-12, rtol=0)
    o2, none = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, chunk_size=chunk)
    assert none is None
    torch.testing.assert_close(o2, o, atol=0, rtol=0)


def test_gradients_match_sequential_fp64():
    q, k, v, g, beta, h0 = gated_delta_case(2, 11, 2, 4, 3, seed=3)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    gen = torch.Generator().manual_seed(9)
    grad_o = torch.randn(2, 11, 2, 3, generator=gen, dtype=F64)
    grad_s = torch.randn(2, 2, 4, 3, generator=gen, dtype=F64)

    def grads(fn, **kw):
        o, s = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kw)
        return torch.autograd.grad((o * grad_o).sum() + (s * grad_s).sum(), leaves)

    for got, ref in zip(grads(chunk_gated_delta_rule_torch, chunk_size=4), grads(gated_delta_rule_naive)):
        torch.testing.assert_close(got, ref, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("split", [5, 11, 16])
def test_state_carry_across_split(split):
    q, k, v, g, beta, h0 = gated_delta_case(1, 23, 2, 6, 4, seed=split)
    o_full, s_full = chunk_gated_delta_rule_torch(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=8
    )
    first = [x[:, :split] for x in (q, k, v, g, beta)]
    second = [x[:, split:] for x in (q, k, v, g, beta)]
    o1, s1 = chunk_gated_delta_rule_torch(*first, initial_state=h0, output_final_state=True, chunk_size=8)
    o2, s2 = chunk_gated_delta_rule_torch(*second, initial_state=s1, output_final_state=True, chunk_size=8)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(s2, s_full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("T,chunk", [(6, 4), (4, 2)])
def test_gradcheck_fp64(T, chunk):
    inputs = [x.requires_grad_(True) for x in gated_delta_case(1, T, 2, 3, 2, seed=T)]

    def fn(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_bf16_vs_fp64_oracle():
    q, k, v, g, beta, h0 = gated_delta_case(2, 64, 2, 16, 16, seed=1, with_state=False)
    low = [x.to(torch.bfloat16) for x in (q, k, v)] + [g.float(), beta.float()]
    o, s = chunk_gated_delta_rule_torch(*low, output_final_state=True, chunk_size=16)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, s_ref = gated_delta_rule_naive(q, k, v, g, beta, output_final_state=True)
    assert rel_rmse(o, o_ref) < 0.05 and rel_rmse(s, s_ref) < 0.05


def test_strong_decay_stays_finite():
    """Very negative log-decays: the masked exponentials must not produce inf * 0 = NaN."""
    q, k, v, g, beta, h0 = gated_delta_case(1, 16, 1, 4, 4, seed=4, dtype=torch.float32)
    g = (g - 80.0).requires_grad_(True)
    o, s = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=8)
    (o.sum() + s.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all() and torch.isfinite(g.grad).all()
    o_ref, _ = gated_delta_rule_naive(q.double(), k.double(), v.double(), g.double(), beta.double(), initial_state=h0.double())
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)


def test_input_validation_and_empty():
    q, k, v, g, beta, h0 = gated_delta_case(1, 5, 2, 3, 4, seed=0)
    with pytest.raises(ValueError, match="k must"):
        chunk_gated_delta_rule_torch(q, k[..., :2], v, g, beta)
    with pytest.raises(ValueError, match="beta"):
        chunk_gated_delta_rule_torch(q, k, v, g, beta[:, :4])
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0.transpose(-1, -2))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule_torch(q, k, v, g, beta, chunk_size=0)
    o, s = chunk_gated_delta_rule_torch(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0], initial_state=h0, output_final_state=True)
    assert o.shape == (1, 0, 2, 4)
    torch.testing.assert_close(s, h0)


def _backward_node_names(t: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def test_backward_is_linear_in_the_number_of_chunks():
    """The chunk loop must not index per chunk: each SelectBackward would allocate and add a
    zero-filled buffer of the full (all-chunks) size, making the backward O(N^2) in memory traffic."""

    def indexing_nodes(num_chunks: int) -> int:
        torch.manual_seed(0)
        B, T, H, d = 1, 8 * num_chunks, 2, 8
        q = F.normalize(torch.randn(B, T, H, d), dim=-1).requires_grad_()
        k = F.normalize(torch.randn(B, T, H, d), dim=-1).requires_grad_()
        v = torch.randn(B, T, H, d, requires_grad=True)
        g = F.logsigmoid(torch.randn(B, T, H) + 3.9).requires_grad_()
        beta = torch.sigmoid(torch.randn(B, T, H)).requires_grad_()
        o, _ = chunk_gated_delta_rule_torch(q, k, v, g, beta, chunk_size=8)
        names = _backward_node_names(o)
        assert "UnbindBackward0" in names
        return sum(n in ("SelectBackward0", "SliceBackward0") for n in names)

    assert indexing_nodes(16) == indexing_nodes(4)
