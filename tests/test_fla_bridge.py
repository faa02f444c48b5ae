"""flash-linear-attention bridge: the safety guard (CPU, versions faked) and numerics (GPU)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, project_sources, rel_rmse
from kernels.gated_delta import fla_bridge as bridge
from kernels.gated_delta.naive import gated_delta_rule_naive

pytestmark = pytest.mark.nan_poison


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


def test_timing_only_lifts_flas_own_refusal_of_its_hopper_backward_for_the_block(monkeypatch):
    """FLA 0.6 raises in its gated backward on Hopper with triton < 3.7.1; timing only gets past it."""
    chunk_o = pytest.importorskip("fla.ops.common.chunk_o")
    # What FLA's module flags read on an H100/H200 with triton 3.6.
    monkeypatch.setattr(chunk_o, "IS_NVIDIA_HOPPER", True)
    monkeypatch.setattr(chunk_o, "TRITON_ABOVE_3_4_0", True)
    monkeypatch.setattr(chunk_o, "TRITON_ABOVE_3_7_1", False)
    q, k, v, do = (torch.randn(1, 64, 1, 16) for _ in range(4))
    h, dh, g = torch.randn(1, 1, 1, 16, 16), torch.randn(1, 1, 1, 16, 16), torch.randn(1, 64, 1)

    def refusal():
        """FLA's refusal text, or None when the call got past it (it then fails on CPU tensors)."""
        try:
            chunk_o.chunk_bwd_dqkwg(q, k, v, do, h, dh, g=g)
        except Exception as exc:  # past the refusal, the launch itself fails on CPU tensors
            return str(exc) if "#640" in str(exc) else None
        return None

    assert "3.7.1" in refusal()
    with bridge.fla_timing_only():
        assert refusal() is None
    assert chunk_o.TRITON_ABOVE_3_7_1 is False and "3.7.1" in refusal()


def test_is_usable_refuses_hopper_with_old_triton_and_warns_once(fake_env):
    fake_env(cap=(9, 0), triton="3.6.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bridge.fla_is_usable(torch.device("cuda", 0)) is False
        assert bridge.fla_is_usable("cuda:0") is False
        assert bridge.fla_is_usable("cuda") is False
    assert len(caught) == 1
    assert "PyTorch chunked path" in str(caught[0].message) and "#640" in str(caught[0].message)


def test_is_usable_forward_only_on_hopper_without_warning(fake_env):
    fake_env(cap=(9, 0), triton="3.6.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bridge.fla_is_usable("cuda:0", backward=False) is True
    with pytest.warns(RuntimeWarning, match="#640"):
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


@pytest.mark.gpu
@pytest.mark.parametrize("with_state", [False, True])
def test_gpu_fla_matches_reference(with_state):
    """FLA (bf16) vs the fp64 sequential oracle: outputs, state and all gradients, rel err < 0.05."""
    if not bridge.fla_is_usable(torch.device("cuda")):
        pytest.skip(f"flash-linear-attention not usable here: {bridge._USABLE.get(('cuda', None, True))}")
    torch.manual_seed(0)
    B, T, H, d = 2, 300, 4, 64
    q = F.normalize(torch.randn(B, T, H, d, device="cuda", dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, d, device="cuda", dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, d, device="cuda", dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda", dtype=torch.float64) + 3.9)
    beta = torch.sigmoid(torch.randn(B, T, H, device="cuda", dtype=torch.float64))
    h0 = 0.1 * torch.randn(B, H, d, d, device="cuda", dtype=torch.float64) if with_state else None
    q, k, v = (x.bfloat16().double() for x in (q, k, v))  # the oracle sees the same rounded inputs
    go = torch.randn(B, T, H, d, device="cuda", dtype=torch.float64)
    gs = torch.randn(B, H, d, d, device="cuda", dtype=torch.float64)

    def run(fn, cast, state_dtype):
        leaves = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        gates = [x.float().detach().requires_grad_() if state_dtype == torch.float32 else x.detach().requires_grad_()
                 for x in (g, beta)]
        init = None if h0 is None else h0.to(state_dtype).detach().requires_grad_()
        o, state = fn(*leaves, *gates, initial_state=init, output_final_state=True)
        loss = (o.double() * go).sum() + (state.double() * gs).sum()
        wrt = leaves + gates + ([init] if init is not None else [])
        return [o.double(), state.double()] + [x.double() for x in torch.autograd.grad(loss, wrt)]

    ref = run(gated_delta_rule_naive, lambda x: x, torch.float64)
    out = run(bridge.fla_gated_delta_rule, lambda x: x.bfloat16(), torch.float32)
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
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
