"""flash-linear-attention bridge: the safety guard (CPU, versions faked) and numerics: on a GPU, and on the
CPU through FLA's own kernels in TRITON_INTERPRET=1 children of `test_interpreter_suite` (fp16)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, interpret_fla_kernels, project_sources, rel_rmse, run_interpreter_tests
from kernels.gated_delta import fla_bridge as bridge
from kernels.gated_delta.naive import gated_delta_rule_naive

pytestmark = pytest.mark.nan_poison
interpreted = pytest.mark.interpreter


@pytest.mark.interpreter_driver
def test_interpreter_suite():
    """This file's interpreted tests, in two TRITON_INTERPRET=1 child pytests."""
    run_interpreter_tests(__file__)


@pytest.mark.parametrize(
    "fla,triton,cap,refused",
    [
        ("0.6.0", "3.6.0", (9, 0), True),  # the known-bad combination (H100/H200)
        ("0.6.2", "3.7.0", (9, 0), True),
        ("0.5.0", "3.4.0", (9, 0), True),
        ("0.6.0", "3.7.1rc1", (9, 0), True),  # a pre-release of the fixed triton is not the fix
        ("0.6.0", "3.7.1", (9, 0), False),
        ("0.6.0", "3.7.1+git4b2c1a", (9, 0), False),
        ("0.6.0", "3.8.0", (9, 0), False),
        ("0.7.0", "3.6.0", (9, 0), False),
        ("0.6.0", "3.6.0", (8, 9), False),  # L4 / L40S
        ("0.6.0", "3.6.0", (8, 0), False),  # A100
        ("0.6.0", "3.6.0", (10, 0), False),  # Blackwell
    ],
)
def test_guard_decision(fla, triton, cap, refused):
    reason = bridge.fla_guard_reason(fla, triton, cap)
    assert (reason is not None) == refused
    if refused:
        assert "wrong" in reason and "3.7.1" in reason and fla in reason


@pytest.mark.parametrize("cap,triton", [((9, 0), "3.6.0"), ((9, 0), "3.7.0"), ((8, 0), "3.6.0")])
def test_guard_lets_forward_only_calls_through(cap, triton):
    """The Hopper bug is in the gated backward: a forward-only call (evaluation) may use FLA."""
    assert bridge.fla_guard_reason("0.6.0", triton, cap, backward=False) is None
    assert "not installed" in bridge.fla_guard_reason(None, triton, cap, backward=False)


@pytest.mark.parametrize("triton", ["3.6.0", "3.7.0"])
def test_guard_accepts_flas_tilelang_fix_of_the_hopper_bug(triton):
    """Where FLA runs the miscompiled kernel in TileLang (its own fix), the Hopper backward is safe."""
    assert bridge.fla_guard_reason("0.6.0", triton, (9, 0), tilelang=True) is None
    assert "installing tilelang" in bridge.fla_guard_reason("0.6.0", triton, (9, 0), tilelang=False)
    assert "not installed" in bridge.fla_guard_reason(None, triton, (9, 0), tilelang=True)
    assert "CUDA" in bridge.fla_guard_reason("0.6.0", triton, None, tilelang=True)


@pytest.fixture
def hopper_chunk_o(monkeypatch):
    """FLA's `chunk_o` module with its flags as they read on an H100/H200 with triton 3.6, FLA_TILELANG unset."""
    chunk_o = pytest.importorskip("fla.ops.common.chunk_o")
    monkeypatch.setattr(chunk_o, "IS_NVIDIA_HOPPER", True)
    monkeypatch.setattr(chunk_o, "TRITON_ABOVE_3_4_0", True)
    monkeypatch.setattr(chunk_o, "TRITON_ABOVE_3_7_1", False)
    monkeypatch.delenv("FLA_TILELANG", raising=False)
    return chunk_o


def _hopper_dqkwg_call(chunk_o):
    """Call FLA's dispatched `chunk_bwd_dqkwg` as its gated backward does: "tilelang" where its TileLang
    backend took the call (stood in for), "#640" where FLA refused it, else the error text (past the
    refusal, the Triton launch itself fails on CPU tensors)."""
    q, k, v, do = (torch.randn(1, 64, 1, 16) for _ in range(4))
    h, dh, g = torch.randn(1, 1, 1, 16, 16), torch.randn(1, 1, 1, 16, 16), torch.randn(1, 64, 1)
    try:
        return chunk_o.chunk_bwd_dqkwg(q, k, v, do, h, dh, g=g)
    except Exception as exc:
        return "#640" if "#640" in str(exc) else str(exc)


@pytest.mark.parametrize("env,default_on,available,expected", [
    ({}, True, True, True),  # FLA's default on Hopper with triton >= 3.4
    ({}, False, True, False),
    ({"FLA_TILELANG": "1"}, False, True, True),
    ({"FLA_TILELANG": "0"}, True, True, False),
    ({}, True, False, False),  # tilelang missing, or no nvcc for its JIT
])
def test_tilelang_detection_agrees_with_flas_own_dispatch(monkeypatch, hopper_chunk_o, env, default_on, available,
                                                          expected):
    """The guard's reading of FLA's TileLang fix matches where FLA's dispatch really sends the kernel of #640."""
    from fla.ops.common.backends import CommonTileLangBackend

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(CommonTileLangBackend, "default_enable", default_on)
    monkeypatch.setattr(CommonTileLangBackend, "is_available", classmethod(lambda cls: available))
    monkeypatch.setattr(CommonTileLangBackend, "chunk_bwd_dqkwg", lambda self, *a, **kw: "tilelang")
    assert bridge._tilelang_runs_the_affected_kernel() is expected
    assert _hopper_dqkwg_call(hopper_chunk_o) == ("tilelang" if expected else "#640")


def test_tilelang_detection_is_off_without_flas_backend_dispatch(monkeypatch):
    """FLA_DISABLE_BACKEND_DISPATCH=1 sends every call to FLA's Triton kernels: no fix then."""
    pytest.importorskip("fla.ops.common.backends")
    from fla.ops.common.backends import CommonTileLangBackend

    monkeypatch.setenv("FLA_TILELANG", "1")
    monkeypatch.setattr(CommonTileLangBackend, "is_available", classmethod(lambda cls: True))
    assert bridge._tilelang_runs_the_affected_kernel() is True
    monkeypatch.setenv("FLA_DISABLE_BACKEND_DISPATCH", "1")
    assert bridge._tilelang_runs_the_affected_kernel() is False


def test_guard_missing_fla_or_device():
    assert "not installed" in bridge.fla_guard_reason(None, "3.6.0", (9, 0))
    assert "CUDA" in bridge.fla_guard_reason("0.6.0", "3.6.0", None)


@pytest.fixture
def fake_env(monkeypatch):
    """Fake an installed FLA and one CUDA device; returns a setter for (fla, triton, capability)."""
    monkeypatch.setattr(bridge, "_USABLE", {})
    monkeypatch.setattr(bridge, "_WARNED", False)
    monkeypatch.delenv("ATMA_FLA", raising=False)

    def set_env(fla="0.6.0", triton="3.6.0", cap=(9, 0)):
        monkeypatch.setattr(bridge, "_installed_fla_version", lambda: fla)
        monkeypatch.setattr(bridge, "_triton_version", lambda: triton)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)

    return set_env


def test_timing_only_switch_is_scoped_and_the_trainer_refuses_it(fake_env):
    """`fla_timing_only()` lets FLA's known-wrong backward run for timing; training never starts under it."""
    from pretrain.config import load_run_config
    from pretrain.trainer import Trainer, TrainingError

    fake_env(cap=(9, 0), triton="3.6.0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bridge.fla_is_usable("cuda:0") is False
        with bridge.fla_timing_only():
            assert bridge.fla_timing_only_active() and bridge.fla_is_usable("cuda:0") is True
            assert bridge.fla_is_usable("cpu") is False  # still needs a GPU
            with pytest.raises(TrainingError, match="known-wrong gradients"):
                Trainer(load_run_config(None, ["data.dir=unused"]))
        assert not bridge.fla_timing_only_active() and bridge.fla_is_usable("cuda:0") is False


def test_only_the_benchmarks_and_the_compile_check_enable_the_timing_only_switch():
    users = sorted(os.path.relpath(path, ROOT) for path in project_sources()
                   if "fla_timing_only()" in open(path, encoding="utf-8").read())
    assert users == ["kernels/bench.py", "kernels/gated_delta/fla_bridge.py", "pretrain/bench.py",
                     "pretrain/compile_check.py"]


def test_timing_only_lifts_flas_own_refusal_of_its_hopper_backward_for_the_block(hopper_chunk_o, monkeypatch):
    """FLA 0.6 raises in its gated backward on Hopper with triton < 3.7.1; timing only gets past it."""
    monkeypatch.setenv("FLA_TILELANG", "0")  # FLA's Triton kernel, whatever is installed here
    assert _hopper_dqkwg_call(hopper_chunk_o) == "#640"
    with bridge.fla_timing_only():
        assert _hopper_dqkwg_call(hopper_chunk_o) not in ("#640", "tilelang")
    assert hopper_chunk_o.TRITON_ABOVE_3_7_1 is False and _hopper_dqkwg_call(hopper_chunk_o) == "#640"


def test_is_usable_refuses_hopper_with_old_triton_and_warns_once(fake_env):
    fake_env(cap=(9, 0), triton="3.6.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bridge.fla_is_usable(torch.device("cuda", 0)) is False
        assert bridge.fla_is_usable("cuda:0") is False
        assert bridge.fla_is_usable("cuda") is False
    assert len(caught) == 1
    assert "PyTorch chunked path" in str(caught[0].message) and "#640" in str(caught[0].message)
    assert "installing tilelang" in str(caught[0].message)


def test_is_usable_lets_fla_train_on_hopper_where_its_tilelang_fix_runs(fake_env, monkeypatch):
    """With triton < 3.7.1 on Hopper and FLA's TileLang backend taking the affected kernel, FLA trains, silently."""
    fake_env(cap=(9, 0), triton="3.6.0")
    monkeypatch.setattr(bridge, "_tilelang_runs_the_affected_kernel", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bridge.fla_is_usable("cuda:0") is True
    assert bridge.fla_refusal((9, 0)) is None and bridge.fla_tilelang_fix((9, 0)) is True
    assert bridge.fla_tilelang_fix((8, 0)) is False  # no bug there, so no fix in use
    fake_env(cap=(9, 0), triton="3.7.1")
    assert bridge.fla_tilelang_fix((9, 0)) is False


def test_is_usable_forward_only_on_hopper_without_warning(fake_env):
    fake_env(cap=(9, 0), triton="3.6.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bridge.fla_is_usable("cuda:0", backward=False) is True
    with pytest.warns(RuntimeWarning, match="#640.*torch >= 2.13 installs a triton with the fix"):
        assert bridge.fla_is_usable("cuda:0", backward=True) is False
    assert bridge.fla_is_usable("cuda:0", backward=False) is True


def test_is_usable_accepts_safe_combinations(fake_env):
    fake_env(cap=(8, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bridge.fla_is_usable("cuda:0") is True
    bridge._USABLE.clear()
    fake_env(cap=(9, 0), triton="3.7.1")
    assert bridge.fla_is_usable("cuda:0") is True


def test_is_usable_off_by_env_and_off_cpu(fake_env, monkeypatch):
    fake_env(cap=(8, 0))
    monkeypatch.setenv("ATMA_FLA", "0")
    assert bridge.fla_is_usable("cuda:0") is False
    monkeypatch.delenv("ATMA_FLA")
    with pytest.warns(RuntimeWarning, match="CUDA"):
        assert bridge.fla_is_usable("cpu") is False


def test_is_usable_without_fla(fake_env):
    fake_env(fla=None, cap=(8, 0))
    with pytest.warns(RuntimeWarning, match="not installed"):
        assert bridge.fla_is_usable("cuda:0") is False


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def fla_and_oracle(device, dtype, *, B, T, H, d, with_state, final_state=True, seed=0):
    """The bridge's outputs, final state (when asked for) and every gradient (q, k, v in `dtype`, the gates
    and the state in fp32) and the fp64 sequential oracle's on the same rounded inputs, against fixed
    upstream gradients; without `final_state` the loss reads the outputs alone, as training does."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    q, k = (F.normalize(rnd(B, T, H, d), dim=-1) for _ in range(2))
    v = rnd(B, T, H, d)
    g = F.logsigmoid(rnd(B, T, H) + 3.9)
    beta = torch.sigmoid(rnd(B, T, H))
    h0 = 0.1 * rnd(B, H, d, d) if with_state else None
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # the oracle sees the same rounded inputs
    go, gs = rnd(B, T, H, d), rnd(B, H, d, d)

    def run(fn, cast, state_dtype):
        leaves = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        gates = [x.to(state_dtype).detach().requires_grad_() for x in (g, beta)]
        init = None if h0 is None else h0.to(state_dtype).detach().requires_grad_()
        o, state = fn(*leaves, *gates, initial_state=init, output_final_state=final_state)
        loss = (o.double() * go).sum() + ((state.double() * gs).sum() if final_state else 0)
        wrt = leaves + gates + ([init] if init is not None else [])
        states = [state.double()] if final_state else []
        return [o.double(), *states] + [x.double() for x in torch.autograd.grad(loss, wrt)]

    return run(bridge.fla_gated_delta_rule, lambda x: x.to(dtype), torch.float32), \
        run(gated_delta_rule_naive, lambda x: x, torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("with_state,final_state", [(False, False), (False, True), (True, True)])
def test_gpu_fla_matches_reference(with_state, final_state):
    """FLA (bf16) vs the fp64 sequential oracle: outputs, state and all gradients, rel err < 0.05; also
    without the final state, as training calls it."""
    if not bridge.fla_is_usable(torch.device("cuda")):
        pytest.skip(f"flash-linear-attention not usable here: {bridge._USABLE.get(('cuda', None, True))}")
    out, ref = fla_and_oracle("cuda", torch.bfloat16, B=2, T=300, H=4, d=64, with_state=with_state,
                              final_state=final_state)
    names = NAMES if final_state else [n for n in NAMES if n != "final_state"]
    for name, a, b in zip(names, out, ref):
        assert rel_rmse(a, b) < 0.05, (name, rel_rmse(a, b))


def test_fp32_inputs_use_the_torch_path():
    """FLA takes bf16/fp16 only; fp32 calls go to the PyTorch chunked path (no FLA needed)."""
    from kernels.gated_delta.torch_impl import chunk_gated_delta_rule_torch

    torch.manual_seed(0)
    B, T, H, d = 1, 9, 2, 8
    q = F.normalize(torch.randn(B, T, H, d), dim=-1)
    k = F.normalize(torch.randn(B, T, H, d), dim=-1)
    v = torch.randn(B, T, H, d)
    g = F.logsigmoid(torch.randn(B, T, H) + 3.9)
    beta = torch.sigmoid(torch.randn(B, T, H))
    o, state = bridge.fla_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o_ref, state_ref = chunk_gated_delta_rule_torch(q, k, v, g, beta, output_final_state=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(state, state_ref)


@pytest.mark.gpu
def test_gpu_fla_forward_only_matches_reference_and_dispatch_picks_it(monkeypatch):
    """Forward-only FLA (allowed even where its backward is refused) vs the fp64 oracle; the
    dispatch sends no-grad CUDA calls there and differentiable ones only where the guard allows."""
    import kernels

    if not bridge.fla_is_usable(torch.device("cuda"), backward=False):
        pytest.skip("flash-linear-attention is not installed here")
    torch.manual_seed(0)
    B, T, H, d = 2, 1000, 4, 128
    q = F.normalize(torch.randn(B, T, H, d, device="cuda", dtype=torch.float64), dim=-1).bfloat16()
    k = F.normalize(torch.randn(B, T, H, d, device="cuda", dtype=torch.float64), dim=-1).bfloat16()
    v = torch.randn(B, T, H, d, device="cuda", dtype=torch.float64).bfloat16()
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 3.9)
    beta = torch.sigmoid(torch.randn(B, T, H, device="cuda"))
    ref, ref_state = gated_delta_rule_naive(q.double(), k.double(), v.double(), g.double(), beta.double(),
                                           output_final_state=True)
    with torch.no_grad():
        o, state = bridge.fla_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    for name, a, b in (("o", o, ref), ("state", state, ref_state)):
        assert rel_rmse(a, b) < 0.02, (name, rel_rmse(a, b))

    calls = []
    real = bridge.fla_gated_delta_rule
    monkeypatch.setattr(bridge, "fla_gated_delta_rule", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        kernels.gated_delta_rule(q, k, v, g, beta)
    assert calls == [1]
    kernels.gated_delta_rule(q, k, v.requires_grad_(), g, beta)
    assert len(calls) == 1 + int(bridge.fla_is_usable(torch.device("cuda"), backward=True))


@pytest.mark.parametrize("compiled", [False, True])
def test_the_bridge_hands_flas_backward_a_final_state_gradient_only_when_it_returned_the_state(monkeypatch, compiled):
    """FLA's host functions, stood in for, see what the bridge passes them: without a final state (training)
    the backward's `dht` is None, never the zero-size gradient autograd gives the forward's empty placeholder
    (FLA's kernel would read B*H*K*V values from it: an illegal memory access on a GPU); with one, its gradient."""
    from fla.ops.gated_delta_rule import chunk as fla_chunk  # fla-core is a requirement

    seen = {}

    def fake_fwd(*, q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
        seen["fwd"] = dict(scale=scale, chunk_size=chunk_size, final=output_final_state)
        B, T, H, K = q.shape
        state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if output_final_state else None
        return g.cumsum(1), v * 2, q.new_zeros(B, T, H, chunk_size), state, None, None

    def fake_bwd(*, q, k, v, g, beta, A, scale, initial_state, do, dht, chunk_size):
        seen["dht"] = None if dht is None else tuple(dht.shape)
        return (q.new_zeros(q.shape), k.new_zeros(k.shape), 2 * do, beta.new_zeros(beta.shape), g.new_zeros(g.shape),
                None)

    monkeypatch.setattr(fla_chunk, "chunk_gated_delta_rule_fwd", fake_fwd)
    monkeypatch.setattr(fla_chunk, "chunk_gated_delta_rule_bwd", fake_bwd)
    B, T, H, d = 2, 8, 2, 4

    def loss(q, k, v, g, beta, final):
        o, state = bridge.fla_gated_delta_rule(q, k, v, g, beta, output_final_state=final)
        return o.float().sum() + (state.sum() if final else 0)

    fn = torch.compile(loss, fullgraph=True) if compiled else loss
    torch._dynamo.reset()
    for final in (False, True):
        leaves = [torch.randn(B, T, H, d, dtype=torch.float16).requires_grad_() for _ in range(3)]
        leaves += [torch.randn(B, T, H).requires_grad_() for _ in range(2)]
        fn(*leaves, final).backward()
        assert seen["fwd"] == dict(scale=1.0, chunk_size=64, final=final)
        assert seen["dht"] == ((B, H, d, d) if final else None)
        torch.testing.assert_close(leaves[2].grad, torch.full_like(leaves[2], 2.0))


# The bridge on the CPU: FLA's own Triton kernels under the interpreter, in fp16 (helpers.interpret_fla_kernels).
# T = 150 is two whole chunks of FLA's 64 and a partial one.
@interpreted
@pytest.mark.parametrize("with_state,final_state", [(False, False), (False, True), (True, True)])
def test_interpreted_fla_matches_reference(with_state, final_state):
    """The bridge's forward and backward (FLA's host functions, the arguments it passes them, the saved
    cumulative gates and WY matrix) against the fp64 oracle: outputs, final state, every gradient; also
    as training calls it, without the final state (whose empty placeholder must not reach FLA's backward)."""
    interpret_fla_kernels()
    out, ref = fla_and_oracle("cpu", torch.float16, B=2, T=150, H=2, d=32, with_state=with_state,
                              final_state=final_state)
    names = NAMES if final_state else [n for n in NAMES if n != "final_state"]
    assert len(out) == len(ref) == len(names) - (not with_state)
    for name, a, b in zip(names, out, ref):
        # fp16 inputs with FLA's fp16 intermediates: about 5e-4 here; a wrong argument gives O(1).
        assert rel_rmse(a, b) < 2e-3, (name, rel_rmse(a, b))


@interpreted
@pytest.mark.parametrize("with_state", [False, True])
def test_interpreted_fla_op_registration(with_state):
    """atma::gated_delta_fla_fwd/_bwd: schema, fake implementations (shapes of FLA's real results) and autograd."""
    interpret_fla_kernels()
    gen = torch.Generator().manual_seed(3)
    B, T, H, d = 1, 70, 2, 16
    q, k = (F.normalize(torch.randn(B, T, H, d, generator=gen), dim=-1).half().requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, d, generator=gen).half().requires_grad_()
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3.9).requires_grad_()
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen)).requires_grad_()
    h0 = (0.1 * torch.randn(B, H, d, d, generator=gen)).requires_grad_() if with_state else None
    for final_state in (True, False):
        torch.library.opcheck(bridge._fla_fwd, (q, k, v, g, beta, h0, final_state))


@interpreted
def test_interpreted_fla_bridge_compiles_without_a_graph_break():
    """Compiled (inductor), a function around the bridge holds FLA's forward as one op, with no graph break, and
    gives the eager values and gradients."""
    interpret_fla_kernels()

    def memory_read(q, k, v, g, beta):
        o, state = bridge.fla_gated_delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, g, beta,
                                               output_final_state=True)
        return o.float().square().sum() + state.sum()

    gen = torch.Generator().manual_seed(5)
    B, T, H, d = 1, 80, 2, 16
    inputs = [torch.randn(B, T, H, d, generator=gen).half() for _ in range(3)]
    inputs += [F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3.9), torch.sigmoid(torch.randn(B, T, H, generator=gen))]

    def value_and_grads(fn):
        leaves = [x.clone().requires_grad_() for x in inputs]
        loss = fn(*leaves)
        return [loss, *torch.autograd.grad(loss, leaves)]

    eager = value_and_grads(memory_read)
    torch._dynamo.reset()
    compiled = value_and_grads(torch.compile(memory_read, fullgraph=True))
    for name, a, b in zip(["loss", "dq", "dk", "dv", "dg", "dbeta"], compiled, eager):
        # Inductor's fp16 normalisation differs from eager's by an ulp here and there (5e-4 of the norm).
        assert rel_rmse(a, b) < 2e-3, (name, rel_rmse(a, b))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(memory_read)(*inputs)
    ops = [str(node.target) for graph in explanation.graphs for node in graph.graph.nodes]
    assert explanation.graph_break_count == 0
    assert ops.count("atma.gated_delta_fla_fwd.default") == 1


@interpreted
def test_interpreted_fla_takes_any_strides():
    """The bridge gives the same values and gradients for inputs in any layout: FLA's kernels read dense
    tensors, and the backward gets the caller's own (saved) inputs, not the forward's dense copies."""
    interpret_fla_kernels()
    gen = torch.Generator().manual_seed(8)
    B, T, H, d = 1, 70, 2, 16

    def pair(x):
        """The same values twice: dense, and as a view whose last two axes' strides are swapped."""
        return x, x.transpose(-1, -2).contiguous().transpose(-1, -2)

    q, k = (pair(F.normalize(torch.randn(B, T, H, d, generator=gen), dim=-1).half()) for _ in range(2))
    v = pair(torch.randn(B, T, H, d, generator=gen).half())
    g = pair(F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3.9))
    beta = pair(torch.sigmoid(torch.randn(B, T, H, generator=gen)))
    h0 = pair(0.1 * torch.randn(B, H, d, d, generator=gen))
    assert not (q[1].is_contiguous() or v[1].is_contiguous() or h0[1].is_contiguous())
    go = torch.randn(B, T, H, d, generator=gen)

    def run(i):
        leaves = [x[i].detach().requires_grad_() for x in (q, k, v, g, beta, h0)]
        o, _ = bridge.fla_gated_delta_rule(*leaves[:5], initial_state=leaves[5])
        return [o, *torch.autograd.grad((o.float() * go).sum(), leaves)]

    for name, a, b in zip(["o", "dq", "dk", "dv", "dg", "dbeta", "dh0"], run(0), run(1)):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)


@interpreted
def test_interpreted_model_through_the_bridge_equals_the_chunked_path(monkeypatch):
    """A NoPE + memory model in fp16 whose memory reads through the bridge (as the dispatch sends it on a GPU
    where FLA is allowed) gives the chunked path's loss and gradients: the memory hands FLA its q, k, v,
    gates and layouts as the bridge expects them."""
    interpret_fla_kernels()
    import kernels
    from helpers import with_live_weights
    from model import AtmaConfig, AtmaForCausalLM

    torch.manual_seed(0)
    model = with_live_weights(AtmaForCausalLM(AtmaConfig.from_preset("tiny", core="nope", memory=True))).half()
    ids = torch.randint(0, model.config.vocab_size, (2, 100))

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    chunked_loss, chunked = loss_and_grads()
    calls = []

    def through_the_bridge(q, k, v, g, beta, *, initial_state=None, output_final_state=False, chunk_size=64,
                           differentiable=None):
        calls.append(differentiable)
        return bridge.fla_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state,
                                           output_final_state=output_final_state)

    monkeypatch.setattr(kernels, "gated_delta_rule", through_the_bridge)
    fla_loss, fla = loss_and_grads()
    memories = sum(getattr(block.mixer, "mem", None) is not None for block in model.blocks)
    assert memories > 0 and calls == [True] * memories  # training mode: every call counts as differentiable
    assert abs(fla_loss.item() - chunked_loss.item()) < 1e-3 * abs(chunked_loss.item())
    assert fla.keys() == chunked.keys()
    for name in chunked:
        # fp16 weights and activations on both paths; observed at most 2.3e-3 (a norm's weight).
        assert rel_rmse(fla[name], chunked[name]) < 1e-2, (name, rel_rmse(fla[name], chunked[name]))
