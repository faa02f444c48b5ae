"""Streaming PyTorch Polar attention vs the SPEC §10.1 golden vectors and the materialised oracle."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.polar_torch import polar_attention_torch
from model.reference import polar_attention_reference

F64 = torch.float64


def _golden_inputs():
    """Return q, k, v of SPEC §10.1 in (B=1, T=5, H=2, d=4) layout."""
    h = torch.arange(2, dtype=F64)[None, :, None]
    t = torch.arange(5, dtype=F64)[:, None, None]
    j = torch.arange(4, dtype=F64)[None, None, :]
    q = torch.sin(1 + h + 0.7 * t + 0.3 * j)
    k = torch.cos(0.5 + 0.4 * h + 0.9 * t - 0.2 * j)
    v = torch.sin(0.3 + 0.2 * h - 0.5 * t + 1.1 * j)
    return q[None], k[None], v[None]


def _init_params():
    return [
        torch.zeros(2, 4, dtype=F64),
        torch.full((2,), 2.0, dtype=F64),
        torch.full((2,), 0.5, dtype=F64),
        torch.full((2,), -1.0, dtype=F64),
        torch.full((2,), -1.5, dtype=F64),
    ]


def _trained_params():
    return [
        torch.tensor([[0.1, 0.2, 0.3, 0.4], [-0.4, 0.3, -0.2, 0.1]], dtype=F64),
        torch.tensor([0.5, -0.25], dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        torch.tensor([0.3, -0.5], dtype=F64),
        torch.tensor([0.2, -1.0], dtype=F64),
    ]


GOLD_TOL = 1e-9


@pytest.mark.parametrize("block_size", [2, 3, 512])
def test_golden_init(block_size):
    q, k, v = _golden_inputs()
    c, mu = polar_attention_torch(q, k, v, *_init_params(), block_size=block_size)
    expect_mu = torch.tensor(
        [
            [0.0475199446, 0.0500505796, 0.0247077181, 0.0216400381, 0.0566294878],
            [0.0245761134, 0.0162149082, 0.0177022286, 0.0573772110, 0.0591427419],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(mu[0].T, expect_mu, atol=GOLD_TOL, rtol=0)
    expect_c_t4 = torch.tensor(
        [[-0.6211095200, -0.1295870333, 0.5035491686, 0.5864029330], [-0.5386235661, 0.1634525463, 0.6869064482, 0.4597036551]],
        dtype=F64,
    )
    torch.testing.assert_close(c[0, 4], expect_c_t4, atol=GOLD_TOL, rtol=0)
    expect_c_h0_t0 = torch.tensor([0.2327265097, 0.7760561580, 0.4713056168, -0.3484913584], dtype=F64)
    torch.testing.assert_close(c[0, 0, 0], expect_c_h0_t0, atol=GOLD_TOL, rtol=0)


@pytest.mark.parametrize("block_size", [1, 2, 512])
def test_golden_window2(block_size):
    q, k, v = _golden_inputs()
    _, mu = polar_attention_torch(q, k, v, *_init_params(), window=2, block_size=block_size)
    expect = torch.tensor([0.0475199446, 0.0500505796, 0.0157742878, 0.0283956104, 0.0756822373], dtype=F64)
    torch.testing.assert_close(mu[0, :, 0], expect, atol=GOLD_TOL, rtol=0)


@pytest.mark.parametrize("block_size", [2, 512])
def test_golden_trained_forward_and_gradients(block_size):
    q, k, v = _golden_inputs()
    q.requires_grad_(True)
    params = [p.requires_grad_(True) for p in _trained_params()]
    c, mu = polar_attention_torch(q, k, v, *params, block_size=block_size)

    expect_mu = torch.tensor(
        [
            [0.3889823368, 0.4937076901, 0.3424161319, 0.2950060584, 0.6215444522],
            [0.1296521227, 0.1369706813, 0.1436915445, 0.2643887710, 0.2986011863],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(mu[0].T.detach(), expect_mu, atol=GOLD_TOL, rtol=0)
    expect_c_t4 = torch.tensor(
        [[-0.5483052139, -0.0873937820, 0.5241990211, 0.6457082201], [-0.6389769576, 0.2488763209, 0.5618058489, 0.4627561049]],
        dtype=F64,
    )
    torch.testing.assert_close(c[0, 4].detach(), expect_c_t4, atol=GOLD_TOL, rtol=0)

    h = torch.arange(2, dtype=F64)[None, :, None]
    t = torch.arange(5, dtype=F64)[:, None, None]
    j = torch.arange(4, dtype=F64)[None, None, :]
    grad_c = torch.cos(0.3 * h + 0.2 * t + 0.1 * j)[None]
    grad_mu = torch.sin(0.5 * h[..., 0] + 0.3 * t[..., 0])[None]
    loss = (c * grad_c).sum() + (mu * grad_mu).sum()
    assert abs(loss.item() - 9.0876503051) < GOLD_TOL
    d_q, d_vnull, d_base, d_slope, d_gain, d_beta = torch.autograd.grad(loss, [q, *params])

    def check(got, expect):
        torch.testing.assert_close(got, torch.tensor(expect, dtype=F64), atol=GOLD_TOL, rtol=0)

    check(d_base, [0.7217345516, -1.8191355144])
    check(d_slope, [0.3912269260, -1.4692495109])
    check(d_gain, [-0.1160025688, -0.4094581763])
    check(d_beta, [0.6422649429, 0.6964154007])
    check(
        d_vnull,
        [[2.6709444686, 0.6220475717, 0.0874279854, 1.0376640432], [3.3159903673, 1.5181306378, 2.1710300075, 2.2951443155]],
    )
    check(
        d_q[0, 4],
        [[0.0602186903, 0.0750956630, 0.0869788087, 0.0953943837], [-0.0539001945, -0.0396750050, -0.0238680984, -0.0071096459]],
    )


def _random_case(B, T, H, G, d, *, dtype=F64, seed=0, null_scale=1.0):
    """Return leaf tensors [q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw]."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale + shift).to(dtype).requires_grad_(True)

    return [
        rnd(B, T, H, d, scale=1.5),
        rnd(B, T, G, d, scale=1.5),
        rnd(B, T, G, d),
        rnd(H, d, scale=0.5),
        rnd(H, scale=null_scale),
        rnd(H, scale=0.5),
        rnd(H, scale=0.5),
        rnd(H, scale=0.5, shift=-1.0),
    ]


def _loss_and_grads(fn, inputs, grad_c, grad_mu, **kw):
    c, mu = fn(*inputs, **kw)
    loss = (c.to(F64) * grad_c).sum() + (mu.to(F64) * grad_mu).sum()
    return c, mu, torch.autograd.grad(loss, inputs)


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
    inputs = _random_case(B, T, H, G, d, seed=T * 31 + ratio * 7 + (window or 0))
    gen = torch.Generator().manual_seed(1234 + T)
    grad_c = torch.randn(B, T, H, d, generator=gen, dtype=F64)
    grad_mu = torch.randn(B, T, H, generator=gen, dtype=F64)
    c_ref, mu_ref, g_ref = _loss_and_grads(polar_attention_reference, inputs, grad_c, grad_mu, window=window)
    # Blocks smaller than T and not dividing it, equal to T, and larger than T.
    for block_size in sorted({3, max(1, T // 2 + 1), T, T + 5}):
        c, mu, grads = _loss_and_grads(
            polar_attention_torch, inputs, grad_c, grad_mu, window=window, block_size=block_size
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
    inputs = _random_case(1, 5, H, G, 4, seed=7 + ratio)

    def fn(*xs):
        return polar_attention_torch(*xs, window=window, block_size=2)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol_fwd,tol_grad", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 5e-2)])
def test_low_precision_vs_fp64_oracle(dtype, tol_fwd, tol_grad):
    """fp32/bf16 inputs: max abs forward error and relative-norm gradient error against the fp64 oracle."""
    B, T, H, G, d = 2, 37, 4, 2, 16
    inputs64 = _random_case(B, T, H, G, d, seed=3)
    # Same values in the low-precision dtype; the oracle sees them upcast, so only compute error remains.
    low = [x.detach().to(dtype).requires_grad_(True) for x in inputs64]
    exact = [x.detach().to(F64).requires_grad_(True) for x in low]
    gen = torch.Generator().manual_seed(5)
    grad_c = torch.randn(B, T, H, d, generator=gen, dtype=F64)
    grad_mu = torch.randn(B, T, H, generator=gen, dtype=F64)
    c_ref, mu_ref, g_ref = _loss_and_grads(polar_attention_reference, exact, grad_c, grad_mu, window=16)
    c, mu, grads = _loss_and_grads(polar_attention_torch, low, grad_c, grad_mu, window=16, block_size=8)
    assert c.dtype == dtype and mu.dtype == dtype
    assert (c.to(F64) - c_ref).abs().max().item() < tol_fwd
    assert (mu.to(F64) - mu_ref).abs().max().item() < tol_fwd
    for got, ref in zip(grads, g_ref):
        assert got.dtype == dtype
        rel = (got.to(F64) - ref).norm() / ref.norm().clamp_min(1e-12)
        assert rel.item() < tol_grad


def test_null_dominated_rows_stay_finite():
    """A null logit far above every real logit: Q2 underflows in fp32 but nothing turns NaN (SPEC §11 item 5)."""
    B, T, H, G, d = 1, 20, 2, 1, 8
    inputs = _random_case(B, T, H, G, d, dtype=torch.float32, seed=11)
    with torch.no_grad():
        inputs[4].fill_(60.0)  # null_base
    c, mu = polar_attention_torch(*inputs, block_size=6)
    c_ref, mu_ref = polar_attention_reference(*[x.detach().to(F64) for x in inputs])
    assert (mu.to(F64) - mu_ref).abs().max().item() < 1e-6
    assert (c.to(F64) - c_ref).abs().max().item() < 1e-5
    grads = torch.autograd.grad(c.sum() + mu.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


class _LargestTensor(TorchDispatchMode):
    """Record the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_memory_is_key_blocked():
    """T=4096, block 128: no intermediate reaches T*T elements; saved tensors are O(T*d)."""
    B, T, H, G, d, block = 1, 4096, 2, 1, 16, 128
    inputs = _random_case(B, T, H, G, d, dtype=torch.float32, seed=2)
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
    q, k, v, *params = _random_case(1, 4, 4, 2, 8)
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
    inputs = _random_case(2, 0, 4, 2, 8)
    c, mu = polar_attention_torch(*inputs)
    assert c.shape == (2, 0, 4, 8) and mu.shape == (2, 0, 4)
