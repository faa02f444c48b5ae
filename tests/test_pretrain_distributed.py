"""DeepSpeed training end to end on CPU ranks (gloo): convergence, rank/stage agreement, exact
resume, crash recovery, activation checkpointing under ZeRO-3, dashboards, bad-step guards."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
LAUNCH_PORT = 29500 + os.getpid() % 1000

# Deterministic data order so that 1-rank and 2-rank runs see the same global batches.
BASE = ["--config", "pretrain/configs/tiny-cpu.yaml", "--set", "batch.tokens=512", "--set", "logging.val_every=0",
        "--set", "logging.progress=false", "--set", "data.shuffle=false", "--set", "train.precision=fp32"]


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def train(data, run_dir, *extra, ranks=1, check=True, timeout=600):
    """Run pretraining as a user would: `python -m pretrain.train` or the deepspeed launcher."""
    args = [*BASE, "--data", data, "--run-dir", str(run_dir), *extra]
    if ranks == 1:
        cmd = [sys.executable, "-m", "pretrain.train", *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(LAUNCH_PORT), "pretrain/train.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(run_dir, key="loss/total"):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r[key] for r in rows if key in r}


def final_weights(run_dir):
    from pretrain.export import consolidate, read_client_state, resolve_tag

    tag = resolve_tag(str(run_dir), "latest")
    states = read_client_state(os.path.join(run_dir, "checkpoints", tag))
    return {k: v.contiguous() for k, v in consolidate(str(run_dir), tag, states).items()}


def test_tiny_model_learns(golden_run_losses):
    # The golden-loss run: 20 steps of this file's BASE settings at the config's learning rate (0.003).
    curve = dict(enumerate(golden_run_losses, start=1))
    assert len(curve) == 20
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.5, curve


def test_two_ranks_match_one_rank_and_zero_stages_agree(tiny_shards, tmp_path, one_rank_run, two_rank_run,
                                                        two_rank_sharded_run):
    # The shared runs: 3 steps on one rank and on two (the config's ZeRO-3, and ZeRO-3 sharding every
    # tensor, which the shipped JSON does not do for a model this small).
    reference = losses(one_rank_run)
    assert sorted(reference) == [1, 2, 3]
    runs = {"zero3": two_rank_run, "zero3-sharded": two_rank_sharded_run}
    for stage, val_batches in (("zero2", 4), ("zero1", 3)):  # 3: rounded up to 2 per rank, the same 4 in all
        runs[stage] = tmp_path / f"r2-{stage}"
        proc = train(tiny_shards, runs[stage], "--max-steps", "3", "--set", "checkpoint.every=100",
                     "--set", "logging.val_every=3", "--set", f"logging.val_batches={val_batches}",
                     "--set", f"deepspeed_config=ds_configs/{stage}_bf16.json", ranks=2)
        rounded = ("[atma] validation: logging.val_batches=3 is not a multiple of the 2 data-parallel ranks; "
                   "each rank evaluates 2 micro-batches, 4 in all")
        assert (rounded in proc.stdout) == (val_batches == 3), proc.stdout[-2000:]
    for stage, run in runs.items():
        got = losses(run)
        assert sorted(got) == sorted(reference)
        for step, value in reference.items():
            # fp32 on CPU; only the order of the cross-rank gradient sum differs.
            assert abs(got[step] - value) <= 1e-5 * abs(value), (stage, step, got[step], value)
        # Validation shares logging.val_batches among the ranks: the same samples as on one rank.
        [val] = losses(run, "loss/val").values()
        assert abs(val - losses(one_rank_run, "loss/val")[3]) <= 1e-5 * val, (stage, val)
    # DeepSpeed's shared-memory all-reduce segments of these runs did not outlive them.
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{LAUNCH_PORT}_*") == []


def test_a_build_lock_left_by_a_killed_build_stops_training_in_one_line(tiny_shards, tmp_path):
    from pretrain.opbuild import STALE_LOCK_SECONDS

    extensions = tmp_path / "extensions"
    lock = extensions / "cpu_adam" / "lock"  # optimizer offload builds DeepSpeed's CPU Adam
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    old = time.time() - 2 * STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    args = [*BASE, "--data", tiny_shards, "--run-dir", str(tmp_path / "run"), "--max-steps", "1",
            "--set", "deepspeed_config=ds_configs/zero3_offload_bf16.json"]
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env(), TORCH_EXTENSIONS_DIR=str(extensions)), timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {lock} is 30 minutes old: an interrupted build of a DeepSpeed op left it")
    # The communication backend started (before the optimizer) without compiling DeepSpeed's
    # shared-memory op, which serves only inference.
    assert sorted(p.name for p in extensions.iterdir()) == ["cpu_adam"]


def test_resume_is_exact(tiny_shards, tmp_path, two_rank_run, two_rank_sharded_run):
    common = ["--set", "checkpoint.every=3"]
    train(tiny_shards, tmp_path / "straight", "--max-steps", "6", *common, ranks=2)
    # The first 3 steps: a copy of a shared two-rank run, which ended with a checkpoint of step 3. The
    # run whose ZeRO-3 sharded every tensor resumes with the shipped JSON, which keeps them whole (as a
    # run started before the persistence threshold changed resumes after it).
    for name, first_steps in (("split", two_rank_run), ("split-sharded", two_rank_sharded_run)):
        shutil.copytree(first_steps, tmp_path / name)
        proc = train(tiny_shards, tmp_path / name, "--max-steps", "6", *common, ranks=2)
        assert "resumed from" in proc.stdout + proc.stderr
        assert losses(tmp_path / name) == losses(tmp_path / "straight"), name  # bitwise on CPU
        a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_kill_9_then_auto_resume(tiny_shards, tmp_path):
    run = tmp_path / "killed"
    args = [*BASE, "--data", tiny_shards, "--run-dir", str(run), "--max-steps", "20",
            "--set", "checkpoint.every=2", "--set", "checkpoint.keep_last=2"]
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    marker = run / "checkpoints" / "step_00000004" / "COMPLETE"
    while not marker.exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = max(int(t.split("_")[1]) for t in os.listdir(run / "checkpoints")
                 if (run / "checkpoints" / t / "COMPLETE").exists())
    assert before < 20
    out = train(tiny_shards, run, "--max-steps", "20", "--set", "checkpoint.every=2")
    text = out.stdout + out.stderr
    assert f"resumed from {run}/checkpoints/step_{before:08d}" in text
    assert max(losses(run)) == 20
    # Steps logged after the last checkpoint and redone after the kill appear once.
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == list(range(1, 21))


def test_activation_checkpointing_same_gradients_under_zero3(tiny_shards, tmp_path, two_rank_run):
    for policy in ("all", "global"):
        train(tiny_shards, tmp_path / policy, "--max-steps", "3", "--set", f"train.activation_checkpointing={policy}",
              ranks=2)
    # The shared two-rank run has the config's policy, none.
    base_norm = losses(two_rank_run, "grad_norm")
    base_w = final_weights(two_rank_run)
    for policy in ("all", "global"):
        norms = losses(tmp_path / policy, "grad_norm")
        for step, value in base_norm.items():
            assert abs(norms[step] - value) <= 1e-6 * value, (policy, step)
        w = final_weights(tmp_path / policy)
        for k in base_w:
            torch.testing.assert_close(w[k], base_w[k], rtol=1e-6, atol=1e-7)


def test_dashboards_and_composite_loss(tiny_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "dash"
    losses_on = ["--set", "loss.sig_mode=weak", "--set", "loss.sig_weight=0.01", "--set", "loss.num_random_keys=8",
                 "--set", "loss.distractor_weight=0.01", "--set", "loss.copy_weight=0.5"]
    proc = train(tiny_shards, run, "--max-steps", "4", "--set", "logging.wandb=true", "--set", "logging.val_every=2",
                 "--set", "logging.val_batches=2", *losses_on, "--set", "logging.peak_flops=1e12",
                 "--set", "logging.throughput_warmup_steps=2", "--set", "logging.every=3")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/total", "loss/lm", "loss/copy", "loss/sig", "loss/distractor", "lr", "grad_norm", "perf/tokens_per_s",
                "perf/mfu", "perf/memory_gib", "perf/step_time_s", "loss/val"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 3, 4]  # the first, every third, the last
    # the warm-up's duration (steps 1-2), left out of tokens/s: said on the console when it ends, logged with
    # the next logged step, in the same row
    assert [e.step for e in acc.Scalars("perf/warmup_s")] == [e.step for e in acc.Scalars("perf/first_step_s")] == [3]
    assert [e.step for e in acc.Scalars("perf/tokens_per_s")] == [3, 4]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss/total" in r] == [1, 3, 4]
    (warmup,) = [r for r in rows if "perf/warmup_s" in r]
    seconds, first = warmup["perf/warmup_s"], warmup["perf/first_step_s"]
    assert warmup["step"] == 3 and "loss/total" in warmup and 0 < first < seconds
    said = [line for line in proc.stdout.splitlines() if line.startswith("[atma] warm-up")]
    assert said == [f"[atma] warm-up (compilation, autotuning, allocator): the first 2 steps took {seconds:.1f} s, "
                    f"the first alone {first:.1f} s; left out of tokens/s and MFU (logging.throughput_warmup_steps)"], \
        proc.stdout[-2000:]
    # Source files repeat names and phrases: some targets are copies, and their loss is positive.
    assert all(e.value > 0 for e in acc.Scalars("loss/copy"))
    assert any(name.startswith("offline-run") for name in os.listdir(run / "wandb"))
    wandb_id = (run / "wandb_id.txt").read_text().strip()
    proc = train(tiny_shards, run, "--max-steps", "5", "--set", "logging.wandb=true", *losses_on)
    assert (run / "wandb_id.txt").read_text().strip() == wandb_id  # same W&B run across resumes
    # How long the resume took to check and load its checkpoint: said once, logged with the next step.
    [said] = [line for line in proc.stdout.splitlines() if line.startswith("[atma] resumed from")]
    checked, loaded = map(float, re.fullmatch(
        rf"\[atma\] resumed from {run}/checkpoints/step_00000004 at step 4 \(2,048 tokens seen\); "
        r"checksums checked in (\d+\.\d+) s, state loaded in (\d+\.\d+) s", said).groups())
    [row] = [json.loads(line) for line in open(run / "metrics.jsonl") if '"perf/checkpoint_load_s"' in line]
    assert row["step"] == 5 and "loss/total" in row
    assert row["perf/checkpoint_load_s"] > 0
    assert row["perf/checkpoint_load_s"] == pytest.approx(checked + loaded, abs=0.11)  # the console rounds


# Training whose checkpoint saves and validation each take 4 s more than they do.
SLOW_SAVES_AND_VALIDATION = """
import runpy, time
import pretrain.checkpoint as ckpt
from pretrain.trainer import Trainer
save, validate = ckpt.save, Trainer.validate
def slow_save(*args, **kwargs):
    time.sleep(4.0)
    return save(*args, **kwargs)
def slow_validate(self):
    time.sleep(4.0)
    return validate(self)
ckpt.save, Trainer.validate = slow_save, slow_validate
runpy.run_module("pretrain.train", run_name="__main__", alter_sys=True)
"""


def test_checkpoint_saves_and_validation_are_timed_and_left_out_of_tokens_per_s(tiny_shards, tmp_path):
    run = tmp_path / "slow-saves"
    args = [*BASE, "--data", tiny_shards, "--run-dir", str(run), "--max-steps", "4", "--set", "checkpoint.every=2",
            "--set", "logging.val_every=2", "--set", "logging.val_batches=1", "--set", "logging.every=2",
            "--set", "logging.throughput_warmup_steps=1"]
    proc = subprocess.run([sys.executable, "-c", SLOW_SAVES_AND_VALIDATION, *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    # Step 2's validation and save fall between steps 2 and 4: 8 s that tokens/s and the step time leave out.
    [step4] = [r for r in rows if r["step"] == 4 and "loss/total" in r]
    assert step4["perf/checkpoint_save_s"] >= 4.0
    assert step4["perf/step_time_s"] < 2.0, step4  # with the 8 s counted, at least 4 s per step
    assert step4["perf/tokens_per_s"] == pytest.approx(512 / step4["perf/step_time_s"], rel=1e-6)
    val = {r["step"]: r["perf/val_s"] for r in rows if "loss/val" in r}
    assert sorted(val) == [2, 4] and min(val.values()) >= 4.0
    out = proc.stdout
    for step in (2, 4):
        [saved] = re.findall(rf"\[atma\] saved checkpoint step_0000000{step} in (\d+\.\d) s", out)
        assert float(saved) >= 4.0
        [took] = re.findall(rf"\[atma\] step {step}: val loss \d+\.\d{{4}} \((\d+\.\d) s\)", out)
        assert float(took) >= 4.0


def kl_to_teacher(teacher_dir, student, batch) -> float:
    """Mean per-token KL(teacher || student) on `batch`, through the trainer's Teacher."""
    from pretrain.teacher import Teacher

    teacher = Teacher(str(teacher_dir), device=torch.device("cpu"), dtype=torch.float32,
                      vocab_size=student.config.vocab_size)
    with torch.no_grad():
        return student(batch, kl_targets=teacher.target_rows(batch)).kl_loss.item()


def test_distillation_alone_moves_the_student_to_the_teacher(tiny_shards, tmp_path, golden_run):
    from data_pipeline.loader import build_loader
    from model import AtmaForCausalLM

    # The teacher: the golden-loss run, 20 steps of this file's BASE settings.
    export = [sys.executable, "-m", "pretrain.export"]
    subprocess.run([*export, str(golden_run), str(tmp_path / "t-out")], cwd=ROOT, env=env(), check=True,
                   capture_output=True)
    batch = next(iter(build_loader(tiny_shards, split="val", batch_size=4, shuffle=False)))["input_ids"]
    teacher = AtmaForCausalLM.from_pretrained(str(tmp_path / "t-out"))
    # The teacher as its own student: nothing to distil.
    assert abs(kl_to_teacher(tmp_path / "t-out", teacher, batch)) < 1e-6

    run = tmp_path / "student"
    train(tiny_shards, run, "--max-steps", "8", "--set", f"loss.teacher={tmp_path / 't-out'}",
          "--set", "loss.lm_weight=0", "--set", "loss.distill_weight=1.0")
    kd = losses(run, "loss/distill")
    assert sorted(kd) == list(range(1, 9)) and "loss/lm" not in json.loads(open(run / "metrics.jsonl").readline())
    subprocess.run([*export, str(run), str(tmp_path / "s-out")], cwd=ROOT, env=env(), check=True, capture_output=True)
    student = AtmaForCausalLM.from_pretrained(str(tmp_path / "s-out"))
    # A fresh student has a zero LM head, i.e. uniform logits; training on KD alone halves its distance
    # to the teacher on held-out text.
    fresh = AtmaForCausalLM(student.config)
    before, after = kl_to_teacher(tmp_path / "t-out", fresh, batch), kl_to_teacher(tmp_path / "t-out", student, batch)
    assert before > 0.05 and after < 0.5 * before, (before, after)
    assert kd[8] < kd[1]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_guard(tiny_shards, tmp_path, policy, monkeypatch):
    monkeypatch.setenv("ATMA_FAULT_NAN_AT_STEP", "2")
    proc = train(tiny_shards, tmp_path / policy, "--max-steps", "4", "--set", f"train.nan_policy={policy}",
                 check=False)
    if policy == "stop":
        assert proc.returncode == 1
        assert "non-finite loss at optimizer step 3" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert losses(tmp_path / policy, "perf/skipped_steps")[4] == 1
        assert "step skipped (1 so far)" in proc.stdout


def test_bad_config_gives_one_line_error(tiny_shards, tmp_path):
    proc = train(tiny_shards, tmp_path / "bad", "--set", "batch.tokens=500", check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "not a multiple" in lines[0]
    assert "Traceback" not in proc.stderr


def test_muon_under_zero3_trains(tiny_shards, tmp_path):
    run = tmp_path / "muon"
    proc = train(tiny_shards, run, "--max-steps", "8", "--set", "optim.name=muon",
                 "--set", "deepspeed_config=ds_configs/zero3_muon_bf16.json", ranks=2)
    assert "not applied with Muon" in proc.stderr
    curve = losses(run)
    assert sorted(curve) == list(range(1, 9)) and curve[8] < curve[1] - 0.3, curve


def test_a_run_starts_from_exported_weights(tiny_shards, tmp_path, one_rank_run):
    from pretrain.export import export

    first = one_rank_run  # 3 steps at the config's learning rate, 0.003
    export(str(first), str(tmp_path / "exported"))
    # A second run on 2 ranks (ZeRO-3) starts from those weights; a tiny learning rate keeps them.
    second = tmp_path / "second"
    train(tiny_shards, second, "--max-steps", "1", "--set", "optim.lr=1e-9", "--set",
          f"train.init_from={tmp_path / 'exported'}", ranks=2)
    a, b = final_weights(first), final_weights(second)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    # A model of another shape is refused in one line before any step.
    bad = train(tiny_shards, tmp_path / "bad", "--max-steps", "1", "--set", "model.overrides.hidden_size=64",
                "--set", f"train.init_from={tmp_path / 'exported'}", check=False)
    assert bad.returncode != 0 and "train.init_from" in bad.stderr and "holds another model" in bad.stderr
