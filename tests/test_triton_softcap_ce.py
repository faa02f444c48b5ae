"""The LM head loss's Triton row kernels (kernels.softcap_ce) against the fp64 oracle, and the fused loss
on them against the naive loss. Interpreted tests run in TRITON_INTERPRET=1 children of
`test_interpreter_suite` on the CPU."""

from __future__ import annotations

import pytest
import torch

from helpers import F64, assert_same_results, fenced, rel_max_err, run_interpreter_tests
from kernels.softcap_ce.naive import (softcap_ce_grad_naive, softcap_ce_kl_grad_naive, softcap_ce_kl_rows_naive,
                                      softcap_ce_rows_naive)
from model.lm_loss import softcap_cross_entropy_sums, softcap_cross_entropy_sums_naive

pytestmark = pytest.mark.nan_poison
interpreted = pytest.mark.interpreter
CAP = 15.0


@pytest.mark.interpreter_driver
def test_interpreter_suite():
    """This file's interpreted tests, in two TRITON_INTERPRET=1 child pytests."""
    run_interpreter_tests(__file__)


def logits_case(n, v, dtype, *, seed=0, scale=25.0, row_pad=0):
    """Pre-cap logits reaching far past the soft-cap's bend, labels with ignored rows, per-row weights."""
    gen = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(n, v + row_pad, generator=gen)).to(dtype)[:, :v]
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::3] = -100
    labels[1] = v - 1  # the last column, in the last (partial) tile
    coef = torch.rand(n, generator=gen) * (labels != -100)
    return z, labels, coef


# (N, V): V below one column tile (64 under the interpreter), exactly one, several with a partial last one.
SHAPES = [(4, 50), (3, 64), (7, 201), (2, 1)]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_interpreted_rows_and_grad_match_the_oracle(n, v, dtype):
    from kernels.softcap_ce.triton_impl import softcap_ce_grad_triton, softcap_ce_rows_triton

    z, labels, coef = logits_case(n, v, dtype, seed=v)
    lse, picked = softcap_ce_rows_triton(z, labels, CAP)
    want_lse, want_picked = softcap_ce_rows_naive(z.double(), labels, CAP)
    assert lse.dtype == picked.dtype == torch.float32
    assert rel_max_err(lse, want_lse) < 1e-6 and rel_max_err(picked, want_picked) < 1e-6
    assert torch.all(picked[labels == -100] == 0)
    dz, db = softcap_ce_grad_triton(z, labels, want_lse.float(), coef, CAP)
    want = softcap_ce_grad_naive(z.double(), labels, want_lse, coef.double(), CAP)
    assert dz.dtype == dtype and dz.shape == z.shape and db.dtype == torch.float32
    # Entries are at most coef <= 1, the scale below which the error counts as absolute (with V = 1 the
    # gradient is 0 up to the rounding of lse to fp32).
    assert rel_max_err(dz, want, floor=1.0) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel_max_err(db, want.sum(0), floor=1.0) < 1e-6  # summed before the rounding to the logits' dtype
    assert torch.all(dz[labels == -100] == 0)


@interpreted
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("dtype,t_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32-targets"])
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_interpreted_kl_rows_and_grad_match_the_oracle(n, v, dtype, t_dtype, tau):
    from kernels.softcap_ce.triton_impl import softcap_ce_kl_grad_triton, softcap_ce_kl_rows_triton

    z, labels, coef = logits_case(n, v, dtype, seed=v)
    t = logits_case(n, v, t_dtype, seed=v + 1, scale=4.0)[0]
    kl_coef = torch.rand(n, generator=torch.Generator().manual_seed(v))  # every row, ignored label or not
    rows = softcap_ce_kl_rows_triton(z, t, labels, CAP, tau)
    want = softcap_ce_kl_rows_naive(z.double(), t.double(), labels, CAP, tau)
    for name, got, exp in zip(("lse", "picked", "lse_st", "lse_u", "kl"), rows, want):
        assert got.dtype == torch.float32, name
        # the KL is a difference of terms of order lse: its error counts against that scale
        assert rel_max_err(got, exp, floor=want[0].abs().max().item() if name == "kl" else 0.0) < 1e-6, name
    lse, _, lse_st, lse_u, _ = (w.float() for w in want)
    dz, db = softcap_ce_kl_grad_triton(z, labels, lse, coef, t, lse_st, lse_u, kl_coef, CAP, tau)
    exp = softcap_ce_kl_grad_naive(z.double(), labels, coef.double(), t.double(), kl_coef.double(), CAP, tau)
    assert dz.dtype == dtype and dz.shape == z.shape and db.dtype == torch.float32
    assert rel_max_err(dz, exp, floor=1.0) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel_max_err(db, exp.sum(0), floor=1.0) < 1e-6


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interpreted_kernels_read_nothing_outside_their_inputs(dtype):
    """Every input fenced by NaN (labels by a wild index) on both sides (helpers.fenced): the rows' statistics and
    the gradients, with and without the KL, are the same bit for bit, so no load reaches past an input."""
    from kernels.softcap_ce.triton_impl import (softcap_ce_grad_triton, softcap_ce_kl_grad_triton,
                                                softcap_ce_kl_rows_triton, softcap_ce_rows_triton)

    z, labels, coef = logits_case(7, 201, dtype, seed=5)
    t = torch.randn(7, 201, generator=torch.Generator().manual_seed(6)).to(dtype)
    kl_coef = torch.linspace(0.1, 1.0, 7)

    def run(wrap):
        lse, picked = softcap_ce_rows_triton(wrap(z), wrap(labels), CAP)
        grads = softcap_ce_grad_triton(wrap(z), wrap(labels), wrap(lse), wrap(coef), CAP)
        rows = softcap_ce_kl_rows_triton(wrap(z), wrap(t), wrap(labels), CAP, 2.0)
        kl_grads = softcap_ce_kl_grad_triton(wrap(z), wrap(labels), wrap(rows[0]), wrap(coef), wrap(t), wrap(rows[2]),
                                             wrap(rows[3]), wrap(kl_coef), CAP, 2.0)
        return [lse, picked, *grads, *rows, *kl_grads]

    assert_same_results(run(fenced), run(lambda x: x.clone()), f"softcap rows {dtype}")


@interpreted
def test_interpreted_rows_read_the_row_stride():
    from kernels.softcap_ce.triton_impl import softcap_ce_grad_triton, softcap_ce_rows_triton

    z, labels, coef = logits_case(5, 70, torch.float32, row_pad=30)
    assert z.stride(0) == 100
    for got, want in zip(softcap_ce_rows_triton(z, labels, CAP), softcap_ce_rows_triton(z.contiguous(), labels, CAP)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    lse = softcap_ce_rows_naive(z, labels, CAP)[0].float()
    for got, want in zip(softcap_ce_grad_triton(z, labels, lse, coef, CAP),
                         softcap_ce_grad_triton(z.contiguous(), labels, lse, coef, CAP)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def loss_case(n=37, d=8, v=150, dtype=torch.float32, seed=0):
    """Rows, head and labels whose logits reach the soft-cap's bend."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    w = (3.0 * torch.randn(v, d, generator=gen)).requires_grad_()
    b = torch.randn(v, generator=gen).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen)
    y[3] = -100
    focus = (torch.rand(n, generator=gen) < 0.4).float()
    return h, w, b, y, focus


def sums_and_grads(fn, h, w, b, y, focus, **kw):
    sums = fn(h, w, b, y, focus, cap=CAP, **kw)
    grads = torch.autograd.grad((sums * torch.tensor([0.7, 1.3], dtype=sums.dtype)).sum(), (h, w, b))
    return [sums.detach(), *grads]


# Without a focus mask the loss computes its gradients in the forward (model.lm_loss).
FOCUS = pytest.mark.parametrize("with_focus", [True, False], ids=["focus", "grads-in-forward"])


@interpreted
@FOCUS
@pytest.mark.parametrize("chunk", [5, 37, 10_000])
def test_interpreted_fused_loss_on_the_kernels_equals_the_naive_loss(chunk, with_focus):
    h, w, b, y, focus = loss_case()
    focus = focus if with_focus else None
    got = sums_and_grads(softcap_cross_entropy_sums, h, w, b, y, focus, chunk_tokens=chunk, elementwise="triton")
    want = sums_and_grads(softcap_cross_entropy_sums_naive, *(t.detach().double().requires_grad_()
                                                              for t in (h, w, b)), y,
                          None if focus is None else focus.double())
    for name, a, e in zip(("sums", "hidden", "weight", "bias"), got, want):
        assert a.dtype == torch.float32, name
        assert rel_max_err(a, e) < 2e-5, name


def sums_and_grads_with_kl(fn, h, w, b, y, focus, **kw):
    sums = fn(h, w, b, y, focus, **kw)
    grads = torch.autograd.grad((sums * torch.tensor([0.7, 1.3, 0.4], dtype=sums.dtype)).sum(), (h, w, b))
    return [sums.detach(), *grads]


@interpreted
@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [5, 37])
def test_interpreted_fused_ce_and_kl_on_the_kernels_equal_the_naive_loss(chunk, tau, recompute):
    h, w, b, y, focus = loss_case()
    targets = 4.0 * torch.randn(h.shape[0], w.shape[0], generator=torch.Generator().manual_seed(1))
    asked = []

    def rows(start, end):
        asked.append((start, end))
        return targets[start:end].bfloat16()  # a bf16 teacher

    got = sums_and_grads_with_kl(softcap_cross_entropy_sums, h, w, b, y, focus, cap=CAP, chunk_tokens=chunk,
                                 targets_rows=rows, temperature=tau, recompute_targets=recompute,
                                 elementwise="triton")
    chunks = -(-h.shape[0] // chunk)
    assert len(asked) == chunks * (2 if recompute else 1)
    want = sums_and_grads_with_kl(softcap_cross_entropy_sums_naive, *(t.detach().double().requires_grad_()
                                                                      for t in (h, w, b)),
                                  y, focus.double(), cap=CAP, targets=targets.bfloat16().double(), temperature=tau)
    for name, a, e in zip(("sums", "hidden", "weight", "bias"), got, want):
        assert a.dtype == torch.float32, name
        assert rel_max_err(a, e) < 2e-5, name


@interpreted
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_interpreted_kl_alone_on_the_kernels_has_its_gradients_from_the_forward(tau):
    h, w, b, y, _ = loss_case()
    targets = 4.0 * torch.randn(h.shape[0], w.shape[0], generator=torch.Generator().manual_seed(1))
    asked = []
    got = sums_and_grads_with_kl(softcap_cross_entropy_sums, h, w, b, None, None, cap=CAP, chunk_tokens=10,
                                 targets_rows=lambda s, e: asked.append(s) or targets[s:e], temperature=tau,
                                 recompute_targets=True, elementwise="triton")
    assert asked == [0, 10, 20, 30]  # once per chunk: nothing asked again in backward
    want = sums_and_grads_with_kl(softcap_cross_entropy_sums_naive, *(t.detach().double().requires_grad_()
                                                                      for t in (h, w, b)),
                                  torch.full_like(y, -100), None, cap=CAP, targets=targets.double(), temperature=tau)
    for name, a, e in zip(("sums", "hidden", "weight", "bias"), got, want):
        assert rel_max_err(a, e) < 2e-5, name


@interpreted
@FOCUS
def test_interpreted_weighted_terms_on_the_kernels_take_their_gradients_from_the_forward(with_focus):
    """CE (with or without focus) and KL given the loss's coefficients: one differentiable scalar whose
    gradients the forward computes on the kernels, equal to the oracle's; the teacher asked once per chunk."""
    h, w, b, y, focus = loss_case()
    focus = focus if with_focus else None
    targets = 4.0 * torch.randn(h.shape[0], w.shape[0], generator=torch.Generator().manual_seed(1))
    coefs = (0.7, 1.3, 0.4)
    asked = []
    sums, total = softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=10, temperature=2.5,
                                             targets_rows=lambda s, e: asked.append(s) or targets[s:e],
                                             recompute_targets=True, elementwise="triton", weights=coefs)
    got = [sums, total.detach(), *torch.autograd.grad(total, (h, w, b))]
    assert asked == [0, 10, 20, 30] and not sums.requires_grad
    want = sums_and_grads_with_kl(softcap_cross_entropy_sums_naive, *(t.detach().double().requires_grad_()
                                                                      for t in (h, w, b)),
                                  y, None if focus is None else focus.double(), cap=CAP, targets=targets.double(),
                                  temperature=2.5)
    want.insert(1, (want[0] * torch.tensor(coefs, dtype=torch.float64)).sum())
    for name, a, e in zip(("sums", "weighted", "hidden", "weight", "bias"), got, want):
        assert rel_max_err(a, e) < 2e-5, name


@interpreted
def test_interpreted_bf16_ce_and_kl_on_the_kernels_are_as_close_to_the_oracle_as_the_pytorch_rows():
    h, w, b, y, focus = loss_case(n=64, d=16, v=96, dtype=torch.bfloat16, seed=2)
    targets = (4.0 * torch.randn(64, 96, generator=torch.Generator().manual_seed(3))).bfloat16()
    kw = dict(cap=CAP, chunk_tokens=20, targets_rows=lambda s, e: targets[s:e], temperature=2.0)
    exact = sums_and_grads_with_kl(softcap_cross_entropy_sums_naive, *(t.detach().double().requires_grad_()
                                                                       for t in (h, w, b)),
                                   y, focus.double(), cap=CAP, targets=targets.double(), temperature=2.0)
    kernels = sums_and_grads_with_kl(softcap_cross_entropy_sums, h, w, b, y, focus, elementwise="triton", **kw)
    pytorch = sums_and_grads_with_kl(softcap_cross_entropy_sums, h, w, b, y, focus, elementwise="torch", **kw)
    for got, ref, want in zip(kernels, pytorch, exact):
        err, ref_err = (got.double() - want).abs().max(), (ref.double() - want).abs().max()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)


@interpreted
@FOCUS
def test_interpreted_bf16_loss_on_the_kernels_is_as_close_to_the_oracle_as_the_pytorch_rows(with_focus):
    h, w, b, y, focus = loss_case(n=64, d=16, v=96, dtype=torch.bfloat16, seed=2)
    focus = focus if with_focus else None
    exact = sums_and_grads(softcap_cross_entropy_sums_naive, *(t.detach().double().requires_grad_()
                                                               for t in (h, w, b)), y,
                           None if focus is None else focus.double())
    kernels = sums_and_grads(softcap_cross_entropy_sums, h, w, b, y, focus, chunk_tokens=20, elementwise="triton")
    pytorch = sums_and_grads(softcap_cross_entropy_sums, h, w, b, y, focus, chunk_tokens=20, elementwise="torch")
    assert kernels[1].dtype == torch.bfloat16 and kernels[2].dtype == torch.float32
    for got, ref, want in zip(kernels, pytorch, exact):
        err, ref_err = (got.double() - want).abs().max(), (ref.double() - want).abs().max()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)


@interpreted
def test_interpreted_auto_takes_the_kernels_on_the_triton_backend(monkeypatch):
    import kernels.softcap_ce.triton_impl as impl

    calls = []
    launch = impl._fwd  # the forward kernels' launch, with or without the KL term
    monkeypatch.setattr(impl, "_fwd", lambda *a: calls.append(1) or launch(*a))
    h, w, b, y, focus = loss_case(n=8, v=40)
    monkeypatch.setenv("ATMA_KERNELS", "torch")
    softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4)
    assert calls == []
    monkeypatch.setenv("ATMA_KERNELS", "triton")
    softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4)
    assert len(calls) == 2  # one per chunk
    targets = torch.randn(8, 40)
    softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4, targets_rows=lambda s, e: targets[s:e])
    assert len(calls) == 4  # with the KL term too
    monkeypatch.setenv("ATMA_LOSS_ROWS", "torch")  # the rows alone back on PyTorch
    softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4)
    softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4, targets_rows=lambda s, e: targets[s:e])
    assert len(calls) == 4
    monkeypatch.setenv("ATMA_KERNELS", "torch")
    monkeypatch.setenv("ATMA_LOSS_ROWS", "triton")  # the rows alone on the kernels
    softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4)
    softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4, targets_rows=lambda s, e: targets[s:e])
    assert len(calls) == 8


@interpreted
def test_interpreted_op_registration():
    """atma::softcap_ce_fwd/_bwd and softcap_ce_kl_fwd/_bwd: schema and fake implementations (opcheck)."""
    from kernels.softcap_ce.triton_impl import _kl_rows_bwd, _kl_rows_fwd, _rows_bwd, _rows_fwd

    z, labels, coef = logits_case(6, 90, torch.bfloat16)
    torch.library.opcheck(_rows_fwd, (z, labels, CAP))
    lse = softcap_ce_rows_naive(z, labels, CAP)[0].float()
    torch.library.opcheck(_rows_bwd, (z, labels, lse, coef, CAP))
    t = logits_case(6, 90, torch.float32, seed=1, scale=4.0)[0]
    torch.library.opcheck(_kl_rows_fwd, (z, t, labels, CAP, 2.0))
    _, _, lse_st, lse_u, _ = (r.float() for r in softcap_ce_kl_rows_naive(z, t, labels, CAP, 2.0))
    torch.library.opcheck(_kl_rows_bwd, (z, labels, lse, coef, t, lse_st, lse_u, coef.flip(0).contiguous(), CAP, 2.0))


@interpreted
def test_interpreted_loss_benchmark_times_the_pytorch_rows_beside_the_kernels(tmp_path, monkeypatch, capsys):
    import json

    from model import bench_loss

    monkeypatch.setenv("ATMA_KERNELS", "triton")
    out = tmp_path / "loss.json"
    assert bench_loss.main(["--tokens", "24", "--hidden", "8", "--vocab", "40", "--chunk-tokens", "16",
                            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["ms"]) == {"fused", "fused, logits recomputed", "fused, PyTorch rows",
                                 "naive chunked (baseline)"}
    assert all(ms > 0 for ms in record["ms"].values()) and "row_kernels_speedup" in record
    assert "Triton rows over PyTorch rows" in capsys.readouterr().out
    # With the rows switched back to PyTorch there is nothing to compare them with.
    monkeypatch.setenv("ATMA_LOSS_ROWS", "torch")
    assert bench_loss.main(["--tokens", "24", "--hidden", "8", "--vocab", "40", "--chunk-tokens", "16",
                            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["ms"]) == {"fused", "fused, logits recomputed", "naive chunked (baseline)"}
    assert "row_kernels_speedup" not in record


@interpreted
def test_interpreted_kernels_read_and_write_the_logits_six_times(tmp_path, monkeypatch):
    """bf16 logits (2 bytes each), gradients in the forward: written by the head, read by the forward kernel
    and by the gradient kernel, which writes dz, read by the two products: 12 bytes per logit. Recomputed
    in backward, the head writes them once more and the gradient kernel reads that copy: 14."""
    import json

    from model import bench_loss

    monkeypatch.setenv("ATMA_KERNELS", "triton")
    out = tmp_path / "traffic.json"
    assert bench_loss.main(["--count-bytes", "--tokens", "96", "--hidden", "4", "--vocab", "300", "--chunk-tokens",
                            "40", "--dtype", "bf16", "--device", "cpu", "--json", str(out)]) == 0
    traffic = json.loads(out.read_text())["traffic"]
    logits = 96 * 300
    assert traffic["fused"] == {"bytes": 12 * logits, "ops": 5 * 3}  # 3 chunks
    assert traffic["fused, logits recomputed"] == {"bytes": 14 * logits, "ops": 6 * 3}
    assert traffic["fused, PyTorch rows"]["bytes"] > 10 * traffic["fused"]["bytes"]
    # With the distillation KL the kernels read the bf16 targets beside the logits in each pass: 12 + 2 + 2
    # bytes with the gradients in the forward (the weighted loss), 14 + 2 + 2 with the logits recomputed.
    assert bench_loss.main(["--count-bytes", "--tokens", "96", "--hidden", "4", "--vocab", "300", "--chunk-tokens",
                            "40", "--dtype", "bf16", "--device", "cpu", "--distill", "--json", str(out)]) == 0
    traffic = json.loads(out.read_text())["traffic"]
    assert traffic["fused"] == {"bytes": 16 * logits, "ops": 5 * 3}
    assert traffic["fused, logits recomputed"] == {"bytes": 18 * logits, "ops": 6 * 3}
    assert traffic["fused, PyTorch rows"]["bytes"] > 10 * traffic["fused"]["bytes"]


def test_the_elementwise_choice_is_checked():
    h, w, b, y, focus = loss_case(n=4, v=10)
    with pytest.raises(ValueError, match="elementwise must be auto, triton or torch, got 'cuda'"):
        softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4, elementwise="cuda")
    with pytest.raises(ValueError, match="got torch.float64"):
        softcap_cross_entropy_sums(h.double(), w, b, y, focus, cap=CAP, chunk_tokens=4, elementwise="triton")


def test_the_rows_environment_variable_is_checked(monkeypatch):
    h, w, b, y, focus = loss_case(n=4, v=10)
    monkeypatch.setenv("ATMA_LOSS_ROWS", "fast")
    with pytest.raises(ValueError, match="ATMA_LOSS_ROWS must be one of auto, triton, torch, got 'fast'"):
        softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4)
    monkeypatch.setenv("ATMA_LOSS_ROWS", " Torch ")  # case and blanks do not matter
    naive = softcap_cross_entropy_sums_naive(h, w, b, y, focus, cap=CAP)
    torch.testing.assert_close(softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4), naive)


def test_the_kernels_refuse_what_they_cannot_take():
    from kernels.common import interpreting
    from kernels.softcap_ce.triton_impl import softcap_ce_grad_triton, softcap_ce_rows_triton

    z, labels, coef = logits_case(3, 20, torch.float32)
    if not interpreting():  # no kernel launches on the CPU outside the interpreter
        with pytest.raises(ValueError, match="Triton kernels need CUDA tensors"):
            softcap_ce_rows_triton(z, labels, CAP)
        return
    with pytest.raises(ValueError, match="columns must be contiguous"):
        softcap_ce_rows_triton(z.t().contiguous().t(), labels, CAP)
    with pytest.raises(ValueError, match="labels must be int64 of shape"):
        softcap_ce_rows_triton(z, labels.int(), CAP)
    with pytest.raises(ValueError, match="lse must be contiguous fp32"):
        softcap_ce_grad_triton(z, labels, torch.zeros(3, dtype=torch.float64), coef, CAP)


@interpreted
def test_interpreted_kl_kernels_refuse_targets_they_cannot_take():
    from kernels.softcap_ce.triton_impl import softcap_ce_kl_grad_triton, softcap_ce_kl_rows_triton

    z, labels, coef = logits_case(3, 20, torch.float32)
    with pytest.raises(ValueError, match=r"target logits must be \(3, 20\)"):
        softcap_ce_kl_rows_triton(z, z[:, :10], labels, CAP, 1.0)
    with pytest.raises(ValueError, match="target logits must be .* got .* torch.float64"):
        softcap_ce_kl_rows_triton(z, z.double(), labels, CAP, 1.0)
    with pytest.raises(ValueError, match="contiguous columns"):
        softcap_ce_kl_rows_triton(z, z.t().contiguous().t(), labels, CAP, 1.0)
    with pytest.raises(ValueError, match="temperature must be positive, got 0.0"):
        softcap_ce_kl_rows_triton(z, z, labels, CAP, 0.0)
    with pytest.raises(ValueError, match="kl_coef must be contiguous fp32"):
        softcap_ce_kl_grad_triton(z, labels, coef, coef, z, coef, coef, coef.double(), CAP, 1.0)


@pytest.mark.gpu
@FOCUS
def test_gpu_loss_on_the_kernels_at_the_training_head(with_focus):
    """atma-378m's head (hidden 1024, vocabulary 50,304), bf16, 2 chunks: kernels vs PyTorch rows vs fp64."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 4096, 1024, 50304
    h = torch.randn(n, d, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=gen) / d**0.5 * 8).bfloat16().requires_grad_()
    b = torch.zeros(v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, v, (n,), device="cuda", generator=gen)
    y[::7] = -100
    focus = (torch.rand(n, device="cuda", generator=gen) < 0.2).bfloat16()

    def run(fn, *leaves, **kw):
        sums = fn(*leaves, y, focus.to(leaves[0].dtype) if with_focus else None, cap=CAP, **kw)
        weights = torch.tensor([0.7, 1.3], device="cuda", dtype=sums.dtype)
        return [sums.detach(), *torch.autograd.grad((sums * weights).sum(), leaves)]

    exact = run(softcap_cross_entropy_sums_naive, *(t.detach().double().requires_grad_() for t in (h, w, b)))
    kernels = run(softcap_cross_entropy_sums, h, w, b, chunk_tokens=2048, elementwise="triton")
    pytorch = run(softcap_cross_entropy_sums, h, w, b, chunk_tokens=2048, elementwise="torch")
    for name, got, ref, want in zip(("sums", "hidden", "weight", "bias"), kernels, pytorch, exact):
        err, ref_err = (got.double() - want).abs().max(), (ref.double() - want).abs().max()
        assert err <= 2 * ref_err + 1e-6, (name, err, ref_err)
    assert rel_max_err(kernels[0], exact[0]) < 1e-4
