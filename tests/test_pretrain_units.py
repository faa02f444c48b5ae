"""Single-process pieces of pretraining: batch plan, schedules, parameter groups, loss terms, FLOPs."""

import argparse
import dataclasses
import glob
import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from helpers import ROOT, with_live_weights
from model import AtmaConfig, AtmaForCausalLM
from pretrain.config import ConfigError, load_run_config
from pretrain.flops import forward_flops_per_token, peak_flops_for, train_flops_per_token
from pretrain.losses import LossWeights, combine_losses, signature_loss
from pretrain.optim import build_param_groups, lr_multiplier
from pretrain.trainer import padded_vocab, plan_batch


# The shipped DeepSpeed JSONs that shard (ZeRO-1/2/3), each of which accumulates and reduces bf16 gradients in fp32.
SHARDED_BF16_JSONS = ("zero1_bf16.json", "zero2_bf16.json", "zero3_bf16.json", "zero3_muon_bf16.json",
                      "zero3_offload_bf16.json")


def shipped_ds(name: str) -> dict:
    """A shipped DeepSpeed JSON (`ds_configs/NAME`), parsed."""
    with open(os.path.join(ROOT, "ds_configs", name)) as f:
        return json.load(f)


# ---------------------------------------------------------------------- batch plan
def test_batch_plan_derives_accumulation():
    plan = plan_batch(4096, 4, 256, 2)
    assert plan.grad_accum == 2 and plan.tokens_per_step == 4096
    assert plan_batch(4096, 4, 256, 1).grad_accum == 4
    with pytest.raises(ConfigError, match="not a multiple"):
        plan_batch(4096, 3, 256, 2)


def test_padded_vocab():
    assert padded_vocab(50257, 128) == 50304
    assert padded_vocab(8192, 128) == 8192


# ---------------------------------------------------------------------- schedules
def sched(**kw):
    cfg = load_run_config(None, ["data.dir=d"] + [f"schedule.{k}={v}" for k, v in kw.items()])
    return cfg.schedule


def test_paper_schedule_is_flat_then_linear_to_zero():
    s = sched(kind="paper", flat_fraction=0.3)
    total = 1000
    assert lr_multiplier(0, total, s) == 1.0 and lr_multiplier(299, total, s) == 1.0
    assert math.isclose(lr_multiplier(300, total, s), 1.0)
    assert math.isclose(lr_multiplier(650, total, s), 0.5)
    assert math.isclose(lr_multiplier(1000, total, s), 0.0, abs_tol=1e-12)


def test_cosine_and_wsd_schedules():
    c = sched(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert math.isclose(lr_multiplier(0, 110, c), 0.1) and math.isclose(lr_multiplier(9, 110, c), 1.0)
    assert math.isclose(lr_multiplier(10, 110, c), 1.0)
    assert math.isclose(lr_multiplier(60, 110, c), 0.55)
    assert math.isclose(lr_multiplier(110, 110, c), 0.1)
    w = sched(kind="wsd", warmup_steps=0, decay_start_fraction=0.8, min_lr_ratio=0.0)
    assert lr_multiplier(79, 100, w) == 1.0
    assert math.isclose(lr_multiplier(90, 100, w), 0.5)


# ---------------------------------------------------------------------- parameter groups
def test_muon_groups_follow_the_project_partition():
    model = AtmaForCausalLM(AtmaConfig.from_preset("tiny"))
    cfg = load_run_config("pretrain/configs/atma-378m.yaml", ["data.dir=d"]).optim
    groups = {g["name"]: g for g in build_param_groups(model, cfg)}
    params = dict(model.named_parameters())
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert id(params["blocks.0.attn.in_proj.weight"]) in ids["matrix"] and groups["matrix"]["use_muon"]
    assert id(params["blocks.2.attn.v_null"]) in ids["matrix"]
    assert id(params["blocks.0.attn.conv.weight"]) in ids["conv"] and not groups["conv"]["use_muon"]
    assert id(params["blocks.2.attn.canon_q.weight"]) in ids["conv"]
    assert id(params["embed.weight"]) in ids["embed"] and groups["embed"]["lr"] == 0.3
    assert id(params["proj.weight"]) in ids["head"] and groups["head"]["lr"] == 0.003125
    assert id(params["proj.bias"]) in ids["scalar"] and id(params["blocks.2.attn.null_base"]) in ids["scalar"]
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(params)  # exact and disjoint


# ---------------------------------------------------------------------- loss terms
def tiny_model():
    torch.manual_seed(0)
    return with_live_weights(AtmaForCausalLM(AtmaConfig.from_preset("tiny", vocab_size=256, num_random_keys=8)))


def grads_for(model, ids, weights: LossWeights, *, sig_mode="weak", seed=7):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(ids, ids, output_hidden_states=True)
    terms = {"lm": out.loss, "sig": signature_loss(out.hidden_states, sig_mode, 16), "distractor": out.align_loss}
    combine_losses(terms, weights).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("term", ["sig", "distractor"])
def test_loss_term_weight_scales_its_gradient(term):
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 24))
    base = grads_for(model, ids, LossWeights(lm=1.0))
    off = grads_for(model, ids, LossWeights(lm=1.0, **{term: 0.0}))
    assert torch.equal(base, off)
    w1 = grads_for(model, ids, LossWeights(lm=1.0, **{term: 0.5}))
    w2 = grads_for(model, ids, LossWeights(lm=1.0, **{term: 1.0}))
    assert not torch.allclose(w1, base)
    # Linear in the weight: g(1.0) - g(0) == 2 (g(0.5) - g(0)).
    torch.testing.assert_close(w2 - base, 2 * (w1 - base), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["weak", "discrete", "strong", "zipfian"])
def test_signature_modes_are_finite_and_differentiable(mode):
    torch.manual_seed(0)
    h = [torch.randn(2, 16, 32, requires_grad=True) for _ in range(3)]
    loss = signature_loss(h, mode, sketch_dim=8)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in h)
    assert signature_loss(h, "baseline").item() == 0.0


def test_weak_signature_is_zero_for_whitened_input():
    # Columns already white and D <= k: the covariance is the identity, so the loss vanishes.
    n, d = 4096, 4
    x = torch.randn(n, d, dtype=torch.float64)
    x = x - x.mean(0)
    chol = torch.linalg.cholesky(x.T @ x / (n - 1 + 1e-6))
    x = x @ torch.linalg.inv(chol).T
    # fp32 arithmetic inside the regularizer: zero up to rounding.
    assert signature_loss([x[None]], "weak", sketch_dim=8).item() < 1e-5
    assert signature_loss([2 * x[None]], "weak", sketch_dim=8).item() > 1.0


def test_distillation_from_identical_teacher_is_zero_and_weight_scales():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        hidden = model.trunk(ids)[0].reshape(-1, model.config.hidden_size)
    same = lambda s, e: model.logits(hidden[s:e])  # noqa: E731
    out = model(ids, ids, kl_targets=same)
    assert abs(out.kl_loss.item()) < 1e-6
    other = lambda s, e: torch.randn(e - s, 256, generator=torch.Generator().manual_seed(s))  # noqa: E731
    out = model(ids, ids, kl_targets=other, loss_chunk_tokens=7)
    assert out.kl_loss.item() > 0.1
    (g_kl,) = torch.autograd.grad(out.kl_loss, model.proj.weight)
    assert g_kl.abs().sum() > 0
    terms = {"lm": out.loss, "distill": out.kl_loss}
    torch.testing.assert_close(combine_losses(terms, LossWeights(lm=1.0, distill=0.0)), out.loss)


class ListTeacher:
    """Stands in for a teacher: fixed random target logits (`logits`, else drawn per call), recording the
    rows it is asked for."""

    def __init__(self, asked, logits=None):
        self.asked, self.logits = asked, logits

    def target_rows(self, input_ids):
        logits = self.logits
        if logits is None:
            logits = torch.randn(input_ids.numel(), 256, generator=torch.Generator().manual_seed(4))
        return lambda s, e: self.asked.append((s, e)) or logits[s:e]


def test_the_training_step_asks_the_teacher_once_per_chunk_and_keeps_no_targets():
    """LM + distillation: the head's terms are one weighted loss whose gradients the forward computes, so the
    teacher is asked once per chunk, nothing waits for the backward, and the logged terms carry no graph."""
    from pretrain.config import LossSection
    from pretrain.step import TrainStep

    model = tiny_model()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    asked = []
    loss = LossSection(distill_weight=0.5, teacher="t", loss_chunk_tokens=16)
    step = TrainStep(model, grad_accum=1, loss=loss, nan_policy="stop", device=torch.device("cpu"),
                     teacher=ListTeacher(asked))
    assert step.head_weights() == (1.0, 0.0, 0.5)
    terms, head = step.forward_terms(ids, ids)
    assert len(asked) == 3  # 40 tokens in chunks of 16
    assert set(terms) == {"lm", "distill"} and not any(t.requires_grad for t in terms.values())
    assert head.grad_fn.kept == []  # the teacher's targets are not kept for the backward
    combine_losses(terms, step.weights, head).backward()
    assert len(asked) == 3 and model.proj.weight.grad.abs().sum() > 0


def test_distill_recompute_is_accepted_with_a_warning():
    from pretrain.config import LossSection

    with pytest.warns(UserWarning, match="loss.distill_recompute changes nothing"):
        LossSection(distill_weight=1.0, teacher="t", distill_recompute=True)


@pytest.mark.parametrize("weights", [
    LossWeights(lm=1.0, distill=0.5), LossWeights(lm=0.7, copy=2.0), LossWeights(lm=1.0, copy=1.5, distill=0.3),
    LossWeights(lm=0.0, copy=1.0, distill=0.4),
], ids=["lm+distill", "lm+copy", "lm+copy+distill", "copy+distill"])
def test_the_head_loss_with_gradients_from_the_forward_equals_the_terms_weighted_one_by_one(weights):
    """The training step's weighted head loss (its gradients computed in the forward) gives the same total
    and the same gradient of every parameter as the model's terms weighted and summed by autograd."""
    from pretrain.config import LossSection
    from pretrain.step import TrainStep

    model = tiny_model().double()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    ids[:, 12:18] = ids[:, 2:8]  # repeats, so the copy term's focus mask selects tokens
    loss = LossSection(lm_weight=weights.lm, copy_weight=weights.copy, distill_weight=weights.distill,
                       teacher="t" if weights.distill else None, loss_chunk_tokens=16, copy_context=2)
    logits = torch.randn(48, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    teacher = ListTeacher([], logits) if weights.distill else None
    step = TrainStep(model, grad_accum=1, loss=loss, nan_policy="stop", device=torch.device("cpu"), teacher=teacher)
    assert step.head_weights() is not None
    results = []
    for head_weights in (step.head_weights(), None):
        step.head_weights = lambda: head_weights
        model.zero_grad()
        terms, head = step.forward_terms(ids, ids)
        assert (head is None) == (head_weights is None)
        assert weights.copy == 0 or terms["copy"] > 0  # the focus mask selects tokens
        total = combine_losses(terms, step.weights, head)
        total.backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}))
    (total, grads), (total_ref, grads_ref) = results
    torch.testing.assert_close(total, total_ref, rtol=1e-12, atol=1e-12)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=name)


class RecordingEngine:
    """Stands in for the DeepSpeed engine around a model: records backward (with its loss), the host read
    of the step's reduced values and step, in order."""

    def __init__(self, model, events):
        self.model, self.events = model, events

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def backward(self, loss):
        self.events.append(("backward", loss.item()))

    def step(self):
        self.events.append(("step", None))

    def was_step_applied(self):
        return not any(kind == "backward" and value != value for kind, value in self.events)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_the_step_reads_its_reduced_values_after_the_last_backward_and_poisons_a_bad_step(monkeypatch, policy):
    from pretrain import step as step_module
    from pretrain.config import LossSection
    from pretrain.step import NonFiniteStep, TrainStep

    events = []
    monkeypatch.setattr(step_module.dist, "all_reduce", lambda t: None)
    monkeypatch.setattr(step_module.dist, "get_world_size", lambda: 1)
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: events.append(("read", t.numel())) or tolist(t))
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    batches = iter([{"input_ids": ids, "labels": ids}] * 4)
    step = TrainStep(RecordingEngine(tiny_model(), events), grad_accum=2, loss=LossSection(), nan_policy=policy,
                     device=torch.device("cpu"))
    outcome = step.run(batches)
    assert [kind for kind, _ in events] == ["backward", "step", "backward", "read", "step"]
    assert outcome.applied and not outcome.non_finite and all(v == v for _, v in events[:3:2])
    events.clear()
    # A NaN in the first micro-batch: the last micro-batch's loss is made NaN too, before its backward
    # (skip: DeepSpeed then discards the step), or the step stops before the optimizer (stop).
    if policy == "stop":
        with pytest.raises(NonFiniteStep, match="non-finite loss"):
            step.run(batches, inject_nan=True)
        assert [kind for kind, _ in events] == ["backward", "step", "backward", "read"]
    else:
        outcome = step.run(batches, inject_nan=True)
        assert [kind for kind, _ in events] == ["backward", "step", "backward", "read", "step"]
        assert not outcome.applied and outcome.non_finite
    losses = [value for kind, value in events if kind == "backward"]
    assert len(losses) == 2 and all(v != v for v in losses)


def test_all_zero_weights_rejected():
    with pytest.raises(ValueError, match="zero"):
        combine_losses({"lm": torch.tensor(1.0)}, LossWeights(lm=0.0))


# ---------------------------------------------------------------------- FLOPs
def test_flops_per_token_counts_every_component():
    cfg = AtmaConfig.from_preset("atma-378m")
    parts = forward_flops_per_token(cfg, 2048)
    assert all(v > 0 for v in parts.values())
    n_params = 378_220_864
    # Matmul FLOPs dominate: forward is close to 2 x non-embedding parameters plus attention.
    assert 2 * (n_params - 51_511_296) * 0.95 < sum(parts.values()) < 2 * n_params * 1.3
    assert train_flops_per_token(cfg, 4096) > train_flops_per_token(cfg, 2048)
    no_mem = AtmaConfig.from_preset("atma-378m", memory=False)
    assert forward_flops_per_token(no_mem, 2048)["memory"] == 0
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops_for("Quadro") is None


# ---------------------------------------------------------------------- checkpoint bookkeeping
def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
    from pretrain import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        tag = root / ckpt.tag_for(step)
        tag.mkdir(parents=True)
        (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"partial")
        if complete:
            (tag / ckpt.COMPLETE).write_text(f"{step}\n")
    assert ckpt.complete_tags(str(root)) == ["step_00000004", "step_00000008"]
    assert ckpt.find_resume(str(root), "auto").endswith("step_00000008")
    assert ckpt.find_resume(str(root), "none") is None
    assert ckpt.find_resume(str(root), str(root / "step_00000004")).endswith("step_00000004")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.find_resume(str(root), str(root / "step_00000012"))
    assert ckpt.remove_incomplete(str(root)) == ["step_00000012"]
    assert not (root / "step_00000012").exists() and (root / "step_00000008").exists()


def test_a_damaged_checkpoint_is_refused_with_the_previous_complete_one(tmp_path):
    from pretrain import checkpoint as ckpt
    from pretrain.trainer import check_loadable

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        tag = root / ckpt.tag_for(step)
        tag.mkdir(parents=True)
        for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "rank_state_00000.pt"):
            torch.save({"step": step, "weights": torch.zeros(1000)}, tag / name)
        (tag / ckpt.COMPLETE).write_text(f"{step}\n")
    states = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    (root / "step_00000006" / states).write_bytes(b"")
    data = (root / "step_00000004" / states).read_bytes()
    (root / "step_00000004" / states).write_bytes(data[: len(data) // 2])
    assert ckpt.damaged_files(str(root / "step_00000002")) == []
    assert ckpt.damaged_files(str(root / "step_00000006")) == [str(root / "step_00000006" / states)]
    with pytest.raises(ConfigError) as info:
        check_loadable(str(root / "step_00000006"))
    # The cut-short step 4 is passed over.
    assert str(info.value) == (
        f"{root / 'step_00000006' / states}: empty or cut short, so checkpoint {root / 'step_00000006'} cannot be "
        f"loaded; resume from the previous complete checkpoint with --resume {root / 'step_00000002'}, or pass "
        "--resume none to start over")
    (root / "step_00000002" / "rank_state_00000.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"step_00000004/zero_pp_rank_0_mp_rank_00_model_states.pt: empty or cut "
                                          r"short, .*; there is no earlier complete checkpoint: pass --resume none"):
        check_loadable(str(root / "step_00000004"))


def test_a_checkpoint_file_changed_after_saving_is_refused(tmp_path):
    import torch.utils.serialization

    from pretrain import checkpoint as ckpt
    from pretrain.trainer import check_loadable

    root = tmp_path / "checkpoints"
    states = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    weights = torch.full((1000,), 1.5)
    for step in (2, 4):
        tag = root / ckpt.tag_for(step)
        tag.mkdir(parents=True)
        for name in ("rank_state_00000.pt", states):
            torch.save({"step": step, "weights": weights}, tag / name)
        (tag / ckpt.COMPLETE).write_text(f"{step}\n")
    path = root / "step_00000004" / states
    data = bytearray(path.read_bytes())
    data[data.find(weights.numpy().tobytes()) + 2001] ^= 0x10  # one bit of one weight
    path.write_bytes(bytes(data))
    # torch.load takes it without a word: the weight has changed.
    assert not torch.equal(torch.load(path)["weights"], weights)
    assert ckpt.damaged_files(str(path.parent)) == []
    assert ckpt.corrupt_files(str(path.parent)) == [str(path)]
    assert ckpt.corrupt_files(str(root / "step_00000002")) == []
    # Ranks split the (sorted) files: the model states are the second of two.
    assert ckpt.corrupt_files(str(path.parent), (0, 2)) == []
    assert ckpt.corrupt_files(str(path.parent), (1, 2)) == [str(path)]
    with pytest.raises(ConfigError) as info:
        check_loadable(str(path.parent))
    assert str(info.value) == (
        f"{path}: its data does not match the checksums stored when it was saved (the file was changed or damaged "
        f"since), so checkpoint {path.parent} cannot be loaded; resume from the previous complete checkpoint with "
        f"--resume {root / 'step_00000002'}, or pass --resume none to start over")
    # A file written without checksums (torch's compute_crc32 off) has nothing to compare against.
    before = torch.utils.serialization.config.save.compute_crc32
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"weights": weights}, root / "step_00000002" / states)
    finally:
        torch.serialization.set_crc32_options(before)
    assert ckpt.corrupt_files(str(root / "step_00000002")) == []


def test_a_run_resumed_at_or_past_its_max_steps_says_there_is_nothing_to_train():
    from types import SimpleNamespace

    from pretrain.trainer import Trainer

    lines = []
    monitor = SimpleNamespace(print=lines.append, close=lambda: lines.append("closed"))
    trainer = SimpleNamespace(cfg=load_run_config(None, ["data.dir=d", "train.max_steps=2"]), step=4,
                              resume_from="runs/x/checkpoints/step_00000004", monitor=monitor)
    assert Trainer.train(trainer) == {} and trainer.stopped is False
    assert lines == ["closed", "[atma] nothing to train: runs/x/checkpoints/step_00000004 is at step 4 and "
                     "train.max_steps is 2; pass a larger --max-steps to train further"]


def test_ds_config_filled_from_run_config():
    from pretrain.trainer import build_ds_config

    cfg = load_run_config("pretrain/configs/tiny-cpu.yaml", ["data.dir=d"])
    ds = build_ds_config(cfg, plan_batch(4096, 4, 256, 2), device_type="cpu")
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": False}  # fp32 on the CPU
    assert build_ds_config(cfg, plan_batch(4096, 4, 256, 2), device_type="cuda")["bf16"] == {"enabled": True}
    # DeepSpeed's throughput timer would synchronise the device at each micro-batch: off unless the JSON asks for it
    assert ds["timers"] == {"throughput": {"enabled": False}}
    timed = build_ds_config(cfg, plan_batch(4096, 4, 256, 2), device_type="cuda",
                            overrides={"timers.throughput.enabled": True, "timers.throughput.synchronized": False})
    assert timed["timers"] == {"throughput": {"enabled": True, "synchronized": False}}
    muon = load_run_config("pretrain/configs/atma-378m.yaml", ["data.dir=d"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped Muon config asks for no clip, so nothing to warn about
        ds = build_ds_config(muon, plan_batch(524288, 16, 2048, 2), device_type="cuda")
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["reduce_scatter"] is False
    clipped = load_run_config("pretrain/configs/atma-378m.yaml", ["data.dir=d", "optim.grad_clip=1.0"])
    with pytest.warns(UserWarning, match="Muon"):
        ds = build_ds_config(clipped, plan_batch(524288, 16, 2048, 2), device_type="cuda")
    assert ds["gradient_clipping"] == 0.0
    bad = load_run_config(None, ["data.dir=d", "optim.name=muon", "deepspeed_config=ds_configs/zero3_bf16.json"])
    with pytest.raises(ConfigError, match="reduce_scatter"):
        build_ds_config(bad, plan_batch(4096, 4, 256, 2), device_type="cpu")
    # one rank reduces gradients in place anyway, which is what Muon needs
    assert build_ds_config(bad, plan_batch(4096, 4, 256, 1), device_type="cpu")["zero_optimization"][
        "reduce_scatter"] is False


def test_ds_config_overrides_are_set_over_the_json_and_checked_like_it():
    from pretrain.trainer import build_ds_config

    cfg = load_run_config(None, ["data.dir=d", "deepspeed_config=ds_configs/zero3_bf16.json"])
    plan = plan_batch(4096, 4, 256, 1)
    ds = build_ds_config(cfg, plan, device_type="cpu", overrides={
        "zero_optimization.overlap_comm": False, "zero_optimization.offload_optimizer.device": "cpu"})
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] is False and zero["offload_optimizer"] == {"device": "cpu"}
    assert zero["reduce_bucket_size"] == 50_000_000 and zero["stage"] == 3  # the rest of the file is kept
    for overrides, message in (
            ({"zero_optimization.overlap_comms": False}, "zero_optimization.overlap_comms: unknown key"),
            ({"steps_per_prin": 5}, "steps_per_prin: unknown key .*did you mean 'steps_per_print'"),
            ({"gradient_clipping": 1.0}, "gradient_clipping: set from the run config"),
            ({"bf16.enabled": False}, "bf16.enabled: set from the run config"),
            ({"zero_optimization.stage.x": 1}, "zero_optimization.stage is not a JSON object"),
            ({"zero_optimization.reduce_bucket_size": -1}, "zero_optimization.reduce_bucket_size: .*got -1")):
        with pytest.raises(ConfigError, match="^--ds-variant v1: " + message):
            build_ds_config(cfg, plan, device_type="cpu", overrides=overrides, overrides_source="--ds-variant v1")
    # Overrides come before the run config's own rules, which still apply to them.
    muon = load_run_config("pretrain/configs/atma-378m.yaml", ["data.dir=d"])
    with pytest.raises(ConfigError, match="Muon under ZeRO-3 needs zero_optimization.reduce_scatter = false"):
        build_ds_config(muon, plan, device_type="cuda", overrides={"zero_optimization.reduce_scatter": True})


def test_bf16_gradients_accumulate_in_fp32_where_deepspeed_can_and_a_warning_says_where_not(tmp_path):
    from pretrain.accumulation import accumulation_dtype
    from pretrain.trainer import build_ds_config

    for name in SHARDED_BF16_JSONS:
        assert accumulation_dtype(shipped_ds(name)) == torch.float32, name

    def build(ds: dict, micro_batches: int = 4, run: tuple = (), overrides: dict | None = None) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"bf16": {"enabled": True}, **ds}))
        cfg = load_run_config(None, ["data.dir=d", f"deepspeed_config={path}", *run])
        return build_ds_config(cfg, plan_batch(256 * micro_batches, 1, 256, 1), device_type="cuda",
                               overrides=overrides)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(shipped_ds("zero3_bf16.json"))  # fp32: nothing to say
        build({"zero_optimization": {"stage": 0}}, micro_batches=1)  # one micro-batch: nothing added
        build({"zero_optimization": {"stage": 0}}, run=["train.precision=fp32"])  # fp32 weights
    with pytest.warns(UserWarning, match="gradients of 4 micro-batches are added in bf16.*ZeRO-1/2/3 with "
                                         "data_types.grad_accum_dtype fp32"):
        build({"zero_optimization": {"stage": 0}})
    with pytest.warns(UserWarning, match="ds.json with overrides: the gradients of 4 micro-batches are added in "
                                         "bf16.*set data_types.grad_accum_dtype to fp32"):
        build({"zero_optimization": {"stage": 3}, "data_types": {"grad_accum_dtype": "fp32"}},
              overrides={"data_types.grad_accum_dtype": "bf16"})
    # DeepSpeed 0.19 refuses fp32 accumulation of bf16 weights without ZeRO from deep inside its engine.
    with pytest.raises(ConfigError, match="grad_accum_dtype 'fp32' needs ZeRO stage 1, 2 or 3.*bfloat16"):
        build({"zero_optimization": {"stage": 0}, "data_types": {"grad_accum_dtype": "fp32"}})
    with pytest.raises(ConfigError, match=r"ds.json: data_types.grad_accum_dtype 'fp23' is not a dtype DeepSpeed "
                                          r"reads \(one of .*'fp32'"):
        build({"zero_optimization": {"stage": 3}, "data_types": {"grad_accum_dtype": "fp23"}})
    with pytest.raises(ConfigError, match="ds.json: data_types must be a JSON object, got 'fp32'"):
        build({"zero_optimization": {"stage": 3}, "data_types": "fp32"})


def test_bf16_gradients_are_summed_over_the_ranks_in_fp32_as_shipped_and_a_bad_dtype_is_one_line(tmp_path):
    from pretrain.accumulation import communication_dtype
    from pretrain.trainer import build_ds_config

    for name in SHARDED_BF16_JSONS:
        assert communication_dtype(shipped_ds(name)) == torch.float32, name
    # DeepSpeed's default: the weights' dtype.
    assert communication_dtype(shipped_ds("zero0_bf16.json")) == torch.bfloat16
    assert communication_dtype({}) == torch.float32
    assert communication_dtype({"communication_data_type": "BF16"}) == torch.bfloat16  # DeepSpeed lower-cases it
    path = tmp_path / "ds.json"
    for value, shown in (("fp23", "'fp23'"), (32, "32")):
        path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "communication_data_type": value}))
        cfg = load_run_config(None, ["data.dir=d", f"deepspeed_config={path}"])
        with pytest.raises(ConfigError, match=f"ds.json: communication_data_type {shown} is not a dtype DeepSpeed "
                                              r"reduces in \(one of 'fp32', 'bf16', 'fp16'\)"):
            build_ds_config(cfg, plan_batch(256, 1, 256, 1), device_type="cuda")
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_run_config(None, ["data.dir=d", f"deepspeed_config={path}"])
    with pytest.raises(ConfigError, match="--ds-variant v1: communication_data_type 'half' is not a dtype"):
        build_ds_config(cfg, plan_batch(256, 1, 256, 1), device_type="cuda",
                        overrides={"communication_data_type": "half"}, overrides_source="--ds-variant v1")


def test_zero3_on_one_rank_keeps_parameters_gathered_only_where_that_is_safe(monkeypatch):
    from pretrain import one_rank

    class Optimizer:  # the parts of DeepSpeed's ZeRO-3 optimizer that the change reads and replaces
        def __init__(self, ranks, **settings):
            self.persistent_parameters, self.dp_process_group = ["whole"], ranks
            self.offload_param = self.offload_optimizer = False
            self.__dict__.update(settings)
            self.seen = []

        def _partition_all_parameters(self):
            self.seen.append("released")

        def step(self, closure=None):
            self._partition_all_parameters()
            self.seen.append(("gathered back", list(self.persistent_parameters)))

    class Engine:
        def __init__(self, ranks=1, stage=3, persist=True, **settings):
            self.optimizer, self.stage = Optimizer(ranks, **settings), stage
            self.module = torch.nn.Linear(2, 2)
            for p in self.module.parameters():
                p.ds_persist = persist

        def zero_optimization_stage(self):
            return self.stage

    monkeypatch.setattr(one_rank.dist, "get_world_size", lambda group: group)
    ds = {"zero_optimization": {"stage": 3}}
    engine = Engine()
    assert one_rank.keep_parameters_gathered(engine, ds)
    engine.optimizer.step()
    assert engine.optimizer.seen == [("gathered back", [])]  # neither released nor gathered back
    assert engine.optimizer.persistent_parameters == ["whole"] and "_partition_all_parameters" not in vars(
        engine.optimizer)  # both restored after the step, for DeepSpeed's checkpoint loads and saves
    unchanged = [
        (Engine(ranks=2), ds), (Engine(stage=2), ds), (Engine(persist=False), ds),
        (Engine(offload_param=True), ds), (Engine(offload_optimizer=True), ds),
        (Engine(), {"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}),
        (Engine(), {"zero_optimization": {"stage": 3}, "compile": {"deepcompile": True}}),
    ]
    for engine, config in unchanged:
        assert not one_rank.keep_parameters_gathered(engine, config)
        engine.optimizer.step()
        assert engine.optimizer.seen == ["released", ("gathered back", ["whole"])]
    # A gathered parameter that is a copy of its partition would miss the update: DeepSpeed's step takes over.
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    engine = Engine()
    weight, bias = engine.module.weight, engine.module.bias
    for p in (weight, bias):
        p.ds_status, p.ds_tensor = ZeroParamStatus.AVAILABLE, p.data.view(-1)
    assert one_rank.keep_parameters_gathered(engine, ds)
    engine.optimizer.step()
    assert engine.optimizer.seen == [("gathered back", [])]
    bias.ds_tensor = bias.data.clone()
    with pytest.warns(RuntimeWarning, match="1 gathered parameter.s. are not views of their ZeRO-3 partition"):
        engine.optimizer.step()
    engine.optimizer.step()
    assert engine.optimizer.seen[1:] == 2 * ["released", ("gathered back", ["whole"])]
    assert "step" not in vars(engine.optimizer)
    engine = Engine()
    del Optimizer._partition_all_parameters  # a DeepSpeed whose optimizer is laid out otherwise
    with pytest.warns(UserWarning, match="lacks _partition_all_parameters: ZeRO-3 on one rank releases and gathers"):
        assert not one_rank.keep_parameters_gathered(engine, ds)


def test_zero3_on_one_rank_moves_each_gradient_into_its_partition_where_that_is_deepspeeds_result(monkeypatch):
    from pretrain import one_rank

    class Stream:
        def __init__(self):
            self.waited = []

        def wait_stream(self, stream):
            self.waited.append(stream)

    class Optimizer:  # the parts of DeepSpeed's ZeRO-3 optimizer that the change reads and replaces
        def __init__(self, params, ranks=1, **settings):
            self.fp16_groups, self.dp_process_group = [params[:1], params[1:]], ranks
            self.offload_param = self.offload_optimizer = self.zenflow = self._coalesce_grad_reduction = False
            self.postscale_gradients, self.gradient_predivide_factor, self.sequence_parallel_size = True, 1.0, 1
            self.micro_step_id, self.gradient_accumulation_dtype = 0, torch.float32
            self.comm_dtype, self.reduce_and_partition_stream = torch.bfloat16, Stream()
            self.__dict__.update(settings)
            flat = torch.zeros(sum(p.numel() for p in params))
            sizes = [p.numel() for p in params]
            self._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition = {
                p.ds_id: part for p, part in zip(params, flat.split(sizes))}
            self.flat, self.seen = flat, []

        def reduce_ready_partitions_and_remove_grads(self, param):
            self.seen.append(("bucket", param.ds_id))

        def independent_gradient_partition_epilogue(self):
            self.seen.append(("epilogue", self.flat.clone(), self.reduce_and_partition_stream.waited[:]))

        def get_param_comm_dtype(self, param):
            return self.comm_dtype

        def _get_param_partition_group(self, param):
            return self.dp_process_group

    class Engine:
        def __init__(self, stage=3, **settings):
            self.params = [torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16)),
                           torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
            for i, p in enumerate(self.params):
                p.ds_id = 10 + i
            self.optimizer, self.stage = Optimizer(self.params, **settings), stage

        def zero_optimization_stage(self):
            return self.stage

    monkeypatch.setattr(one_rank.dist, "get_world_size", lambda group: group)
    ds = {"zero_optimization": {"stage": 3, "reduce_scatter": False}}
    engine = Engine()
    optimizer, (w, b) = engine.optimizer, engine.params
    assert one_rank.reduce_gradients_into_partitions(engine, ds)
    first = [torch.randn(2, 3).bfloat16(), torch.randn(4).bfloat16()]
    w.grad, b.grad = first[0].clone(), first[1].clone()
    optimizer.reduce_ready_partitions_and_remove_grads(b)
    optimizer.reduce_ready_partitions_and_remove_grads(w)
    assert optimizer.seen == [] and w.grad is not None  # noted: nothing copied, no bucket
    optimizer.independent_gradient_partition_epilogue()
    (_, flat, waited), = optimizer.seen
    # DeepSpeed's epilogue finds every gradient in its partition, in the accumulation dtype, and the
    # gradients freed; its reduction stream waits for the copies only after that epilogue's host wait.
    assert torch.equal(flat, torch.cat([first[0].float().flatten(), first[1].float()]))
    assert w.grad is None and b.grad is None and waited == []
    assert len(optimizer.reduce_and_partition_stream.waited) == 1
    # The step's second micro-batch adds to the partitions; a gradient noted twice (it grew between its hooks)
    # counts once. A hook under DeepSpeed's coalesced reduction, or of a gradient not yet complete, notes nothing.
    optimizer.micro_step_id = 1
    w.grad, b.grad = torch.ones(2, 3, dtype=torch.bfloat16), torch.full((4,), 2.0, dtype=torch.bfloat16)
    optimizer.reduce_ready_partitions_and_remove_grads(w)
    optimizer.reduce_ready_partitions_and_remove_grads(w)
    b.ds_grad_is_ready = False
    optimizer.reduce_ready_partitions_and_remove_grads(b)
    optimizer._coalesce_grad_reduction = True
    optimizer.reduce_ready_partitions_and_remove_grads(b)
    optimizer.independent_gradient_partition_epilogue()
    assert torch.equal(optimizer.seen[-1][1], torch.cat([first[0].float().flatten() + 1, first[1].float()]))
    assert w.grad is None and b.grad is not None  # b's gradient stays with it until it is complete
    unchanged = [
        (Engine(ranks=2), ds), (Engine(stage=2), ds), (Engine(offload_param=True), ds),
        (Engine(offload_optimizer=True), ds), (Engine(zenflow=True), ds), (Engine(sequence_parallel_size=2), ds),
        (Engine(gradient_predivide_factor=2.0), ds), (Engine(comm_dtype=torch.float16), ds),
        (Engine(), {"zero_optimization": {"stage": 3}}),  # DeepSpeed's reduce-scatter path, by its default
        (Engine(), {"zero_optimization": {"stage": 3, "reduce_scatter": False, "zero_quantized_gradients": True}}),
        (Engine(), {"zero_optimization": {"stage": 3, "reduce_scatter": False}, "compile": {"deepcompile": True}}),
    ]
    family = Engine()
    family.params[1].ds_zero_placement_family = "autoep_expert"
    unchanged.append((family, ds))
    for engine, config in unchanged:
        assert not one_rank.reduce_gradients_into_partitions(engine, config)
        engine.optimizer.reduce_ready_partitions_and_remove_grads(engine.params[0])
        assert engine.optimizer.seen == [("bucket", 10)]
    # bf16 gradients carried in fp32 (the shipped JSONs' communication dtype) keep their values exactly.
    assert one_rank.reduce_gradients_into_partitions(Engine(comm_dtype=torch.float32), ds)
    # With prescale_gradients (postscale off) ZeRO-3's bucket path leaves the predivide factor out: still bitwise.
    assert one_rank.reduce_gradients_into_partitions(Engine(postscale_gradients=False, gradient_predivide_factor=2.0),
                                                     ds)
    del Optimizer.independent_gradient_partition_epilogue  # a DeepSpeed whose optimizer is laid out otherwise
    with pytest.warns(UserWarning, match="lacks independent_gradient_partition_epilogue: ZeRO-3 on one rank copies "
                                         "each gradient into a reduction bucket"):
        assert not one_rank.reduce_gradients_into_partitions(Engine(), ds)


def test_zero3_on_one_rank_keeps_parameters_whole_and_reduces_gradients_in_place(tmp_path, monkeypatch):
    from pretrain.trainer import build_ds_config

    cfg = load_run_config(None, ["data.dir=d", "deepspeed_config=ds_configs/zero3_bf16.json"])
    notes = []
    zero = build_ds_config(cfg, plan_batch(4096, 4, 256, 1), device_type="cuda", notes=notes)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == sys.maxsize and zero["reduce_scatter"] is False
    assert "stage3_model_persistence_threshold" not in zero  # DeepSpeed's default: no limit
    assert zero["leaf_module"]["classes"] == ["model.modeling.BlockStack"]
    assert notes == ["ZeRO-3 on one rank has nothing to shard: every parameter is kept whole, the blocks are one "
                     "leaf module, gradients are reduced in place and the parameters stay gathered through each "
                     "optimizer step (stage3_param_persistence_threshold 10,000,000 -> no limit, "
                     "leaf_module.classes model.modeling.Block -> model.modeling.BlockStack, "
                     "reduce_scatter true -> false)"]
    # More ranks shard as the file says; so do other stages, and a --ds-variant set over it is kept.
    notes = []
    zero = build_ds_config(cfg, plan_batch(4096, 4, 256, 2), device_type="cuda", notes=notes)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 10_000_000 and "reduce_scatter" not in zero and notes == []
    assert zero["leaf_module"]["classes"] == ["model.modeling.Block"]
    zero2 = load_run_config(None, ["data.dir=d", "deepspeed_config=ds_configs/zero2_bf16.json"])
    zero = build_ds_config(zero2, plan_batch(4096, 4, 256, 1), device_type="cuda")["zero_optimization"]
    assert "stage3_param_persistence_threshold" not in zero and "reduce_scatter" not in zero
    zero = build_ds_config(cfg, plan_batch(4096, 4, 256, 1), device_type="cuda", overrides={
        "zero_optimization.stage3_param_persistence_threshold": 10_000_000,
        "zero_optimization.reduce_scatter": True,
        "zero_optimization.leaf_module": {"classes": ["model.modeling.Block"]}})["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 10_000_000 and zero["reduce_scatter"] is True
    assert zero["leaf_module"]["classes"] == ["model.modeling.Block"]
    # DeepCompile removes DeepSpeed's module hooks, so the leaf modules stay as the file names them.
    deepcompile = load_run_config(None, ["data.dir=d", "deepspeed_config=ds_configs/zero3_bf16.json",
                                         "train.compile=true", "train.compile_method=deepcompile"])
    monkeypatch.setattr("pretrain.opbuild.toolkit_missing", lambda op: "")
    notes = []
    zero = build_ds_config(deepcompile, plan_batch(4096, 4, 256, 1), device_type="cuda", notes=notes)[
        "zero_optimization"]
    assert zero["leaf_module"]["classes"] == ["model.modeling.Block"] and zero["reduce_scatter"] is False
    assert "leaf module" not in notes[0] and "gathered" not in notes[0]

    def on_one_rank(zero: dict) -> tuple[dict, list[str]]:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"zero_optimization": zero}))
        own = load_run_config(None, ["data.dir=d", f"deepspeed_config={path}"])
        notes = []
        return build_ds_config(own, plan_batch(4096, 4, 256, 1), device_type="cuda", notes=notes)[
            "zero_optimization"], notes

    # A model-wide cap is lifted too; parameters offloaded to the host stay there, and with the optimizer
    # offloaded the gradients are reduced as configured.
    capped, _ = on_one_rank({"stage": 3, "stage3_model_persistence_threshold": 5})
    assert capped["stage3_param_persistence_threshold"] == capped["stage3_model_persistence_threshold"] == sys.maxsize
    offloaded, notes = on_one_rank({"stage": 3, "offload_param": {"device": "cpu"}})
    assert "stage3_param_persistence_threshold" not in offloaded and "reduce_scatter" not in offloaded and notes == []
    optimizer_offloaded, notes = on_one_rank({"stage": 3, "offload_optimizer": {"device": "cpu"}})
    assert optimizer_offloaded["stage3_param_persistence_threshold"] == sys.maxsize
    assert "reduce_scatter" not in optimizer_offloaded
    assert notes == ["ZeRO-3 on one rank has nothing to shard: every parameter is kept whole "
                     "(stage3_param_persistence_threshold 100,000 -> no limit)"]
    _, notes = on_one_rank({"stage": 3, "stage3_param_persistence_threshold": sys.maxsize,
                            "reduce_scatter": False})
    assert notes == []
    # The blocks' stack replaces the block among the leaf classes; the other classes and leaf settings stay,
    # and a JSON without the block among them keeps its own choice. Parameters or the optimizer offloaded
    # (gradients leave the device block by block) keep every leaf.
    leaves = {"classes": ["model.layers.MLP", "model.modeling.Block"], "names": ["proj"]}
    own, _ = on_one_rank({"stage": 3, "leaf_module": leaves})
    assert own["leaf_module"] == {"classes": ["model.layers.MLP", "model.modeling.BlockStack"], "names": ["proj"]}
    own, notes = on_one_rank({"stage": 3, "leaf_module": {"classes": ["model.layers.MLP"]}})
    assert own["leaf_module"] == {"classes": ["model.layers.MLP"]} and "leaf" not in notes[0]
    for part in ("param", "optimizer"):
        offloaded, _ = on_one_rank({"stage": 3, f"offload_{part}": {"device": "cpu"}, "leaf_module": leaves})
        assert offloaded["leaf_module"]["classes"] == ["model.layers.MLP", "model.modeling.Block"], part


def test_zero1_and_zero2_on_one_rank_leave_gradients_in_place_and_do_not_wait_for_the_device(tmp_path):
    from pretrain.trainer import build_ds_config

    def built(zero: dict, ranks: int = 1, overrides: dict | None = None, run: tuple = (),
              top: dict | None = None) -> tuple[dict, list[str]]:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({**(top or {}), "zero_optimization": zero}))
        cfg = load_run_config(None, ["data.dir=d", f"deepspeed_config={path}", *run])
        notes = []
        return build_ds_config(cfg, plan_batch(4096, 4, 256, ranks), device_type="cuda", notes=notes,
                               overrides=overrides)["zero_optimization"], notes

    shipped = shipped_ds("zero2_bf16.json")["zero_optimization"]
    zero, notes = built(shipped)
    assert zero["contiguous_gradients"] is False and zero["overlap_comm"] is False
    assert zero["reduce_bucket_size"] == 50_000_000  # the rest as the file says
    assert notes == ["ZeRO-2 on one rank has nothing to reduce: gradients skip DeepSpeed's contiguous buffers "
                     "and the host does not wait for the device after each backward "
                     "(contiguous_gradients true -> false, overlap_comm true -> false)"]
    # ZeRO-1's file sets neither: DeepSpeed's defaults are contiguous gradients on, overlap off.
    zero, notes = built(shipped_ds("zero1_bf16.json")["zero_optimization"])
    assert zero["contiguous_gradients"] is False and "overlap_comm" not in zero
    assert notes == ["ZeRO-1 on one rank has nothing to reduce: gradients skip DeepSpeed's contiguous buffers "
                     "(contiguous_gradients true -> false)"]
    # More ranks reduce as the file says; so do ZeRO-0 and an offloaded optimizer; nothing to change, no notice;
    # a --ds-variant set over it is kept.
    for zero_in, ranks in ((shipped, 2), ({"stage": 0}, 1), ({**shipped, "offload_optimizer": {"device": "cpu"}}, 1),
                           ({"stage": 2, "contiguous_gradients": False}, 1)):
        zero, notes = built(zero_in, ranks)
        assert notes == [] and zero.get("contiguous_gradients", True) == zero_in.get("contiguous_gradients", True)
        assert zero.get("overlap_comm") == zero_in.get("overlap_comm"), zero_in
    zero, _ = built(shipped, overrides={"zero_optimization.overlap_comm": True})
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is False
    # DeepSpeed's Muon keeps its contiguous buffer (its compiled update rounds otherwise without it); only the
    # wait goes.
    zero, notes = built(shipped, run=["optim.name=muon"])
    assert zero["contiguous_gradients"] is True and zero["overlap_comm"] is False
    assert notes == ["ZeRO-2 on one rank has nothing to reduce: the host does not wait for the device after each "
                     "backward (overlap_comm true -> false)"]
    _, notes = built({"stage": 1}, run=["optim.name=muon"])
    assert notes == []
    # ZeRO-1 as shipped accumulates bf16 gradients in fp32: DeepSpeed then runs its BF16_Optimizer, whose buffers
    # these settings do not reach, so nothing changes and nothing is said. In fp32 (or with bf16 accumulation set
    # over it) DeepSpeed's ZeRO optimizer runs, and the change applies.
    zero1 = shipped_ds("zero1_bf16.json")
    zero, notes = built(zero1["zero_optimization"], top={k: v for k, v in zero1.items() if k != "zero_optimization"})
    assert notes == [] and "contiguous_gradients" not in zero
    for run, overrides in ((["train.precision=fp32"], None), ((), {"data_types.grad_accum_dtype": "bf16"})):
        zero, notes = built(zero1["zero_optimization"], run=run, overrides=overrides,
                            top={k: v for k, v in zero1.items() if k != "zero_optimization"})
        assert zero["contiguous_gradients"] is False and notes[0].startswith("ZeRO-1 on one rank"), (run, overrides)
    # Through the contiguous buffers a predivide factor divides and multiplies back: they stay (not when
    # prescaling, where DeepSpeed divides once either way).
    for top, contiguous in (({"gradient_predivide_factor": 2.0}, True),
                            ({"gradient_predivide_factor": 2.0, "prescale_gradients": True}, False)):
        zero, _ = built(shipped, top=top)
        assert zero["contiguous_gradients"] is contiguous and zero["overlap_comm"] is False, top


def test_zero1_and_zero2_clip_on_the_device_by_deepspeeds_factor_and_leave_overflow_to_the_norm():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from pretrain import step_reads

    class Optimizer:  # the parts of DeepSpeed's ZeRO-1/2 optimizer that the change reads and replaces
        unscale_and_clip_grads = DeepSpeedZeroOptimizer.unscale_and_clip_grads

        def __init__(self, **settings):
            self.clip_grad, self.loss_scale, self.compute_grad_norm, self.check_grad_overflow = 1.0, 1.0, True, True
            self.cpu_offload, self.dtype, self.device, self.overflow = False, torch.bfloat16, "cpu", None
            self.__dict__.update(settings)

        def check_overflow(self, partition_gradients=True):
            self.overflow = "checked every gradient"

    class Engine:
        def __init__(self, stage=2, **settings):
            self.optimizer, self.stage = Optimizer(**settings), stage

        def zero_optimization_stage(self):
            return self.stage

    def read(self, *args):
        raise AssertionError("the clip read from the device")

    # The norm as ZeRO-1/2 hands it over (fp32; -1 is DeepSpeed's sentinel for a norm that is not finite).
    for settings in ({}, {"clip_grad": 0.3}, {"clip_grad": 0.0, "loss_scale": 1024.0}, {"loss_scale": 1024.0}):
        for norm in (0.01, 0.3, 1.0, 2.5, 3e38, float("inf"), float("nan"), -1.0):
            grads = [torch.randn(7), [torch.randn(3), torch.randn(5)]]
            expected = [g.clone() for g in [grads[0], *grads[1]]]
            Optimizer.unscale_and_clip_grads(Optimizer(**settings), [expected[0], expected[1:]], torch.tensor(norm))
            engine = Engine(**settings)
            assert step_reads.fewer_step_reads(engine, True)
            with pytest.MonkeyPatch.context() as mp:
                for name in ("__bool__", "item", "__float__"):
                    mp.setattr(torch.Tensor, name, read)
                engine.optimizer.unscale_and_clip_grads(grads, torch.tensor(norm))
            got = [grads[0], *grads[1]]
            assert all(torch.equal(a, b) or (a.isnan().all() and b.isnan().all()) for a, b in zip(got, expected)), (
                settings, norm)
    engine = Engine()
    assert step_reads.fewer_step_reads(engine, True)
    engine.optimizer.check_overflow()
    assert engine.optimizer.overflow is False  # left to the step's check of the norm
    # bf16 without check_grad_overflow: the step checks neither, so neither does the change.
    engine = Engine(check_grad_overflow=False)
    assert step_reads.fewer_step_reads(engine, True) and "check_overflow" not in vars(engine.optimizer)
    # fp32 and fp16 steps always check the norm.
    engine = Engine(check_grad_overflow=False, dtype=torch.float32)
    assert step_reads.fewer_step_reads(engine, True) and "check_overflow" in vars(engine.optimizer)
    for engine, fused_norm in ((Engine(stage=3), True), (Engine(stage=0), True), (Engine(), False),
                               (Engine(cpu_offload=True), False), (Engine(compute_grad_norm=False), True)):
        assert not step_reads.fewer_step_reads(engine, fused_norm)
        assert "unscale_and_clip_grads" not in vars(engine.optimizer)
    del Optimizer.check_overflow  # a DeepSpeed whose optimizer is laid out otherwise
    with pytest.warns(UserWarning, match="lacks check_overflow: ZeRO-2 reads its clip factor and overflow check"):
        assert not step_reads.fewer_step_reads(Engine(), True)


def test_zero0_in_bf16_leaves_overflow_to_the_norm_and_skips_the_same_steps():
    # DeepSpeed's bf16 wrapper of FusedAdam under ZeRO-0 (FP16_Optimizer, what a GPU runs), here around AdamW:
    # its overflow check reads each gradient tensor; left to the norm, the same steps are skipped, bit for bit.
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    from pretrain import step_reads

    class Engine:
        pipeline_parallelism = False

        def __init__(self, optimizer):
            self.optimizer = optimizer

        def zero_optimization_stage(self):
            return 0

    def build():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape).bfloat16()) for shape in ((4, 3), (5,), (2, 2), (7,))]
        adam = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=0.1)
        return params, FP16_Optimizer(adam, low_precision_dtype=torch.bfloat16, clip_grad=0.5)

    (params_a, deepspeeds), (params_b, ours) = build(), build()
    assert step_reads.fewer_step_reads(Engine(ours), False)
    reads = {"on": None, "n": 0}

    def counted(fn):  # DeepSpeed's reads (not the wrapped AdamW's)
        def wrapper(*args, **kwargs):
            reads["n"] += reads["on"] is not None and "deepspeed" in sys._getframe(1).f_code.co_filename
            return fn(*args, **kwargs)
        return wrapper

    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator).bfloat16() for p in params_a]
        if step == 2:
            grads[1][3] = float("inf")
        counts = []
        for params, optimizer in ((params_a, deepspeeds), (params_b, ours)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            reads["n"] = 0
            with pytest.MonkeyPatch.context() as mp:
                for name in ("__bool__", "item", "__float__"):
                    mp.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
                reads["on"] = True
                optimizer.step()
                reads["on"] = None
            counts.append(reads["n"])
        assert deepspeeds.overflow == ours.overflow == (step == 2)
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
        if step != 2:  # DeepSpeed's check read every gradient tensor; the norm reads once per group and once more
            assert counts[0] >= len(params_a) + 3 and counts[1] == 3, counts
    assert not torch.equal(params_a[0], build()[0][0])  # the other steps trained


def test_bf16_optimizer_gets_the_one_read_step_only_where_its_norm_covers_every_gradient():
    # The step itself is trained against DeepSpeed's in `tests/test_pretrain_throughput.py`; here where it applies.
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from pretrain.bf16_step import one_read_bf16_step

    class Engine:
        pipeline_parallelism = False

        def __init__(self, optimizer):
            self.optimizer = optimizer

    def bf16_optimizer(**settings):  # DeepSpeed's BF16_Optimizer, not built, with what the step reads set
        optimizer = BF16_Optimizer.__new__(BF16_Optimizer)
        param = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
        optimizer.__dict__.update(mpu=None, has_moe_layers=False, grad_acc_dtype=torch.float32, norm_type=2.0,
                                  bf16_groups=[[param]], fp32_groups_flat_partition=[torch.zeros(3)],
                                  fp32_groups_gradient_flat_partition=[torch.zeros(3)], optimizer=None,
                                  _uses_muon=False, clip_grad=1.0)
        optimizer.__dict__.update(settings)
        return optimizer

    engine = Engine(bf16_optimizer())
    assert one_read_bf16_step(engine, {}) and "step" in vars(engine.optimizer)
    replicated = torch.nn.Parameter(torch.zeros(2))
    replicated.ds_pipe_replicated = True
    for settings, ds in (({"mpu": object()}, {}), ({"has_moe_layers": True}, {}),
                         ({"grad_acc_dtype": torch.bfloat16}, {}), ({"norm_type": float("inf")}, {}),
                         ({"bf16_groups": [[replicated]]}, {}), ({}, {"compile": {"deepcompile": True}})):
        engine = Engine(bf16_optimizer(**settings))
        assert not one_read_bf16_step(engine, ds) and "step" not in vars(engine.optimizer), (settings, ds)
    engine = Engine(bf16_optimizer())
    engine.pipeline_parallelism = True
    assert not one_read_bf16_step(engine, {})
    assert not one_read_bf16_step(Engine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)), {})
    engine = Engine(bf16_optimizer())
    del engine.optimizer.fp32_groups_flat_partition  # a DeepSpeed whose BF16_Optimizer is laid out otherwise
    with pytest.warns(UserWarning, match="lacks fp32_groups_flat_partition: ZeRO-1 takes its gradient norm one"):
        assert not one_read_bf16_step(engine, {})
    assert "step" not in vars(engine.optimizer)


@pytest.mark.parametrize("zero, message", [
    ({"stage": 7}, "zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
    ({"stage": "three"}, "zero_optimization.stage must be 0, 1, 2 or 3, got 'three'"),
    ({"stage": 3, "overlap_comms": True},
     "zero_optimization.overlap_comms: unknown key (not a DeepSpeed ZeRO setting)"),
    ({"stage": 3, "offload_optimizer": {"device": "gpu"}},
     "zero_optimization.offload_optimizer.device must be 'none', 'cpu' or 'nvme', got 'gpu'"),
    (3, "zero_optimization must be a JSON object, got 3"),
    ({"stage": 3, "leaf_module": ["model.modeling.Block"]},
     "zero_optimization: leaf_module configuration must be a mapping of fields to values"),
])
def test_ds_config_with_a_bad_zero_value_is_one_line_before_the_engine(tmp_path, zero, message):
    from pretrain.trainer import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    cfg = load_run_config("pretrain/configs/tiny-cpu.yaml", ["data.dir=d", f"deepspeed_config={path}"])
    with pytest.raises(ConfigError) as info:
        build_ds_config(cfg, plan_batch(4096, 4, 256, 1), device_type="cpu")
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize("path", sorted(glob.glob("ds_configs/*.json")))
def test_shipped_ds_configs_and_the_keys_the_trainer_adds_are_deepspeed_settings(path, monkeypatch):
    from pretrain.trainer import build_ds_config, check_top_level_keys

    monkeypatch.setattr("pretrain.opbuild.toolkit_missing", lambda op: "")  # as on a GPU machine with nvcc
    cfg = load_run_config("pretrain/configs/tiny-cpu.yaml", ["data.dir=d", f"deepspeed_config={path}",
                                                             "train.compile=true", "train.compile_method=deepcompile"])
    ds = build_ds_config(cfg, plan_batch(4096, 4, 256, 1), device_type="cuda")
    assert {"train_batch_size", "gradient_clipping", "compile", "bf16", "steps_per_print", "timers"} <= set(ds)
    check_top_level_keys(ds, path)


@pytest.mark.parametrize("key, message", [
    ("gradient_clippping", "gradient_clippping: unknown key (not a DeepSpeed setting; did you mean "
                           "'gradient_clipping'?)"),
    ("zero_optimisation", "zero_optimisation: unknown key (not a DeepSpeed setting; did you mean "
                          "'zero_optimization'?)"),
    ("my_own_setting", "my_own_setting: unknown key (not a DeepSpeed setting)"),
    ("amp", "amp: NVIDIA Apex AMP integration has been removed."),
])
def test_ds_config_with_an_unknown_top_level_key_is_one_line_before_the_engine(tmp_path, key, message):
    from pretrain.trainer import build_ds_config, check_inputs

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, key: 1.0}))
    cfg = load_run_config("pretrain/configs/tiny-cpu.yaml", ["data.dir=d", f"deepspeed_config={path}"])
    with pytest.raises(ConfigError) as info:
        build_ds_config(cfg, plan_batch(4096, 4, 256, 1), device_type="cpu")
    assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value)
    with pytest.raises(ConfigError) as early:  # at start, before torch.distributed and the data
        check_inputs(cfg)
    assert str(early.value) == str(info.value)


@pytest.mark.parametrize("value,expected", [
    ("9.0a", "9.0"), ("8.0;9.0a+PTX", "8.0;9.0+PTX"), ("9.0a 10.0a", "9.0 10.0"), ("8.6", "8.6"), (None, None),
])
def test_arch_list_for_deepspeed_op_builds(value, expected):
    from pretrain.optim import jit_safe_arch_list

    assert jit_safe_arch_list(value) == expected


def test_training_bench_model_overrides(capsys):
    from pretrain import bench

    assert bench.model_overrides(["hidden_size=64", "window=512", "rope_scale=0.5"]) == {
        "hidden_size": 64, "window": 512, "rope_scale": 0.5}
    for bad in (["hidden_size"], ["=3"], ["core=nope"]):
        with pytest.raises(ValueError, match="model-set"):
            bench.model_overrides(bad)
    small = AtmaConfig.from_preset("atma-378m", hidden_size=64, head_dim=16, vocab_size=256)
    assert bench.count_parameters(small) < bench.CPU_MAX_PARAMETERS
    assert bench.count_parameters(AtmaConfig.from_preset("atma-378m")) == 378_220_864
    assert bench.main(["--device", "cpu", "--model-set", "hidden_sise=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hidden_sise" in err[0]
    assert bench.main(["--device", "cpu"]) == 2
    assert "too large" in capsys.readouterr().err


def test_ds_config_compile_and_skip_rules(monkeypatch):
    from pretrain.trainer import build_ds_config

    plan = plan_batch(4096, 4, 256, 2)
    cfg = load_run_config("pretrain/configs/tiny-cpu.yaml", ["data.dir=d", "train.compile=true",
                                                             "train.compile_method=deepcompile"])
    with pytest.raises(ConfigError, match="deepcompile needs CUDA"):
        build_ds_config(cfg, plan, device_type="cpu")
    monkeypatch.setattr("pretrain.opbuild.toolkit_missing", lambda op: {"dc": "no GPU toolkit (reason)"}[op])
    with pytest.raises(ConfigError, match=r"needs DeepSpeed's DeepCompile op, .* there is no GPU toolkit \(reason\)"):
        build_ds_config(cfg, plan, device_type="cuda")
    monkeypatch.setattr("pretrain.opbuild.toolkit_missing", lambda op: {"dc": ""}[op])
    assert build_ds_config(cfg, plan, device_type="cuda")["compile"] == {"deepcompile": True}
    # ZeRO-3 without Blocks as leaf modules: every compiled block would break at each submodule's hook.
    no_leaf = load_run_config(None, ["data.dir=d", "train.compile=true",
                                     "deepspeed_config=ds_configs/zero3_offload_bf16.json"])
    assert build_ds_config(no_leaf, plan, device_type="cpu")["zero_optimization"]["leaf_module"]["classes"] == [
        "model.modeling.Block"]
    skip0 = load_run_config(None, ["data.dir=d", "train.nan_policy=skip", "deepspeed_config=ds_configs/zero0_bf16.json"])
    with pytest.raises(ConfigError, match="nan_policy=skip needs ZeRO stage 1, 2 or 3"):
        build_ds_config(skip0, plan, device_type="cpu")
    for value, expected in (("true", "true"), (True, "true"), ("False", "false"), ("auto", "auto")):
        assert load_run_config(None, ["data.dir=d", f"train.compile={value}"]).train.compile == expected
    with pytest.raises(ConfigError, match="train.compile must be one of auto, true, false"):
        load_run_config(None, ["data.dir=d", "train.compile=yes please"])


def test_compile_default_is_on_for_cuda_only():
    from pretrain.compilation import compile_method

    train = load_run_config(None, ["data.dir=d"]).train
    assert compile_method(train, "cuda") == "blocks" and compile_method(train, "cpu") is None
    forced = load_run_config(None, ["data.dir=d", "train.compile=true"]).train
    assert compile_method(forced, "cpu") == "blocks"
    off = load_run_config(None, ["data.dir=d", "train.compile=false"]).train
    assert compile_method(off, "cuda") is None


def test_throughput_leaves_out_warmup_steps(monkeypatch):
    from pretrain import throughput

    clock = iter([90.0, 97.0, 100.0, 103.0, 104.0, 108.0])  # start, first step, end of warm-up, then three reads
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    meter = throughput.ThroughputMeter(warmup_steps=2, device=torch.device("cpu"))
    meter.start()
    for _ in range(2):  # warm-up: 10 s, not counted
        assert meter.take_warmup() is None
        meter.record(1000, data_wait_s=0.5)
    assert meter.read() == {}
    # the warm-up's time and its first step's, reported once
    assert meter.take_warmup() == {"perf/warmup_s": pytest.approx(10.0), "perf/first_step_s": pytest.approx(7.0)}
    assert meter.take_warmup() is None
    meter.record(1000, data_wait_s=0.25)
    meter.record(1000, data_wait_s=0.5)
    first = meter.read()  # two steps in 3 s
    assert first["perf/tokens_per_s"] == pytest.approx(2000 / 3)
    assert first["perf/step_time_s"] == pytest.approx(1.5) and first["perf/data_wait_fraction"] == pytest.approx(0.25)
    meter.record(1000, data_wait_s=0.0)
    assert meter.read()["perf/tokens_per_s"] == pytest.approx(1000)  # next window: one step in 1 s
    meter.record(1000, data_wait_s=0.0)
    assert meter.read()["perf/step_time_s"] == pytest.approx(4.0)


@pytest.fixture
def clock(monkeypatch):
    """The meter's clock, set by the test: clock[0] is the time in seconds."""
    from pretrain import throughput

    now = [0.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: now[0])
    return now


def test_throughput_leaves_out_paused_steps_and_their_time(clock):
    from pretrain import throughput

    now = clock
    meter = throughput.ThroughputMeter(warmup_steps=0, device=torch.device("cpu"))
    meter.start()  # t = 0
    now[0] = 1.0
    meter.record(1000, data_wait_s=0.0)  # a counted step: 1 s
    meter.pause()
    now[0] = 11.0
    meter.record(1000, data_wait_s=5.0)  # a traced step: 10 s, not counted
    meter.resume()
    now[0] = 13.0
    meter.record(1000, data_wait_s=0.5)  # a counted step: 2 s
    figures = meter.read()  # two steps in 3 s
    assert figures["perf/tokens_per_s"] == pytest.approx(2000 / 3)
    assert figures["perf/data_wait_fraction"] == pytest.approx(0.5 / 3)
    # A read while paused ends the window where the pause began.
    now[0] = 14.0
    meter.record(1000, data_wait_s=0.0)
    meter.pause()
    now[0] = 20.0
    meter.record(1000, data_wait_s=0.0)
    assert meter.read()["perf/step_time_s"] == pytest.approx(1.0)
    now[0] = 30.0
    meter.resume()
    now[0] = 32.0
    meter.record(1000, data_wait_s=0.0)
    assert meter.read()["perf/step_time_s"] == pytest.approx(2.0)


def test_throughput_reports_a_warmup_of_one_step_and_none_without_warmup(clock):
    from pretrain import throughput

    now = clock
    now[0] = 10.0
    one = throughput.ThroughputMeter(warmup_steps=1, device=torch.device("cpu"))
    one.start()
    now[0] = 14.0
    one.record(1000, data_wait_s=0.0)
    assert one.take_warmup() == {"perf/warmup_s": pytest.approx(4.0), "perf/first_step_s": pytest.approx(4.0)}
    now[0] = 15.0
    one.record(1000, data_wait_s=0.0)
    assert one.take_warmup() is None and one.read()["perf/step_time_s"] == pytest.approx(1.0)
    none = throughput.ThroughputMeter(warmup_steps=0, device=torch.device("cpu"))
    none.start()
    for _ in range(3):
        now[0] += 1.0
        none.record(1000, data_wait_s=0.0)
        assert none.take_warmup() is None
    unstarted = throughput.ThroughputMeter(warmup_steps=2, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="before start"):
        unstarted.record(1000, data_wait_s=0.0)


def test_throughput_window_starts_after_a_pause_that_ends_the_warmup(clock):
    from pretrain import throughput

    now = clock
    meter = throughput.ThroughputMeter(warmup_steps=1, device=torch.device("cpu"))
    meter.start()
    meter.pause()
    now[0] = 5.0
    meter.record(1000, data_wait_s=0.0)  # the warm-up step ends while paused
    now[0] = 9.0
    meter.record(1000, data_wait_s=0.0)  # traced: not counted
    meter.resume()
    now[0] = 12.0
    meter.record(1000, data_wait_s=0.0)
    assert meter.read()["perf/step_time_s"] == pytest.approx(3.0)


def test_throughput_leaves_out_time_set_aside_for_saves_and_validation(clock):
    from pretrain import throughput

    now = clock
    meter = throughput.ThroughputMeter(warmup_steps=2, device=torch.device("cpu"))
    meter.start()  # t = 0
    now[0] = 3.0
    meter.record(1000, data_wait_s=0.0)  # warm-up step 1: 3 s
    with meter.set_aside() as took:  # a save inside the warm-up: not part of it
        now[0] = 10.0
    assert took == {"seconds": pytest.approx(7.0)}
    now[0] = 12.0
    meter.record(1000, data_wait_s=0.0)  # warm-up step 2: 2 s
    assert meter.take_warmup() == {"perf/warmup_s": pytest.approx(5.0), "perf/first_step_s": pytest.approx(3.0)}
    now[0] = 13.0
    meter.record(1000, data_wait_s=0.5)
    with meter.set_aside() as took:  # validation: 20 s
        now[0] = 33.0
    now[0] = 34.0
    meter.record(1000, data_wait_s=0.5)
    figures = meter.read()  # two steps in 2 s of training
    assert took["seconds"] == pytest.approx(20.0)
    assert figures["perf/step_time_s"] == pytest.approx(1.0) and figures["perf/tokens_per_s"] == pytest.approx(1000)
    assert figures["perf/data_wait_fraction"] == pytest.approx(0.5)
    # Inside a pause (the profiler's window) the pause leaves the time out already, once.
    now[0] = 36.0
    meter.record(1000, data_wait_s=0.0)  # counted: 2 s
    meter.pause()
    with meter.set_aside():
        now[0] = 37.0
    now[0] = 40.0
    meter.record(1000, data_wait_s=0.0)  # traced: not counted
    meter.resume()
    now[0] = 42.0
    meter.record(1000, data_wait_s=0.0)  # counted: 2 s
    assert meter.read()["perf/step_time_s"] == pytest.approx(2.0)


def test_bench_ratios_compare_cases_that_differ_in_one_setting():
    from pretrain.bench import Case, ratios

    cases = []
    for zero, core, seconds in ((0, "polar", 1.0), (0, "nope", 0.5), (3, "polar", 1.2), (3, "nope", 0.6)):
        case = Case(core, zero, "none", "off")
        case.result = {"step_s_median": seconds}
        cases.append(case)
    found = {(r["ratio"], r["case"]): r["value"] for r in ratios(cases, "nope")}
    assert found == {("polar/nope step", "polar z0 ac=none compile=off"): pytest.approx(2.0),
                     ("polar/nope step", "polar z3 ac=none compile=off"): pytest.approx(2.0),
                     ("ZeRO-3/ZeRO-0 step", "polar z3 ac=none compile=off"): pytest.approx(1.2),
                     ("ZeRO-3/ZeRO-0 step", "nope z3 ac=none compile=off"): pytest.approx(1.2)}


def test_bench_ratios_compare_each_ds_variant_with_the_shipped_json():
    from pretrain.bench import Case, ratios

    cases = []
    for zero, variant, seconds in ((0, "", 1.0), (3, "", 1.5), (3, "v1", 1.2)):
        case = Case("nope", zero, "none", "off", variant)
        case.result = {"step_s_median": seconds}
        cases.append(case)
    found = {(r["ratio"], r["case"], r["baseline"]): r["value"] for r in ratios(cases, "nope")}
    z0 = "nope z0 ac=none compile=off"
    assert found == {("ZeRO-3/ZeRO-0 step", "nope z3 ac=none compile=off", z0): pytest.approx(1.5),
                     # a variant without its own ZeRO-0 case is compared with the shipped one
                     ("ZeRO-3/ZeRO-0 step", "nope z3 ac=none compile=off ds=v1", z0): pytest.approx(1.2),
                     ("ds v1/shipped step", "nope z3 ac=none compile=off ds=v1", "nope z3 ac=none compile=off"):
                         pytest.approx(0.8)}


def test_training_bench_ds_variants_are_parsed_and_checked_before_any_engine(capsys):
    from pretrain import bench

    parsed = bench._ds_variant("zero_optimization.overlap_comm=false, zero_optimization.reduce_bucket_size=5e8")
    assert parsed == {"zero_optimization.overlap_comm": False, "zero_optimization.reduce_bucket_size": 5e8}
    assert bench._ds_variant("zero_optimization.offload_optimizer.device=cpu") == {
        "zero_optimization.offload_optimizer.device": "cpu"}
    # a JSON list, object or string keeps its commas; a comma outside them starts the next setting
    assert bench._ds_variant('a.b=[1, 2],c={"x": 1, "y": [3, 4]},d="p,q=r",e="say \\"x,y\\"",f=cpu') == {
        "a.b": [1, 2], "c": {"x": 1, "y": [3, 4]}, "d": "p,q=r", "e": 'say "x,y"', "f": "cpu"}
    for bad in ("overlap_comm", "=1", "zero_optimization..x=1", " , ", "a=[1],2"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._ds_variant(bad)
    assert bench._cases("polar:3:none:off:v1,nope:0:none:off") == [("polar", 3, "none", "off", "v1"),
                                                                    ("nope", 0, "none", "off")]
    with pytest.raises(argparse.ArgumentTypeError, match="CORE:ZERO:AC:COMPILE"):
        bench._cases("polar:3:none:off:")
    base = ["--device", "cpu", "--preset", "tiny", "--ds-variant", "zero_optimization.overlap_comm=false"]
    assert bench.main([*base, "--cases", "nope:3:none:off:v2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --cases: nope z3 ac=none compile=off ds=v2: no --ds-variant v2 (defined: v1)"]
    assert bench.main([*base, "--ds-variant", "zero_optimization.overlap_comms=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ds-variant v2 (zero_optimization.overlap_comms=false)" in err[0]
    assert "unknown key" in err[0]


def test_training_bench_takes_its_recipe_from_a_run_config():
    from pretrain import bench

    def planned(*argv):
        args = bench.parse_args(["--device", "cpu", *argv])
        args.model_overrides = bench.model_overrides(args.model_set)
        args.seq_len = 64
        cases = bench.plan_cases(args)
        bench.plan_accumulation(args)
        return args, cases

    args, cases = planned()  # no run config: the benchmark's own defaults
    assert (args.preset, args.micro_batch, args.grad_accum, args.zero_stages) == ("atma-378m", 8, 1, [2, 3])
    assert {bench.case_ds_json(c, args) for c in cases} == {"ds_configs/zero2_bf16.json", "ds_configs/zero3_bf16.json"}

    args, cases = planned("--config", "pretrain/configs/tiny-cpu.yaml")
    assert (args.preset, args.micro_batch, args.zero_stages) == ("tiny", 4, [3])
    assert args.activation_checkpointing == ["none"]
    assert args.grad_accum == 4096 // (4 * 64)  # batch.tokens over micro-batch x sequence length x one rank
    args, _ = planned("--config", "pretrain/configs/tiny-cpu.yaml", "--micro-batch", "2", "--grad-accum", "3",
                      "--set", "train.activation_checkpointing=all")
    assert (args.micro_batch, args.grad_accum, args.activation_checkpointing) == (2, 3, ["all"])

    # the paper recipe: its Muon JSON for its ZeRO-3 cases, the shipped JSON of any other stage
    args, cases = planned("--config", "pretrain/configs/atma-378m.yaml", "--zero-stages", "2,3",
                          "--model-set", "window=128")
    assert args.micro_batch == 16 and args.grad_accum == 524288 // (16 * 64)
    assert {c.zero_stage: bench.case_ds_json(c, args) for c in cases} == {
        3: "ds_configs/zero3_muon_bf16.json", 2: "ds_configs/zero2_bf16.json"}
    model = bench.case_model_config(next(c for c in cases if c.core == "nope"), args)
    assert (model.core, model.memory, model.window) == ("nope", True, 128)  # case core; recipe memory; --model-set
    args.no_memory = True
    assert not bench.case_model_config(cases[0], args).memory
    # a recipe without the memory: its models have none, and the report names no memory kernel
    args, cases = planned("--set", "model.overrides.memory=false", "--cases", "polar:3:none:off")
    assert not bench.recipe_memory(args) and not bench.case_model_config(cases[0], args).memory
    cpu = torch.device("cpu")
    with_memory = dataclasses.replace(bench.case_model_config(cases[0], args), memory=True)
    assert bench.memory_kernel(cpu, bench.case_model_config(cases[0], args), args) == "none"
    assert bench.memory_kernel(cpu, with_memory, args) == "torch"

    for argv, message in [
        # --set alone takes the default run config's recipe (micro-batch 4)
        (["--set", "batch.tokens=1000"], "batch.tokens=1000 is not a multiple of micro_batch_size (4) x seq_len (64)"),
        (["--set", "loss.teacher=/nonexistent", "--set", "loss.distill_weight=0.5"],
         "loss.teacher '/nonexistent': no such directory, and not a Hugging Face model name"),
        (["--set", "optim.nme=muon"], "unknown key(s) in optim: nme"),
    ]:
        with pytest.raises(ConfigError) as info:
            planned(*argv)
        assert message in str(info.value)


def test_training_bench_names_the_memory_path_training_takes(monkeypatch):
    """FLA where its guard allows it; else the chunked path with the Triton carry where it fits, else the loop."""
    from kernels.gated_delta import fla_bridge, triton_impl
    from pretrain import bench

    gpu = torch.device("cuda", 0)
    config = AtmaConfig.from_preset("atma-378m")
    args = argparse.Namespace(fla_timing_only=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton_impl, "device_class", lambda device, env_var: "large")
    monkeypatch.setattr(fla_bridge, "_installed_fla_version", lambda: "0.6.0")
    monkeypatch.setattr(fla_bridge, "_triton_version", lambda: "3.7.1")
    assert bench.memory_kernel(gpu, config, args) == "fla"
    monkeypatch.setattr(fla_bridge, "_triton_version", lambda: "3.6.0")  # refused on Hopper
    monkeypatch.setattr(fla_bridge, "_tilelang_runs_the_affected_kernel", lambda: False)
    assert bench.memory_kernel(gpu, config, args) == "chunked, triton carry"
    monkeypatch.setattr(fla_bridge, "_tilelang_runs_the_affected_kernel", lambda: True)  # FLA's own fix
    assert bench.memory_kernel(gpu, config, args) == "fla (its gated backward's dq/dk/dg kernel in TileLang)"
    monkeypatch.setattr(fla_bridge, "_tilelang_runs_the_affected_kernel", lambda: False)
    args.fla_timing_only = True
    assert bench.memory_kernel(gpu, config, args).startswith("fla (timing only")
    monkeypatch.setattr(fla_bridge, "_installed_fla_version", lambda: None)
    assert bench.memory_kernel(gpu, config, args) == "chunked, triton carry"
    assert bench.memory_kernel(gpu, dataclasses.replace(config, head_dim=256), args) == "torch"
    monkeypatch.setenv("ATMA_KERNELS", "torch")
    assert bench.memory_kernel(gpu, config, args) == "torch"


def test_training_bench_names_the_loss_rows_training_takes(monkeypatch):
    """The LM head loss's Triton rows on a GPU, PyTorch's on the CPU or when switched off."""
    from pretrain import bench

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("ATMA_KERNELS", raising=False)
    monkeypatch.delenv("ATMA_LOSS_ROWS", raising=False)
    assert (bench.loss_rows(gpu), bench.loss_rows(cpu)) == ("triton", "torch")
    monkeypatch.setenv("ATMA_LOSS_ROWS", "torch")
    assert bench.loss_rows(gpu) == "torch"


def test_training_bench_refuses_data_and_outputs_it_cannot_use_before_any_engine(tiny_shards, tmp_path, capsys):
    from pretrain import bench

    base = ["--device", "cpu", "--preset", "tiny", "--cases", "nope:0:none:off"]
    refusals = {
        ("--data", str(tmp_path)): f"error: --data: {tmp_path}/manifest.json: not found (not a prepared dataset, "
                                   "or prepare did not finish)",
        ("--data", tiny_shards, "--seq-len", "32"): f"error: --seq-len 32: the shards in {tiny_shards} hold "
                                                    "sequences of 64 tokens; drop --seq-len or give that length",
        ("--data", tiny_shards, "--model-set", "vocab_size=256"): f"error: --data {tiny_shards}: its 512 token ids "
                                                                  "do not fit the model's vocab_size 256; set "
                                                                  "--model-set vocab_size=512 or more",
        ("--json", str(tmp_path / "missing" / "b.json")): f"error: --json {tmp_path}/missing/b.json: folder "
                                                          f"{tmp_path}/missing does not exist",
        ("--json", str(tmp_path)): f"error: --json {tmp_path}: not a file that can be written",
        ("--set", "loss.copy_weight=0.5", "--set", "loss.copy_targets=numbers"): (
            "error: loss.copy_targets=numbers: the number tokens come from the shards' tokenizer; give --data SHARDS, "
            "or time the copy loss over all targets (--set loss.copy_targets=all)"),
    }
    for extra, message in refusals.items():
        assert bench.main([*base, *extra]) == 2, extra
        assert capsys.readouterr().err.strip().splitlines() == [message]
    for flag in ("--micro-batch", "--seq-len", "--grad-accum"):
        with pytest.raises(SystemExit):
            bench.parse_args([flag, "0"])
        assert "--seq-len, --micro-batch and --grad-accum must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------- error lines
def test_an_error_every_rank_meets_is_printed_by_rank_0_only(capsys):
    from pretrain.train import report_error

    for rank in (0, 1):
        report_error("batch.tokens=500 is not a multiple", rank=rank, world=2, every_rank=True)
    assert capsys.readouterr().err == "error: batch.tokens=500 is not a multiple\n"
    # An error of one rank's own (a shard it read) is printed by that rank, which it names.
    report_error("train-000001.tar: sample 7 is corrupt", rank=1, world=2, every_rank=False)
    assert capsys.readouterr().err == "error: rank 1: train-000001.tar: sample 7 is corrupt\n"


def test_training_bench_cases_share_one_teacher_per_precision_and_compile(monkeypatch):
    from types import SimpleNamespace

    from pretrain import bench

    loads = []

    def load_teacher(spec, **kw):  # a stand-in numbered by its load
        loads.append((spec, kw))
        return SimpleNamespace(number=len(loads), whole_logits_note=None)

    monkeypatch.setattr("pretrain.teacher.load_teacher", load_teacher)
    cfg = load_run_config(None, ["data.dir=d", "loss.distill_weight=1", "loss.teacher=t-dir"])
    compiled = load_run_config(None, ["data.dir=d", "loss.distill_weight=1", "loss.teacher=t-dir",
                                      "train.compile=true"])
    model = AtmaConfig.from_preset("tiny")
    loaded, cpu = {}, torch.device("cpu")
    bf16, fp32 = {"bf16": {"enabled": True}}, {"bf16": {"enabled": False}}
    assert [bench.case_teacher(cfg, model, ds, cpu, loaded).number for ds in (bf16, bf16, fp32, bf16)] == [1, 1, 2, 1]
    # a case that compiles its student gets a teacher with compiled blocks, loaded once for such cases
    assert [bench.case_teacher(compiled, model, bf16, cpu, loaded).number for _ in range(2)] == [3, 3]
    assert loads == [("t-dir", dict(device=cpu, bf16=True, vocab_size=model.vocab_size, compile_blocks=False)),
                     ("t-dir", dict(device=cpu, bf16=False, vocab_size=model.vocab_size, compile_blocks=False)),
                     ("t-dir", dict(device=cpu, bf16=True, vocab_size=model.vocab_size, compile_blocks=True))]
    assert bench.case_teacher(load_run_config(None, ["data.dir=d"]), model, bf16, cpu, loaded) is None  # no KD


def test_inputs_that_would_fail_after_the_engine_build_are_refused_at_start(tmp_path, monkeypatch):
    from pretrain.trainer import check_inputs

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    (shards / "train-000000.tar").write_bytes(b"")
    a_file = tmp_path / "a_file"
    a_file.write_text("")

    def refusal(*sets):
        cfg = load_run_config("pretrain/configs/tiny-cpu.yaml", [f"data.dir={shards}", f"run_dir={tmp_path / 'run'}",
                                                                 *sets])
        with pytest.raises(ConfigError) as info:
            check_inputs(cfg)
        return str(info.value)

    assert refusal(f"data.dir={shards / 'train-000000.tar'}") == (
        f"{shards / 'train-000000.tar'}: a file, not a directory; --data (data.dir) takes the shard directory, the "
        f"one holding manifest.json (here perhaps {shards})")
    for run_dir in (a_file, a_file / "run"):
        assert refusal(f"run_dir={run_dir}") == (
            f"{a_file}: a file, not a directory; --run-dir (run_dir) must be a directory or a path that does not "
            "exist yet")
    assert refusal("loss.distill_weight=1", "loss.teacher=/nonexistent") == (
        "loss.teacher '/nonexistent': no such directory, and not a Hugging Face model name (NAME or ORG/NAME); give "
        "an exported model directory (python -m pretrain.export) or a Hugging Face causal LM")
    assert refusal("loss.distill_weight=1", f"loss.teacher={a_file}") == (
        f"loss.teacher '{a_file}' is a file; give an exported model directory or a Hugging Face model name")
    monkeypatch.setenv("ATMA_KERNELS", "foo")
    assert refusal() == "the environment variable ATMA_KERNELS must be one of auto, triton, torch, got 'foo'"
    monkeypatch.setenv("ATMA_KERNELS", "torch")
    # What can still be right passes: a run dir to create, a teacher directory, a Hugging Face name while the hub
    # answers.
    monkeypatch.setattr("data_pipeline.sources.hub_unreachable", lambda **kwargs: None)
    for teacher in (shards, "gpt2", "org/some-model"):
        check_inputs(load_run_config(None, [f"data.dir={shards}", f"run_dir={tmp_path / 'new' / 'run'}",
                                            "loss.distill_weight=1", f"loss.teacher={teacher}"]))


def test_a_hugging_face_teacher_neither_cached_nor_reachable_is_refused_at_start(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pretrain.teacher import check_teacher

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--org--cached" / "refs").mkdir()
    (cache / "models--org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as info:
        check_teacher("org/missing")
    assert str(info.value) == (f"loss.teacher 'org/missing': no such directory, and not in the Hugging Face cache "
                               f"({cache}) while HF_HUB_OFFLINE is set; give an exported model directory (python -m "
                               "pretrain.export), or download the model once with the network on")
    check_teacher("org/cached")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers
    with pytest.raises(ValueError, match=r"^loss.teacher 'org/missing': no such directory, and not in the Hugging "
                                         r"Face cache, and the Hugging Face hub at http://127.0.0.1:9 is unreachable "
                                         r"\(.*\); to work offline, give an exported model directory"):
        check_teacher("org/missing")
    check_teacher("org/cached")


def test_a_start_up_refusal_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from pretrain import train
    from pretrain.signals import StopRequests

    monkeypatch.setattr(StopRequests, "watch_startup", lambda self: None)  # keep pytest's own Ctrl-C
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    args = ["--config", "pretrain/configs/tiny-cpu.yaml", "--data", str(tmp_path), "--run-dir", str(a_file)]
    assert train.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: {a_file}: a file, not a directory; --run-dir (run_dir) must be a directory or a path that does not "
        "exist yet\n")


def test_python_m_model_refuses_an_unknown_kernel_choice(monkeypatch, capsys):
    from model.__main__ import main

    monkeypatch.setenv("ATMA_KERNELS", "fast")
    assert main(["--seq-len", "8"]) == 2
    assert capsys.readouterr().err == (
        "error: the environment variable ATMA_KERNELS must be one of auto, triton, torch, got 'fast'\n")


# ---------------------------------------------------------------------- first-run op build
def test_an_op_not_built_yet_is_announced_before_the_build(tmp_path, monkeypatch, capsys):
    from pretrain.opbuild import announce_builds, pending_builds

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pending_builds(["CPUAdamBuilder"]) == ["CPUAdamBuilder"]
    capsys.readouterr()
    announce_builds(["CPUAdamBuilder"])
    assert capsys.readouterr().out == (
        "[atma] building DeepSpeed's CPU Adam (optimizer offload) op for this machine (one time, about a minute; "
        "cached under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)\n")
    # Built once: the cached library is found and nothing is said.
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    assert pending_builds(["CPUAdamBuilder"]) == []
    announce_builds(["CPUAdamBuilder"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("cache", [None, "xdg-cache"])
def test_the_extensions_root_is_torchs_default_without_importing_torch(tmp_path, monkeypatch, cache):
    from torch.utils.cpp_extension import get_default_build_root

    from pretrain.opbuild import extensions_root

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if cache is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / cache))
    assert extensions_root() == get_default_build_root()
    assert extensions_root({"TORCH_EXTENSIONS_DIR": "/ext"}) == "/ext"
    probe = "import sys; from pretrain.opbuild import extensions_root; extensions_root(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_only_the_build_locks_made_or_remade_after_the_snapshot_are_removed(tmp_path):
    from pretrain.opbuild import build_locks, remove_build_locks_made_after

    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    kept, remade = tmp_path / "py311_cpu" / "kept" / "lock", tmp_path / "remade" / "lock"
    new = tmp_path / "py311_cu128" / "new" / "lock"
    for lock in (kept, remade, new):
        lock.parent.mkdir(parents=True, exist_ok=True)
    kept.touch(), remade.touch()
    os.utime(remade, (time.time() - 60,) * 2)
    before = build_locks(env)
    assert set(before) == {str(kept), str(remade)}
    new.touch()
    os.utime(new, (time.time() - 120,) * 2)  # dated before the snapshot, as a coarse file-system clock may
    os.utime(remade, (time.time() - 30,) * 2)  # another build took the same op's lock since
    assert sorted(remove_build_locks_made_after(before, env)) == sorted([str(remade), str(new)])
    assert kept.exists() and not remade.exists() and not new.exists()


def test_a_build_lock_left_by_a_killed_build_is_refused_in_one_line(tmp_path, monkeypatch):
    from pretrain.opbuild import STALE_LOCK_SECONDS, check_build_locks
    from pretrain.step import TrainingError

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    check_build_locks(["CPUAdamBuilder"])  # no lock
    lock.write_bytes(b"")
    check_build_locks(["CPUAdamBuilder"])  # a build running now: torch waits for it
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.raises(TrainingError) as err:
        check_build_locks(["CPUAdamBuilder"])
    assert str(err.value) == (
        f"{lock} is 16 minutes old: an interrupted build of a DeepSpeed op left it, and loading the op would wait "
        f"for it forever; if no build is running, delete it (rm {lock}) and start again")


def test_training_bench_reports_the_polar_backward_auto_picks(monkeypatch):
    from pretrain import bench
    from kernels.polar import triton_impl

    monkeypatch.setattr(triton_impl, "_AUTO_CHOICES", {
        ("cuda:0", torch.bfloat16, 128, False, 2048): ("split", {"two_pass": 2.05, "split": 1.8}),
        ("cpu", torch.float32, 64, True, 256): ("two_pass", None),
    })
    assert bench.polar_backward_picks() == [
        {"shape": "cuda:0 bfloat16 d=128 T<=2048", "chosen": "split", "ms": {"two_pass": 2.05, "split": 1.8},
         "text": "cuda:0 bfloat16 d=128 T<=2048: split (timed on first use: two_pass 2.050 ms, split 1.800 ms)"},
        {"shape": "cpu float32 d=64 T<=256, windowed", "chosen": "two_pass", "ms": None,
         "text": "cpu float32 d=64 T<=256, windowed: two_pass (nothing timed)"},
    ]
    monkeypatch.delitem(sys.modules, "kernels.polar.triton_impl")
    assert bench.polar_backward_picks() == []  # the Triton path never ran in this process


def test_trainer_prints_the_polar_backward_auto_picks_once_known(monkeypatch):
    from types import SimpleNamespace

    from kernels.polar import triton_impl
    from pretrain.trainer import Trainer

    printed = []
    fake = SimpleNamespace(monitor=SimpleNamespace(print=printed.append))
    monkeypatch.setattr(triton_impl, "_AUTO_CHOICES", {})
    Trainer._report_polar_backward_picks(fake)
    assert printed == []
    monkeypatch.setattr(triton_impl, "_AUTO_CHOICES", {
        ("cuda:0", torch.bfloat16, 128, False, 2048): ("split", {"two_pass": 2.05, "split": 1.8}),
        ("cuda:0", torch.bfloat16, 128, True, 4096): ("two_pass", None),
    })
    Trainer._report_polar_backward_picks(fake)
    assert printed == ["[atma] Polar backward (ATMA_POLAR_BWD=auto) at cuda:0 bfloat16 d=128 T<=2048: split (timed "
                       "on first use: two_pass 2.050 ms, split 1.800 ms)",
                       "[atma] Polar backward (ATMA_POLAR_BWD=auto) at cuda:0 bfloat16 d=128 T<=4096, windowed: "
                       "two_pass (nothing timed)"]


def test_compiled_blocks_get_the_activation_memory_budget_of_the_run_config():
    from types import SimpleNamespace

    from pretrain import compilation

    calls = []
    engine = SimpleNamespace(module=SimpleNamespace(compile_blocks=lambda **kw: calls.append(kw)),
                             compile=lambda: calls.append("engine.compile"))
    compilation.compile_engine(engine, "blocks")
    compilation.compile_engine(engine, "blocks", activation_memory_budget=0.25)
    compilation.compile_engine(engine, None, activation_memory_budget=0.25)
    assert calls == [{}, {"backend": compilation.memory_budget_backend(0.25)}]
    # one backend per budget: Dynamo shares a graph between models compiled with the same backend
    assert compilation.memory_budget_backend(0.25) is not compilation.memory_budget_backend(0.5)
    assert compilation.memory_budget_backend(0.25).__name__ == "inductor_activation_memory_budget_0.25"
    with pytest.warns(UserWarning, match="activation_memory_budget=0.25 has no effect here: the blocks are not "
                                         "compiled on cpu"):
        compilation.configure_compile({}, None, device_type="cpu", source="x.json", budget=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compilation.configure_compile({}, None, device_type="cpu", source="x.json")


def test_training_bench_takes_an_activation_memory_budget_as_an_ac_value(tmp_path):
    from pretrain import bench
    from pretrain.bench import Case, ratios

    assert bench._cases("polar:3:budget0.5:blocks,polar:3:none:blocks") == [("polar", 3, "budget0.5", "blocks"),
                                                                             ("polar", 3, "none", "blocks")]
    for bad in ("polar:3:budget1:blocks", "polar:3:budget-0.1:blocks", "polar:3:budgetx:blocks", "polar:3:budget:blocks"):
        with pytest.raises(argparse.ArgumentTypeError, match="CORE:ZERO:AC:COMPILE"):
            bench._cases(bad)
    assert bench._ac_list("none,budget0,budget0.25") == ["none", "budget0", "budget0.25"]
    with pytest.raises(argparse.ArgumentTypeError, match="budget<F> with 0 <= F < 1"):
        bench._ac_list("budget2")
    assert bench.ac_settings("budget0.25") == ["train.activation_checkpointing=none",
                                               "train.activation_memory_budget=0.25"]
    assert bench.ac_settings("all") == ["train.activation_checkpointing=all", "train.activation_memory_budget=1.0"]
    # a run config's budget is the default AC value of its cases; a policy case sets the budget back to 1
    run = tmp_path / "run.yaml"
    run.write_text("data:\n  dir: d\ntrain:\n  compile: true\n  activation_memory_budget: 0.25\n")
    args = bench.parse_args(["--device", "cpu", "--config", str(run)])
    args.model_overrides = bench.model_overrides(args.model_set)
    args.seq_len = 64
    assert {case.checkpointing for case in bench.plan_cases(args)} == {"budget0.25"}
    # each AC value is compared with no recomputation
    cases = []
    for ac, seconds in (("none", 1.0), ("all", 1.4), ("budget0.5", 1.1)):
        case = Case("polar", 3, ac, "blocks")
        case.result = {"step_s_median": seconds}
        cases.append(case)
    found = {r["ratio"]: r["value"] for r in ratios(cases, "polar")}
    assert found == {"checkpointing all/none step": pytest.approx(1.4),
                     "checkpointing budget0.5/none step": pytest.approx(1.1)}


def _deepspeeds_group_norm(grads, *, zero3: bool = True) -> torch.Tensor:
    """A group's gradient norm as DeepSpeed's `get_grad_norm_direct` takes it, one tensor at a time: ZeRO-3's, or
    ZeRO-1/2's (which sums the squares in fp64, then goes on in fp32)."""
    norms = torch.stack([torch.linalg.vector_norm(g.to(torch.float64), ord=2.0) for g in grads])
    total = torch.sum(torch.pow(norms, 2.0)) if zero3 else norms.pow(2.0).sum().float()
    total = total ** 0.5
    return torch.where(total.isinf() | total.isnan(), torch.tensor(-1.0), total)


def test_gradient_norms_take_deepspeeds_norm_of_each_group_in_one_reduction():
    from pretrain.grad_norm import gradient_norms

    generator = torch.Generator().manual_seed(0)
    # Groups of different sizes and scales, so that a tensor counted in the wrong group shows.
    groups = [[torch.randn(64, 33, generator=generator) * 10.0**k for k in range(-3, 2)],
              [torch.randn(5, generator=generator)],
              [torch.randn(3, 7, generator=generator) * 1e3, torch.randn(1000, generator=generator) * 1e-4],
              [torch.randn(17, 4, generator=generator).to(torch.bfloat16) for _ in range(3)]]
    norms = gradient_norms(groups)
    assert len(norms) == len(groups)
    for norm, group in zip(norms, groups):
        assert norm.dtype == torch.float64 and norm.dim() == 0
        assert torch.equal(norm, _deepspeeds_group_norm(group))  # bit for bit on the CPU
        oracle = torch.cat([g.to(torch.float64).flatten() for g in group]).norm()
        assert norm.item() == pytest.approx(oracle.item(), rel=1e-14)
    # ZeRO-1/2 cast each group's sum to fp32 before reducing it.
    for norm, group in zip(gradient_norms(groups, sum_dtype=torch.float32), groups):
        assert norm.dtype == torch.float32 and torch.equal(norm, _deepspeeds_group_norm(group, zero3=False))
    # The sums of squares are added up over the ranks once, all groups together: two ranks with the same
    # gradients give sqrt(2) times each norm.
    reduced = []
    doubled = gradient_norms(groups, all_reduce=lambda totals: reduced.append(totals.shape) or totals.mul_(2.0))
    assert reduced == [torch.Size([4])]
    assert [d.item() for d in doubled] == pytest.approx([math.sqrt(2.0) * n.item() for n in norms], rel=1e-14)
    # A non-finite gradient makes its own group's norm -1 (DeepSpeed's mark of an invalid norm), no other.
    for bad in (float("inf"), float("nan")):
        broken = [list(group) for group in groups]
        broken[2][1] = broken[2][1].clone()
        broken[2][1][3] = bad
        marked = gradient_norms(broken)
        assert marked[2].item() == -1.0
        assert all(torch.equal(marked[i], norms[i]) for i in (0, 1, 3))
    # A rank without gradients still joins the other ranks' all-reduce, with zeros.
    reduced.clear()
    empty = gradient_norms([[], []], device=torch.device("cpu"),
                           all_reduce=lambda totals: reduced.append(totals.tolist()) or totals.add_(9.0))
    assert reduced == [[0.0, 0.0]] and [n.item() for n in empty] == [3.0, 3.0]
    with pytest.raises(ValueError, match="needs a device where no group has a gradient tensor"):
        gradient_norms([[], []])


def test_zero_optimizers_take_their_gradient_norm_in_one_reduction_only_where_that_is_the_same_norm(monkeypatch):
    import deepspeed.comm

    from pretrain import grad_norm

    class Optimizer:  # the parts of DeepSpeed's ZeRO optimizers that the change reads and replaces
        def __init__(self, params, stage, **settings):
            groups = [params[:1], params[1:]]
            self.averaged_gradients = {0: [torch.ones(2, 2)], 1: [torch.ones(9), torch.ones(4, 4)]}
            if stage == 3:
                self.fp16_groups, self.offload_optimizer = groups, False
            else:
                # ZeRO-1/2 pair each real gradient with a parameter: the bias stands for two here
                self.bit16_groups = self.params_in_partition = [groups[0], groups[1] * 2]
                self.cpu_offload = self.has_moe_layers = False
                padding = torch.full((3,), 100.0)
                padding._zero_padding = True  # the partition's padding, left out of the norm
                self.averaged_gradients[1].insert(1, padding)
            self.model_parallel_group, self.dp_process_group, self.loss_scale = None, "ranks", 4.0
            self.__dict__.update(settings)

        def _get_norm_groups(self):
            return "DeepSpeed's"

        def scaled_global_norm(self, norm_type=2):
            return "DeepSpeed's"

    class Engine:
        def __init__(self, stage=3, **settings):
            self.module = torch.nn.Linear(2, 2)
            self.optimizer, self.stage = Optimizer(list(self.module.parameters()), stage, **settings), stage

        def zero_optimization_stage(self):
            return self.stage

        def norm(self):
            return getattr(self.optimizer, grad_norm.NORM_METHODS[self.stage])()

    ranks = {"ranks": 1, "other ranks": 2}
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda group: ranks[group])
    ds = {"zero_optimization": {"stage": 3}}
    engine = Engine()
    assert grad_norm.fuse_gradient_norm(engine, ds)
    assert [n.item() for n in engine.norm()] == [2.0, 5.0]  # each sub-group's: sqrt(4), sqrt(9 + 16)
    # ZeRO-1/2 combine the groups' norms into one: sqrt(4 + 25), without the padding.
    for stage in (1, 2):
        engine = Engine(stage=stage)
        assert grad_norm.fuse_gradient_norm(engine, ds)
        assert engine.norm().item() == pytest.approx(math.sqrt(29.0), rel=1e-7)
    # A Muon update marked as lacking the loss scale gets it back, as in DeepSpeed's own norm.
    engine = Engine(_muon_update_lacks_loss_scale=lambda i: i == 1)
    assert grad_norm.fuse_gradient_norm(engine, ds)
    assert [n.item() for n in engine.norm()] == [2.0, 20.0]
    engine = Engine(stage=2, _muon_update_lacks_loss_scale=lambda i: i == 1)
    assert grad_norm.fuse_gradient_norm(engine, ds)
    assert engine.norm().item() == pytest.approx(math.sqrt(4.0 + 400.0), rel=1e-7)
    # Over two ranks the sums are all-reduced in the parameters' partition group.
    calls = []
    monkeypatch.setattr(deepspeed.comm, "all_reduce", lambda t, op, group: calls.append((t.tolist(), group)))
    for stage in (3, 2):
        engine = Engine(stage=stage, dp_process_group="other ranks")
        assert grad_norm.fuse_gradient_norm(engine, ds)
        engine.norm()
    assert calls == [([4.0, 25.0], "other ranks")] * 2

    def engine_with(stage=3, *, param=None, **settings):
        engine = Engine(stage, **settings)
        for name, value in (param or {}).items():
            setattr(engine.module.bias, name, value)
        return engine

    unchanged = [
        (engine_with(stage=0), ds), (engine_with(offload_optimizer=True), ds),
        (engine_with(model_parallel_group="tensor ranks"), ds),
        (engine_with(param={"ds_zero_placement_family": "autoep_expert"}), ds),
        (engine_with(param={"ds_process_group": "other ranks"}), ds),
        (engine_with(), {"zero_optimization": {"stage": 3}, "compile": {"deepcompile": True}}),
        (engine_with(2, cpu_offload=True), ds), (engine_with(2, has_moe_layers=True), ds),
        (engine_with(2, model_parallel_group="tensor ranks"), ds),
        (engine_with(2, param={"ds_pipe_replicated": True}), ds),
    ]
    for engine, config in unchanged:
        assert not grad_norm.fuse_gradient_norm(engine, config)
        assert "_get_norm_groups" not in vars(engine.optimizer) and "scaled_global_norm" not in vars(engine.optimizer)
    engine = Engine()
    del engine.optimizer.averaged_gradients  # a DeepSpeed whose optimizer is laid out otherwise
    with pytest.warns(UserWarning, match="lacks averaged_gradients: ZeRO-3 takes its gradient norm one tensor"):
        assert not grad_norm.fuse_gradient_norm(engine, ds)
    engine = Engine(stage=2)
    del engine.optimizer.params_in_partition
    with pytest.warns(UserWarning, match="lacks params_in_partition: ZeRO-2 takes its gradient norm one tensor"):
        assert not grad_norm.fuse_gradient_norm(engine, ds)
    # DeepSpeed's other wrappers (BF16_Optimizer under ZeRO-1) take their norm otherwise: left alone, quietly.
    engine = Engine(stage=1)
    engine.optimizer = object()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not grad_norm.fuse_gradient_norm(engine, ds)
