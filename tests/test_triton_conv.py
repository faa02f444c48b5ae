"""Triton causal depthwise conv against the fp64 oracle, forward, dx and dweight.

On the CPU the kernels run under the Triton interpreter in two child pytests started with
TRITON_INTERPRET=1 (`test_interpreter_suite`), or directly when this process was started with it.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_same_results, conv_case, fenced, rel_max_err, run_interpreter_tests
from kernels.causal_conv.naive import causal_conv1d_naive

pytestmark = pytest.mark.nan_poison
# Interpreter-only tests run in the child processes of `test_interpreter_suite` (tests/conftest.py
# deselects each group in the process where it does not belong).
interpreted = pytest.mark.interpreter


@pytest.mark.interpreter_driver
def test_interpreter_suite():
    """Run this file's interpreter tests in two child pytests with TRITON_INTERPRET=1, side by side.

    Triton fixes interpreter mode when `triton.language` is first imported, so the CPU checks
    need a process that starts with the variable set; this keeps the parent suite unaffected.
    """
    run_interpreter_tests(__file__)


def run_conv(B, T, C, K, x_dtype, *, device="cpu", seed=0, strided=False):
    """Run kernel and fp64 oracle on the same (rounded) inputs; return (y, dx, dweight) pairs."""
    from kernels.causal_conv.triton_impl import causal_conv1d_triton

    x, w, gy = conv_case(B, T, C, K, dtype=x_dtype, device=device, seed=seed, channel_stride=2 if strided else 1)
    w = w.float()
    assert x.is_contiguous() != strided  # the kernel reads x's strides: no copy
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    yr = causal_conv1d_naive(xr, wr)
    (yr * gy).sum().backward()
    xt, wt = x.detach().requires_grad_(), w.detach().requires_grad_()
    yt = causal_conv1d_triton(xt, wt)
    (yt.double() * gy).sum().backward()
    assert yt.dtype == x_dtype and xt.grad.dtype == x_dtype and wt.grad.dtype == torch.float32
    return (yt, yr), (xt.grad, xr.grad), (wt.grad, wr.grad)


# (B, T, C, K): LFM2 width K=3 and canon K=4, plus K=1 and a wide K; T=1, T smaller than the
# time tile, odd T over several tiles; C not a multiple of the channel tile.
CASES = [(1, 1, 8, 3), (2, 13, 40, 3), (2, 37, 96, 4), (3, 70, 33, 4), (1, 9, 16, 1), (1, 41, 24, 7)]


@interpreted
@pytest.mark.parametrize("B,T,C,K", CASES, ids=[f"B{b}-T{t}-C{c}-K{k}" for b, t, c, k in CASES])
def test_interpreted_fp32_matches_oracle(B, T, C, K):
    for out, ref in run_conv(B, T, C, K, torch.float32, seed=T):
        assert rel_max_err(out, ref) < 1e-5


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreted_half_matches_oracle(dtype):
    y, dx, dw = run_conv(2, 45, 64, 4, dtype, seed=1)
    # y, dx and the incoming dy are rounded to the half type (2^-8 / 2^-11); sums run in fp32
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert rel_max_err(*y) < tol and rel_max_err(*dx) < tol and rel_max_err(*dw) < tol


@interpreted
def test_interpreted_strided_input():
    for out, ref in run_conv(2, 21, 24, 3, torch.float32, strided=True):
        assert rel_max_err(out, ref) < 1e-5


@interpreted
def test_interpreted_no_weight_grad_and_empty():
    from kernels.causal_conv.triton_impl import causal_conv1d_triton

    x = torch.randn(2, 10, 16, requires_grad=True)
    w = torch.randn(16, 4)
    causal_conv1d_triton(x, w).sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(causal_conv1d_naive(x, w).sum(), x)[0])
    assert causal_conv1d_triton(torch.randn(2, 0, 16), w).shape == (2, 0, 16)


@interpreted
@pytest.mark.parametrize("weight_grad", [True, False])
def test_interpreted_op_registration(weight_grad):
    """atma::causal_conv1d_triton_fwd/_bwd: schema, fake implementation and autograd (torch.library.opcheck)."""
    from kernels.causal_conv.triton_impl import _conv_fwd

    x, w, _ = conv_case(2, 13, 40, 3, dtype=torch.float32, seed=2, channel_stride=2)
    torch.library.opcheck(_conv_fwd, (x.requires_grad_(), w.float().contiguous().requires_grad_(weight_grad)))


@interpreted
def test_interpreted_reads_nothing_outside_its_inputs():
    """Every input fenced by NaN on both sides (helpers.fenced): the output and both gradients are the same,
    bit for bit, so no load reaches past an input (on a GPU: garbage or an illegal memory access)."""
    from kernels.causal_conv.triton_impl import causal_conv1d_triton

    x, w, gy = conv_case(3, 70, 33, 4, dtype=torch.float32)

    def run(wrap):
        xl, wl = wrap(x).requires_grad_(), wrap(w.float()).requires_grad_()
        y = causal_conv1d_triton(xl, wl)
        return [y, *torch.autograd.grad(y, (xl, wl), wrap(gy.float()))]

    assert_same_results(run(fenced), run(lambda t: t.detach().clone()), "causal conv")


def forcing(config) -> dict:
    """The environment forcing `config` (BT, BC, warps, stages) on both passes."""
    value = ",".join(map(str, config))
    return {"ATMA_CONV_CONFIG": f"fwd={value};bwd={value}"}


# The autotuning candidates of kernels.causal_conv.triton_impl (the tests check the two lists agree).
CANDIDATES = [(64, 128, 4, 1), (32, 128, 4, 1), (16, 128, 4, 1), (16, 256, 8, 1), (32, 128, 8, 1)]


@interpreted
@pytest.mark.parametrize("config", CANDIDATES, ids=lambda c: "-".join(map(str, c)))
def test_interpreted_autotuning_candidate_tiles_match_oracle(monkeypatch, config):
    """Candidate tiles against the oracle, forced one at a time: time tiles longer and shorter than T, the
    weight gradient's partial sums sized by the tile the launch ran with."""
    from kernels.causal_conv import triton_impl

    for name, value in forcing(config).items():
        monkeypatch.setenv(name, value)
    assert list(triton_impl.CANDIDATES) == CANDIDATES
    for out, ref in run_conv(2, 70, 40, 4, torch.float32, seed=5):
        assert rel_max_err(out, ref) < 1e-5
    assert triton_impl.last_launch_configs() == {"fwd": config, "bwd": config}


def test_conv_tiles_are_autotuned_unless_forced(monkeypatch):
    from kernels.causal_conv import triton_impl

    if triton_impl._INTERPRET:
        pytest.skip("the interpreter launches its own configuration")
    monkeypatch.delenv("ATMA_CONV_CONFIG", raising=False)
    monkeypatch.delenv("ATMA_CONV_AUTOTUNE", raising=False)
    assert triton_impl._configs("bwd") == (None, triton_impl.CANDIDATES)
    monkeypatch.setenv("ATMA_CONV_AUTOTUNE", "0")
    assert triton_impl._configs("fwd") == (None, triton_impl.CANDIDATES[:1])
    monkeypatch.setenv("ATMA_CONV_CONFIG", "bwd=16,256,8,1")
    assert triton_impl._configs("bwd") == ((16, 256, 8, 1), ()) and triton_impl._configs("fwd")[0] is None
    for bad, needle in (("bwd=24,256,8,1", "powers of two"), ("bwd=16,256,6,1", "powers of two"),
                        ("dx=16,256,8,1", "KIND")):
        monkeypatch.setenv("ATMA_CONV_CONFIG", bad)
        with pytest.raises(ValueError, match=needle):
            triton_impl.forced_config("bwd")


@pytest.mark.gpu
@pytest.mark.parametrize("config", CANDIDATES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_every_candidate_tile_matches_oracle(monkeypatch, config):
    for name, value in forcing(config).items():
        monkeypatch.setenv(name, value)
    y, dx, dw = run_conv(2, 2049, 1024, 3, torch.bfloat16, device="cuda", seed=9)
    assert rel_max_err(*y) < 1e-2 and rel_max_err(*dx) < 1e-2 and rel_max_err(*dw) < 1e-2


@pytest.mark.gpu
def test_gpu_op_registration():
    from kernels.causal_conv.triton_impl import _conv_fwd

    x, w, _ = conv_case(2, 300, 256, 4, dtype=torch.bfloat16, device="cuda", seed=3)
    torch.library.opcheck(_conv_fwd, (x.requires_grad_(), w.float().contiguous().requires_grad_()))


def test_rejects_bad_shapes():
    from kernels.causal_conv.triton_impl import causal_conv1d_triton

    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_triton(torch.randn(1, 4, 8), torch.randn(6, 3))
    with pytest.raises(ValueError, match="fp32"):
        causal_conv1d_triton(torch.randn(1, 4, 8).double(), torch.randn(8, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("K", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_oracle_and_torch_path(K, dtype):
    from kernels.causal_conv.torch_impl import causal_conv1d_torch
    from kernels.causal_conv.triton_impl import causal_conv1d_triton

    y, dx, dw = run_conv(2, 4097, 1024, K, dtype, device="cuda", seed=K)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_max_err(*y) < tol and rel_max_err(*dx) < tol
    assert rel_max_err(*dw) < max(tol, 1e-4)
    x = torch.randn(2, 4097, 1024, device="cuda", dtype=dtype)
    w = torch.randn(1024, K, device="cuda")
    # the PyTorch path rounds the weight to the activation dtype first; same values otherwise
    torch.testing.assert_close(causal_conv1d_triton(x, w.to(dtype).float()), causal_conv1d_torch(x, w.to(dtype)),
                               atol=tol * 10, rtol=tol * 10)
