"""Which Adam the trainer steps with (DeepSpeed's fused Adam, or torch's fused AdamW where it cannot be
compiled), and checkpoints that move between the two: DeepSpeed's Adams count steps in ints, torch's in
tensors."""

import copy
import subprocess
import sys

import pytest
import torch

from model import AtmaConfig, AtmaForCausalLM
from pretrain import optim
from pretrain.config import load_run_config
from pretrain.opbuild import toolkit_missing
from pretrain.optim import AdamChoice, build_optimizer, choose_adam

from test_pretrain_distributed import ROOT, env


class IntStepAdamW(torch.optim.Optimizer):
    """AdamW counting steps in Python ints, as DeepSpeed's fused and CPU Adams do (a CPU stand-in)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                assert type(state["step"]) is int, type(state["step"])
                state["step"] += 1
                t = state["step"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


TORCH = AdamChoice("torch_adamw", torch.optim.AdamW, {})
TORCH_FUSED = AdamChoice("torch_fused_adamw", torch.optim.AdamW, {"fused": True})
INT_STEPS = AdamChoice("int_steps", IntStepAdamW, {})


def test_choose_adam_per_device_and_toolkit(monkeypatch):
    assert choose_adam("cpu", False) == TORCH
    offload = choose_adam("cpu", True)
    assert (offload.name, offload.cls.__name__, offload.builds) == ("deepspeed_cpu_adam", "DeepSpeedCPUAdam",
                                                                    "CPUAdamBuilder")
    monkeypatch.setattr(optim, "toolkit_missing", {"fused_adam": ""}.get)
    fused = choose_adam("cuda", False)
    assert (fused.name, fused.cls.__name__, fused.kwargs, fused.builds, fused.note) == (
        "deepspeed_fused_adam", "FusedAdam", {"adam_w_mode": True}, "FusedAdamBuilder", "")
    missing = {"fused_adam": "no GPU toolkit to compile it (reason)"}
    monkeypatch.setattr(optim, "toolkit_missing", missing.get)
    fallback = choose_adam("cuda", False)
    assert (fallback.name, fallback.cls, fallback.kwargs, fallback.builds) == (
        "torch_fused_adamw", torch.optim.AdamW, {"fused": True}, None)
    assert "no GPU toolkit to compile it (reason)" in fallback.note and "CUDA_HOME" in fallback.note


def test_fused_adam_toolkit_detection(monkeypatch, tmp_path):
    from deepspeed import git_version_info
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(git_version_info, "installed_ops", {"fused_adam": False})
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert toolkit_missing("fused_adam") == "no GPU toolkit to compile it (CUDA_HOME is not set and no nvcc is on PATH)"
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))  # a runtime-only CUDA directory
    assert toolkit_missing("fused_adam").startswith(f"no nvcc in {tmp_path}/bin")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    assert toolkit_missing("fused_adam") == ""
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(git_version_info, "installed_ops", {"fused_adam": True})  # built into the wheel
    assert toolkit_missing("fused_adam") == ""


def _model():
    torch.manual_seed(0)
    return AtmaForCausalLM(AtmaConfig.from_preset("tiny", hidden_size=32, vocab_size=64))


def _steps(model, optimizer, first, last):
    """Optimizer steps first..last on gradients that depend on the step and the weights."""
    for step in range(first, last + 1):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 64, (2, 16), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()


def _restore_in_place(optimizer, saved_state):
    """Write saved per-parameter state straight into `optimizer`, as DeepSpeed's universal restore does."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, state in saved_state["state"].items():
        optimizer.state[params[index]] = dict(state)
    return optim.match_loaded_step_counters(optimizer)


@pytest.mark.parametrize("restore", ["load_state_dict", "in_place"])
@pytest.mark.parametrize("saved_by, loaded_by", [(INT_STEPS, TORCH_FUSED), (INT_STEPS, TORCH),
                                                 (TORCH_FUSED, INT_STEPS), (TORCH, INT_STEPS)],
                         ids=lambda c: c.name)
def test_a_checkpoint_moves_between_int_and_tensor_step_counters(saved_by, loaded_by, restore):
    cfg = load_run_config(None, ["data.dir=d", "optim.lr=1e-2"]).optim
    model = _model()
    optimizer = build_optimizer(model, cfg, saved_by)
    _steps(model, optimizer, 1, 3)
    saved_weights, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _steps(model, optimizer, 4, 5)  # the run that never stopped

    resumed = _model()
    resumed.load_state_dict(saved_weights)
    other = build_optimizer(resumed, cfg, loaded_by)
    if restore == "in_place":
        assert _restore_in_place(other, saved_state) == len(saved_state["state"])
    else:
        other.load_state_dict(saved_state)
    counters = [s["step"] for s in other.state.values()]
    assert all(isinstance(c, torch.Tensor) == (loaded_by.cls is torch.optim.AdamW) for c in counters)
    assert all(float(c) == 3 for c in counters)
    _steps(resumed, other, 4, 5)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_muon_counts_its_auxiliary_adam_steps_as_that_adam_does():
    cfg = load_run_config(None, ["data.dir=d", "optim.name=muon"]).optim
    muon = build_optimizer(_model(), cfg, TORCH)
    assert optim.keeps_tensor_steps(muon) and not optim.keeps_tensor_steps(IntStepAdamW([torch.zeros(1)]))
    state = muon.state_dict()
    aux = [i for g in state["param_groups"] if not g["use_muon"] for i in g["params"]]
    state["state"] = {i: {"step": 7, "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)} for i in aux}
    muon.load_state_dict(state)
    assert {type(s["step"]) for s in muon.state.values()} == {torch.Tensor}


# Through DeepSpeed ZeRO-3 (one CPU rank, fp32), as the trainer builds the engines: two steps with torch's fused
# AdamW (a machine without a CUDA toolkit), a checkpoint, the third step continued there and, from the
# checkpoint, with the int-counting Adam (DeepSpeed's fused Adam on a machine with one).
ZERO3_RESUME = r"""
import sys
import torch
import deepspeed
from model import AtmaConfig
from pretrain import trainer
from pretrain.config import load_run_config
from pretrain.optim import AdamChoice
from pretrain.shutdown import exit_without_teardown
from pretrain.trainer import BatchPlan, build_ds_config, build_engine, init_distributed
sys.path.insert(0, "tests")
from test_adam_choice import IntStepAdamW

_, _, device = init_distributed()
cfg = load_run_config(None, ["data.dir=unused", "deepspeed_config=ds_configs/zero3_bf16.json",
                             "train.precision=fp32", "optim.lr=1e-2"])
ds = build_ds_config(cfg, BatchPlan(16, 2, 1, 1), device_type=device.type)
ds["zero_allow_untested_optimizer"] = True
model_config = AtmaConfig.from_preset("tiny", hidden_size=32, vocab_size=64)


def engine_with(choice):
    trainer.choose_adam = lambda device_type, offload: choice
    return build_engine(cfg, model_config, ds, device=device)[0]


def step(engine, n):
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(n))
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()


def weights(engine):
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


first = engine_with(AdamChoice("torch_fused_adamw", torch.optim.AdamW, {"fused": True}))
step(first, 1)
step(first, 2)
first.save_checkpoint(sys.argv[1], tag="two")
step(first, 3)
second = engine_with(AdamChoice("int_steps", IntStepAdamW, {}))
second.load_checkpoint(sys.argv[1], tag="two")
step(second, 3)
worst = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(weights(first), weights(second)))
print("worst relative difference", worst)
assert worst < 1e-5, worst
exit_without_teardown(0)  # as the trainer's entry point ends
"""


def test_a_zero3_checkpoint_of_torch_fused_adamw_continues_under_an_int_step_adam(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(ZERO3_RESUME)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "worst relative difference" in proc.stdout
