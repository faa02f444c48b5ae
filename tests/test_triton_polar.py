"""Triton Polar attention against the fp64 oracle, forward and every gradient, for both backward
variants (two-pass and one-pass).

On the CPU the kernels run under the Triton interpreter, in two child pytest processes started with
TRITON_INTERPRET=1 (`test_interpreter_suite`), or directly when this process was started with
it. Shapes stay small there (d <= 64, T <= 260); every candidate tile shape of every launch class
is forced once (ATMA_POLAR_CONFIG). The interpreter tests also check the in-kernel length terms
against `kernels.common.numerics`, the custom ops (`torch.library.opcheck`, `torch.compile` with
no graph break) and the kernel launches per call. The `gpu` tests repeat the comparison at
realistic shapes, in the default launch configurations and then for every autotuning candidate
of the device.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (
    POLAR_GOLDEN,
    POLAR_GRAD_NAMES,
    assert_golden,
    assert_same_results,
    fenced,
    max_abs_err,
    polar_case,
    polar_forward_backward,
    polar_golden_inputs,
    polar_golden_params,
    polar_golden_upstream,
    rel_max_err,
    rel_rmse,
    reuse_interpreter_patches,
    run_interpreter_tests,
)
from kernels.common import interpreting
from kernels.polar.naive import polar_attention_naive

pytestmark = pytest.mark.nan_poison


# Interpreter-only tests run in the child processes of `test_interpreter_suite` (tests/conftest.py
# deselects each group in the process where it does not belong).
interpreted = pytest.mark.interpreter
if interpreting():
    reuse_interpreter_patches()


@pytest.mark.interpreter_driver
def test_interpreter_suite():
    """Run this file's interpreter tests in two child pytests with TRITON_INTERPRET=1, side by side.

    Triton fixes interpreter mode when `triton.language` is first imported, so the CPU checks
    need a process that starts with the variable set; this keeps the parent suite unaffected.
    """
    run_interpreter_tests(__file__)


@pytest.fixture(scope="module")
def polar():
    from kernels.polar import triton_impl

    return triton_impl


@contextlib.contextmanager
def backward(variant: str):
    """Run the Polar backward as `variant` ("two_pass", "one_pass" or "split") inside the block."""
    with mock.patch.dict(os.environ, {"ATMA_POLAR_BWD": variant}):
        yield


VARIANTS = ("two_pass", "one_pass", "split")


def kernel_backwards(fn, inputs, g_dir, g_mag, *, dtype, window, variants=VARIANTS) -> dict:
    """Run fn forward once on leaf copies of `inputs` (q, k, v in `dtype`, the parameters in fp32)
    and backpropagate sum(c g_dir) + sum(mu g_mag) once per backward variant.

    Returns {variant: (direction, magnitude, gradients in argument order)}.
    """
    leaves = [x.detach().to(dtype if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(inputs)]
    direction, magnitude = fn(*leaves, window=window)
    loss = (direction.double() * g_dir).sum() + (magnitude.double() * g_mag).sum()
    out = {}
    for i, variant in enumerate(variants):
        with backward(variant):
            grads = torch.autograd.grad(loss, leaves, retain_graph=i + 1 < len(variants))
        out[variant] = (direction.detach(), magnitude.detach(), list(grads))
    return out


def compare(polar_fn, inputs, g_dir, g_mag, window, dtype, *, fwd_tol, grad_tol, round_inputs=False, grad_floor=1e-6):
    """Run the oracle once and the kernel with each backward variant; assert closeness and
    return the errors by variant and name."""
    if round_inputs:  # compare half-precision kernels with the oracle on the same (rounded) q, k, v
        inputs = [x.to(dtype).double() if i < 3 else x for i, x in enumerate(inputs)]
    ref = polar_forward_backward(polar_attention_naive, inputs, g_dir, g_mag, window=window)
    all_errs = {}
    for variant, out in kernel_backwards(polar_fn, inputs, g_dir, g_mag, dtype=dtype, window=window).items():
        errs = {"direction": max_abs_err(out[0], ref[0]), "magnitude": max_abs_err(out[1], ref[1])}
        for name, a, b in zip(POLAR_GRAD_NAMES, out[2], ref[2]):
            errs["d" + name] = rel_max_err(a, b, grad_floor)
        all_errs[variant] = errs
    # Written as "not <=" so that a NaN error (an element never written) fails too.
    bad = {f"{variant}:{k}": v for variant, errs in all_errs.items() for k, v in errs.items()
           if not v <= (fwd_tol if k in ("direction", "magnitude") else grad_tol)}
    assert not bad, all_errs
    return all_errs


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
@pytest.mark.parametrize("null_base,v_null_scale", [(30.0, 0.5), (30.0, 0.0), (6.0, 0.5)],
                         ids=["v_null", "zero_v_null", "mixed_clamps"])
def test_interpreted_null_dominated_rows_follow_oracle_clamps(polar, null_base, v_null_scale):
    # A null logit ~30 nats above the real keys puts the real mass below eps = 1e-6, so the
    # renormalisation clamps of SPEC §2.6 bind (and with v_null = 0 the direction clamp too).
    # The true scalar gradients are then ~1e-8 while each row's fp32 terms are O(1), so errors
    # are measured against a gradient scale of at least 1 (observed: <= 3e-5). With null_base 6,
    # 21 of the 80 rows have L clamped but Q2 not, a branch of its own (observed error 1.4e-6).
    inputs, g_dir, g_mag = polar_case(1, 40, 2, 1, 16, seed=11, null_base=null_base, v_null_scale=v_null_scale)
    compare(polar.polar_attention_triton, inputs, g_dir, g_mag, None, torch.float32, fwd_tol=1e-5, grad_tol=1e-4,
            grad_floor=1.0)


# Every tile shape (BM, BN) that some launch class lists for some kernel (head dim <= 128, bf16
# and fp32 tables), so that each candidate's loop boundaries are checked on the CPU. Run i forces
# the i-th shape of each kernel (cycling through the shorter lists).
def _every_tile_shape(kind: str) -> list:
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
    shapes = {kind: _every_tile_shape(kind) for kind in ("fwd", "dq", "dkdv", "onepass", "rows")}
    return [{kind: shapes[kind][i % len(shapes[kind])] for kind in shapes}
            for i in range(max(len(v) for v in shapes.values()))]


TILE_RUNS = _tile_runs()


@interpreted
@pytest.mark.parametrize("configs", TILE_RUNS,
                         ids=["-".join(f"{k}{c[0]}x{c[1]}" for k, c in run.items()) for run in TILE_RUNS])
def test_interpreted_every_candidate_tile_shape(polar, monkeypatch, configs):
    """T = 150 spans one full tile of the largest size (128) and ends inside a tile of every size;
    windows 20 (inside one tile), 100 (across tiles) and none; forward and every gradient of both
    backward variants vs the oracle."""
    monkeypatch.setenv(polar.FORCE_ENV, config_string(configs))
    for window in (None, 20, 100):
        inputs, g_dir, g_mag = polar_case(1, 150, 2, 1, 16, seed=41 + (window or 0))
        compare(polar.polar_attention_triton, inputs, g_dir, g_mag, window, torch.float32, fwd_tol=1e-5,
                grad_tol=1e-4)


@interpreted
@pytest.mark.parametrize("variant", VARIANTS)
def test_interpreted_reproduces_spec_golden_vectors(polar, variant):
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
    with backward(variant):
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
@pytest.mark.parametrize("window", [None, 24])
def test_interpreted_kernels_read_nothing_outside_their_inputs(polar, window):
    """Every input and upstream gradient fenced by NaN on both sides (helpers.fenced): the forward and each
    backward variant give the same results bit for bit, so no value from outside an input reaches a result
    (on a GPU such a load reads garbage or faults)."""
    inputs, g_dir, g_mag = polar_case(2, 75, 4, 2, 16, seed=12)  # T: a partial last tile of every kind
    inputs = [x.float() for x in inputs]

    def run(wrap):
        leaves = [wrap(x).requires_grad_() for x in inputs]
        direction, magnitude = polar.polar_attention_triton(*leaves, window=window)
        out = []
        for i, variant in enumerate(VARIANTS):
            with backward(variant):
                grads = torch.autograd.grad((direction, magnitude), leaves, (wrap(g_dir.float()), wrap(g_mag.float())),
                                            retain_graph=i + 1 < len(VARIANTS))
            out += grads
        return [direction, magnitude, *out]

    assert_same_results(run(fenced), run(lambda x: x.clone()), f"polar, window {window}")


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
def test_interpreted_backward_through_one_output(polar):
    """A loss on the magnitude alone (or the direction alone) gives the gradients of the same loss
    written with a zero weight on the other output (no zero gradient is made for unused outputs)."""
    args, g_dir, g_mag = _polar_args()
    for used in ("magnitude", "direction"):
        c, mu = polar.polar_attention_triton(*args, window=8)
        alone = (mu * g_mag).sum() if used == "magnitude" else (c * g_dir).sum()
        both = (mu * g_mag * (used == "magnitude")).sum() + (c * g_dir * (used == "direction")).sum()
        a = torch.autograd.grad(alone, args, retain_graph=True)
        b = torch.autograd.grad(both, args)
        for name, x, y in zip(POLAR_GRAD_NAMES, a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=f"{used}: d{name}")


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
    # the launcher reports the tiles it launched with: the backward sizes its partial sums by them
    assert run(lambda meta: (100 // meta["BN"], 1), "arg", D=128) == (16, 64)
    assert kernel.launches == [((1, 1), dict(BM=16, BN=64, num_warps=8, num_stages=1, D=128))]


def test_launches_record_the_tiles_they_ran_with(polar, monkeypatch):
    """`kernels.bench` reports the tiles each launch kind last ran with: forced, or the autotuner's pick."""
    if polar._INTERPRET:
        pytest.skip("the interpreter launches its own configuration, never the autotuner")
    import triton

    monkeypatch.setenv(polar.FORCE_ENV, "dkdv=16,64,8,1")
    polar.reset_launch_configs()
    polar._launcher(_RecordingKernel(), "dkdv", torch.device("cuda"), torch.bfloat16, 128)(lambda meta: (1, 1), D=128)
    assert polar.last_launch_configs() == {"dkdv": (16, 64, 8, 1)}
    monkeypatch.delenv(polar.FORCE_ENV)
    monkeypatch.setenv("ATMA_POLAR_TRITON_PROFILE", "large")

    class Tuned(_RecordingKernel):
        best_config = triton.Config({"BM": 64, "BN": 32}, num_warps=8, num_stages=2)

    monkeypatch.setattr(polar, "_TUNED", {})
    monkeypatch.setattr(polar.triton, "autotune", lambda **options: lambda kernel: Tuned())
    run = polar._launcher(_RecordingKernel(), "dq", torch.device("cuda"), torch.bfloat16, 128)
    assert run(lambda meta: (1, 1), D=128) == (64, 32)
    assert polar.last_launch_configs() == {"dkdv": (16, 64, 8, 1), "dq": (64, 32, 8, 2)}
    polar.reset_launch_configs()
    assert polar.last_launch_configs() == {}


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_auto_backward_is_two_pass_and_split_shares_its_dq_dk_dv(polar, dtype):
    """Without a GPU "auto" runs the two-pass backward; the split one, its other candidate, gives the same
    dq, dk and dv bit for bit (only the per-head sums are added in another order)."""
    polar.reset_auto_backward()
    inputs, g_dir, g_mag = polar_case(2, 70, 4, 2, 16, seed=12)
    runs = kernel_backwards(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=dtype, window=17,
                            variants=("auto", "two_pass", "split"))
    assert_same_results(runs["auto"][2], runs["two_pass"][2], "auto against two-pass")
    assert_same_results(runs["split"][2][:3], runs["two_pass"][2][:3], "split against two-pass: dq, dk, dv")
    assert {choice for choice, _ in polar.auto_backward_choices().values()} == {"two_pass"}


@interpreted
def test_interpreted_auto_backward_times_the_real_candidates_and_returns_the_picks_gradients(polar, monkeypatch):
    """The timing path end to end, its clock faked: each candidate's real backward runs on the call's inputs,
    and the gradients returned are those of the faster one."""
    polar.reset_auto_backward()
    monkeypatch.setattr(polar, "_can_time", lambda q: True)
    timed = []

    def fake_ms(fn, reps=3):
        polar.reset_launch_configs()
        fn()
        timed.append(set(polar.last_launch_configs()))
        return {"two_pass": 2.0, "split": 1.0}["split" if "rows" in timed[-1] else "two_pass"]

    monkeypatch.setattr(polar, "_device_ms", fake_ms)
    inputs, g_dir, g_mag = polar_case(2, 70, 4, 2, 16, seed=13)
    runs = kernel_backwards(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=torch.float32, window=None,
                            variants=("auto", "split", "two_pass"))
    assert timed == [{"dq", "dkdv"}, {"rows", "dkdv", "dq"}]  # the two-pass backward, then the split one
    (chosen, times), = polar.auto_backward_choices().values()
    assert (chosen, times) == ("split", {"two_pass": 2.0, "split": 1.0})
    assert_same_results(runs["auto"][2], runs["split"][2], "auto against split")
    assert not all(torch.equal(a, b) for a, b in zip(runs["auto"][2], runs["two_pass"][2]))
    polar.reset_auto_backward()


@interpreted
@pytest.mark.parametrize("variant,kinds", [("auto", {"fwd", "dq", "dkdv"}), ("two_pass", {"fwd", "dq", "dkdv"}),
                                           ("one_pass", {"fwd", "rows", "onepass"}),
                                           ("split", {"fwd", "rows", "dkdv", "dq"})])
def test_interpreted_launches_record_each_variants_kinds(polar, variant, kinds):
    inputs, g_dir, g_mag = polar_case(1, 40, 4, 2, 16, seed=3)
    polar.reset_launch_configs()
    kernel_backwards(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=torch.float32, window=None,
                     variants=(variant,))
    assert polar.last_launch_configs() == {kind: polar._CONFIG_INTERPRET[kind] for kind in kinds}


@interpreted
@pytest.mark.parametrize("schedule", ["longest_first", "in_order"])
def test_interpreted_program_order(polar, monkeypatch, schedule):
    """Each program id owns one (tile, slice); longest first, the tiles with the most causal work start first."""
    monkeypatch.setenv(polar.SCHEDULE_ENV, schedule)
    for T, tile, slices in ((100, 32, 3), (64, 16, 5), (7, 16, 2)):
        n_tiles = -(-T // tile)
        in_order = [(t, s) for s in range(slices) for t in range(n_tiles)]
        for key_tiles in (False, True):
            order = [tuple(p) for p in polar.polar_program_order_triton(T, tile, slices, key_tiles=key_tiles).tolist()]
            assert sorted(order) == sorted(in_order), (T, tile, slices, key_tiles)
            if schedule == "in_order":
                assert order == in_order
                continue
            # a query tile's causal work grows with its index, a key tile's with its distance from the end
            work = [n_tiles - t if key_tiles else t + 1 for t, _ in order]
            assert work == sorted(work, reverse=True) and work[0] == n_tiles, order
            assert [s for _, s in order[:slices]] == list(range(slices))


@interpreted
@pytest.mark.parametrize("window", [None, 20])
def test_interpreted_program_order_changes_no_result(polar, monkeypatch, window):
    """Both program orders reach every launch and give the same results: bit for bit, but for the
    one-pass dq, whose atomic adds land in the order the programs run."""
    launched = []
    real_launcher = polar._launcher

    def spying_launcher(kernel, name, *args):
        run = real_launcher(kernel, name, *args)

        def spy(grid, *a, **kw):
            launched.append((name, kw["LONGEST_FIRST"]))
            return run(grid, *a, **kw)

        return spy

    monkeypatch.setattr(polar, "_launcher", spying_launcher)
    inputs, g_dir, g_mag = polar_case(2, 70, 4, 2, 16, seed=11)
    results = {}
    for schedule in polar.SCHEDULES:
        monkeypatch.setenv(polar.SCHEDULE_ENV, schedule)
        launched.clear()
        results[schedule] = kernel_backwards(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=torch.float32,
                                             window=window)
        assert {name for name, _ in launched} == {"fwd", "dq", "dkdv", "rows", "onepass"}
        assert {flag for _, flag in launched} == {schedule == "longest_first"}
    for variant in VARIANTS:
        (c1, mu1, g1), (c2, mu2, g2) = results["longest_first"][variant], results["in_order"][variant]
        assert_same_results([c1, mu1, *g1[1:]], [c2, mu2, *g2[1:]], variant)
        if variant == "one_pass":
            torch.testing.assert_close(g1[0], g2[0], rtol=1e-5, atol=1e-6)
        else:
            assert_same_results(g1[:1], g2[:1], f"{variant}: dq")


def test_program_order_switch(polar, monkeypatch):
    monkeypatch.delenv(polar.SCHEDULE_ENV, raising=False)
    assert polar.longest_first()
    monkeypatch.setenv(polar.SCHEDULE_ENV, " In_Order ")
    assert not polar.longest_first()
    monkeypatch.setenv(polar.SCHEDULE_ENV, "reverse")
    with pytest.raises(ValueError, match="ATMA_POLAR_SCHEDULE must be one of longest_first, in_order") as info:
        polar.longest_first()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value,needle", [
    ("fwd=64,32,4", "four positive integers"),
    ("fwd=64,32,4,x", "four positive integers"),
    ("fwd=64,32,4,0", "four positive integers"),
    ("bwd=64,32,4,2", "KIND"),
    ("fwd:64,32,4,2", "KIND"),
    ("fwd=32,64,4,2", "BM % BN == 0"),
    ("dkdv=64,32,4,2", "BN % BM == 0"),
    ("onepass=64,32,4,2", "BN % BM == 0"),
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


def test_backward_variant_switch(polar, monkeypatch):
    monkeypatch.delenv(polar.BACKWARD_ENV, raising=False)
    assert polar.backward_variant() == "auto"
    monkeypatch.setenv(polar.BACKWARD_ENV, " One_Pass ")
    assert polar.backward_variant() == "one_pass"
    monkeypatch.setenv(polar.BACKWARD_ENV, "onepass")
    with pytest.raises(ValueError, match="ATMA_POLAR_BWD must be one of auto, two_pass, one_pass, split") as info:
        polar.backward_variant()
    assert "\n" not in str(info.value)


class _FakeCudaTensor:
    """Stands in for a CUDA q [B, T, H, D] where only its device, dtype and shape are read."""

    def __init__(self, T, D=128, index=0):
        self.device = torch.device("cuda", index)
        self.dtype = torch.bfloat16
        self.shape = (8, T, 8, D)


def test_auto_backward_times_the_candidates_once_per_shape_and_keeps_the_faster(polar, monkeypatch):
    if polar._INTERPRET:
        pytest.skip("under the interpreter auto is the two-pass backward without timing")
    monkeypatch.setattr(polar, "_AUTO_CHOICES", {})
    monkeypatch.delenv("ATMA_POLAR_AUTOTUNE", raising=False)
    speeds = {"two_pass": 2.0, "split": 1.5}
    calls = []

    def fake_ms(fn, reps=3):
        fn()
        return speeds[calls[-1]]

    monkeypatch.setattr(polar, "_device_ms", fake_ms)
    run = calls.append
    assert polar._auto_variant(_FakeCudaTensor(2048), None, run) == "split"
    assert calls == ["two_pass", "split"]
    # the same key is not timed again; T = 1500 falls in the same power-of-two bucket
    assert polar._auto_variant(_FakeCudaTensor(2048), None, run) == "split"
    assert polar._auto_variant(_FakeCudaTensor(1500), None, run) == "split" and len(calls) == 2
    # another bucket, a window or another GPU is timed afresh
    speeds["split"] = 2.5
    assert polar._auto_variant(_FakeCudaTensor(8192), None, run) == "two_pass"
    assert polar._auto_variant(_FakeCudaTensor(2048), 512, run) == "two_pass"
    assert polar._auto_variant(_FakeCudaTensor(2048, index=1), None, run) == "two_pass" and len(calls) == 8
    key = ("cuda:0", torch.bfloat16, 128, False, 2048)
    assert polar.auto_backward_choices()[key] == ("split", {"two_pass": 2.0, "split": 1.5})
    # without autotuning nothing is timed: the two-pass backward
    polar.reset_auto_backward()
    monkeypatch.setenv("ATMA_POLAR_AUTOTUNE", "0")
    assert polar._auto_variant(_FakeCudaTensor(2048), None, run) == "two_pass" and len(calls) == 8
    assert polar.auto_backward_choices() == {key: ("two_pass", None)}
    # tensors off the GPU are never timed either
    monkeypatch.delenv("ATMA_POLAR_AUTOTUNE")
    assert polar._auto_variant(torch.zeros(1, 4, 1, 16), None, run) == "two_pass" and len(calls) == 8
    # a candidate that fails on its first use (no tile fits, say) is left out with a warning; all failing raises
    polar.reset_auto_backward()

    def split_fails(fn, reps=3):
        fn()
        if calls[-1] == "split":
            raise RuntimeError("out of resource: shared memory\nmore")
        return 9.0

    monkeypatch.setattr(polar, "_device_ms", split_fails)
    with pytest.warns(UserWarning, match="the split Polar backward failed on its first use here "
                                         "\\(RuntimeError: out of resource: shared memory\\); it is left out"):
        assert polar._auto_variant(_FakeCudaTensor(2048), None, run) == "two_pass"
    assert polar.auto_backward_choices()[key] == ("two_pass", {"two_pass": 9.0})
    monkeypatch.setattr(polar, "_device_ms", lambda fn, reps=3: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        polar._auto_variant(_FakeCudaTensor(4096), None, run)


def test_compile_report_reads_a_hopper_build(polar):
    """compile_report builds a kernel for sm_90 on the CPU and reads its resource use."""
    if polar._INTERPRET:
        pytest.skip("interpreter-mode kernels cannot be compiled")
    from kernels.polar import compile_report
    from kernels.polar.triton_kernels import polar_bwd_kernel_heads

    compiled = compile_report.compile_kernel(polar_bwd_kernel_heads, dict(D=64, RB=16), dict(num_warps=4),
                                             io="bf16", dq_io=True, arch=90)
    usage = compile_report.resource_usage(compiled)
    assert compiled.metadata.target.arch == 90
    assert set(usage) == {"reg", "stack", "shared", "local", "dynamic_shared"}
    assert 16 <= usage["reg"] <= 255 and usage["stack"] == usage["local"] == 0


# ---------------------------------------------------------------------------------------------
# In-kernel length terms, custom ops and launches per call.


@interpreted
@pytest.mark.parametrize("window", [None, 1, 17, 250])
def test_interpreted_length_terms_match_numerics(polar, window):
    """t and nu as every kernel computes them (`_length_terms`, via a kernel that writes them out)
    equal kernels.common.numerics.polar_length_terms for every count n of T = 300 (rows past the
    window included); the raw scalars cover both sides of softplus's threshold (20)."""
    from kernels.common import polar_length_features, polar_length_terms, polar_visible_counts

    raw = torch.tensor([[-3.0, 0.0, 0.7, 25.0, -30.0], [2.0, -1.0, 21.0, 0.5, 0.0], [-1.0, 19.5, -4.0, 0.3, 40.0]])
    null_base, null_slope_raw, len_gain_raw = raw
    T = 300
    n = polar_visible_counts(T, window)
    t, nu = polar.polar_length_terms_triton(T, window, null_base, null_slope_raw, len_gain_raw)
    t_ref, nu_ref = polar_length_terms(n, null_base, null_slope_raw, len_gain_raw)
    # a few fp32 ulps: softplus and log1p are written out in Triton (observed: <= 1 ulp)
    torch.testing.assert_close(t, t_ref, rtol=5e-7, atol=0.0)
    # nu = b + s sqrt(ln(n + 1)) cancels where b < 0 (head 0: -3 + about 3.2), so one ulp of the
    # product or of the logarithm is many ulps of the sum, and how the interpreter rounds them
    # varies between installs; bound the error by a few ulps of the summands instead.
    scale = null_base.abs()[:, None] + F.softplus(null_slope_raw)[:, None] * polar_length_features(n)[1][None, :]
    error = (nu - nu_ref).abs()
    assert (error <= 4 * torch.finfo(torch.float32).eps * scale).all(), error.max()


def _polar_args(B=1, T=21, H=4, G=2, D=16, *, seed=0, requires_grad=True, dtype=torch.float32):
    inputs, g_dir, g_mag = polar_case(B, T, H, G, D, seed=seed)
    args = [x.to(dtype if i < 3 else torch.float32).requires_grad_(requires_grad) for i, x in enumerate(inputs)]
    return args, g_dir.to(dtype), g_mag.to(dtype)


@interpreted
def test_interpreted_custom_ops_pass_opcheck(polar):
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of both ops;
    the variants that differ only in output shapes or kernels get the fake-tensor check."""
    args, g_dir, g_mag = _polar_args(T=8)
    fwd, bwd = torch.ops.atma.polar_triton_fwd.default, torch.ops.atma.polar_triton_bwd.default
    torch.library.opcheck(fwd, (*args, 4, True))
    detached = [x.detach() for x in args]
    torch.library.opcheck(fwd, (*detached, None, False), test_utils="test_faketensor")
    _, _, *stats = fwd(*detached, 4, True)
    torch.library.opcheck(bwd, (g_dir, g_mag, *detached, *stats, 4, "two_pass"))
    for variant in ("one_pass", "split", "auto"):
        torch.library.opcheck(bwd, (g_dir, g_mag, *detached, *stats, 4, variant), test_utils="test_faketensor")
    with pytest.raises(ValueError, match="variant must be one of auto, two_pass, one_pass, split; got 'fused'"):
        bwd(g_dir, g_mag, *detached, *stats, 4, "fused")


@interpreted
@pytest.mark.parametrize("variant", VARIANTS)
def test_interpreted_compiles_without_graph_break(polar, variant):
    """torch.compile(fullgraph=True) traces a function around polar_attention_triton (fullgraph
    raises on any graph break) and gives the eager outputs and gradients."""
    import torch._dynamo

    def f(q, k, v, v_null, *scalars):
        c, mu = polar.polar_attention_triton(q * 1.5, k, v, v_null, *scalars, window=9)
        return (c * c.sin()).sum() + mu.square().sum()

    args, _, _ = _polar_args()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with backward(variant):
        eager = torch.autograd.grad(f(*args), args)
        loss = compiled(*args)
        grads = torch.autograd.grad(loss, args)
    torch.testing.assert_close(loss, f(*args), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch._dynamo.explain(f)(*args).graph_break_count == 0


class _CountLaunches(TorchDispatchMode):
    """Counts, per name, the Triton kernels launched (under the interpreter) and the torch ops that
    would launch a GPU kernel (views and allocations excluded), inside the atma custom ops too."""

    def __init__(self):
        super().__init__()
        self.triton, self.torch = collections.Counter(), collections.Counter()
        self._in_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_launch:  # the interpreter's own copies of the kernel arguments
            return func(*args, **kwargs)
        if func.namespace == "atma":  # run the op's implementation with this mode still on
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("to", "_to_copy"):  # a cast (its schema may alias: a same-dtype `to` returns its input)
            self.torch["cast"] += 1
        elif not (func.is_view or name in ("empty", "empty_like", "empty_strided", "new_empty", "detach")):
            self.torch[name] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def launches(self):
        from triton.runtime.interpreter import GridExecutor

        original = GridExecutor.__call__

        def counted(executor, *args, **kw):
            self.triton[executor.fn.__name__] += 1
            self._in_launch = True
            try:
                return original(executor, *args, **kw)
            finally:
                self._in_launch = False

        with mock.patch.object(GridExecutor, "__call__", counted), self:
            yield self


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interpreted_launches_per_call(polar, monkeypatch, dtype):
    """One kernel per forward; three per backward (row terms + dq, dk/dv, per-head sums) and no
    PyTorch op; the one-pass backward adds the zeroed fp32 dq buffer and, for half inputs, its cast;
    the split backward launches the query-parallel kernel twice (row terms, then dq)."""
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        fn = getattr(owner, name)  # count allocations as they are outside the NaN-poisoning harness
        monkeypatch.setattr(owner, name, getattr(fn, "__wrapped__", fn))
    args, g_dir, g_mag = _polar_args(T=40, dtype=dtype)
    with _CountLaunches().launches() as fwd:
        out = polar.polar_attention_triton(*args)
    assert fwd.triton == {"polar_fwd_kernel": 1} and not fwd.torch, (fwd.triton, fwd.torch)
    backward_kernels = {"polar_bwd_kernel_dq": 1, "polar_bwd_kernel_dkdv": 1, "polar_bwd_kernel_heads": 1}
    one_pass_ops = {"zeros": 1, **({"cast": 1} if dtype != torch.float32 else {})}
    for variant, extra in (("two_pass", {}), ("one_pass", one_pass_ops), ("split", {})):
        with backward(variant), _CountLaunches().launches() as bwd:
            torch.autograd.grad(out, args, (g_dir, g_mag), retain_graph=True)
        kernels = {**backward_kernels, "polar_bwd_kernel_dq": 2 if variant == "split" else 1}
        assert bwd.triton == kernels and bwd.torch == extra, (variant, bwd.triton, bwd.torch)


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
    outs = kernel_backwards(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=dtype, window=window)
    bad = {variant: gpu_bound_violations(out, ref, dtype) for variant, out in outs.items()}
    assert not any(bad.values()), bad


# The backward variants that launch each kind: the query-parallel kernel runs its dq loop in two
# (after the row terms in two-pass, alone in split) and the row terms alone in the other two.
KIND_VARIANTS = {"fwd": ("two_pass",), "dq": ("two_pass", "split"), "dkdv": ("two_pass", "split"),
                 "onepass": ("one_pass",), "rows": ("one_pass", "split")}


def candidate_failures(polar, monkeypatch, kind, dtype, device, shape, windows, oracle, checked=None) -> list:
    """Force each launch candidate of `kind` on `device` in turn (the other kernels at their class
    default) and compare forward and every gradient of the backward variants that launch it with
    the oracle; return the failures.

    `checked`, a set shared between calls, skips the (configurations, window, variant) runs that an
    earlier call made already: each kind's first candidate is the class default of every kernel.
    """
    B, T, H, G, D = shape
    defaults = {k: polar.launch_candidates(k, device, dtype, D)[0] for k in polar.KERNELS}
    checked = set() if checked is None else checked
    failures = []
    for cand in polar.launch_candidates(kind, device, dtype, D):
        configs = config_string({**defaults, kind: cand})
        monkeypatch.setenv(polar.FORCE_ENV, configs)
        for window in windows:
            variants = tuple(v for v in KIND_VARIANTS[kind] if (configs, window, v) not in checked)
            if not variants:
                continue
            checked.update((configs, window, v) for v in variants)
            inputs, g_dir, g_mag, ref = oracle(dtype, window)
            outs = kernel_backwards(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=dtype, window=window,
                                    variants=variants)
            for variant, out in outs.items():
                bad = gpu_bound_violations(out, ref, dtype)
                if bad:
                    failures.append(f"{kind}={cand} {variant} window={window}: {bad}")
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
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv", "onepass", "rows"])
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
    """The GPU per-candidate check, run on the CPU for every kernel of the "small" class in bf16
    (window 24 only: every tile shape meets the unwindowed loops in the test above)."""
    monkeypatch.setenv("ATMA_POLAR_TRITON_PROFILE", "small")
    device, shape = torch.device("cpu"), (1, 80, 2, 1, 16)

    def oracle(dtype, window):
        return oracle_cache(device, shape, dtype, window)

    failures, checked = [], set()
    for kind in polar.KERNELS:
        failures += candidate_failures(polar, monkeypatch, kind, torch.bfloat16, device, shape, (24,), oracle,
                                       checked)
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


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 4096])
def test_gpu_length_terms_match_numerics(polar, window):
    """The in-kernel t and nu with the GPU's own log and sqrt, for every count up to 70 000."""
    from kernels.common import polar_length_terms, polar_visible_counts

    raw = torch.tensor([[-3.0, 0.0, 25.0, 2.0], [2.0, -1.0, 0.5, 21.0], [-1.0, 19.5, 0.3, 40.0]], device="cuda")
    T = 70_000
    t, nu = polar.polar_length_terms_triton(T, window, *raw)
    t_ref, nu_ref = polar_length_terms(polar_visible_counts(T, window, device="cuda"), *raw)
    torch.testing.assert_close(t, t_ref, rtol=2e-6, atol=0.0)
    torch.testing.assert_close(nu, nu_ref, rtol=2e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_auto_backward_runs_the_faster_variant(polar, monkeypatch):
    """On a GPU "auto" times the two-pass and the split backward on first use and runs the faster, whose
    gradients it returns bit for bit."""
    monkeypatch.delenv("ATMA_POLAR_AUTOTUNE", raising=False)
    polar.reset_auto_backward()
    inputs, g_dir, g_mag = gpu_case(2, 1024, 8, 2, 128, torch.bfloat16, seed=7)
    runs = kernel_backwards(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=torch.bfloat16, window=None,
                            variants=("auto", "two_pass", "split"))
    (chosen, times), = polar.auto_backward_choices().values()
    assert set(times) == set(polar.AUTO_CANDIDATES) and all(ms > 0 for ms in times.values())
    assert chosen == min(times, key=times.get)
    assert_same_results(runs["auto"][2], runs[chosen][2], f"auto against {chosen}")


@pytest.mark.gpu
def test_gpu_program_orders_agree(polar, monkeypatch):
    """At the training shape both program orders give bit-identical outputs and gradients (two-pass)."""
    inputs, g_dir, g_mag = gpu_case(2, 2048, 8, 2, 128, torch.bfloat16, seed=6)
    runs = []
    for schedule in polar.SCHEDULES:
        monkeypatch.setenv(polar.SCHEDULE_ENV, schedule)
        c, mu, grads = kernel_backwards(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=torch.bfloat16,
                                        window=None, variants=("two_pass",))["two_pass"]
        runs.append([c, mu, *grads])
    assert_same_results(runs[0], runs[1], "longest_first against in_order")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["two_pass", "split"])
def test_gpu_backward_without_atomics_is_reproducible(polar, variant):
    """No atomics in the two-pass and split backwards: the same call gives bit-identical gradients."""
    inputs, g_dir, g_mag = gpu_case(2, 2048, 8, 2, 128, torch.bfloat16, seed=5)
    runs = [kernel_backwards(polar.polar_attention_triton, inputs, g_dir, g_mag, dtype=torch.bfloat16, window=None,
                             variants=(variant,))[variant] for _ in range(2)]
    for name, a, b in zip(POLAR_GRAD_NAMES, runs[0][2], runs[1][2]):
        assert torch.equal(a, b), name
