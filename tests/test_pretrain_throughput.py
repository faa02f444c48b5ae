"""Training-step throughput on CPU ranks (gloo): compiled and eager training agree under ZeRO-3, the
step makes one host sync, and the FLA timing-only switch never reaches training."""

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from test_pretrain_distributed import BASE, ROOT, env, final_weights, losses, train

pytestmark = pytest.mark.slow


def run_script(tmp_path, name: str, source: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Write `source` to tmp_path/name, run it with this Python from the project root, check that it exited
    with status 0 and return the finished process."""
    script = tmp_path / name
    script.write_text(source)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_bench(*args, timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
    """Run `python -m pretrain.bench` with `args` from the project root (`extra_env` added to its environment),
    check that it exited with status 0 and return the finished process."""
    proc = subprocess.run([sys.executable, "-m", "pretrain.bench", *map(str, args)], cwd=ROOT,
                          env={**env(), **extra_env}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


# Runs the trainer on every rank with the host-sync entry points counted. A call counts when it
# comes from the project's training code (pretrain/, model/, kernels/), keyed by the trainer's
# step counter at the time; DeepSpeed's own calls (its optimizer's overflow check, and its accelerator's
# device synchronisations, which are no-ops on the CPU but wait for a GPU) are counted apart. Writes
# {"ours": {step: {kind: n}}, "deepspeed": {...}} per rank.
SYNC_COUNTER = r"""
import collections, json, os, sys
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from pretrain.config import load_run_config
from pretrain.shutdown import exit_without_teardown
from pretrain.trainer import Trainer

ROOT = os.getcwd()
OURS = tuple(os.path.join(ROOT, pkg) + os.sep for pkg in ("pretrain", "model", "kernels"))
counts = {"ours": collections.defaultdict(collections.Counter),
          "deepspeed": collections.defaultdict(collections.Counter)}
trainer = None


def counted(kind, fn):
    def wrapper(*args, **kwargs):
        if trainer is not None:
            caller = sys._getframe(1).f_code.co_filename
            who = "ours" if caller.startswith(OURS) else "deepspeed" if "deepspeed" in caller else None
            if who:
                counts[who][trainer.step][kind] += 1
        return fn(*args, **kwargs)
    return wrapper


for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
    setattr(torch.Tensor, name, counted("read", getattr(torch.Tensor, name)))
torch.cuda.synchronize = counted("read", torch.cuda.synchronize)
accelerator = get_accelerator()  # DeepSpeed's device synchronisations (a no-op on the CPU, counted all the same)
accelerator.synchronize = counted("read", accelerator.synchronize)
for name in ("all_reduce", "all_gather", "broadcast", "barrier", "reduce_scatter_tensor", "all_gather_into_tensor"):
    setattr(dist, name, counted("collective", getattr(dist, name)))

out, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
cfg = load_run_config(None, overrides)
trainer = Trainer(cfg)
trainer.train()
with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
    json.dump(counts, f)
trainer.close()
exit_without_teardown(0)  # as the trainer's entry point ends
"""


def count_syncs(tiny_shards, tmp_path, ranks: int, max_steps: int, *overrides: str) -> list[dict]:
    """SYNC_COUNTER's counts of each rank after training `max_steps` steps on `ranks` CPU ranks, two micro-batches
    per step, logged at the first and the last step only, no validation, one checkpoint."""
    script = tmp_path / "count_syncs.py"
    script.write_text(SYNC_COUNTER)
    out = tmp_path / "syncs"
    overrides = ["data.dir=" + tiny_shards, f"run_dir={tmp_path / 'run'}", f"batch.tokens={512 * ranks}",
                 "batch.micro_batch_size=4", f"train.max_steps={max_steps}", "logging.every=1000",
                 "logging.val_every=0", "logging.progress=false", "logging.tensorboard=false",
                 "checkpoint.every=1000", "data.shuffle=false", "logging.throughput_warmup_steps=0", *overrides]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(29700 + os.getpid() % 200), str(script), str(out), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((tmp_path / f"syncs.rank{rank}.json").read_text()) for rank in range(ranks)]


def test_one_host_sync_per_optimizer_step(tiny_shards, tmp_path):
    for rank, counts in enumerate(count_syncs(tiny_shards, tmp_path, 2, 8, "train.precision=fp32")):
        # Keys 2..6 hold the whole of steps 3..7 (key 1 also holds step 1's log, key 7 step 8's).
        for step in map(str, range(2, 7)):
            assert counts["ours"][step] == {"read": 1, "collective": 1}, (rank, step, counts)
        # DeepSpeed's ZeRO-3 optimizer reads its gradient norm once per step (its non-finite check); its
        # gathers and reductions are asynchronous collectives, not reads. Its throughput timer, which would
        # synchronise the device as each micro-batch's forward starts and as its step ends, is off.
        assert all(counts["deepspeed"][s].get("read", 0) <= 1 for s in map(str, range(2, 7))), counts["deepspeed"]


@pytest.mark.parametrize(("ds_json", "reads"), [("zero0_bf16.json", 10), ("zero1_bf16.json", 1), ("zero2_bf16.json", 1),
                                               ("zero1_bf16_accumulation.json", 1)])
def test_zero0_to_zero2_read_from_the_device_no_more_than_for_their_norm(tiny_shards, tmp_path, ds_json, reads):
    # In bf16 DeepSpeed's ZeRO-1/2 step reads its overflow check, its norm's check and, in each parameter group, the
    # norm again for the clip factor (7 reads); with the overflow left to the norm and the clip factor on the device,
    # the norm's check alone. Its ZeRO-0 step (on the CPU the wrapper of optimizers other than FusedAdam) read each
    # gradient tensor for overflow (80 reads), and reads its norm: twice in each of the five parameter groups. The
    # shipped ZeRO-1 JSON accumulates in fp32, so DeepSpeed runs its BF16_Optimizer, which read whether its norm is
    # finite and whether to clip; with its clip factor on the device, whether its norm is finite alone. With bf16
    # accumulation ("_accumulation": the JSON without its data_types and communication_data_type), the ZeRO
    # optimizer again.
    path = f"ds_configs/{ds_json}"
    if ds_json == "zero1_bf16_accumulation.json":
        with open("ds_configs/zero1_bf16.json") as f:
            ds = json.load(f)
        del ds["data_types"], ds["communication_data_type"]
        path = tmp_path / ds_json
        path.write_text(json.dumps(ds))
    (counts,) = count_syncs(tiny_shards, tmp_path, 1, 5, "train.precision=bf16", f"deepspeed_config={path}")
    for step in ("2", "3"):  # the whole of steps 3 and 4
        assert counts["ours"][step] == {"read": 1, "collective": 1}, (step, counts)
        assert counts["deepspeed"][step].get("read", 0) == reads, (step, counts["deepspeed"])


# Runs the trainer on one rank and counts, per trainer step and calling function, the ZeRO-3 parameter
# gathers that would make the host wait for the GPU: a wait on a one-way partition (DeepSpeed's
# NoGatherHandle and NoGatherCoalescedHandle) synchronises the current CUDA stream, which the CPU
# accelerator skips. A handle is counted once, at its first wait. Also counts, per step and module class,
# DeepSpeed's module fetches (its hooks before each module's forward and backward). Writes
# {"fetches": {step: {caller: n}}, "modules": {step: {class: n}}}, the effective persistence threshold and
# what Dynamo built.
FETCH_COUNTER = r"""
import collections, json, sys
import deepspeed.runtime.zero.partition_parameters as pp
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
from pretrain.compilation import dynamo_summary
from pretrain.config import load_run_config
from pretrain.shutdown import exit_without_teardown
from pretrain.trainer import Trainer

counts = collections.defaultdict(collections.Counter)
modules = collections.defaultdict(collections.Counter)
trainer = None
fetch_sub_module = PartitionedParameterCoordinator.fetch_sub_module


def fetch_counted(self, module, *args, **kwargs):
    if trainer is not None:
        modules[trainer.step][type(module).__name__] += 1
    return fetch_sub_module(self, module, *args, **kwargs)


PartitionedParameterCoordinator.fetch_sub_module = fetch_counted


def counted(cls):
    wait = cls.wait

    def wrapper(self, *args, **kwargs):
        if trainer is not None and not getattr(self, f"_{cls.__name__}__complete"):
            counts[trainer.step][sys._getframe(1).f_code.co_name] += 1
        return wait(self, *args, **kwargs)
    cls.wait = wrapper


counted(pp.NoGatherHandle)
counted(pp.NoGatherCoalescedHandle)
out, *overrides = sys.argv[1:]
trainer = Trainer(load_run_config(None, overrides))
trainer.train()
zero = trainer.ds_config["zero_optimization"]
with open(out, "w") as f:
    json.dump({"fetches": counts, "modules": modules, "threshold": zero["stage3_param_persistence_threshold"],
               "dynamo": dynamo_summary()}, f)
trainer.close()
exit_without_teardown(0)
"""


def test_zero3_on_one_rank_fetches_no_parameter_once_training_runs(tiny_shards, tmp_path):
    # A ZeRO-3 JSON that shards every tensor above 1,000 elements (the embedding, the LM head, the block
    # matrices): on one rank the trainer keeps them all whole, so no step waits on a parameter fetch.
    # Compiled blocks, as training runs on a GPU.
    ds = json.loads(open(os.path.join(ROOT, "ds_configs", "zero3_bf16.json")).read())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    overrides = ["data.dir=" + tiny_shards, f"run_dir={tmp_path / 'run'}", f"deepspeed_config={tmp_path / 'ds.json'}",
                 "batch.tokens=1024", "batch.micro_batch_size=2", "train.max_steps=4", "train.precision=fp32",
                 "logging.every=1000", "logging.val_every=0", "logging.progress=false", "logging.tensorboard=false",
                 "checkpoint.every=1000", "data.shuffle=false", "train.compile=true"]
    proc = run_script(tmp_path, "count_fetches.py", FETCH_COUNTER, tmp_path / "fetches.json", *overrides, timeout=600)
    assert ("[atma] ZeRO-3 on one rank has nothing to shard: every parameter is kept whole, the blocks are one leaf "
            "module, gradients are reduced in place and the parameters stay gathered through each optimizer step "
            "(stage3_param_persistence_threshold 1,000 -> no limit, leaf_module.classes model.modeling.Block -> "
            "model.modeling.BlockStack, reduce_scatter true -> false)") in proc.stdout
    result = json.loads((tmp_path / "fetches.json").read_text())
    assert result["threshold"] == sys.maxsize
    # Key 0 is the first step (its first forward gathers each block once); steps 2-4, of 8 micro-batches each,
    # would otherwise fetch the LM head in every micro-batch, and DeepSpeed's optimizer step would release every
    # parameter and gather the whole ones back after the update (from its _post_step): none of them waits now.
    assert all(result["fetches"].get(str(step), {}) == {} for step in (1, 2, 3)), result
    # DeepSpeed's hooks fetch the stack of blocks once per forward and once per backward of each micro-batch,
    # never a block (16 fetches per block and step otherwise), and the few modules outside it.
    per_step = {"AtmaForCausalLM": 16, "Embedding": 16, "BlockStack": 16, "RMSNorm": 16, "SoftcapLMHead": 16}
    assert all(result["modules"][str(step)] == per_step for step in (1, 2, 3)), result["modules"]
    # The blocks compiled as on a GPU: the hooks run outside their graphs (a conv block's, a global block's).
    assert result["dynamo"] == {"graphs": 2, "graph_breaks": 0}


# Trains the tiny model for 3 optimizer steps (2 micro-batches each) on one rank under ZeRO-3 with each of two
# sets of DeepSpeed settings (argv[1], a JSON list of two override dicts), the run-config overrides argv[2:]
# over fp32; prints the losses, the gradient norms, the classes of the ZeRO-3 leaf modules and the largest
# weight difference as JSON.
SAME_RESULT = r"""
import json, sys
import deepspeed
import torch
from deepspeed.utils import z3_leaf_module
from model import AtmaConfig
from pretrain.config import load_run_config
from pretrain.grad_norm import NORM_METHODS
from pretrain.optim import apply_lr
from pretrain.shutdown import exit_without_teardown
from pretrain.step import TrainStep
from pretrain.trainer import BatchPlan, build_ds_config, build_engine, init_distributed

_, _, device = init_distributed()
variants = json.loads(sys.argv[1])


def loss_of(outcome):  # the step's loss, or None where the step was skipped
    return outcome.terms["loss/total"] if outcome.applied else None


runs, replaced_step, fused_norm, moved_gradients, contiguous, fewer_reads, skipped, wrappers = ([] for _ in range(8))
for overrides in variants:
    # "_run": run-config settings of this variant alone; "_deepspeed_step": DeepSpeed's own optimizer step;
    # "_deepspeed_norm": DeepSpeed's own gradient norm; "_deepspeed_gradients": DeepSpeed's own gradient hooks
    # and epilogue; "_deepspeed_clip": DeepSpeed's own overflow check and clip; "_inf_gradient": a gradient
    # that is not finite in the second step; "_reload": save a checkpoint after the second step and load it back;
    # the rest are DeepSpeed settings
    deepspeed_step, reload = overrides.pop("_deepspeed_step", False), overrides.pop("_reload", False)
    deepspeed_norm = overrides.pop("_deepspeed_norm", False)
    deepspeed_gradients = overrides.pop("_deepspeed_gradients", False)
    deepspeed_clip, inf_gradient = overrides.pop("_deepspeed_clip", False), overrides.pop("_inf_gradient", False)
    cfg = load_run_config(None, ["data.dir=unused", "deepspeed_config=ds_configs/zero3_bf16.json",
                                 "train.precision=fp32", *sys.argv[2:], *overrides.pop("_run", [])])
    ds = build_ds_config(cfg, BatchPlan(64, 2, 2, 1), device_type=device.type, overrides=overrides)
    engine, optimizer = build_engine(cfg, AtmaConfig.from_preset("tiny", vocab_size=512), ds, device=device)
    if deepspeed_step:  # DeepSpeed's own step (ZeRO-3 on one rank, BF16_Optimizer), as the trainer found it
        vars(engine.optimizer).pop("step")
    if deepspeed_norm:  # DeepSpeed's own norm, one gradient tensor at a time
        vars(engine.optimizer).pop(NORM_METHODS[engine.zero_optimization_stage()])
    if deepspeed_gradients:  # DeepSpeed's reduction bucket, then each gradient into its partition
        vars(engine.optimizer).pop("reduce_ready_partitions_and_remove_grads")
        vars(engine.optimizer).pop("independent_gradient_partition_epilogue")
    if deepspeed_clip:  # DeepSpeed's own overflow check (and ZeRO-1/2 clip factor), each read from the device
        for owner, name in ((engine.optimizer, "unscale_and_clip_grads"), (engine.optimizer, "check_overflow"),
                            (getattr(engine.optimizer, "overflow_checker", None), "has_overflow")):
            getattr(owner, "__dict__", {}).pop(name, None)
    second_step = {"on": False}
    if inf_gradient:  # the second step's gradient of the final norm's weight not finite
        weight = dict(engine.module.named_parameters())["norm.weight"]
        weight.register_hook(lambda g: g * float("inf") if second_step["on"] else g)
    apply_lr(optimizer, 1.0)
    step = TrainStep(engine, grad_accum=2, loss=cfg.loss, nan_policy="skip" if inf_gradient else "stop",
                     device=device)
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            x = torch.randint(0, 512, (2, 65), generator=generator)
            yield {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    stream = batches()
    saved = []  # bytes autograd keeps for the first step's backward
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        losses = [loss_of(step.run(stream))]
    second_step["on"] = True
    losses.append(loss_of(step.run(stream)))
    second_step["on"] = False
    if reload:
        engine.save_checkpoint(sys.argv[0] + f".ckpt{len(runs)}", tag="step2")
        engine.load_checkpoint(sys.argv[0] + f".ckpt{len(runs)}", tag="step2")
    losses.append(loss_of(step.run(stream)))
    replaced_step.append("step" in vars(engine.optimizer))
    fused_norm.append(NORM_METHODS.get(engine.zero_optimization_stage()) in vars(engine.optimizer))
    moved_gradients.append("reduce_ready_partitions_and_remove_grads" in vars(engine.optimizer))
    contiguous.append(getattr(engine.optimizer, "contiguous_gradients", None))
    checker = getattr(engine.optimizer, "overflow_checker", None)
    wrappers.append(type(engine.optimizer).__name__)
    fewer_reads.append("check_overflow" in vars(engine.optimizer) or "has_overflow" in getattr(checker, "__dict__", {}))
    skipped.append(engine.skipped_steps)
    leaves = sorted({type(m).__name__ for m in engine.module.modules() if z3_leaf_module(m)})
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    runs.append((losses, float(engine.get_global_grad_norm()), leaves, weights, sum(saved) / 2**20))
(losses_a, norm_a, leaves_a, a, saved_a), (losses_b, norm_b, leaves_b, b, saved_b) = runs
moved = max((a[n] - b[n]).abs().max().item() for n in a)
print(json.dumps({"losses": [losses_a, losses_b], "grad_norms": [norm_a, norm_b], "leaves": [leaves_a, leaves_b],
                  "max_weight_difference": moved, "saved_mib": [saved_a, saved_b], "replaced_step": replaced_step,
                  "fused_norm": fused_norm, "moved_gradients": moved_gradients, "contiguous_gradients": contiguous,
                  "fewer_reads": fewer_reads, "skipped_steps": skipped, "optimizers": wrappers}))
exit_without_teardown(0)
"""


def train_both_ways(tmp_path, variants: list[dict], *overrides: str, rounding: float = 0.0) -> dict:
    """SAME_RESULT's figures for the two sets of DeepSpeed settings `variants` (with a variant's own run-config
    settings under "_run"), after checking that both trained
    to the same losses, gradient norm and weights: bitwise, or within `rounding` (relative for the norm,
    absolute for the weights, which three steps at a learning rate of 3e-3 move by about 1e-2)."""
    proc = run_script(tmp_path, "same_result.py", SAME_RESULT, json.dumps(variants), *overrides)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (losses_a, losses_b), (norm_a, norm_b) = result["losses"], result["grad_norms"]
    assert [x is None for x in losses_a] == [x is None for x in losses_b], result  # the same steps skipped
    losses_a, losses_b = [x for x in losses_a if x is not None], [x for x in losses_b if x is not None]
    assert losses_a == pytest.approx(losses_b, rel=rounding, abs=0), result
    assert norm_a == pytest.approx(norm_b, rel=rounding, abs=0), result
    assert result["max_weight_difference"] <= rounding, result
    assert losses_a[0] != losses_a[-1]  # the steps trained
    return result


def test_zero3_on_one_rank_reduces_gradients_in_place_to_the_same_result(tmp_path):
    # DeepSpeed's reduce-scatter path (as the JSON says) against the gradients moved straight into their
    # partitions; then DeepSpeed's bucket path without the reduce-scatter (where its own gradient hooks run).
    result = train_both_ways(tmp_path, [{"zero_optimization.reduce_scatter": True},
                                        {"zero_optimization.reduce_scatter": False}])
    assert result["moved_gradients"] == [False, True]
    train_both_ways(tmp_path, [{"zero_optimization.reduce_scatter": True},
                               {"zero_optimization.reduce_scatter": False, "_deepspeed_gradients": True}])
    # DeepSpeed's Muon orthogonalises the whole gradients it finds in the partitions at the step.
    result = train_both_ways(tmp_path, [{"_deepspeed_gradients": True}, {}], "optim.name=muon")
    assert result["moved_gradients"] == [False, True]
    # In bf16, with the JSON's fp32 communication: DeepSpeed's bucket carries each bf16 gradient widened to fp32.
    result = train_both_ways(tmp_path, [{"_deepspeed_gradients": True}, {}], "train.precision=bf16")
    assert result["moved_gradients"] == [False, True]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("ds_json", ["zero1_bf16.json", "zero2_bf16.json"])
def test_zero1_and_zero2_on_one_rank_leave_gradients_in_place_to_the_same_result(tmp_path, ds_json, precision):
    # DeepSpeed's reduction buffer and partition buffer (and, for ZeRO-2 as its JSON says, its overlapped stream)
    # with its own gradient norm, clip and overflow check, against the gradients left in their own tensors with the
    # trainer's norm in one reduction and the clip factor computed on the device: bitwise the same, two micro-batches
    # per step, every step clipped, across a checkpoint saved and loaded.
    # In bf16 the shipped ZeRO-1 JSON accumulates in fp32, which DeepSpeed runs with its BF16_Optimizer (next test);
    # here the ZeRO optimizer of bf16 accumulation. ZeRO-2 accumulates in fp32 as shipped.
    as_written = {"zero_optimization.contiguous_gradients": True, "_deepspeed_norm": True, "_deepspeed_clip": True,
                  "_reload": True}
    ours = {"_reload": True}
    if ds_json == "zero2_bf16.json":
        as_written["zero_optimization.overlap_comm"] = True
    elif precision == "bf16":
        for variant in (as_written, ours):
            variant.update({"data_types.grad_accum_dtype": "bf16", "communication_data_type": "bf16"})
    result = train_both_ways(tmp_path, [as_written, ours], f"deepspeed_config=ds_configs/{ds_json}",
                             f"train.precision={precision}", "optim.grad_clip=0.05")
    assert result["contiguous_gradients"] == [True, False] and result["fused_norm"] == [False, True]
    assert result["fewer_reads"] == [False, True]
    assert min(result["grad_norms"]) > 0.05  # the last step was clipped


@pytest.mark.parametrize("grad_clip", [0.05, 100.0])
def test_zero1_in_bf16_steps_deepspeeds_bf16_optimizer_with_one_read_to_the_same_result(tmp_path, grad_clip):
    # fp32 accumulation under ZeRO-1: DeepSpeed's BF16_Optimizer (its one-rank settings stay as written,
    # `tests/test_pretrain_units.py`). DeepSpeed's own step against the trainer's (`pretrain/bf16_step.py`: the norm
    # in one reduction, the clip factor on the device), with every step clipped or none: bitwise the same, with a
    # step whose gradients hold infs and NaNs skipped by both, across a checkpoint saved and loaded after it.
    result = train_both_ways(tmp_path, [{"_inf_gradient": True, "_deepspeed_step": True},
                                        {"_inf_gradient": True, "_reload": True}],
                             "deepspeed_config=ds_configs/zero1_bf16.json", "train.precision=bf16",
                             f"optim.grad_clip={grad_clip}")
    assert result["optimizers"] == ["BF16_Optimizer", "BF16_Optimizer"], result
    assert result["replaced_step"] == [False, True], result  # the trainer's step, in the second run only
    assert result["skipped_steps"] == [1, 1] and result["losses"][1][1] is None, result
    assert (min(result["grad_norms"]) > grad_clip) == (grad_clip < 1), result  # the last step clipped, or not


@pytest.mark.parametrize(("ds_json", "precision"), [("zero2_bf16.json", "fp32"), ("zero2_bf16.json", "bf16"),
                                                    ("zero0_bf16.json", "bf16")])
def test_a_step_with_a_gradient_not_finite_is_skipped_as_deepspeed_skips_it(tmp_path, ds_json, precision):
    # The second step's gradients hold infs and NaNs. DeepSpeed's own overflow check (bf16) or norm check (fp32),
    # and the check of the norm alone, skip that step the same way, and the steps around it train bitwise the same
    # (ZeRO-2 with its clip factor computed on the device; ZeRO-0 in fp32 has no overflow check to change).
    deepspeeds = {"_deepspeed_norm": ds_json != "zero0_bf16.json", "_deepspeed_clip": True, "_inf_gradient": True}
    result = train_both_ways(tmp_path, [deepspeeds, {"_inf_gradient": True}], f"deepspeed_config=ds_configs/{ds_json}",
                             f"train.precision={precision}", "optim.grad_clip=0.05")
    assert result["skipped_steps"] == [1, 1] and result["losses"][1][1] is None
    assert result["fewer_reads"] == [False, precision == "bf16" or ds_json != "zero0_bf16.json"]


def test_zero2_on_one_rank_with_a_predivide_factor_keeps_the_contiguous_buffers_to_the_same_result(tmp_path):
    # Through the contiguous buffers the factor divides each gradient and multiplies it back, which rounds;
    # without them it is never applied, which trains to other last bits: so the buffers stay.
    ds = json.loads(open(os.path.join(ROOT, "ds_configs", "zero2_bf16.json")).read())
    ds["gradient_predivide_factor"] = 3.0
    ds["zero_optimization"]["reduce_scatter"] = False  # DeepSpeed's ZeRO-2 needs it with the factor
    (tmp_path / "predivide.json").write_text(json.dumps(ds))
    result = train_both_ways(tmp_path, [{"zero_optimization.overlap_comm": True, "_reload": True}, {"_reload": True}],
                             f"deepspeed_config={tmp_path / 'predivide.json'}")
    assert result["contiguous_gradients"] == [True, True]


def test_zero2_on_one_rank_with_muon_only_stops_waiting_for_the_device_to_the_same_result(tmp_path):
    # DeepSpeed's Muon compiles its Newton-Schulz step, whose rounding follows the gradients' layout (the
    # contiguous buffer's views or tensors of their own), so with Muon only the overlapped stream goes:
    # bitwise the same.
    result = train_both_ways(tmp_path, [{"zero_optimization.overlap_comm": True, "_reload": True}, {"_reload": True}],
                             "deepspeed_config=ds_configs/zero2_bf16.json", "optim.name=muon")
    assert result["contiguous_gradients"] == [True, True]


def test_zero3_on_one_rank_keeps_parameters_gathered_through_the_step_to_the_same_result(tmp_path):
    # DeepSpeed's step releases every parameter and gathers it back around the update; on one rank a whole
    # parameter is a view of the partition that the update writes, so skipping both changes nothing, bit for
    # bit, also across a checkpoint saved and loaded (whose load releases and gathers as DeepSpeed does).
    # The gradient norm taken in one reduction and the gradients moved straight into their partitions (copied
    # in each step's first micro-batch, added in its second) are bitwise DeepSpeed's on the CPU, so the three
    # changes are compared together against DeepSpeed's own step, norm and gradient hooks.
    result = train_both_ways(tmp_path, [{"_deepspeed_step": True, "_deepspeed_norm": True,
                                         "_deepspeed_gradients": True, "_reload": True}, {"_reload": True}])
    assert result["replaced_step"] == [False, True] and result["fused_norm"] == [False, True]
    assert result["moved_gradients"] == [False, True]


@pytest.mark.gpu
def test_zero3_on_one_gpu_keeps_parameters_gathered_through_the_step(tmp_path):
    # On CUDA, in bf16: every gathered parameter stays a view of its partition (else the step would have
    # fallen back to DeepSpeed's, and "replaced_step" would read False), and training matches DeepSpeed's
    # step and gradient norm, within bf16 rounding should a device kernel add in another order from run to run
    # (the multi-tensor norm adds each tensor's squares in another order than DeepSpeed's per-tensor one).
    # The gradients are moved into their partitions on the compute stream, DeepSpeed's on its reduction stream.
    result = train_both_ways(tmp_path, [{"_deepspeed_step": True, "_deepspeed_norm": True,
                                         "_deepspeed_gradients": True, "_reload": True}, {"_reload": True}],
                             "train.precision=bf16", "train.compile=false", rounding=1e-2)
    assert result["replaced_step"] == [False, True] and result["fused_norm"] == [False, True]
    assert result["moved_gradients"] == [False, True]


@pytest.mark.gpu
@pytest.mark.parametrize(("ds_json", "wrappers"), [("zero0_bf16.json", ("FP16_Optimizer", "FP16_UnfusedOptimizer")),
                                                   ("zero2_bf16.json", ("DeepSpeedZeroOptimizer",))])
def test_zero0_and_zero2_on_one_gpu_skip_a_step_with_a_gradient_not_finite_as_deepspeed_does(tmp_path, ds_json,
                                                                                             wrappers):
    # On CUDA, in bf16, with FusedAdam where it builds (under ZeRO-0 DeepSpeed wraps it in FP16_Optimizer, which
    # the CPU never runs; other optimizers in FP16_UnfusedOptimizer): the overflow left to the norm (and ZeRO-2's
    # clip factor on the device) skips the same step as DeepSpeed's own checks, and the other steps train the
    # same, within bf16 rounding.
    deepspeeds = {"_deepspeed_norm": ds_json != "zero0_bf16.json", "_deepspeed_clip": True, "_inf_gradient": True}
    result = train_both_ways(tmp_path, [deepspeeds, {"_inf_gradient": True}], f"deepspeed_config=ds_configs/{ds_json}",
                             "train.precision=bf16", "train.compile=false", "optim.grad_clip=0.05", rounding=1e-2)
    assert result["optimizers"][0] == result["optimizers"][1] in wrappers and result["fewer_reads"] == [False, True]
    assert result["skipped_steps"] == [1, 1] and result["losses"][1][1] is None


@pytest.mark.gpu
def test_zero1_on_one_gpu_steps_deepspeeds_bf16_optimizer_with_one_read_as_deepspeed_steps(tmp_path):
    # On CUDA, in bf16, with FusedAdam where it builds: the BF16_Optimizer's step with the norm in one reduction and
    # the clip factor on the device skips the same step as DeepSpeed's, and the other steps train the same, within
    # bf16 rounding (the multi-tensor norm adds on the device in another order than DeepSpeed's per-tensor one).
    result = train_both_ways(tmp_path, [{"_inf_gradient": True, "_deepspeed_step": True}, {"_inf_gradient": True}],
                             "deepspeed_config=ds_configs/zero1_bf16.json", "train.precision=bf16",
                             "train.compile=false", "optim.grad_clip=0.05", rounding=1e-2)
    assert result["optimizers"] == ["BF16_Optimizer", "BF16_Optimizer"] and result["replaced_step"] == [False, True]
    assert result["skipped_steps"] == [1, 1] and result["losses"][1][1] is None


@pytest.mark.gpu
def test_a_step_on_one_gpu_waits_for_it_only_for_its_loss_terms_and_gradient_norm(tmp_path):
    # torch's sync debug mode names every operation that waits for the GPU, and the counter adds explicit
    # synchronisations (`pretrain/host_syncs.py`). Per optimizer step of two micro-batches, compiled, in bf16, each
    # shipped ZeRO-1/2/3 JSON: the trainer's read of its loss terms (whose copy is queued before the last backward)
    # and the optimizer's check of its gradient norm; nothing in the model, its kernels or the micro-batches.
    out = tmp_path / "bench.json"
    proc = run_bench("--preset", "tiny", "--seq-len", "256",
                     "--micro-batch", "2", "--grad-accum", "2", "--steps", "1", "--warmup", "2",
                     "--breakdown-steps", "0", "--profile-steps", "0", "--sync-steps", "2",
                     "--cases", "polar:3:none:auto,polar:2:none:auto,polar:1:none:auto", "--json", str(out))
    for r in json.loads(out.read_text())["results"]:
        sites = {s["site"].rsplit(":", 1)[0]: s["per_step"] for s in r["host_sync_sites"]}
        assert r["host_syncs_all"] == [2, 2] and sites.get("pretrain/step.py") == 1, (r["case"], r["host_sync_sites"])
        assert not any(site.startswith(("model/", "kernels/")) for site in sites), (r["case"], sites)
    assert proc.stdout.count("    host waits for the GPU: 2 per step (") == 3


# Trains the tiny model for 3 optimizer steps (2 micro-batches each) on every rank under the DeepSpeed JSON
# argv[2] (ZeRO-2 or ZeRO-3) and, at each step, takes DeepSpeed's own gradient norm beside the one the step
# uses (ZeRO-3: each sub-group's; ZeRO-2: the combined one); writes both, as floats, and whether this rank's
# partition is a part of the model, to argv[1].rank<r>.json.
NORM_PAIRS = r"""
import json, sys
import torch
import torch.distributed as dist
from model import AtmaConfig
from pretrain.config import load_run_config
from pretrain.grad_norm import NORM_METHODS
from pretrain.shutdown import exit_without_teardown
from pretrain.step import TrainStep
from pretrain.trainer import BatchPlan, build_ds_config, build_engine, init_distributed

rank, world, device = init_distributed()
out, ds_json = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank
cfg = load_run_config(None, ["data.dir=unused", f"deepspeed_config={ds_json}", "train.precision=fp32"])
ds = build_ds_config(cfg, BatchPlan(64, 2, 2, world), device_type=device.type)
engine, _ = build_engine(cfg, AtmaConfig.from_preset("tiny", vocab_size=512), ds, device=device)
optimizer, stage = engine.optimizer, engine.zero_optimization_stage()
method = NORM_METHODS[stage]
fused, pairs = vars(optimizer).get(method), []


def floats(norms):
    return [n.item() for n in norms] if isinstance(norms, list) else [norms.item()]


def both(*args):
    ours = fused(*args)
    theirs = getattr(type(optimizer), method)(optimizer, *args)
    pairs.append([floats(ours), floats(theirs)])
    return ours


setattr(optimizer, method, both)
step = TrainStep(engine, grad_accum=2, loss=cfg.loss, nan_policy="stop", device=device)
generator = torch.Generator().manual_seed(rank)


def batches():
    while True:
        x = torch.randint(0, 512, (2, 65), generator=generator)
        yield {"input_ids": x[:, :-1], "labels": x[:, 1:]}


stream = batches()
for _ in range(3):
    step.run(stream)
model_size = sum(p.ds_numel if stage == 3 else p.numel() for p in engine.module.parameters())
held = (sum(p.ds_tensor.numel() for p in engine.module.parameters()) if stage == 3
        else sum(int(size) for size in optimizer.partition_size))
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump({"pairs": pairs, "partitioned": held < model_size}, f)
dist.barrier()
exit_without_teardown(0)
"""


@pytest.mark.parametrize("ds_json", ["ds_configs/zero3_bf16.json", "ds_configs/zero2_bf16.json"])
def test_zero_takes_deepspeeds_gradient_norm_in_one_reduction_on_two_ranks(tmp_path, ds_json):
    script = tmp_path / "norm_pairs.py"
    script.write_text(NORM_PAIRS)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(29300 + os.getpid() % 200), str(script), str(tmp_path / "norms"), ds_json]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"norms.rank{rank}.json").read_text()) for rank in (0, 1)]
    # Each rank holds part of the gradients; the norms are over all parts, so the two ranks agree, and each
    # is bitwise DeepSpeed's (fp64 per tensor, summed over the ranks).
    assert results[0]["partitioned"] and results[1]["partitioned"]
    assert len(results[0]["pairs"]) == 3 and results[0]["pairs"] == results[1]["pairs"]
    for ours, theirs in results[0]["pairs"]:
        assert ours == theirs, results[0]["pairs"]
    # The output projections start at zero, so at the first step only the head and the scalars have gradients.
    assert all(norm > 0 for norm in results[0]["pairs"][-1][0]), results[0]["pairs"]


def test_zero3_on_one_rank_trains_the_block_stack_as_one_leaf_module_to_the_same_result(tmp_path):
    # With every block recomputed in backward and every block's output in the signature loss, so that the
    # leaf's backward hook sees checkpointed blocks and outputs beside its last one.
    # Each block's output then feeds two terms, and its gradient adds them up in an order that depends on
    # the hooks around the block, so the two runs agree to fp32 rounding (1e-7 in the weights), not bitwise;
    # scaling the stack's input by 1.0001 where it is the leaf moves them by 1e-4.
    blocks = {"zero_optimization.leaf_module": {"classes": ["model.modeling.Block"]}}
    result = train_both_ways(tmp_path, [blocks, {}], "train.activation_checkpointing=all", "loss.sig_weight=0.1",
                             "loss.sig_mode=strong", rounding=1e-6)
    assert result["leaves"] == [["Block"], ["BlockStack"]]


def test_an_activation_memory_budget_trains_compiled_blocks_to_the_same_result_under_zero3(tmp_path):
    # The compiler recomputes inside each block what the budget leaves out, so the two runs agree to fp32
    # rounding (a reduction may be ordered differently), not bitwise.
    result = train_both_ways(tmp_path, [{}, {"_run": ["train.activation_memory_budget=0.0"]}], "train.compile=true",
                             rounding=1e-5)
    assert result["saved_mib"][1] < 0.6 * result["saved_mib"][0], result


def test_compiled_training_matches_eager_under_zero3(tiny_shards, tmp_path, two_rank_run):
    eager_run = two_rank_run  # the shared 3-step two-rank run: eager, ZeRO-3
    train(tiny_shards, tmp_path / "compiled", "--max-steps", "3", "--set", "checkpoint.every=100",
          "--set", "train.compile=true", ranks=2)
    for key in ("loss/total", "grad_norm"):
        eager, compiled = losses(eager_run, key), losses(tmp_path / "compiled", key)
        assert sorted(compiled) == [1, 2, 3]
        for step, value in eager.items():
            assert compiled[step] == pytest.approx(value, rel=1e-5), (key, step)
    # Three AdamW steps normalise each gradient element, so fp32 rounding differences of the compiled
    # graph show in the weights at about 1e-5 of their scale; a real difference moves them by ~lr (3e-3).
    a, b = final_weights(eager_run), final_weights(tmp_path / "compiled")
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-4 * a[name].abs().max() + 1e-6, name
    metrics = [json.loads(line) for line in open(tmp_path / "compiled" / "metrics.jsonl")]
    # Two graphs (conv block, global block), no graph break, under ZeRO-3 with Blocks as leaf modules.
    assert {(m["compile/graphs"], m["compile/graph_breaks"]) for m in metrics if "compile/graphs" in m} == {(2, 0)}


ENGINE_BUILDER = r"""
import torch
import torch.nn.functional as F
from model import AtmaConfig
from pretrain.config import load_run_config
from pretrain.shutdown import exit_without_teardown
from pretrain.trainer import BatchPlan, build_ds_config, build_engine, init_distributed

linear = F.linear
_, _, device = init_distributed()
cfg = load_run_config(None, ["data.dir=unused", "deepspeed_config=ds_configs/zero3_bf16.json", "train.precision=fp32"])
ds_config = build_ds_config(cfg, BatchPlan(64, 1, 1, 1), device_type=device.type)
engine, _ = build_engine(cfg, AtmaConfig.from_preset("tiny"), ds_config, device=device)
assert engine.zero_optimization_stage() == 3
print("linear unchanged:", F.linear is linear)
exit_without_teardown(0)
"""


def test_a_zero3_engine_leaves_torch_linear_alone(tmp_path):
    # A process-wide replacement of F.linear would also slow every other model in the process, e.g.
    # the ZeRO-0 baseline that pretrain.bench --interleave times beside the ZeRO-3 case.
    proc = run_script(tmp_path, "build.py", ENGINE_BUILDER)
    assert "linear unchanged: True" in proc.stdout


def test_training_bench_runs_a_deepspeed_variant_beside_the_shipped_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--preset", "tiny", "--seq-len", "32", "--micro-batch", "1", "--steps", "1", "--warmup", "0",
                     "--device", "cpu", "--breakdown-steps", "0", "--profile-steps", "0",
                     "--cases", "nope:3:none:off,nope:3:none:off:v1",
                     "--ds-variant", "zero_optimization.stage3_param_persistence_threshold=0", "--json", str(out),
                     ATMA_POLAR_SCHEDULE="in_order")
    report = json.loads(out.read_text())
    assert report["device"] == "CPU"
    # the kernel choices made in the environment, every one of them
    assert report["kernel_settings"]["ATMA_POLAR_SCHEDULE"] == "in_order"
    assert set(report["kernel_settings"]) == {k for k in env() if k.startswith("ATMA_")} | {"ATMA_POLAR_SCHEDULE"} | (
        {"TRITON_INTERPRET"} if "TRITON_INTERPRET" in os.environ else set())
    assert "\nkernel settings from the environment: " in proc.stdout and " ATMA_POLAR_SCHEDULE=in_order" in (
        " " + proc.stdout.split("kernel settings from the environment: ")[1].splitlines()[0])
    # what the figures were measured with
    from pretrain.provenance import code_version, describe_code

    assert report["code_version"] == code_version() and report["measured_at"].endswith("Z")
    # the installed distribution's version ("2.15.0" for a build whose torch.__version__ is "2.15.0+cu132")
    assert report["versions"]["torch"] == metadata.version("torch") and "deepspeed" in report["versions"]
    assert "fla-core" in report["versions"] and report["versions"]["cuda"] == torch.version.cuda
    # a commit in a git checkout, "unknown" in an unpacked source tree
    assert f"code {describe_code(code_version())}" in proc.stdout
    assert f"torch {metadata.version('torch')}" in proc.stdout
    assert "\nmemory path: torch\n" in proc.stdout  # the chunked path's PyTorch loop on the CPU
    assert "\nLM head loss rows: torch\n" in proc.stdout
    shipped, variant = report["results"]
    assert (shipped["ds_variant"], variant["ds_variant"]) == ("", "v1")
    assert shipped["adam"] == variant["adam"] == "AdamW"  # torch's, unfused, under DeepSpeed's ZeRO-3 wrapper
    # what each engine was built from: the shipped JSON, and the same JSON with the one setting changed
    # one rank: every parameter kept whole (the shipped 1e7 shards the embedding and the LM head on more ranks)
    assert shipped["ds_config"]["zero_optimization"]["stage3_param_persistence_threshold"] == sys.maxsize
    assert variant["ds_config"]["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert {k: v for k, v in variant["ds_config"]["zero_optimization"].items()
            if k != "stage3_param_persistence_threshold"} == {
        k: v for k, v in shipped["ds_config"]["zero_optimization"].items() if k != "stage3_param_persistence_threshold"}
    assert [r["ratio"] for r in report["ratios"]] == ["ds v1/shipped step"]
    assert "ds variant v1: zero_optimization.stage3_param_persistence_threshold=0" in proc.stdout
    assert proc.stdout.count("[bench] ZeRO-3 on one rank has nothing to shard: every parameter is kept whole") == 1


def test_training_bench_writes_each_cases_timeline(tmp_path):
    import gzip

    traces = tmp_path / "traces"
    proc = run_bench("--preset", "tiny", "--seq-len", "32",
                     "--micro-batch", "1", "--steps", "1", "--warmup", "0", "--device", "cpu",
                     "--breakdown-steps", "0", "--profile-steps", "1", "--top-ops", "0",
                     "--cases", "nope:0:none:off,nope:3:none:off", "--trace-dir", str(traces))
    names = ["nope_z0_ac_none_compile_off.pt.trace.json.gz", "nope_z3_ac_none_compile_off.pt.trace.json.gz"]
    assert sorted(os.listdir(traces)) == names
    for name in names:
        assert f"    timeline: {traces / name}" in proc.stdout.splitlines()
        with gzip.open(traces / name, "rt", encoding="utf-8") as f:
            ops = {e.get("name") for e in json.load(f)["traceEvents"]}
        assert "aten::mm" in ops  # the profiled step's ops, though no top ops were asked for
    refused = subprocess.run([sys.executable, "-m", "pretrain.bench", "--profile-steps", "0", "--trace-dir",
                              str(traces)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "python -m pretrain.bench: error: --trace-dir writes the profiled steps: give --profile-steps > 0")


def test_training_bench_under_the_deepspeed_launcher_reports_once_for_all_ranks(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(29500 + os.getpid() % 200), "--module", "pretrain.bench", "--device", "cpu", "--preset", "tiny",
           "--seq-len", "32", "--micro-batch", "1", "--steps", "2", "--warmup", "0", "--breakdown-steps", "0",
           "--profile-steps", "0", "--cases", "nope:3:none:off", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("device: CPU x 2 ranks") == 1 and proc.stdout.count("ratios (same run)") == 0
    # rank 0's progress line, table row and startup line only
    assert proc.stdout.count("nope z3 ac=none compile=off") == 3
    (result,) = json.loads(out.read_text())["results"]
    assert result["ranks"] == 2
    assert result["tokens_per_s"] == pytest.approx(2 * 32 / result["step_s_median"])  # both ranks' tokens


def test_training_bench_times_a_run_configs_recipe(tmp_path):
    def bench(*argv):
        out = tmp_path / "bench.json"
        proc = run_bench("--device", "cpu", "--seq-len", "32",
                         "--steps", "2", "--warmup", "0", "--breakdown-steps", "0", "--profile-steps", "0",
                         *argv, "--json", str(out), timeout=300)
        (result,) = json.loads(out.read_text())["results"]
        return proc.stdout, result

    # the CPU config: its AdamW, its ZeRO-3 JSON; 512 tokens per step of 2 x 32-token micro-batches
    stdout, result = bench("--config", "pretrain/configs/tiny-cpu.yaml", "--set", "batch.tokens=512",
                           "--micro-batch", "2", "--cases", "nope:3:none:off")
    assert "micro-batch 2 x 8 accumulated per rank" in stdout
    assert (result["optimizer"], result["micro_batch"], result["grad_accum"]) == ("adamw", 2, 8)
    assert result["ds_config"]["gradient_accumulation_steps"] == 8
    assert result["tokens_per_s"] == pytest.approx(512 / result["step_s_median"])  # every accumulated token
    # the paper recipe on the tiny preset: Muon under its own ZeRO-3 JSON
    stdout, result = bench("--config", "pretrain/configs/atma-378m.yaml", "--preset", "tiny", "--micro-batch", "1",
                           "--grad-accum", "2", "--cases", "polar:3:none:off")
    assert "optimizer muon, DeepSpeed JSON ds_configs/zero3_muon_bf16.json for its ZeRO-3 cases" in stdout
    assert result["optimizer"] == "muon" and result["grad_accum"] == 2
    assert result["ds_config"]["zero_optimization"]["reduce_scatter"] is False
    assert result["loss_terms"] == ["loss/lm", "loss/total"] and result["teacher"] is None
    # a distillation recipe: the teacher's forward is in every timed micro-batch
    from model import AtmaConfig, AtmaForCausalLM

    AtmaForCausalLM(AtmaConfig.from_preset("tiny")).save_pretrained(str(tmp_path / "teacher"))
    stdout, result = bench("--config", "pretrain/configs/tiny-cpu.yaml", "--set", "loss.lm_weight=0", "--set",
                           "loss.distill_weight=1", "--set", f"loss.teacher={tmp_path / 'teacher'}",
                           "--micro-batch", "1", "--grad-accum", "1", "--cases", "nope:3:none:off")
    assert f"distillation teacher: {tmp_path / 'teacher'} (loaded once" in stdout
    assert result["loss_terms"] == ["loss/distill", "loss/total"] and result["teacher"] == str(tmp_path / "teacher")


# pretrain.bench with its timed step failing (say, out of memory) wherever CONDITION holds.
FAILING_STEP = r"""
import os, sys
from pretrain import bench
from pretrain.shutdown import exit_without_teardown

timed_step = bench.CaseRunner.timed_step


def failing(self):
    if CONDITION:
        raise RuntimeError("out of memory\nsecond line")
    return timed_step(self)


bench.CaseRunner.timed_step = failing
exit_without_teardown(bench.main(sys.argv[1:]))  # as the entry point ends
"""


def run_patched_bench(tmp_path, name: str, source: str, *args, launcher=(), timeout: int = 240):
    """Run `source` (pretrain.bench with something patched) as tmp_path/name on the tiny CPU preset, under `launcher`
    when given, and return the finished process whatever its exit status."""
    script = tmp_path / name
    script.write_text(source)
    cmd = [sys.executable, *launcher, str(script), "--device", "cpu", "--preset", "tiny", "--seq-len", "32",
           "--micro-batch", "1", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env={**env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=timeout)


def bench_failing_where(tmp_path, condition, *args, launcher=()):
    """Run pretrain.bench (under `launcher` when given) with its timed step failing where `condition` holds."""
    # without the early end, a rank left waiting in a collective would hang until gloo's timeout
    return run_patched_bench(tmp_path, "failing_step.py", FAILING_STEP.replace("CONDITION", condition),
                             "--breakdown-steps", "0", "--profile-steps", "0", "--json", tmp_path / "b.json", *args,
                             launcher=launcher)


# pretrain.bench with every case's engine build 0.3 s slower and its first step 0.5 s slower, as compiling
# makes the first step of a compiled case.
SLOW_START = r"""
import sys, time
from pretrain import bench
from pretrain.shutdown import exit_without_teardown

build, run = bench.CaseRunner.__init__, bench.CaseRunner.run


def slow_build(self, *args, **kwargs):
    build(self, *args, **kwargs)
    time.sleep(0.3)
    self.first_done = False


def slow_first_step(self):
    if not self.first_done:
        self.first_done = True
        time.sleep(0.5)
    return run(self)


bench.CaseRunner.__init__, bench.CaseRunner.run = slow_build, slow_first_step
exit_without_teardown(bench.main(sys.argv[1:]))  # as the entry point ends
"""


@pytest.mark.parametrize("interleave", [False, True])
def test_training_bench_times_each_cases_startup_apart_from_its_steps(tmp_path, interleave):
    out = tmp_path / "bench.json"
    proc = run_script(tmp_path, "slow_start.py", SLOW_START, "--device", "cpu", "--preset", "tiny", "--seq-len", "32",
                      "--micro-batch", "1", "--steps", "2", "--warmup", "2", "--breakdown-steps", "0",
                      "--profile-steps", "0", "--cases", "nope:0:none:off,nope:2:none:off", "--json", out,
                      *(["--interleave"] if interleave else []))
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2
    for r in results:
        assert r["build_s"] >= 0.3, r
        assert r["first_step_s"] >= 0.5 and r["warmup_s"] > r["first_step_s"], r  # both warm-up steps
        assert max(r["step_s_all"]) < 0.5, r  # the slow first step is the warm-up's, not a timed one
    lines = proc.stdout.splitlines()
    shown = lines[lines.index("startup (not in the step times):") + 1:][:2]
    assert [line.split()[:2] for line in shown] == [["nope", "z0"], ["nope", "z2"]]
    assert all(f"engine built in {r['build_s']:.1f} s, first step {r['first_step_s']:.1f} s, all warm-up steps "
               f"{r['warmup_s']:.1f} s" in line for r, line in zip(results, shown))


def test_a_case_failing_on_one_rank_ends_the_run_on_every_rank(tmp_path):
    launcher = ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(29700 + os.getpid() % 200)]
    proc = bench_failing_where(tmp_path, 'os.environ["RANK"] == "1"', "--steps", "3", "--warmup", "1", "--cases",
                               "nope:3:none:off,nope:2:none:off", launcher=launcher)
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = ("error: rank 1: nope z3 ac=none compile=off: RuntimeError: out of memory; the run ends here (the other "
                "ranks cannot go on without this one)")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert expected in lines, proc.stderr[-3000:]
    # rank 0 is either stopped by the launcher or sees its peer gone first and ends the same way
    assert all(line.startswith("error: rank 0: nope z3 ") for line in lines if line != expected), lines
    assert "nope z2" not in proc.stdout + proc.stderr  # no rank went on to the next case


# pretrain.bench with its profiled steps failing (say, the profiler out of memory) in every case.
FAILING_PROFILE = r"""
import sys
from pretrain import bench
from pretrain.shutdown import exit_without_teardown


def failing(*args, **kwargs):
    raise RuntimeError("profiler out of memory\nsecond line")


bench.profile_case = failing
exit_without_teardown(bench.main(sys.argv[1:]))  # as the entry point ends
"""


def test_a_failing_measure_after_the_timed_steps_keeps_the_step_times(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_patched_bench(tmp_path, "failing_profile.py", FAILING_PROFILE, "--steps", "2", "--warmup", "0",
                             "--breakdown-steps", "1", "--profile-steps", "1",
                             "--cases", "nope:0:none:off,nope:3:none:off", "--json", out)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["case"] for r in results] == ["nope z0 ac=none compile=off", "nope z3 ac=none compile=off"]
    for r in results:
        assert "error" not in r and len(r["step_s_all"]) == 2 and r["tokens_per_s"] > 0, r
        assert set(r["breakdown_ms"]) >= {"forward", "backward"}, r  # the measure before it stands
        assert r["measure_error"] == "profile: RuntimeError: profiler out of memory"
        assert "host_syncs_per_step" not in r and "top_ops" not in r  # not run after it
    assert proc.stdout.count("    measure failed, the ones after it not run (the step times above stand): profile: "
                             "RuntimeError: profiler out of memory") == 2
    assert "; measure failed: profile: RuntimeError: profiler out of memory" in proc.stdout


def test_training_bench_on_shards_times_their_sequence_length(tiny_shards, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--preset", "tiny", "--data", tiny_shards,
                     "--micro-batch", "2", "--steps", "2", "--warmup", "0", "--device", "cpu",
                     "--breakdown-steps", "0", "--profile-steps", "0", "--cases", "nope:0:none:off",
                     # the copy loss over the shards' number tokens, which their tokenizer names
                     "--set", "loss.copy_weight=0.5", "--set", "loss.copy_targets=numbers", "--grad-accum", "1",
                     "--json", str(out), timeout=300)
    assert "T=64, micro-batch 2 per rank" in proc.stdout  # the shards' length, not the 2048 default
    (result,) = json.loads(out.read_text())["results"]
    assert result["tokens_per_s"] == pytest.approx(2 * 64 / result["step_s_median"])
    assert result["loss_terms"] == ["loss/copy", "loss/lm", "loss/total"]
    assert json.loads(out.read_text())["complete"] is True


def test_a_failing_case_ends_an_interleaved_run_with_one_error_line(tmp_path):
    proc = bench_failing_where(tmp_path, 'self.ds_config["zero_optimization"]["stage"] == 2', "--steps", "2",
                               "--warmup", "0", "--interleave", "--cases", "nope:3:none:off,nope:2:none:off")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error")] == [
        "error: --interleave: nope z2 ac=none compile=off: RuntimeError: out of memory"]
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["results"] == [{"case": "nope z2 ac=none compile=off", "error": "RuntimeError: out of memory"}]
    assert report["complete"] is False


def test_training_bench_times_deepspeeds_overflow_check_that_bf16_steps_leave_out(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--preset", "tiny", "--seq-len", "64",
                     "--micro-batch", "2", "--steps", "1", "--warmup", "1", "--device", "cpu", "--cores", "nope",
                     "--zero-stages", "0,2,3", "--breakdown-steps", "1", "--profile-steps", "0",
                     "--set", "train.precision=bf16", "--json", str(out))
    checks = {r["zero_stage"]: r["overflow_check_ms"] for r in json.loads(out.read_text())["results"]}
    # DeepSpeed's check reduces each of the ~80 gradient tensors (about 2 ms here); the trainer's stand-in is a no-op
    # (microseconds), so a timing of the wrong one shows. ZeRO-3 keeps DeepSpeed's own.
    assert checks[0] > 0.2 and checks[2] > 0.2 and checks[3] is None, checks
    assert proc.stdout.count("    overflow check of every gradient: DeepSpeed's ") == 2


def test_training_bench_cases_ratios_breakdown_and_profile(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--preset", "tiny", "--seq-len", "64",
                     "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
                     "--zero-stages", "0,3", "--breakdown-steps", "1", "--profile-steps", "1",
                     "--json", str(out))
    report = json.loads(out.read_text())
    results = report["results"]
    assert [(r["core"], r["zero_stage"]) for r in results] == [("polar", 0), ("nope", 0), ("polar", 3), ("nope", 3)]
    for r in results:
        assert r["tokens_per_s"] > 0 and r["resolved_compile"] == "off" and r["memory_kernel"] == "torch"
        assert r["loss_rows"] == "torch"
        assert set(r["breakdown_ms"]) == {"data", "forward", "sync", "backward", "optimizer"}
        assert r["breakdown_ms"]["forward"] > 0 and r["breakdown_ms"]["backward"] > 0
        assert r["top_ops"] and all(op["self_ms_per_step"] >= 0 for op in r["top_ops"])
        # The ZeRO optimizer's gradient norm, timed both ways on the same gradients (ZeRO-0 takes no such norm)
        if r["zero_stage"] == 3:
            assert set(r["gradient_norm_ms"]) == {"deepspeed", "one_reduction"}, r["gradient_norm_ms"]
            assert all(ms > 0 for ms in r["gradient_norm_ms"].values())
        else:
            assert r["gradient_norm_ms"] is None
        assert r["overflow_check_ms"] is None  # fp32: no step checks its gradients for overflow
        assert r["host_syncs_per_step"] is None and r["host_sync_sites"] is None  # counted on CUDA only
    assert proc.stdout.count("    gradient norm: DeepSpeed's ") == 2
    found = {(x["ratio"], x["case"]) for x in report["ratios"]}
    assert ("ZeRO-3/ZeRO-0 step", "polar z3 ac=none compile=auto") in found
    assert ("polar/nope step", "polar z3 ac=none compile=auto") in found
    assert "ZeRO-3/ZeRO-0 step" in proc.stdout and "breakdown ms/step" in proc.stdout
    refused = subprocess.run([sys.executable, "-m", "pretrain.bench", "--device", "cpu"], cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "too large" in refused.stderr
