"""The chunked gated delta rule with its Triton state carry against the fp64 oracle (outputs, final
state, every gradient), the PyTorch loop and the compiled path; the model on every Triton path.
Interpreted tests run in TRITON_INTERPRET=1 children of `test_interpreter_suite` on the CPU."""

from __future__ import annotations

import pytest
import torch

from helpers import F64, assert_same_results, fenced, gated_delta_case, rel_max_err, run_interpreter_tests
from kernels.gated_delta.naive import gated_delta_rule_naive
from kernels.gated_delta.torch_impl import chunk_gated_delta_rule_torch

pytestmark = pytest.mark.nan_poison
interpreted = pytest.mark.interpreter


@pytest.mark.interpreter_driver
def test_interpreter_suite():
    """This file's interpreted tests, in two TRITON_INTERPRET=1 child pytests."""
    run_interpreter_tests(__file__)


def outputs_and_grads(fn, case, cast, *, device="cpu", seed=0, **kw):
    """o, the final state and the gradients of all inputs of `fn` on `case` cast to `cast`, against fixed
    fp64 upstream gradients; the state is left out when the case has none."""
    q, k, v, g, beta, h0 = case
    B, T, H, dv = v.shape
    gen = torch.Generator().manual_seed(seed)
    grad_o = torch.randn(B, T, H, dv, generator=gen, dtype=F64).to(device)
    grad_s = torch.randn(B, H, q.shape[-1], dv, generator=gen, dtype=F64).to(device)
    inputs = (q, k, v, g, beta) + ((h0,) if h0 is not None else ())
    # q, k, v in `cast`; the gates (and the state) in fp32 at least, as the model hands them over.
    leaves = [x.to(device=device, dtype=cast if i < 3 else torch.promote_types(cast, torch.float32)).requires_grad_()
              for i, x in enumerate(inputs)]
    o, s = fn(*leaves[:5], initial_state=leaves[5] if h0 is not None else None, output_final_state=True, **kw)
    grads = torch.autograd.grad((o.double() * grad_o).sum() + (s.double() * grad_s).sum(), leaves)
    return [o, s, *grads]


NAMES = ["o", "state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]

# (B, T, H, dk, dv, chunk): one chunk, T shorter than a chunk, T not a multiple of the chunk, dv
# over two V tiles of the backward, dims below tl.dot's smallest tile, chunk not a power of two.
CASES = [(1, 16, 1, 16, 16, 16), (2, 37, 3, 5, 4, 16), (1, 70, 2, 16, 32, 64), (2, 130, 2, 64, 64, 64),
         (1, 9, 1, 8, 40, 4), (1, 50, 2, 8, 8, 12)]


@interpreted
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("B,T,H,dk,dv,chunk", CASES,
                         ids=[f"B{b}-T{t}-H{h}-K{k}-V{v}-C{c}" for b, t, h, k, v, c in CASES])
def test_interpreted_fp32_matches_oracle(B, T, H, dk, dv, chunk, with_state):
    case = gated_delta_case(B, T, H, dk, dv, seed=T + dk, with_state=with_state)
    ref = outputs_and_grads(gated_delta_rule_naive, case, F64)
    got = outputs_and_grads(chunk_gated_delta_rule_torch, case, torch.float32, chunk_size=chunk, carry="triton")
    for name, a, b in zip(NAMES, got, ref):
        assert a.dtype == torch.float32, name
        assert rel_max_err(a, b) < 2e-6, name


@interpreted
def test_interpreted_bf16_inputs_match_oracle():
    """bf16 q, k, v (the training dtype): o comes back in bf16, the state in fp32; fp32 inside."""
    case = gated_delta_case(2, 100, 2, 32, 32, seed=5)
    rounded = [x.to(torch.bfloat16).to(F64) if i < 3 else x for i, x in enumerate(case)]
    ref = outputs_and_grads(gated_delta_rule_naive, rounded, F64)
    got = outputs_and_grads(chunk_gated_delta_rule_torch, rounded, torch.bfloat16, chunk_size=32, carry="triton")
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for name, a, b in zip(NAMES, got, ref):
        assert rel_max_err(a, b) < 1e-2, name


@interpreted
def test_interpreted_matches_the_torch_carry_eagerly_and_compiled():
    """Same values as the PyTorch loop; compiled (inductor), the chunked path is traced around the carry's op."""
    case = gated_delta_case(2, 90, 2, 16, 24, seed=7)
    loop = outputs_and_grads(chunk_gated_delta_rule_torch, case, torch.float32, chunk_size=32, carry="torch")
    eager = outputs_and_grads(chunk_gated_delta_rule_torch, case, torch.float32, chunk_size=32, carry="triton")
    torch._dynamo.reset()
    compiled_fn = torch.compile(chunk_gated_delta_rule_torch, fullgraph=True)
    compiled = outputs_and_grads(compiled_fn, case, torch.float32, chunk_size=32, carry="triton")
    for name, a, b, c in zip(NAMES, eager, loop, compiled):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(c, a, atol=2e-5, rtol=1e-5, msg=name)
    # The graph calls the carry's op, not the opaque op (with its recomputing backward) of the loop.
    leaves = [x.float() for x in case]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(chunk_gated_delta_rule_torch)(
        *leaves[:5], initial_state=leaves[5], chunk_size=32, carry="triton")
    ops = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
    assert explanation.graph_break_count == 0
    assert "atma.gated_delta_state_fwd.default" in ops and "atma.gated_delta_torch_fwd.default" not in ops


@interpreted
def test_interpreted_dispatch_takes_the_triton_carry_on_the_triton_backend(monkeypatch):
    """ATMA_KERNELS=triton takes the carry, with about-fp32 products for fp32 inputs and TF32 for bf16 ones."""
    import kernels
    from kernels.gated_delta import triton_impl

    calls = []
    original = triton_impl.state_recurrence_triton

    def recording(*args, precision):
        calls.append(precision)
        return original(*args, precision=precision)

    monkeypatch.setattr(triton_impl, "state_recurrence_triton", recording)
    q, k, v, g, beta, h0 = (x.float() for x in gated_delta_case(1, 20, 2, 8, 8, seed=2))
    monkeypatch.setenv("ATMA_KERNELS", "torch")
    o_loop, _ = kernels.gated_delta_rule(q, k, v, g, beta, initial_state=h0, chunk_size=8)
    assert calls == []
    monkeypatch.setenv("ATMA_KERNELS", "triton")
    o_triton, _ = kernels.gated_delta_rule(q, k, v, g, beta, initial_state=h0, chunk_size=8)
    assert calls == ["tf32x3"]
    torch.testing.assert_close(o_triton, o_loop, atol=1e-5, rtol=1e-5)
    half = [x.to(torch.bfloat16) for x in (q, k, v)]
    kernels.gated_delta_rule(*half, g, beta, initial_state=h0, chunk_size=8)
    assert calls == ["tf32x3", "tf32"]
    with pytest.raises(ValueError, match="precision must be one of tf32, tf32x3"):
        original(*(torch.zeros(1, 1, 1, 16, 16) for _ in range(3)), torch.zeros(1, 1, 1, 16, 16),
                 torch.zeros(1, 1, 1, 16, 16), torch.zeros(1, 1, 1), None, precision="ieee")


@interpreted
@pytest.mark.parametrize("with_state", [True, False])
def test_interpreted_op_registration(with_state):
    """atma::gated_delta_state_fwd/_bwd: schema, fake implementation and autograd (torch.library.opcheck)."""
    from kernels.gated_delta.triton_impl import _state_fwd

    gen = torch.Generator().manual_seed(4)
    BH, N, C, K, V = 3, 2, 16, 16, 16

    def rnd(*shape, scale=0.3):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    args = (rnd(BH, N, C, V), rnd(BH, N, C, K), rnd(BH, N, C, K), rnd(BH, N, C, C), rnd(BH, N, C, K),
            torch.rand(BH, N, generator=gen).requires_grad_(), rnd(BH, K, V) if with_state else None, "tf32")
    torch.library.opcheck(_state_fwd, args)


@interpreted
def test_interpreted_op_takes_any_strides():
    """The op's results do not depend on its inputs' memory layout (a compiled caller chooses it)."""
    from kernels.gated_delta.triton_impl import _state_bwd, _state_fwd

    gen = torch.Generator().manual_seed(6)
    BH, N, C, K, V = 2, 3, 16, 16, 32

    def pair(*shape):
        """The same values twice: dense, and as a view with its last two axes' strides swapped."""
        x = torch.randn(*shape, generator=gen) * 0.3
        return x, x.transpose(-1, -2).contiguous().transpose(-1, -2)

    inputs = [pair(BH, N, C, V), pair(BH, N, C, K), pair(BH, N, C, K), pair(BH, N, C, C), pair(BH, N, C, K),
              (torch.rand(BH, N, generator=gen),) * 2, pair(BH, K, V)]
    dense, strided = ([x[i] for x in inputs] for i in (0, 1))
    assert not strided[0].is_contiguous()
    for a, b in zip(_state_fwd(*dense, "tf32"), _state_fwd(*strided, "tf32")):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    o, s_all, u, _ = _state_fwd(*dense, "tf32")
    grad_o = pair(BH, N, C, V)
    saved = [dense[1], dense[2], dense[3], dense[4], dense[5]]
    strided_saved = [strided[1], strided[2], strided[3], strided[4], strided[5]]
    s_all_t = s_all.transpose(-1, -2).contiguous().transpose(-1, -2)
    for a, b in zip(_state_bwd(grad_o[0], None, *saved, s_all, u, "tf32"),
                    _state_bwd(grad_o[1], None, *strided_saved, s_all_t, u, "tf32")):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@interpreted
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_interpreted_op_reads_nothing_outside_its_inputs(precision):
    """Every input of both passes fenced by NaN on both sides (helpers.fenced): the same results bit for bit,
    so no load reaches past an input (on a GPU: garbage or an illegal memory access)."""
    from kernels.gated_delta.triton_impl import _state_bwd, _state_fwd

    gen = torch.Generator().manual_seed(9)
    BH, N, C, K, V = 2, 3, 12, 12, 40  # partial tiles on every axis (16-wide; V in three, the last partial)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.3

    inputs = [rnd(BH, N, C, V), rnd(BH, N, C, K), rnd(BH, N, C, K), rnd(BH, N, C, C), rnd(BH, N, C, K),
              torch.rand(BH, N, generator=gen), rnd(BH, K, V)]
    grad_o, grad_s = rnd(BH, N, C, V), rnd(BH, K, V)

    def run(wrap):
        o, s_all, u, state = _state_fwd(*map(wrap, inputs), precision)
        saved = [wrap(x) for x in (*inputs[1:6], s_all, u)]
        return [o, s_all, u, state, *_state_bwd(wrap(grad_o), wrap(grad_s), *saved, precision)]

    assert_same_results(run(fenced), run(lambda x: x.clone()), f"state carry {precision}")


def test_fp64_keeps_the_loop_and_bad_carry_is_refused():
    """The kernels compute in fp32: fp64 inputs stay on the loop (exact to the oracle) on any backend."""
    q, k, v, g, beta, h0 = gated_delta_case(1, 10, 1, 4, 4, seed=1)
    o, _ = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, chunk_size=4, carry="triton")
    o_ref, _ = gated_delta_rule_naive(q, k, v, g, beta, initial_state=h0)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="carry must be one of torch, triton"):
        chunk_gated_delta_rule_torch(q, k, v, g, beta, carry="cuda")


def test_sizes_beyond_the_checked_launches_keep_the_loop(monkeypatch):
    """Heads over 128 wide, chunks over 64 and "small" GPUs keep the loop; the launch follows the class."""
    from kernels.gated_delta import triton_impl

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert triton_impl.triton_carry_fits(128, 128, 64, cpu)
    assert not triton_impl.triton_carry_fits(256, 128, 64, cpu) and not triton_impl.triton_carry_fits(64, 256, 64, cpu)
    assert not triton_impl.triton_carry_fits(64, 64, 128, cpu)
    for cls, fits in (("large", True), ("mid", True), ("small", False)):
        monkeypatch.setattr(triton_impl, "device_class", lambda device, env_var, cls=cls: cls)
        assert triton_impl.triton_carry_fits(128, 128, 64, gpu) == (fits or triton_impl._INTERPRET), cls
    monkeypatch.setattr(triton_impl, "device_class", lambda device, env_var: "large")
    if not triton_impl._INTERPRET:
        assert triton_impl._launch(gpu) == (32, 8, 1)
    assert triton_impl._launch(cpu) == (16, 4, 1)
    # A 256-wide head takes the loop even when asked for the kernels (which would refuse CPU tensors
    # outside the interpreter).
    q, k, v, g, beta, h0 = (x.float() for x in gated_delta_case(1, 12, 1, 256, 8, seed=3))
    o, _ = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, chunk_size=4, carry="triton")
    o_ref, _ = gated_delta_rule_naive(q.double(), k.double(), v.double(), g.double(), beta.double(),
                                      initial_state=h0.double())
    assert rel_max_err(o, o_ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_fp64_chunked_at_a_training_shape(dtype):
    """atma-378m's memory shape (16 heads of 64, T=2048, chunk 64) against the fp64 chunked path on the GPU."""
    case = gated_delta_case(2, 2048, 16, 64, 64, seed=11)
    rounded = [x.to(dtype).to(F64) if i < 3 else x for i, x in enumerate(case)]
    ref = outputs_and_grads(chunk_gated_delta_rule_torch, rounded, F64, device="cuda", chunk_size=64)
    got = outputs_and_grads(chunk_gated_delta_rule_torch, rounded, dtype, device="cuda", chunk_size=64,
                            carry="triton")
    # fp32 inputs: 3xTF32 products (about fp32); bf16: TF32 products and bf16 inputs and outputs
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(NAMES, got, ref):
        assert rel_max_err(a, b) < tol, name


@interpreted
def test_interpreted_global_block_compiles_whole_with_every_triton_path(monkeypatch):
    """A global block (Polar + memory) on the Triton paths traces as one graph holding the carry's op."""
    from model import AtmaConfig, AtmaForCausalLM

    monkeypatch.setenv("ATMA_KERNELS", "triton")
    torch.manual_seed(0)
    config = AtmaConfig.from_preset("tiny", vocab_size=256, head_dim=16, num_attention_heads=2, num_key_value_heads=1)
    model = AtmaForCausalLM(config).train()
    block = next(b for b in model.blocks if b.is_global)
    x = torch.randn(1, 40, config.hidden_size, requires_grad=True)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block.compute)(x)
    ops = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    assert "atma.gated_delta_state_fwd.default" in ops and "atma.gated_delta_torch_fwd.default" not in ops


@interpreted
def test_interpreted_dispatch_count_of_the_carry_does_not_grow_with_the_chunks():
    """The loop dispatches ops per chunk; the Triton carry's count is the same for 2 and 8 chunks."""
    import argparse

    from kernels import bench

    args = argparse.Namespace(heads=2, head_dim=16)
    short, long = ({r["name"]: r for r in bench.count_memory_ops(args, T, torch.device("cpu"))} for T in (128, 512))
    assert long["memory_torch"]["aten_computing"] > short["memory_torch"]["aten_computing"] + 30
    assert long["memory_triton_carry"]["aten_computing"] == short["memory_triton_carry"]["aten_computing"]
    assert long["memory_triton_carry"]["custom_ops"] == short["memory_triton_carry"]["custom_ops"] == 2


@interpreted
def test_interpreted_fp32_calls_to_the_fla_bridge_take_the_triton_carry(monkeypatch):
    """FLA takes half precision only: its bridge sends fp32 calls to the chunked path with the Triton carry."""
    from kernels.gated_delta import fla_bridge, triton_impl

    calls = []
    original = triton_impl.state_recurrence_triton
    monkeypatch.setattr(triton_impl, "state_recurrence_triton",
                        lambda *a, precision: calls.append(precision) or original(*a, precision=precision))
    monkeypatch.setenv("ATMA_KERNELS", "triton")
    q, k, v, g, beta, h0 = (x.float() for x in gated_delta_case(1, 20, 2, 8, 8, seed=4))
    o, _ = fla_bridge.fla_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    o_ref, _ = gated_delta_rule_naive(*(x.double() for x in (q, k, v, g, beta)), initial_state=h0.double())
    assert calls == ["tf32x3"] and rel_max_err(o, o_ref) < 2e-6


@interpreted
def test_interpreted_model_on_the_triton_paths_equals_the_pytorch_paths(monkeypatch):
    """A tiny model with memory: loss and every gradient agree between ATMA_KERNELS=triton and =torch (fp32)."""
    import kernels.softcap_ce.triton_impl as ce_impl
    from model import AtmaConfig, AtmaForCausalLM

    row_calls = []  # the LM head loss's Triton rows, which the Triton backend takes too
    rows = ce_impl.softcap_ce_rows_triton
    monkeypatch.setattr(ce_impl, "softcap_ce_rows_triton", lambda *a: row_calls.append(a[0].shape) or rows(*a))

    torch.manual_seed(0)
    config = AtmaConfig.from_preset("tiny", vocab_size=256, head_dim=16, num_attention_heads=2, num_key_value_heads=1)
    model = AtmaForCausalLM(config).train()
    with torch.no_grad():  # zero-initialised output projections would hide wrong gradients
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("ATMA_KERNELS", backend)
        model.zero_grad()
        loss = model(ids, ids).loss
        loss.backward()
        results[backend] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
        assert len(row_calls) == 1, row_calls  # once, on the Triton backend only
    (loss_t, grads_t), (loss_p, grads_p) = results["triton"], results["torch"]
    assert loss_t == pytest.approx(loss_p, rel=1e-5)
    memory_grads = [n for n in grads_p if ".mem.w_gamma." in n or ".mem.w_beta." in n]
    assert memory_grads  # the memory's own parameters are among those compared
    for name, grad in grads_p.items():
        assert rel_max_err(grads_t[name], grad) < 1e-3, name
