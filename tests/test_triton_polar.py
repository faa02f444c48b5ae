"""Triton Polar attention against the fp64 oracle, forward and every gradient.

On the CPU the kernels run under the Triton interpreter, in a child pytest process started with
TRITON_INTERPRET=1 (`test_interpreter_suite`), or directly when this process was started with
it. Shapes stay small there (d <= 64, T <= 260); every candidate tile shape of every launch class
is forced once (ATMA_POLAR_CONFIG). The `gpu` tests repeat the comparison at realistic shapes,
in the default launch configurations and then for every autotuning candidate of the device.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import (
    POLAR_GOLDEN,
    POLAR_GRAD_NAMES,
    assert_golden,
    max_abs_err,
    polar_case,
    polar_forward_backward,
    polar_golden_inputs,
    polar_golden_params,
    polar_golden_upstream,
    rel_max_err,
    rel_rmse,
)
from kernels.polar.naive import polar_attention_naive

pytestmark = pytest.mark.nan_poison
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Interpreter-only tests run in the child process of `test_interpreter_suite` (tests/conftest.py
# deselects each group in the process where it does not belong).
interpreted = pytest.mark.interpreter


@pytest.mark.interpreter_driver
def test_interpreter_suite():
    """Run this file's interpreter tests in a child pytest with TRITON_INTERPRET=1.

    Triton fixes interpreter mode when `triton.language` is first imported, so the CPU checks
    need a process that starts with the variable set; this keeps the parent suite unaffected.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-m", "not gpu", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def polar():
    from kernels.polar import triton_impl

    return triton_impl


def compare(polar_fn, inputs, g_dir, g_mag, window, dtype, *, fwd_tol, grad_tol, round_inputs=False, grad_floor=1e-6):
    """Run kernel and oracle, assert closeness, return the errors by name."""
    if round_inputs:  # compare half-precision kernels with the oracle on the same (rounded) q, k, v
        inputs = [x.to(dtype).double() if i < 3 else x for i, x in enumerate(inputs)]
    ref = polar_forward_backward(polar_attention_naive, inputs, g_dir, g_mag, window=window)
    out = polar_forward_backward(polar_fn, inputs, g_dir, g_mag, dtype=dtype, window=window)
    errs = {"direction": max_abs_err(out[0], ref[0]), "magnitude": max_abs_err(out[1], ref[1])}
    for name, a, b in zip(POLAR_GRAD_NAMES, out[2], ref[2]):
        errs["d" + name] = rel_max_err(a, b, grad_floor)
    # Written as "not <=" so that a NaN error (an element never written) fails too.
    bad = {k: v for k, v in errs.items() if not v <= (fwd_tol if k in ("direction", "magnitude") else grad_tol)}
    assert not bad, errs
    return errs


def config_string(configs: dict) -> str:
    """The ATMA_POLAR_CONFIG value forcing `configs` {kernel: (BM, BN, warps, stages)}."""
    return ";".join(f"{kind}={','.join(map(str, c))}" for kind, c in configs.items())


# (B, T, H, G, D, window): T=1, T below one tile, odd T, several tiles, exact multiple of the
# tiles, GQA ratios 1 and 4, windows (incl. self-only) whose band edges fall inside tiles.
CPU_CASES = [
    (1, 1, 4, 1, 16, None),
    (2, 13, 2, 2, 16, None),
    (1, 37, 4, 1, 16, None),
    (1, 70, 8, 2, 16, None),
    (1, 64, 4, 4, 32, None),
    (2, 45, 4, 1, 16, 20),
    (1, 70, 2, 2, 16, 1),
    (1, 50, 4, 2, 16, 17),
    (1, 130, 4, 2, 16, None),
    (2, 100, 4, 1, 16, 33),
    (1, 96, 2, 1, 64, 40),
]


@interpreted
@pytest.mark.parametrize("B,T,H,G,D,window", CPU_CASES,
                         ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-G{c[3]}-D{c[4]}-W{c[5]}" for c in CPU_CASES])
def test_interpreted_fp32_matches_oracle(polar, B, T, H, G, D, window):
    inputs, g_dir, g_mag = polar_case(B, T, H, G, D, seed=T + H)
    compare(polar.polar_attention_triton, inputs, g_dir, g_mag, window, torch.float32, fwd_tol=1e-5, grad_tol=1e-4)


@interpreted
@pytest.mark.parametrize("window", [None, 9])
def test_interpreted_bf16_matches_oracle(polar, window):
    inputs, g_dir, g_mag = polar_case(2, 45, 4, 1, 16, seed=3)
    compare(polar.polar_attention_triton, inputs, g_dir, g_mag, window, torch.bfloat16,
            fwd_tol=2e-2, grad_tol=5e-2, round_inputs=True)


@interpreted
def test_interpreted_fp16_matches_oracle(polar):
    inputs, g_dir, g_mag = polar_case(1, 33, 4, 2, 16, seed=5)
    compare(polar.polar_attention_triton, inputs, g_dir, g_mag, None, torch.float16,
            fwd_tol=5e-3, grad_tol=1e-2, round_inputs=True)


@interpreted
@pytest.mark.parametrize("v_null_scale", [0.5, 0.0], ids=["v_null", "zero_v_null"])
def test_interpreted_null_dominated_rows_follow_oracle_clamps(polar, v_null_scale):
    # A null logit ~30 nats above the real keys puts the real mass below eps = 1e-6, so the
    # renormalisation clamps of SPEC §2.6 bind (and with v_null = 0 the direction clamp too).
    # The true scalar gradients are then ~1e-8 while each row's fp32 terms are O(1), so errors
    # are measured against a gradient scale of at least 1 (observed: <= 3e-5).
    inputs, g_dir, g_mag = polar_case(1, 40, 2, 1, 16, seed=11, null_base=30.0, v_null_scale=v_null_scale)
    compare(polar.polar_attention_triton, inputs, g_dir, g_mag, None, torch.float32, fwd_tol=1e-5, grad_tol=1e-4,
            grad_floor=1.0)


# Every tile shape (BM, BN) that some launch class lists for some kernel (head dim <= 128, bf16
# and fp32 tables), so that each candidate's loop boundaries are checked on the CPU. Run i forces
# the i-th shape of each kernel (cycling through the shorter lists).
def _every_tile_shape(kind: str) -> list:
    from unittest import mock

    from kernels.polar.triton_impl import launch_candidates

    shapes = []
    for profile in ("large", "mid", "small"):
        with mock.patch.dict(os.environ, {"ATMA_POLAR_TRITON_PROFILE": profile}):
            for dtype in (torch.bfloat16, torch.float32):
                for config in launch_candidates(kind, torch.device("cuda"), dtype, 128):
                    if config[:2] not in [c[:2] for c in shapes]:
                        shapes.append(config)
    return shapes


def _tile_runs() -> list:
    shapes = {kind: _every_tile_shape(kind) for kind in ("fwd", "dq", "dkdv")}
    return [{kind: shapes[kind][i % len(shapes[kind])] for kind in shapes}
            for i in range(max(len(v) for v in shapes.values()))]


TILE_RUNS = _tile_runs()


@interpreted
@pytest.mark.parametrize("configs", TILE_RUNS,
                         ids=["-".join(f"{k}{c[0]}x{c[1]}" for k, c in run.items()) for run in TILE_RUNS])
def test_interpreted_every_candidate_tile_shape(polar, monkeypatch, configs):
    """T = 260 spans two of the largest tiles (128) and ends inside a tile of every size; windows
    20 (inside one tile), 150 (across tiles) and none; forward and every gradient vs the oracle."""
    monkeypatch.setenv(polar.FORCE_ENV, config_string(configs))
    for window in (None, 20, 150):
        inputs, g_dir, g_mag = polar_case(1, 260, 2, 1, 16, seed=41 + (window or 0))
        compare(polar.polar_attention_triton, inputs, g_dir, g_mag, window, torch.float32, fwd_tol=1e-5,
                grad_tol=1e-4)


@interpreted
def test_interpreted_reproduces_spec_golden_vectors(polar):
    """SPEC §10.1 "trained" case (d=4), embedded in d=16: zero-padded, q scaled by sqrt(16/4)."""
    gold = POLAR_GOLDEN["trained"]
    d, D = 4, 16
    q4, k4, v4 = polar_golden_inputs()

    def pad(x):
        return torch.nn.functional.pad(x, (0, D - d))

    q = (pad(q4) * math.sqrt(D / d)).float().requires_grad_()
    k, v = pad(k4).float().requires_grad_(), pad(v4).float().requires_grad_()
    v_null4, *scalars4 = polar_golden_params("trained")
    v_null = pad(v_null4).float().requires_grad_()
    scalars = [x.float().requires_grad_() for x in scalars4]
    c, mu = polar.polar_attention_triton(q, k, v, v_null, *scalars)
    g_c, g_mu = polar_golden_upstream()
    loss = (c[..., :d] * g_c.float()).sum() + (mu * g_mu.float()).sum()
    loss.backward()

    tol = dict(atol=2e-6, rtol=1e-5)
    assert loss.item() == pytest.approx(gold["loss"], abs=1e-5)
    assert_golden(mu[0].T, gold["mu"], **tol)
    assert_golden(c[0, 4, :, :d], gold["c_t4"], **tol)
    torch.testing.assert_close(c[..., d:], torch.zeros_like(c[..., d:]))
    for i, name in enumerate(("null_base", "null_slope_raw", "len_gain_raw", "mag_beta_raw")):
        assert_golden(scalars[i].grad, gold["grads"][name], atol=1e-5, rtol=1e-5)
    assert_golden(v_null.grad[:, :d], gold["grads"]["v_null"], atol=1e-5, rtol=1e-5)
    dq = q.grad[0, 4, :, :d] * math.sqrt(D / d)  # chain rule through the sqrt(16/4) scaling
    assert_golden(dq, gold["grads"]["q_t4"], atol=1e-6, rtol=1e-5)


@interpreted
def test_interpreted_no_grad_forward_matches(polar):
    inputs, _, _ = polar_case(1, 21, 4, 2, 16, seed=1)
    args = [x.float() for x in inputs]
    with torch.no_grad():
        c0, mu0 = polar.polar_attention_triton(*args, window=8)
    leaves = [x.clone().requires_grad_() for x in args]
    c1, mu1 = polar.polar_attention_triton(*leaves, window=8)
    assert torch.equal(c0, c1.detach()) and torch.equal(mu0, mu1.detach())
    assert c0.dtype == torch.float32 and mu0.shape == (1, 21, 4)


@interpreted
def test_interpreted_window_covering_sequence_equals_no_window(polar):
    inputs, _, _ = polar_case(1, 19, 2, 1, 16, seed=2)
    args = [x.float() for x in inputs]
    a = polar.polar_attention_triton(*args, window=19)
    b = polar.polar_attention_triton(*args, window=None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("bad", ["dim12", "dim8", "fp64", "heads", "window", "vnull"])
def test_rejects_bad_inputs(polar, bad):
    B, T, H, G, D = 1, 4, 4, 2, 16
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, G, D), torch.randn(B, T, G, D)
    v_null, scalars, window = torch.zeros(H, D), [torch.zeros(H) for _ in range(4)], None
    if bad == "dim12":
        q, k, v, v_null = q[..., :12], k[..., :12], v[..., :12], v_null[:, :12]
    elif bad == "dim8":
        q, k, v, v_null = q[..., :8], k[..., :8], v[..., :8], v_null[:, :8]
    elif bad == "fp64":
        q, k, v = q.double(), k.double(), v.double()
    elif bad == "heads":
        k, v = torch.randn(B, T, 3, D), torch.randn(B, T, 3, D)
    elif bad == "window":
        window = 0
    elif bad == "vnull":
        v_null = torch.zeros(H, D + 1)
    message = {"dim12": "power of two", "dim8": "power of two", "fp64": "dtype", "heads": "multiple",
               "window": "window", "vnull": "v_null"}[bad]
    with pytest.raises(ValueError, match=message):
        polar.polar_attention_triton(q, k, v, v_null, *scalars, window=window)


def test_cpu_tensors_need_the_interpreter(polar):
    if polar._INTERPRET:
        pytest.skip("TRITON_INTERPRET was set when the suite started")
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        polar.polar_attention_triton(q, q, q, torch.zeros(2, 16), *[torch.zeros(2)] * 4)


# ---------------------------------------------------------------------------------------------
# Launch configurations: candidates, the autotuning switch and the forced-configuration hook.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_autotune_switch_keeps_only_the_class_default(polar, monkeypatch, dtype):
    # The tile shapes themselves are checked against the oracle by the interpreter tests above.
    monkeypatch.setenv("ATMA_POLAR_TRITON_PROFILE", "large")
    for kind in polar.KERNELS:
        cands = polar.launch_candidates(kind, torch.device("cuda"), dtype, 128)
        assert len(cands) > 1 and polar.autotune_candidates(kind, torch.device("cuda"), dtype, 128) == tuple(cands)
    monkeypatch.setenv("ATMA_POLAR_AUTOTUNE", "0")
    for kind in polar.KERNELS:
        cands = polar.launch_candidates(kind, torch.device("cuda"), dtype, 128)
        assert polar.autotune_candidates(kind, torch.device("cuda"), dtype, 128) == (cands[0],)


def test_unknown_profile_is_rejected(polar, monkeypatch):
    monkeypatch.setenv("ATMA_POLAR_TRITON_PROFILE", "huge")
    with pytest.raises(ValueError, match="ATMA_POLAR_TRITON_PROFILE"):
        polar.launch_candidates("fwd", torch.device("cuda"), torch.bfloat16, 128)


class _RecordingKernel:
    """Stands in for a Triton kernel: records the grid and launch options of `kernel[grid](...)`."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, kw))


def test_forced_config_reaches_the_launch(polar, monkeypatch):
    monkeypatch.setenv(polar.FORCE_ENV, "fwd=64,32,4,3; dkdv=16,64,8,1")
    assert polar.forced_config("fwd") == (64, 32, 4, 3) and polar.forced_config("dq") is None
    kernel = _RecordingKernel()
    run = polar._launcher(kernel, "dkdv", torch.device("cuda"), torch.bfloat16, 128)
    run(lambda meta: (100 // meta["BN"], 1), "arg", D=128)
    assert kernel.launches == [((1, 1), dict(BM=16, BN=64, num_warps=8, num_stages=1, D=128))]


@pytest.mark.parametrize("value,needle", [
    ("fwd=64,32,4", "four positive integers"),
    ("fwd=64,32,4,x", "four positive integers"),
    ("fwd=64,32,4,0", "four positive integers"),
    ("bwd=64,32,4,2", "KIND"),
    ("fwd:64,32,4,2", "KIND"),
    ("fwd=32,64,4,2", "BM % BN == 0"),
    ("dkdv=64,32,4,2", "BN % BM == 0"),
    ("dq=48,16,4,2", "powers of two"),
    ("dq=32,8,4,2", "powers of two"),
    ("dq=32,16,3,2", "warp"),
])
def test_forced_config_rejects_bad_values(polar, monkeypatch, value, needle):
    monkeypatch.setenv(polar.FORCE_ENV, value)
    with pytest.raises(ValueError, match=needle) as info:
        for kind in polar.KERNELS:
            polar.forced_config(kind)
    assert polar.FORCE_ENV in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# GPU: realistic shapes. The fp64 oracle runs one (batch, KV-group) slice at a time to bound its
# T x T memory, and the gradients are assembled from the slices.


def oracle_by_group(inputs, g_dir, g_mag, window):
    """fp64 oracle outputs and gradients, computed per (batch, KV head) slice."""
    q, k, v, v_null, *scalars = inputs
    B, T, H, D = q.shape
    G = k.shape[2]
    r = H // G
    direction, magnitude = torch.zeros_like(q), torch.zeros_like(g_mag)
    grads = [torch.zeros_like(x) for x in inputs]
    for b in range(B):
        for g in range(G):
            hs = slice(g * r, (g + 1) * r)
            leaves = [x.detach().requires_grad_() for x in (
                q[b:b + 1, :, hs], k[b:b + 1, :, g:g + 1], v[b:b + 1, :, g:g + 1], v_null[hs], *[s[hs] for s in scalars])]
            c, mu = polar_attention_naive(*leaves, window=window)
            ((c * g_dir[b:b + 1, :, hs]).sum() + (mu * g_mag[b:b + 1, :, hs]).sum()).backward()
            direction[b:b + 1, :, hs], magnitude[b:b + 1, :, hs] = c.detach(), mu.detach()
            grads[0][b:b + 1, :, hs] += leaves[0].grad
            grads[1][b:b + 1, :, g:g + 1] += leaves[1].grad
            grads[2][b:b + 1, :, g:g + 1] += leaves[2].grad
            grads[3][hs] += leaves[3].grad
            for i in range(4):
                grads[4 + i][hs] += leaves[4 + i].grad
            del leaves, c, mu
    return direction, magnitude, grads


def gpu_bound_violations(out, ref, dtype) -> dict:
    """The errors of (direction, magnitude, grads) against the oracle that exceed the GPU bounds."""
    errs = {"direction": max_abs_err(out[0], ref[0]), "magnitude": max_abs_err(out[1], ref[1])}
    if dtype == torch.float32:
        # fp32 (products as three TF32 passes): ~1e-6 expected, 1e-4 allowed (T = 4097 sums)
        bounds = dict(direction=1e-4, magnitude=1e-4)
        for name, a, b in zip(POLAR_GRAD_NAMES, out[2], ref[2]):
            errs["d" + name], bounds["d" + name] = rel_max_err(a, b), 1e-3
    else:
        # bf16 operands and outputs (rounding 2^-8). Relative RMSE: q, k, v, v_null and mag_beta
        # < 2e-2; the null-floor scalars < 5e-2; len_gain < 0.25, because its gradient is a sum
        # over all B*T rows with heavy cancellation (interpreter emulation, T=1024: 3e-2 to 8e-2).
        bounds = dict(direction=2e-2, magnitude=2e-2)
        loose = {"null_base": 5e-2, "null_slope_raw": 5e-2, "len_gain_raw": 0.25}
        for name, a, b in zip(POLAR_GRAD_NAMES, out[2], ref[2]):
            errs["d" + name], bounds["d" + name] = rel_rmse(a, b), loose.get(name, 2e-2)
    return {name: err for name, err in errs.items() if not err < bounds[name]}


def gpu_case(B, T, H, G, D, dtype, *, seed, device="cuda"):
    """Random inputs whose q, k, v are already rounded to `dtype`, so the oracle sees what the kernel sees."""
    inputs, g_dir, g_mag = polar_case(B, T, H, G, D, seed=seed, device=device)
    inputs = [x.to(dtype).double() if i < 3 else x for i, x in enumerate(inputs)]
    return inputs, g_dir, g_mag


GPU_CASES = [
    (1024, None, torch.float32), (4097, None, torch.float32),
    (1024, None, torch.bfloat16), (4097, None, torch.bfloat16),
    (4097, 512, torch.float32), (4097, 512, torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("T,window,dtype", GPU_CASES, ids=[f"T{c[0]}-W{c[1]}-{str(c[2])[6:]}" for c in GPU_CASES])
def test_gpu_matches_oracle(polar, T, window, dtype):
    inputs, g_dir, g_mag = gpu_case(2, T, 8, 2, 128, dtype, seed=T)
    ref = oracle_by_group(inputs, g_dir, g_mag, window)
    out = polar_forward_backward(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=dtype, window=window)
    assert not gpu_bound_violations(out, ref, dtype)


def candidate_failures(polar, monkeypatch, kind, dtype, device, shape, windows, oracle) -> list:
    """Force each launch candidate of `kind` on `device` in turn (the other two kernels at their
    class default) and compare forward and every gradient with the oracle; return the failures."""
    B, T, H, G, D = shape
    defaults = {k: polar.launch_candidates(k, device, dtype, D)[0] for k in polar.KERNELS}
    failures = []
    for cand in polar.launch_candidates(kind, device, dtype, D):
        monkeypatch.setenv(polar.FORCE_ENV, config_string({**defaults, kind: cand}))
        for window in windows:
            inputs, g_dir, g_mag, ref = oracle(dtype, window)
            out = polar_forward_backward(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=dtype,
                                         window=window)
            bad = gpu_bound_violations(out, ref, dtype)
            if bad:
                failures.append(f"{kind}={cand} window={window}: {bad}")
    return failures


@pytest.fixture(scope="module")
def oracle_cache():
    """Inputs and fp64 oracle results by (device, shape, dtype, window), computed once per module."""
    cache = {}

    def get(device, shape, dtype, window):
        key = (str(device), shape, dtype, window)
        if key not in cache:
            inputs, g_dir, g_mag = gpu_case(*shape, dtype, seed=sum(shape), device=device)
            cache[key] = (inputs, g_dir, g_mag, oracle_by_group(inputs, g_dir, g_mag, window))
        return cache[key]

    return get


# T = 777 ends inside a tile of every size, spans six of the largest; window 50 lies inside one
# tile of 64 or 128, window 300 crosses tiles.
GPU_CANDIDATE_SHAPE = (2, 777, 8, 2, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_gpu_every_launch_candidate_matches_oracle(polar, monkeypatch, oracle_cache, kind, dtype):
    """Every autotuning candidate of this GPU's launch class, forced one at a time, against the oracle."""
    device = torch.device("cuda")

    def oracle(dtype, window):
        return oracle_cache(device, GPU_CANDIDATE_SHAPE, dtype, window)

    failures = candidate_failures(polar, monkeypatch, kind, dtype, device, GPU_CANDIDATE_SHAPE, (None, 50, 300),
                                  oracle)
    assert not failures, "\n".join(failures)


@interpreted
def test_interpreted_candidate_loop_of_the_small_class(polar, monkeypatch, oracle_cache):
    """The GPU per-candidate check, run on the CPU for every kernel of the "small" class in bf16."""
    monkeypatch.setenv("ATMA_POLAR_TRITON_PROFILE", "small")
    device, shape = torch.device("cpu"), (1, 80, 2, 1, 16)

    def oracle(dtype, window):
        return oracle_cache(device, shape, dtype, window)

    failures = []
    for kind in polar.KERNELS:
        failures += candidate_failures(polar, monkeypatch, kind, torch.bfloat16, device, shape, (None, 24), oracle)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
def test_gpu_dispatch_picks_triton(polar, monkeypatch):
    import kernels

    monkeypatch.delenv("ATMA_KERNELS", raising=False)
    inputs, _, _ = polar_case(2, 300, 8, 2, 128, seed=1, device="cuda")
    args = [x.to(torch.bfloat16) if i < 3 else x.float() for i, x in enumerate(inputs)]
    assert kernels.kernel_backend(args[0].device) == "triton"
    a = kernels.polar_attention(*args)
    b = polar.polar_attention_triton(*args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
