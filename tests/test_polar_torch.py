"""Streaming PyTorch Polar attention vs the SPEC §10.1 golden vectors and the materialised oracle."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (
    F64,
    GOLD_TOL,
    POLAR_GOLDEN,
    assert_golden,
    max_abs_err,
    polar_case,
    polar_forward_backward,
    polar_golden_inputs,
    polar_golden_params,
    polar_golden_upstream,
    rel_rmse,
)
from kernels.polar.naive import polar_attention_naive
from kernels.polar.torch_impl import polar_attention_torch

pytestmark = pytest.mark.nan_poison


@pytest.mark.parametrize("block_size", [2, 3, 512])
def test_golden_init(block_size):
    gold = POLAR_GOLDEN["init"]
    c, mu = polar_attention_torch(*polar_golden_inputs(), *polar_golden_params("init"), block_size=block_size)
    assert_golden(mu[0].T, gold["mu"])
    assert_golden(c[0, 4], gold["c_t4"])
    assert_golden(c[0, 0, 0], gold["c_t0_h0"])


@pytest.mark.parametrize("block_size", [1, 2, 512])
def test_golden_window2(block_size):
    params = polar_golden_params("init")
    _, mu = polar_attention_torch(*polar_golden_inputs(), *params, window=2, block_size=block_size)
    assert_golden(mu[0, :, 0], POLAR_GOLDEN["init"]["mu_h0_window2"])


@pytest.mark.parametrize("block_size", [2, 512])
def test_golden_trained_forward_and_gradients(block_size):
    gold = POLAR_GOLDEN["trained"]
    q, k, v = polar_golden_inputs()
    q.requires_grad_(True)
    params = [p.requires_grad_(True) for p in polar_golden_params("trained")]
    c, mu = polar_attention_torch(q, k, v, *params, block_size=block_size)
    assert_golden(mu[0].T, gold["mu"])
    assert_golden(c[0, 4], gold["c_t4"])

    grad_c, grad_mu = polar_golden_upstream()
    loss = (c * grad_c).sum() + (mu * grad_mu).sum()
    assert abs(loss.item() - gold["loss"]) < GOLD_TOL
    d_q, d_vnull, d_base, d_slope, d_gain, d_beta = torch.autograd.grad(loss, [q, *params])
    assert_golden(d_base, gold["grads"]["null_base"])
    assert_golden(d_slope, gold["grads"]["null_slope_raw"])
    assert_golden(d_gain, gold["grads"]["len_gain_raw"])
    assert_golden(d_beta, gold["grads"]["mag_beta_raw"])
    assert_golden(d_vnull, gold["grads"]["v_null"])
    assert_golden(d_q[0, 4], gold["grads"]["q_t4"])


def _leaves(B, T, H, G, d, *, dtype=F64, seed=0):
    """Leaf tensors [q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw] of a random case."""
    inputs, _, _ = polar_case(B, T, H, G, d, seed=seed, qk_scale=1.5, scalar_scale=0.5)
    return [x.to(dtype).requires_grad_(True) for x in inputs]


GRID = [
    (T, ratio, window)
    for T in (1, 2, 7, 33, 100)
    for ratio in (1, 2, 4)
    for window in (None, 1, 3, 16)
]


@pytest.mark.parametrize("T,ratio,window", GRID, ids=[f"T{T}-r{r}-W{w}" for T, r, w in GRID])
def test_streaming_matches_oracle_fp64(T, ratio, window):
    G, d, B = 2 if ratio < 4 else 1, 8, 2
    H = G * ratio
    inputs, g_dir, g_mag = polar_case(B, T, H, G, d, seed=T * 31 + ratio * 7 + (window or 0), qk_scale=1.5,
                                      scalar_scale=0.5)
    c_ref, mu_ref, g_ref = polar_forward_backward(polar_attention_naive, inputs, g_dir, g_mag, window=window)
    # Blocks smaller than T and not dividing it, equal to T, and larger than T.
    for block_size in sorted({3, max(1, T // 2 + 1), T, T + 5}):
        c, mu, grads = polar_forward_backward(
            polar_attention_torch, inputs, g_dir, g_mag, window=window, block_size=block_size
        )
        torch.testing.assert_close(c, c_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(mu, mu_ref, atol=1e-12, rtol=0)
        for got, ref in zip(grads, g_ref):
            torch.testing.assert_close(got, ref, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("ratio", [1, 2])
def test_gradcheck_fp64(window, ratio):
    G = 1 if ratio == 2 else 2
    H = G * ratio
    inputs = _leaves(1, 5, H, G, 4, seed=7 + ratio)

    def fn(*xs):
        return polar_attention_torch(*xs, window=window, block_size=2)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol_fwd,tol_grad", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 5e-2)])
def test_low_precision_vs_fp64_oracle(dtype, tol_fwd, tol_grad):
    """fp32/bf16 inputs: max abs forward error and relative-norm gradient error against the fp64 oracle."""
    B, T, H, G, d = 2, 37, 4, 2, 16
    inputs, g_dir, g_mag = polar_case(B, T, H, G, d, seed=3, qk_scale=1.5, scalar_scale=0.5)
    # Same values in the low-precision dtype; the oracle sees them upcast, so only compute error remains.
    exact = [x.to(dtype).to(F64) for x in inputs]
    c_ref, mu_ref, g_ref = polar_forward_backward(polar_attention_naive, exact, g_dir, g_mag, window=16)
    c, mu, grads = polar_forward_backward(polar_attention_torch, exact, g_dir, g_mag, dtype=dtype, param_dtype=dtype,
                                          window=16, block_size=8)
    assert c.dtype == dtype and mu.dtype == dtype
    assert max_abs_err(c, c_ref) < tol_fwd
    assert max_abs_err(mu, mu_ref) < tol_fwd
    for got, ref in zip(grads, g_ref):
        assert got.dtype == dtype
        assert rel_rmse(got, ref) < tol_grad


def test_null_dominated_rows_stay_finite():
    """A null logit far above every real logit: Q2 underflows in fp32 but nothing turns NaN (SPEC §11 item 5)."""
    B, T, H, G, d = 1, 20, 2, 1, 8
    inputs = _leaves(B, T, H, G, d, dtype=torch.float32, seed=11)
    with torch.no_grad():
        inputs[4].fill_(60.0)  # null_base
    c, mu = polar_attention_torch(*inputs, block_size=6)
    c_ref, mu_ref = polar_attention_naive(*[x.detach().to(F64) for x in inputs])
    assert max_abs_err(mu, mu_ref) < 1e-6
    assert max_abs_err(c, c_ref) < 1e-5
    grads = torch.autograd.grad(c.sum() + mu.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


class _LargestTensor(TorchDispatchMode):
    """Record the largest number of elements of any tensor an op produces, inside our custom ops too."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "atma":
            # Run the op's CPU kernel with this mode active, so the aten ops inside it are seen.
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_memory_is_key_blocked():
    """T=4096, block 128: no intermediate reaches T*T elements; saved tensors are O(T*d)."""
    B, T, H, G, d, block = 1, 4096, 2, 1, 16, 128
    inputs = _leaves(B, T, H, G, d, dtype=torch.float32, seed=2)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    tracker = _LargestTensor()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), tracker:
        c, mu = polar_attention_torch(*inputs, block_size=block)
        (c.sum() + mu.sum()).backward()
    assert max(saved) <= B * T * H * d
    assert tracker.largest <= B * H * T * block
    assert tracker.largest < T * T // 8
    assert all(torch.isfinite(x.grad).all() for x in inputs)


def test_input_validation():
    q, k, v, *params = _leaves(1, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple"):
        polar_attention_torch(q, k[:, :, :1].expand(1, 4, 3, 8), v[:, :, :1].expand(1, 4, 3, 8), *params)
    with pytest.raises(ValueError, match="window"):
        polar_attention_torch(q, k, v, *params, window=0)
    with pytest.raises(ValueError, match="block_size"):
        polar_attention_torch(q, k, v, *params, block_size=0)
    with pytest.raises(ValueError, match="k must be"):
        polar_attention_torch(q, k[:, :3], v[:, :3], *params)
    with pytest.raises(ValueError, match="v_null"):
        polar_attention_torch(q, k, v, params[0][:2], *params[1:])
    with pytest.raises(ValueError, match="len_gain_raw"):
        polar_attention_torch(q, k, v, *params[:3], params[3][:1], params[4])
    with pytest.raises(ValueError, match="q must be"):
        polar_attention_torch(q[0], k, v, *params)


def test_empty_sequence():
    inputs = _leaves(2, 0, 4, 2, 8)
    c, mu = polar_attention_torch(*inputs)
    assert c.shape == (2, 0, 4, 8) and mu.shape == (2, 0, 4)
