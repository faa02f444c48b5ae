"""The kernel paths as torch custom ops: registrations checked by torch.library.opcheck (schema, fake
implementation, autograd), compiled calls without graph breaks that equal eager ones, and the FLA
ops' fake implementations (FLA itself needs a GPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import F64, polar_case
from kernels.gated_delta import fla_bridge
from kernels.gated_delta.torch_impl import _gated_delta_fwd, chunk_gated_delta_rule_torch
from kernels.polar.torch_impl import _polar_fwd, polar_attention_torch

pytestmark = pytest.mark.nan_poison


def gated_delta_case(B=2, T=37, H=2, dk=8, dv=6, *, dtype=F64, with_state=True, seed=0):
    """Leaf inputs of the gated delta rule (unit q, k; log-decay g; beta in (0, 1)) and an initial state."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, dk, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, dv, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=dtype) + 3.0)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=dtype))
    state = torch.randn(B, H, dk, dv, generator=gen, dtype=dtype) if with_state else None
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]
    return leaves, (state.requires_grad_() if state is not None else None)


@pytest.mark.parametrize("window", [None, 3])
def test_polar_torch_op_registration(window):
    inputs, _, _ = polar_case(2, 9, 4, 2, 8, seed=1, qk_scale=1.5, scalar_scale=0.5)
    args = [x.requires_grad_() for x in inputs]
    torch.library.opcheck(_polar_fwd, (*args, window, 4))


@pytest.mark.parametrize("with_state", [False, True])
def test_gated_delta_torch_op_registration(with_state):
    leaves, state = gated_delta_case(with_state=with_state)
    torch.library.opcheck(_gated_delta_fwd, (*leaves, state, 16, "torch"))


def _grads(outputs, inputs, seed=3):
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, upstream)


def test_compiled_polar_equals_eager_without_graph_breaks():
    inputs, _, _ = polar_case(2, 11, 4, 2, 8, seed=5, qk_scale=1.5, scalar_scale=0.5)
    leaves = [x.requires_grad_() for x in inputs]

    def polar(*xs):
        return polar_attention_torch(*xs, window=4, block_size=3)

    compiled = torch.compile(polar, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    eager, traced = polar(*leaves), compiled(*leaves)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for a, b in zip(_grads(eager, leaves), _grads(traced, leaves)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_compiled_gated_delta_equals_eager_without_graph_breaks():
    leaves, state = gated_delta_case()

    def delta(q, k, v, g, beta, s0):
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=16)

    compiled = torch.compile(delta, backend="aot_eager", fullgraph=True)
    eager, traced = delta(*leaves, state), compiled(*leaves, state)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for a, b in zip(_grads(eager, leaves + [state]), _grads(traced, leaves + [state])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("with_state", [False, True])
def test_fla_op_fake_shapes(with_state):
    """FLA's kernels need a GPU; their fake implementations (what Dynamo traces) give the real layouts."""
    B, T, H, K, V = 2, 130, 4, 16, 8
    with FakeTensorMode():
        q = torch.empty(B, T, H, K, dtype=torch.bfloat16)
        v = torch.empty(B, T, H, V, dtype=torch.bfloat16)
        g, beta = torch.empty(B, T, H), torch.empty(B, T, H, dtype=torch.bfloat16)
        state = torch.empty(B, H, K, V) if with_state else None
        o, final, g_cum, A = torch.ops.atma.gated_delta_fla_fwd(q, q, v, g, beta, state, with_state)
        grads = torch.ops.atma.gated_delta_fla_bwd(o, final if with_state else None, q, q, v, g_cum, beta, A, state)
    assert o.shape == v.shape and o.dtype == torch.bfloat16
    assert final.shape == ((B, H, K, V) if with_state else (0,)) and final.dtype == torch.float32
    assert g_cum.shape == (B, T, H) and g_cum.dtype == torch.float32 and A.shape == (B, T, H, 64)
    assert [x.shape for x in grads[:5]] == [q.shape, q.shape, v.shape, g.shape, beta.shape]
    assert grads[5].shape == ((B, H, K, V) if with_state else (0,))


@pytest.mark.gpu
def test_fla_op_registration_gpu():
    if fla_bridge.fla_refusal(tuple(torch.cuda.get_device_capability())) is not None:
        pytest.skip("flash-linear-attention's backward is refused on this GPU/triton")
    leaves, state = gated_delta_case(1, 128, 2, 64, 64, dtype=torch.float32)
    q, k, v, g, beta = (x.detach().cuda() for x in leaves)
    args = (q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta.bfloat16(), state.detach().cuda(), True)
    torch.library.opcheck(fla_bridge._fla_fwd, [a.requires_grad_() if torch.is_tensor(a) else a for a in args])
