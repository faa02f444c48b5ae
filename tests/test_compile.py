"""Per-block torch.compile: graph breaks per block for every core, with and without memory; one graph per
block kind over the whole model; compiled and eager training steps agree (the DeepSpeed ZeRO-3 run
with inductor is in test_pretrain_distributed.py)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from model import AtmaConfig, AtmaForCausalLM

CORES = [(core, memory) for core in ("polar", "nope", "rope") for memory in (True, False)]
# Graph breaks inside one block's compute: the custom ops keep every kernel path in the graph.
EXPECTED_BREAKS_PER_BLOCK = 0


def tiny_model(core: str, memory: bool, **overrides) -> AtmaForCausalLM:
    torch.manual_seed(0)
    config = AtmaConfig.from_preset("tiny", vocab_size=256, core=core, memory=memory, **overrides)
    model = AtmaForCausalLM(config).train()
    with torch.no_grad():  # zero-initialised output projections would hide wrong gradients
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("core,memory", CORES, ids=[f"{c}-{'mem' if m else 'nomem'}" for c, m in CORES])
def test_graph_breaks_per_block(core, memory):
    model = tiny_model(core, memory, num_random_keys=4)
    x = torch.randn(2, 24, model.config.hidden_size, requires_grad=True)
    kinds = {block.is_global: block for block in model.blocks}
    assert set(kinds) == {True, False}
    for block in kinds.values():
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(block.compute)(x)
        assert explanation.graph_break_count == EXPECTED_BREAKS_PER_BLOCK, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("checkpointing", ["none", "all"])
def test_one_graph_per_block_kind_and_same_step_as_eager(checkpointing):
    eager = tiny_model("polar", True)
    compiled = tiny_model("polar", True)
    for model in (eager, compiled):
        model.set_activation_checkpointing(checkpointing)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled.compile_blocks(backend=counter)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (eager, compiled):
        loss = model(ids, ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    # 4 blocks of 2 kinds: one graph per kind, none per block instance (recomputation reuses them).
    assert counter.frame_count == 2
    # fp32: the traced graph may order a reduction differently, so a few ulps apart at most.
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_a_compiled_teacher_gives_the_eager_teachers_targets(tmp_path):
    from pretrain.compilation import dynamo_summary
    from pretrain.teacher import Teacher

    tiny_model("polar", True).save_pretrained(str(tmp_path / "teacher"))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    targets = {}
    torch._dynamo.reset()
    before = dynamo_summary()
    for compiled in (False, True):
        teacher = Teacher(str(tmp_path / "teacher"), device=torch.device("cpu"), dtype=torch.float32,
                          vocab_size=256, compile_blocks=compiled)
        assert teacher.compiled == compiled
        targets[compiled] = teacher.target_rows(ids)(0, ids.numel())
    # the teacher's two block kinds ran compiled (inductor), under no_grad
    after = dynamo_summary()
    assert (after["graphs"] - before["graphs"], after["graph_breaks"] - before["graph_breaks"]) == (2, 0)
    assert targets[True].shape == (ids.numel(), 256)
    torch.testing.assert_close(targets[True], targets[False], rtol=1e-5, atol=1e-5)


def test_an_activation_memory_budget_recomputes_inside_the_compiled_blocks():
    """Blocks compiled with an activation memory budget keep fewer tensors for the backward and train the same;
    each model keeps its own budget, although Dynamo shares a graph between models compiled alike."""
    from pretrain.compilation import memory_budget_backend

    torch._dynamo.reset()
    models = {}
    for budget in (1.0, 0.0):
        models[budget] = tiny_model("polar", True)
        models[budget].compile_blocks(**({"backend": memory_budget_backend(budget)} if budget < 1 else {}))
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    saved, losses = {}, {}
    for budget in (1.0, 0.0, 1.0):  # the first model again, after the second one compiled
        kept = []
        models[budget].zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = models[budget](ids, ids).loss
        loss.backward()
        saved.setdefault(budget, set()).add(sum(kept))
        losses.setdefault(budget, []).append(loss.item())
    assert len(saved[1.0]) == 1, saved  # the same partition both times
    (full,), (least,) = saved[1.0], saved[0.0]
    assert least < 0.6 * full, saved
    assert losses[0.0][0] == pytest.approx(losses[1.0][0], rel=1e-6)
    assert losses[1.0][1] == losses[1.0][0]
    # fp32: the recomputation may order a reduction differently, so a few ulps apart at most
    for (name, p), q in zip(models[0.0].named_parameters(), models[1.0].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)
