"""Gradient accumulation and reduction in bf16 training: the shipped ZeRO-1/2/3 JSONs add the micro-batches'
gradients in fp32 and reduce them over the ranks in fp32, so the gradient the optimizer steps on is the mean over
the ranks of the sum of the micro-batch gradients to fp32 rounding."""

import json
import os
import subprocess
import sys

import pytest

from test_pretrain_distributed import ROOT, env
from test_pretrain_throughput import run_script

pytestmark = pytest.mark.slow

# For each case of argv[1] (a JSON list of [DeepSpeed JSON, {DeepSpeed setting: value} over it]), trains three steps
# of 16 micro-batches per rank on CPU ranks in bf16 through the trainer's step and engine, each rank on its own
# micro-batches. Each micro-batch's gradient of each parameter is added in fp64 as autograd hands it over; at the
# third step, the gradient DeepSpeed accumulated and reduced is compared with the mean over the ranks of those sums.
# Rank 0 prints a JSON list with, per case, {"optimizer", "relative_error" (over all parameters), "worst_parameter"}.
ACCUMULATED = r"""
import itertools, json, sys
from types import SimpleNamespace
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from model import AtmaConfig
from pretrain.bench import batch_stream
from pretrain.config import load_run_config
from pretrain.optim import apply_lr
from pretrain.shutdown import exit_without_teardown
from pretrain.step import TrainStep
from pretrain.trainer import BatchPlan, build_ds_config, build_engine, init_distributed

MICRO_BATCHES = 16
rank, world, device = init_distributed()
(cases,) = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank


def measure(ds_json, settings):
    cfg = load_run_config(None, ["data.dir=unused", f"deepspeed_config=ds_configs/{ds_json}",
                                 "train.precision=bf16", "optim.grad_clip=0"])
    ds = build_ds_config(cfg, BatchPlan(64, 2, MICRO_BATCHES, world), device_type=device.type, overrides=settings)
    engine, optimizer = build_engine(cfg, AtmaConfig.from_preset("tiny", vocab_size=512), ds, device=device)
    apply_lr(optimizer, 1e-3)
    params = dict(engine.module.named_parameters())
    exact = {name: torch.zeros(getattr(p, "ds_numel", p.numel()), dtype=torch.float64) for name, p in params.items()}

    def add_exactly(name, grad):
        exact[name].add_(grad.detach().double().reshape(-1))

    for name, p in params.items():
        p.register_hook(lambda grad, name=name: add_exactly(name, grad))
    accumulated = {}
    deepspeed_step = engine.step

    def step_after_reading_gradients():
        if engine.is_gradient_accumulation_boundary():
            for name, p in params.items():
                accumulated[name] = safe_get_full_grad(p).detach().double().reshape(-1)
        deepspeed_step()

    engine.step = step_after_reading_gradients
    step = TrainStep(engine, grad_accum=MICRO_BATCHES, loss=cfg.loss, nan_policy="stop", device=device)
    random_tokens = batch_stream(SimpleNamespace(data=None, micro_batch=2, seq_len=64), 512)
    stream = itertools.islice(random_tokens, rank, None, world)  # each rank every world-th micro-batch of one stream
    for _ in range(2):  # the LM head and each block's output start at zero: gradients reach every block from step 3
        assert step.run(stream).applied
    for running in exact.values():
        running.zero_()
    assert step.run(stream).applied
    assert accumulated.keys() == exact.keys()
    for running in exact.values():  # DeepSpeed averages the gradients over the ranks
        dist.all_reduce(running)
        running /= world
    errors = {name: ((accumulated[name] - exact[name]).norm() / exact[name].norm()).item()
              for name in exact if exact[name].norm() > 0}
    assert len(errors) > len(exact) // 2, errors  # most parameters took a gradient
    total = torch.cat([accumulated[n] - exact[n] for n in exact]).norm() / torch.cat(list(exact.values())).norm()
    worst = max(errors, key=errors.get)
    return {"optimizer": type(engine.optimizer).__name__, "relative_error": total.item(),
            "worst_parameter": [worst, errors[worst]]}


results = [measure(ds_json, settings) for ds_json, settings in json.loads(cases)]
if rank == 0:
    print("results:", json.dumps(results))
dist.barrier()
exit_without_teardown(0)
"""


def accumulate(tmp_path, cases: list, ranks: int = 1) -> list[dict]:
    """ACCUMULATED's figures for each of `cases` ((DeepSpeed JSON, {setting: value} over it)), one step of 16
    micro-batches per rank on `ranks` CPU ranks (more than one through the deepspeed launcher), in one process
    per rank."""
    cases = json.dumps(cases)
    if ranks == 1:
        proc = run_script(tmp_path, "accumulated.py", ACCUMULATED, cases)
    else:
        script = tmp_path / "accumulated.py"
        script.write_text(ACCUMULATED)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(29100 + os.getpid() % 200), str(script), cases]
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("results: ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    return json.loads(lines[0].removeprefix("results: "))


SHIPPED = {"zero1_bf16.json": "BF16_Optimizer", "zero2_bf16.json": "DeepSpeedZeroOptimizer",
           "zero3_bf16.json": "DeepSpeedZeroOptimizer_Stage3"}


def test_shipped_zero_jsons_accumulate_bf16_gradients_in_fp32(tmp_path):
    # Adding 16 bf16 gradients in bf16 loses about 5e-3 of the sum (8 bits of mantissa); in fp32, 1e-8. The last
    # case adds them in bf16, DeepSpeed's default, so that the bound is seen to tell the two apart.
    cases = [(name, {}) for name in SHIPPED] + [("zero3_bf16.json", {"data_types.grad_accum_dtype": "bf16"})]
    *shipped, in_bf16 = accumulate(tmp_path, cases)
    for (name, optimizer), result in zip(SHIPPED.items(), shipped):
        assert result["optimizer"] == optimizer, (name, result)
        assert result["relative_error"] < 1e-6 and result["worst_parameter"][1] < 1e-6, (name, result)
    assert in_bf16["relative_error"] > 1e-4, in_bf16


def test_shipped_zero_jsons_reduce_bf16_gradients_over_two_ranks_in_fp32(tmp_path):
    # ZeRO-2/3 reduce each micro-batch's gradient over the ranks as it is produced, ZeRO-1 the accumulated sum once
    # per step; in fp32 (the JSONs' communication_data_type) the mean stays exact to fp32 rounding. The last case
    # reduces in bf16, DeepSpeed's default, which rounds each micro-batch's sum over the ranks.
    cases = [(name, {}) for name in SHIPPED] + [("zero3_bf16.json", {"communication_data_type": "bf16"})]
    *shipped, in_bf16 = accumulate(tmp_path, cases, ranks=2)
    for name, result in zip(SHIPPED, shipped):
        assert result["relative_error"] < 1e-6 and result["worst_parameter"][1] < 1e-6, (name, result)
    assert in_bf16["relative_error"] > 1e-4, in_bf16
