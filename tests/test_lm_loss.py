"""The fused soft-capped cross-entropy (and distillation KL) against naive autograd references (fp64 oracle)."""

import json

import pytest
import torch
import torch.nn.functional as F

from model.layers import softcap
from model.lm_loss import softcap_cross_entropy_sums, softcap_cross_entropy_sums_naive

CAP = 15.0


def case(n=37, d=8, v=50, dtype=torch.float64, scale=3.0, seed=0):
    """Rows, head and labels with logits large enough that the soft-cap bends them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = (scale * torch.randn(v, d, generator=g, dtype=dtype)).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[3] = -100
    focus = (torch.rand(n, generator=g) < 0.4).to(dtype)
    return h, w, b, y, focus


def sums_and_grads(fn, h, w, b, weights=(0.7, 1.3), **kw):
    sums = fn(h, w, b, *kw.pop("targets"), cap=CAP, **kw)
    grads = torch.autograd.grad((sums * torch.tensor(weights, dtype=sums.dtype, device=sums.device)).sum(), (h, w, b))
    return sums.detach(), grads


@pytest.mark.parametrize("chunk", [1, 5, 37, 10_000])
def test_fused_equals_naive_in_fp64(chunk):
    h, w, b, y, focus = case()
    assert (CAP * 0.5 < (h @ w.T + b).abs().max()), "logits must reach the soft-cap's bend"
    fused, fused_grads = sums_and_grads(softcap_cross_entropy_sums, h, w, b, targets=(y, focus), chunk_tokens=chunk)
    naive, naive_grads = sums_and_grads(softcap_cross_entropy_sums_naive, h, w, b, targets=(y, focus))
    torch.testing.assert_close(fused, naive, rtol=1e-12, atol=1e-12)
    for got, want, name in zip(fused_grads, naive_grads, ("hidden", "weight", "bias")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def test_ignored_labels_add_nothing_and_get_no_gradient():
    h, w, b, y, focus = case()
    sums, (grad_h, _, _) = sums_and_grads(softcap_cross_entropy_sums, h, w, b, targets=(y, focus), chunk_tokens=4)
    keep = y != -100
    kept = softcap_cross_entropy_sums(h[keep], w, b, y[keep], focus[keep], cap=CAP, chunk_tokens=4)
    torch.testing.assert_close(sums, kept.detach(), rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(grad_h[3]) == 0 and torch.count_nonzero(grad_h[keep].abs().sum(1)) == keep.sum()


def test_gradcheck():
    h, w, b, y, focus = case(n=9, d=3, v=7)
    assert torch.autograd.gradcheck(
        lambda h, w, b: softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=4), (h, w, b))


@pytest.mark.parametrize("chunk", [1, 5, 37, 10_000])
def test_gradients_computed_in_forward_equal_naive_in_fp64(chunk):
    """Without a focus mask the forward computes the gradients and the backward scales them by the CE
    sum's gradient (here 0.7; the second sum is 0 and its gradient of 1.3 must change nothing)."""
    h, w, b, y, _ = case()
    fused, fused_grads = sums_and_grads(softcap_cross_entropy_sums, h, w, b, targets=(y,), chunk_tokens=chunk)
    naive, naive_grads = sums_and_grads(softcap_cross_entropy_sums_naive, h, w, b, targets=(y,))
    assert fused[1] == 0
    torch.testing.assert_close(fused, naive, rtol=1e-12, atol=1e-12)
    for got, want, name in zip(fused_grads, naive_grads, ("hidden", "weight", "bias")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def test_gradcheck_with_gradients_computed_in_forward():
    h, w, b, y, _ = case(n=9, d=3, v=7)
    assert torch.autograd.gradcheck(
        lambda h, w, b: softcap_cross_entropy_sums(h, w, b, y, cap=CAP, chunk_tokens=4), (h, w, b))


def products_per_pass(fn):
    """Matrix products dispatched by `fn()` (forward) and by the backward of its summed result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"now": 0}

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts["now"] += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
            return func(*args, **(kwargs or {}))

    with Products():
        out = fn()
    forward, counts["now"] = counts["now"], 0
    if out.requires_grad:
        with Products():
            out.sum().backward()
    return forward, counts["now"]


@pytest.mark.parametrize("kind", ["no focus", "recomputed", "focus", "no grad", "frozen head"])
def test_the_head_runs_three_products_per_chunk_in_forward_without_focus_else_one_plus_three(kind):
    """4 chunks: the logits and, where the CE sum alone is differentiable, dh and dW in forward (nothing
    left for backward); otherwise the logits in forward and again in backward with dh and dW."""
    h, w, b, y, focus = case(n=37, d=8, v=50)
    if kind == "frozen head":
        w, b = w.detach(), b.detach()
    kw = {"focus": focus} if kind == "focus" else {"grads_in_forward": False} if kind == "recomputed" else {}

    def loss():
        return softcap_cross_entropy_sums(h, w, b, y, cap=CAP, chunk_tokens=10, **kw)

    if kind == "no grad":
        with torch.no_grad():
            assert products_per_pass(loss) == (4, 0)
        return
    expected = {"no focus": (12, 0), "frozen head": (8, 0), "recomputed": (4, 12), "focus": (4, 12)}[kind]
    assert products_per_pass(loss) == expected
    assert h.grad is not None and (w.grad is None) == (kind == "frozen head")


def test_the_models_lm_loss_computes_its_gradients_in_forward():
    from model.modeling import lm_loss_chunked

    h, w, b, y, focus = case(n=37, d=8, v=50)
    hidden, labels = h.reshape(1, 37, 8), y.reshape(1, 37)
    assert products_per_pass(lambda: lm_loss_chunked(hidden, w, b, labels, cap=CAP, chunk_tokens=10)[0]) == (12, 0)
    with_focus = focus.bool().reshape(1, 37)
    assert products_per_pass(lambda: sum(lm_loss_chunked(hidden, w, b, labels, cap=CAP, chunk_tokens=10,
                                                         focus=with_focus))) == (4, 12)


def check_bf16_against_oracle(device: str, n: int, d: int, v: int, chunk: int, with_focus: bool = True):
    """Fused bf16 sums and gradients no further from the fp64 oracle than the naive path's (without a focus
    mask the fused path computes its gradients in the forward)."""
    h, w, b, y, focus = (t.to(device) for t in case(n=n, d=d, v=v, dtype=torch.float32, scale=1.0))
    w, b = (t.detach().requires_grad_() for t in (w, b))
    h16 = h.detach().bfloat16().requires_grad_()
    targets, targets64 = ((y, focus), (y, focus.double())) if with_focus else ((y,), (y,))
    fused, fused_grads = sums_and_grads(softcap_cross_entropy_sums, h16, w, b, targets=targets, chunk_tokens=chunk)
    naive, naive_grads = sums_and_grads(softcap_cross_entropy_sums_naive, h16, w, b, targets=targets)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h16, w, b))
    exact, exact_grads = sums_and_grads(softcap_cross_entropy_sums_naive, h64, w64, b64, targets=targets64)
    assert fused_grads[0].dtype == torch.bfloat16 and fused_grads[1].dtype == torch.float32
    for got, ref, want in zip((fused, *fused_grads), (naive, *naive_grads), (exact, *exact_grads)):
        err, ref_err = (got.double() - want).abs().max(), (ref.double() - want).abs().max()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)


@pytest.mark.parametrize("with_focus", [True, False], ids=["focus", "grads-in-forward"])
def test_bf16_rows_are_as_close_to_the_fp64_oracle_as_the_naive_path(with_focus):
    check_bf16_against_oracle("cpu", n=64, d=16, v=96, chunk=20, with_focus=with_focus)


@pytest.mark.gpu
@pytest.mark.parametrize("with_focus", [True, False], ids=["focus", "grads-in-forward"])
def test_bf16_on_the_gpu_at_a_training_shape(with_focus):
    check_bf16_against_oracle("cuda", n=4096, d=256, v=8192, chunk=1024, with_focus=with_focus)


@pytest.mark.parametrize("with_focus", [True, False], ids=["recomputed", "grads-in-forward"])
def test_no_logits_sized_tensor_is_kept_for_backward(with_focus):
    n, v = 64, 96
    h, w, b, y, focus = case(n=n, d=8, v=v)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sums = softcap_cross_entropy_sums(h, w, b, y, focus if with_focus else None, cap=CAP, chunk_tokens=16)
    sums.sum().backward()
    assert saved and max(saved) < 16 * v, f"a logits-sized tensor was kept for backward: {sorted(saved)}"


def naive_sums_with_kl(h, w, b, labels, focus, *, cap, targets, temperature):
    """Oracle for the fused CE + KL sums: whole logits, autograd through every op."""
    ce = softcap_cross_entropy_sums_naive(h, w, b, labels, focus, cap=cap)
    log_p = torch.log_softmax(softcap(F.linear(h, w.to(h.dtype), b.to(h.dtype)), cap) / temperature, dim=-1)
    log_q = torch.log_softmax(targets.to(log_p.dtype) / temperature, dim=-1)
    return torch.cat([ce, F.kl_div(log_p, log_q, log_target=True, reduction="sum").reshape(1)])


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("chunk", [1, 5, 37])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_ce_and_kl_equal_naive_in_fp64(chunk, temperature, recompute):
    h, w, b, y, focus = case()
    targets = 4.0 * torch.randn(h.shape[0], w.shape[0], generator=torch.Generator().manual_seed(7), dtype=h.dtype)
    rows = []

    def target_rows(start, end):
        rows.append((start, end))
        return targets[start:end]

    weights = (0.7, 1.3, 0.9)
    fused, fused_grads = sums_and_grads(softcap_cross_entropy_sums, h, w, b, weights, targets=(y, focus),
                                        chunk_tokens=chunk, targets_rows=target_rows, temperature=temperature,
                                        recompute_targets=recompute)
    naive = naive_sums_with_kl(h, w, b, y, focus, cap=CAP, targets=targets, temperature=temperature)
    naive_grads = torch.autograd.grad((naive * torch.tensor(weights, dtype=naive.dtype)).sum(), (h, w, b))
    torch.testing.assert_close(fused, naive.detach(), rtol=1e-12, atol=1e-11)
    for got, want, name in zip(fused_grads, naive_grads, ("hidden", "weight", "bias")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    # the teacher is asked once per chunk in the forward, and again in the backward when recomputing
    chunks = [(s, min(s + chunk, h.shape[0])) for s in range(0, h.shape[0], chunk)]
    assert rows == chunks + (chunks if recompute else [])


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("chunk", [1, 5, 37])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_the_kl_alone_has_its_gradients_from_the_forward_in_fp64(chunk, temperature, recompute):
    """Without labels the KL sum is the only differentiable term: the forward computes its gradients, so the
    targets are asked once per chunk whatever `recompute_targets` says, and nothing is left for backward."""
    h, w, b, y, _ = case()
    targets = 4.0 * torch.randn(h.shape[0], w.shape[0], dtype=h.dtype, generator=torch.Generator().manual_seed(1))
    asked = []

    def rows(start, end):
        asked.append(start)
        return targets[start:end]

    weights = (0.7, 1.3, 0.9)
    fused = softcap_cross_entropy_sums(h, w, b, None, cap=CAP, chunk_tokens=chunk, targets_rows=rows,
                                       temperature=temperature, recompute_targets=recompute)
    fused_grads = torch.autograd.grad((fused * torch.tensor(weights, dtype=h.dtype)).sum(), (h, w, b))
    assert asked == list(range(0, h.shape[0], chunk))
    ignored = torch.full_like(y, -100)
    naive = naive_sums_with_kl(h, w, b, ignored, None, cap=CAP, targets=targets, temperature=temperature)
    naive_grads = torch.autograd.grad((naive * torch.tensor(weights, dtype=h.dtype)).sum(), (h, w, b))
    assert fused[0] == fused[1] == 0
    torch.testing.assert_close(fused.detach(), naive.detach(), rtol=1e-12, atol=1e-12)
    for got, want, name in zip(fused_grads, naive_grads, ("hidden", "weight", "bias")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    products = products_per_pass(lambda: softcap_cross_entropy_sums(
        h, w, b, None, cap=CAP, chunk_tokens=10, targets_rows=rows, temperature=temperature))
    assert products == (12, 0)  # 37 rows in 4 chunks: logits, dh and dW in the forward


WEIGHTS = (0.7, 1.3, 0.9)  # a loss's coefficients of the CE, focus and KL sums


def weighted_case(with_focus, with_kl, chunk, recompute=True):
    """The fused sums and their weighted sum with WEIGHTS, the gradients of 1.7 x that sum, and the
    chunks whose targets were asked for; beside the oracle's sums, weighted sum and gradients."""
    h, w, b, y, focus = case()
    f = focus if with_focus else None
    targets = 4.0 * torch.randn(h.shape[0], w.shape[0], dtype=h.dtype, generator=torch.Generator().manual_seed(5))
    asked = []
    rows = (lambda start, end: asked.append(start) or targets[start:end]) if with_kl else None
    sums, weighted = softcap_cross_entropy_sums(h, w, b, y, f, cap=CAP, chunk_tokens=chunk, targets_rows=rows,
                                                temperature=2.5, recompute_targets=recompute, weights=WEIGHTS)
    got = (sums, weighted.detach(), torch.autograd.grad(1.7 * weighted, (h, w, b)))
    naive = (naive_sums_with_kl(h, w, b, y, f, cap=CAP, targets=targets, temperature=2.5) if with_kl
             else softcap_cross_entropy_sums_naive(h, w, b, y, f, cap=CAP))
    naive_weighted = (naive * torch.tensor(WEIGHTS[:naive.numel()], dtype=h.dtype)).sum()
    want = (naive.detach(), naive_weighted.detach(), torch.autograd.grad(1.7 * naive_weighted, (h, w, b)))
    return got, want, asked, weighted


@pytest.mark.parametrize("with_kl", [False, True], ids=["ce", "ce+kl"])
@pytest.mark.parametrize("with_focus", [False, True], ids=["", "focus"])
@pytest.mark.parametrize("chunk", [1, 5, 37])
def test_weighted_terms_take_their_gradients_from_the_forward_in_fp64(chunk, with_focus, with_kl):
    """Given the loss's coefficients, every combination of the CE, the focus mask and the KL is one
    differentiable scalar: its value and gradients are the oracle's, the sums come back without a
    gradient, and the teacher is asked once per chunk although recomputing was asked for."""
    (sums, weighted, grads), (n_sums, n_weighted, n_grads), asked, _ = weighted_case(with_focus, with_kl, chunk)
    assert not sums.requires_grad
    torch.testing.assert_close(sums, n_sums, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(weighted, n_weighted, rtol=1e-12, atol=1e-11)
    for got, want, name in zip(grads, n_grads, ("hidden", "weight", "bias")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    assert asked == (list(range(0, 37, chunk)) if with_kl else [])


def check_weighted_bf16_against_oracle(device: str, n: int, d: int, v: int, chunk: int):
    """CE, focus and KL with the loss's coefficients (a 1 / tokens scale, as training's), bf16 rows: the weighted
    sum and its gradients no further from the fp64 oracle than twice the same path's without the weights."""
    h, w, b, y, focus = (t.to(device) for t in case(n=n, d=d, v=v, dtype=torch.float32, scale=1.0))
    w, b = (t.detach().requires_grad_() for t in (w, b))
    h16 = h.detach().bfloat16().requires_grad_()
    targets = (4.0 * torch.randn(n, v, generator=torch.Generator().manual_seed(9))).to(device)
    coefs = (1.0 / n, 0.5 / n, 0.3 * 4.0 / n)
    kw = dict(cap=CAP, chunk_tokens=chunk, targets_rows=lambda s, e: targets[s:e].bfloat16(), temperature=2.0)
    _, weighted = softcap_cross_entropy_sums(h16, w, b, y, focus, weights=coefs, **kw)
    unweighted = (softcap_cross_entropy_sums(h16, w, b, y, focus, **kw)
                  * torch.tensor(coefs, dtype=torch.float32, device=device)).sum()
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h16, w, b))
    exact = (naive_sums_with_kl(h64, w64, b64, y, focus.double(), cap=CAP, targets=targets.bfloat16().double(),
                                temperature=2.0) * torch.tensor(coefs, dtype=torch.float64, device=device)).sum()
    got = (weighted.detach(), *torch.autograd.grad(weighted, (h16, w, b)))
    ref = (unweighted.detach(), *torch.autograd.grad(unweighted, (h16, w, b)))
    want = (exact.detach(), *torch.autograd.grad(exact, (h64, w64, b64)))
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for a, r, e in zip(got, ref, want):
        err, ref_err = (a.double() - e).abs().max(), (r.double() - e).abs().max()
        assert err <= 2 * ref_err + 1e-9, (err, ref_err)


def test_bf16_weighted_terms_are_as_close_to_the_fp64_oracle_as_without_the_weights():
    check_weighted_bf16_against_oracle("cpu", n=64, d=16, v=96, chunk=20)


@pytest.mark.gpu
def test_bf16_weighted_terms_on_the_gpu_at_a_training_shape():
    check_weighted_bf16_against_oracle("cuda", n=4096, d=256, v=8192, chunk=1024)


@pytest.mark.parametrize("grads_in_forward", [True, False], ids=["in-forward", "recomputed"])
def test_weighted_terms_run_three_products_per_chunk_in_forward_and_keep_no_targets(grads_in_forward):
    """CE, focus and KL with the loss's coefficients: 4 chunks, the logits, dh and dW in the forward and
    nothing in the backward, no targets kept; with grads_in_forward=False the logits again in backward."""
    h, w, b, y, focus = case(n=37, d=8, v=50)
    targets = torch.randn(37, 50, dtype=h.dtype)
    outputs = []

    def weighted():
        sums, total = softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=10, weights=WEIGHTS,
                                                 targets_rows=lambda s, e: targets[s:e],
                                                 grads_in_forward=grads_in_forward)
        outputs.append(total)
        return total

    assert products_per_pass(weighted) == ((12, 0) if grads_in_forward else (4, 12))
    if grads_in_forward:
        assert outputs[0].grad_fn.kept == []


def test_gradcheck_of_weighted_terms():
    h, w, b, y, focus = case(n=9, d=3, v=7)
    targets = torch.randn(9, 7, dtype=h.dtype, generator=torch.Generator().manual_seed(3))
    assert torch.autograd.gradcheck(lambda h, w, b: softcap_cross_entropy_sums(
        h, w, b, y, focus, cap=CAP, chunk_tokens=4, targets_rows=lambda s, e: targets[s:e], temperature=1.7,
        weights=(0.3, 1.1, torch.tensor(0.8, dtype=h.dtype)))[1], (h, w, b))


def test_weighted_terms_need_three_coefficients():
    h, w, b, y, _ = case()
    with pytest.raises(ValueError, match=r"weights must be \(c_ce, c_focus, c_kl\), got 2 values"):
        softcap_cross_entropy_sums(h, w, b, y, cap=CAP, chunk_tokens=4, weights=(1.0, 0.0))


def test_gradcheck_of_the_kl_alone():
    h, w, b, _, _ = case(n=9, d=3, v=7)
    targets = torch.randn(9, 7, dtype=h.dtype, generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(lambda h, w, b: softcap_cross_entropy_sums(
        h, w, b, None, cap=CAP, chunk_tokens=4, targets_rows=lambda s, e: targets[s:e], temperature=1.7), (h, w, b))


def test_no_labels_and_no_targets_is_refused():
    h, w, b, _, _ = case()
    with pytest.raises(ValueError, match="nothing to compute: no labels and no targets"):
        softcap_cross_entropy_sums(h, w, b, None, cap=CAP, chunk_tokens=4)


def test_recomputed_targets_are_not_kept_for_backward():
    n, v = 64, 96
    h, w, b, y, focus = case(n=n, d=8, v=v)
    targets = torch.randn(n, v, dtype=h.dtype)
    kept = {}
    for recompute in (False, True):
        sums = softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=16,
                                          targets_rows=lambda s, e: targets[s:e], recompute_targets=recompute)
        kept[recompute] = sum(t.numel() for t in sums.grad_fn.kept)
        sums.sum().backward()
    assert kept == {False: n * v, True: 0}


@pytest.mark.gpu
def test_bf16_ce_and_kl_on_the_gpu_are_as_close_to_the_fp64_oracle_as_the_naive_path():
    h, w, b, y, focus = (t.to("cuda") for t in case(n=4096, d=256, v=8192, dtype=torch.float32, scale=1.0))
    w, b = (t.detach().requires_grad_() for t in (w, b))
    h16 = h.detach().bfloat16().requires_grad_()
    targets = 4.0 * torch.randn(4096, 8192, device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    weights = (0.7, 1.3, 0.9)

    def grads_of(sums, inputs):
        return torch.autograd.grad((sums * torch.tensor(weights, device="cuda", dtype=sums.dtype)).sum(), inputs)

    fused = softcap_cross_entropy_sums(h16, w, b, y, focus, cap=CAP, chunk_tokens=1024,
                                       targets_rows=lambda s, e: targets[s:e], temperature=2.0)
    naive = naive_sums_with_kl(h16, w, b, y, focus, cap=CAP, targets=targets, temperature=2.0)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h16, w, b))
    exact = naive_sums_with_kl(h64, w64, b64, y, focus.double(), cap=CAP, targets=targets.double(), temperature=2.0)
    got_all = (fused.detach(), *grads_of(fused, (h16, w, b)))
    ref_all = (naive.detach(), *grads_of(naive, (h16, w, b)))
    want_all = (exact.detach(), *grads_of(exact, (h64, w64, b64)))
    for got, ref, want in zip(got_all, ref_all, want_all):
        err, ref_err = (got.double() - want).abs().max(), (ref.double() - want).abs().max()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)


def test_the_model_gives_the_same_lm_and_kl_terms_fused_as_one_at_a_time():
    from model import AtmaConfig, AtmaForCausalLM

    torch.manual_seed(0)
    model = AtmaForCausalLM(AtmaConfig.from_preset("tiny", vocab_size=64)).double()
    with torch.no_grad():
        model.proj.weight.normal_(0, 0.5)  # the head starts at zero; give it logits to differ in
    ids = torch.randint(0, 64, (2, 24))
    targets = 3.0 * torch.randn(2 * 24, 64, dtype=torch.float64)

    def rows(start, end):
        return targets[start:end]

    def terms_and_grads(**kw):
        out = model(ids, kw.get("labels"), kl_targets=kw.get("kl"), kl_temperature=2.0, loss_chunk_tokens=10,
                    kl_recompute_targets=kw.get("recompute", False))
        terms = [t for t in (out.loss, out.kl_loss) if t is not None]
        grads = torch.autograd.grad(sum(terms), (model.proj.weight, model.embed.weight))
        return [t.detach() for t in terms], grads

    (lm, kl), fused_grads = terms_and_grads(labels=ids, kl=rows)
    (lm_alone,), lm_grads = terms_and_grads(labels=ids)
    (kl_alone,), kl_grads = terms_and_grads(kl=rows)
    torch.testing.assert_close(lm, lm_alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, kl_alone, rtol=1e-12, atol=1e-12)
    for got, a, b in zip(fused_grads, lm_grads, kl_grads):
        torch.testing.assert_close(got, a + b, rtol=1e-10, atol=1e-12)
    # KL alone (the fused pass with every label ignored) against whole logits, autograd through each op
    log_p = torch.log_softmax(model.logits(model.trunk(ids)[0]).reshape(-1, 64) / 2.0, dim=-1)
    log_q = torch.log_softmax(targets / 2.0, dim=-1)
    reference = F.kl_div(log_p, log_q, log_target=True, reduction="sum") * 2.0**2 / log_p.shape[0]
    reference_grads = torch.autograd.grad(reference, (model.proj.weight, model.embed.weight))
    torch.testing.assert_close(kl_alone, reference.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(kl_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # targets asked again in backward: the same terms and gradients, fused and KL alone
    asked = []
    (lm_r, kl_r), fused_r = terms_and_grads(labels=ids, kl=lambda s, e: asked.append("fused") or rows(s, e),
                                            recompute=True)
    (kl_alone_r,), kl_r_grads = terms_and_grads(kl=lambda s, e: asked.append("alone") or rows(s, e), recompute=True)
    # 48 tokens in chunks of 10: forward and backward; the KL alone has its gradients from the forward
    assert asked == ["fused"] * 10 + ["alone"] * 5
    for got, want in zip((lm_r, kl_r, kl_alone_r, *fused_r, *kl_r_grads), (lm, kl, kl_alone, *fused_grads, *kl_grads)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bad_chunk_is_refused():
    h, w, b, y, focus = case()
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        softcap_cross_entropy_sums(h, w, b, y, focus, cap=CAP, chunk_tokens=0)


def test_the_loss_benchmark_checks_then_times_both_paths(tmp_path, capsys, monkeypatch):
    from model import bench_loss

    out = tmp_path / "loss.json"
    assert bench_loss.main(["--tokens", "64", "--hidden", "8", "--vocab", "40", "--chunk-tokens", "16",
                            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["ms"]) == {"fused", "fused, logits recomputed", "naive chunked (baseline)"}
    assert all(ms > 0 for ms in record["ms"].values())
    assert {"speedup", "grads_in_forward_speedup"} <= set(record)
    printed = capsys.readouterr().out
    assert "fused speedup" in printed and "gradients in forward" in printed
    # with the distillation term: the weighted loss with its gradients from the forward, the same path keeping
    # the targets and recomputing the logits in backward, and the naive one
    assert bench_loss.main(["--tokens", "64", "--hidden", "8", "--vocab", "40", "--chunk-tokens", "16", "--distill",
                            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["ms"]) == {"fused", "fused, logits recomputed", "naive chunked (baseline)"}
    assert {"speedup", "grads_in_forward_speedup"} <= set(record)
    assert "LM + distillation KL: 64 tokens" in capsys.readouterr().out
    calls = []
    fused = bench_loss.softcap_cross_entropy_sums
    monkeypatch.setattr(bench_loss, "softcap_cross_entropy_sums",
                        lambda *a, **kw: calls.append(kw.get("weights")) or fused(*a, **kw))
    assert bench_loss.main(["--tokens", "64", "--hidden", "8", "--vocab", "40", "--chunk-tokens", "16", "--distill",
                            "--repeats", "1", "--warmup", "0", "--device", "cpu"]) == 0
    assert set(calls) == {(1.0, 0.0, 1.0), None}  # the fused path weighs the terms as training does


def test_the_loss_benchmark_keeps_the_first_paths_figure_when_the_second_is_cut_short(tmp_path, monkeypatch):
    from model import bench_loss

    timed = []

    def time_calls(fn, inputs, repeats, warmup, device):
        if timed:
            raise KeyboardInterrupt  # the time limit's SIGINT, during the second path
        timed.append(fn)
        return [3.0]

    monkeypatch.setattr(bench_loss, "time_calls", time_calls)
    out = tmp_path / "loss.json"
    with pytest.raises(KeyboardInterrupt):
        bench_loss.main(["--tokens", "64", "--hidden", "8", "--vocab", "40", "--chunk-tokens", "16",
                         "--device", "cpu", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["ms"] == {"fused": 3.0} and "speedup" not in record
