"""One contract from config to export: each checkpoint tag's run.json, the resume check that compares it
with the run being started (free, intended and fixed changes), and a resume end to end."""

import copy
import json
import os
import subprocess
import sys

import pytest

from pretrain.config import ConfigError, load_run_config
from pretrain.contract import build_record, check_allowed_keys, check_resume, describe_data_change

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "runs/x/checkpoints/step_00000003"


def record(*sets: str, **fields) -> dict:
    """A run record of the tiny-cpu config with `--set` overrides and replaced top-level fields."""
    cfg = load_run_config("pretrain/configs/tiny-cpu.yaml", ["data.dir=shards", *sets])
    data = {"id": "d1", "seq_len": 64, "vocab_size": 512, "tokenizer_sha256": "t" * 64, "num_samples": 100,
            "shards": {"train-000000.tar": "a" * 64, "train-000001.tar": "b" * 64}}
    rec = build_record(step=3, tokens_seen=1536, config=cfg.to_dict(), data=data, zero_stage=3, world_size=2,
                       model_config={"hidden_size": 128, "vocab_size": 512, "core": "polar", "preset": "tiny"},
                       code_version={"commit": "c" * 40, "dirty": False}, versions={"torch": "2.13.0"})
    rec.update(fields)
    return rec


def refusal(saved, current, allowed=()) -> str:
    with pytest.raises(ConfigError) as info:
        check_resume(saved, current, tag_dir=TAG, allowed=list(allowed))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unchanged_run_resumes_silently():
    assert check_resume(record(), record(), tag_dir=TAG, allowed=[]) == []


def test_intended_change_is_refused_unless_allowed():
    saved, current = record(), record("optim.lr=0.001")
    assert refusal(saved, current) == (
        f"optim.lr was 0.003 in checkpoint {TAG} and is 0.001 now; to continue with the new value pass "
        "--allow-config-change optim.lr, else set it back, or pass --resume none to start over")
    notices = check_resume(saved, current, tag_dir=TAG, allowed=["optim.lr"])
    assert notices == ["[atma] optim.lr: 0.003 -> 0.001 (allowed by --allow-config-change)"]
    # A section allows every key under it; another key stays refused and every refused key is named.
    assert check_resume(saved, record("optim.lr=0.001", "optim.weight_decay=0.0"), tag_dir=TAG, allowed=["optim"])
    message = refusal(saved, record("optim.lr=0.001", "schedule.kind=wsd"), allowed=["optim.lr"])
    assert message.startswith("schedule.kind was \"cosine\"") and "--allow-config-change schedule.kind" in message


@pytest.mark.parametrize("change, field", [
    (dict(model_config={"hidden_size": 96, "vocab_size": 512, "core": "polar", "preset": "tiny"}),
     "model.hidden_size was 128"),
    (dict(seq_len=128), "seq_len was 64"),
    (dict(zero_stage=2), "ZeRO stage was 3"),
])
def test_fixed_fields_are_refused_even_when_allowed(change, field):
    message = refusal(record(), record(**change), allowed=["model", "optim"])
    assert message.startswith(field) and "--resume none" in message and "new --run-dir" in message
    assert "--allow-config-change" not in message
    message = refusal(record(), record("optim.name=muon"), allowed=["optim"])
    assert message.startswith('optim.name was "adamw"') and "cannot continue with another optim.name" in message


def test_the_clip_is_free_only_while_both_runs_use_muon():
    saved, current = record("optim.name=muon", "optim.grad_clip=1.0"), record("optim.name=muon", "optim.grad_clip=0.0")
    assert check_resume(saved, current, tag_dir=TAG, allowed=[]) == [
        "[atma] changed since the checkpoint (safe for resume): optim.grad_clip 1.0 -> 0.0"]
    message = refusal(record("optim.grad_clip=1.0"), record("optim.grad_clip=0.0"))
    assert message.startswith("optim.grad_clip was 1.0") and "--allow-config-change optim.grad_clip" in message


def test_free_changes_and_other_code_are_notices():
    current = record("train.max_steps=500", "logging.every=5", "data.num_workers=2", "checkpoint.resume=none",
                     code_version={"commit": "d" * 40, "dirty": True}, versions={"torch": "2.14.0"})
    notices = check_resume(record(), current, tag_dir=TAG, allowed=[])
    assert notices == [
        "[atma] changed since the checkpoint (safe for resume): data.num_workers 0 -> 2, logging.every 1 -> 5, "
        "train.max_steps 60 -> 500",
        f"[atma] the checkpoint was written by other code, libraries or kernel settings (code {'c' * 12} -> "
        f"{'d' * 12} (uncommitted changes), torch 2.13.0 -> 2.14.0); training continues, the last bits of the "
        "numbers may differ",
    ]
    # A world-size change is not refused here: the trainer converts the checkpoint instead.
    assert check_resume(record(), record(world_size=1), tag_dir=TAG, allowed=[]) == []


def test_other_kernel_settings_are_a_notice():
    saved = record(kernel_settings={"ATMA_POLAR_BWD": "split", "ATMA_LOSS_ROWS": "torch"})
    current = record(kernel_settings={"ATMA_POLAR_BWD": "two_pass", "ATMA_POLAR_SCHEDULE": "in_order"})
    assert check_resume(saved, current, tag_dir=TAG, allowed=[]) == [
        "[atma] the checkpoint was written by other code, libraries or kernel settings (ATMA_LOSS_ROWS torch -> "
        "unset, ATMA_POLAR_BWD split -> two_pass, ATMA_POLAR_SCHEDULE unset -> in_order); training continues, the "
        "last bits of the numbers may differ"]
    assert check_resume(saved, copy.deepcopy(saved), tag_dir=TAG, allowed=[]) == []
    # a record written before kernel settings were kept has none to compare
    old = record()
    del old["kernel_settings"]
    assert check_resume(old, current, tag_dir=TAG, allowed=[]) == []


def test_data_change_names_what_changed():
    saved = record()
    new = copy.deepcopy(saved)
    new["data"].update(id="d2", seq_len=128, tokenizer_sha256="u" * 64)
    new["data"]["shards"] = {"train-000000.tar": "z" * 64, "train-000002.tar": "c" * 64}
    message = refusal(saved, new)
    assert message == (
        f"the training data differs from checkpoint {TAG}: seq_len 64 -> 128; tokenizer sha256 tttttttttttt -> "
        "uuuuuuuuuuuu; shards added: train-000002.tar; shards removed: train-000001.tar; shards with other "
        "contents: train-000000.tar; a run continues only on the data it started with: point --data at those "
        "shards, train in a new --run-dir, or pass --resume none to start over in this one")
    assert describe_data_change({"id": "a"}, {"id": "b"}) == "data id a -> b"


def test_checkpoints_without_a_record_compare_what_they_kept():
    old = {k: v for k, v in record().items() if k in ("step", "tokens_seen", "config", "model_config")}
    assert check_resume(old, record(), tag_dir=TAG, allowed=[]) == []
    assert refusal(old, record("optim.lr=0.001")).startswith("optim.lr was 0.003")


def test_allow_config_change_names_must_exist():
    config = record()["config"]
    check_allowed_keys(["optim.lr", "schedule", "loss.sig_weight"], config)
    with pytest.raises(ConfigError, match=r"--allow-config-change optim\.lrr: not a run config key or section"):
        check_allowed_keys(["optim.lrr"], config)


# ---------------------------------------------------------------------- end to end
BASE = ["--config", "pretrain/configs/tiny-cpu.yaml", "--set", "batch.tokens=512", "--set", "logging.val_every=0",
        "--set", "logging.progress=false", "--set", "data.shuffle=false", "--set", "train.precision=fp32",
        "--set", "checkpoint.every=3", "--set", "logging.tensorboard=false"]


def train(data, run_dir, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "pretrain.train", *BASE, "--data", data, "--run-dir", str(run_dir),
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_resume_refuses_a_new_learning_rate_until_allowed(tiny_shards, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_shards, run, "--max-steps", "3").returncode == 0
    tag = run / "checkpoints" / "step_00000003"
    saved = json.loads((tag / "run.json").read_text())
    assert saved["seq_len"] == 64 and saved["step"] == 3 and saved["world_size"] == 1 and saved["zero_stage"] == 3
    assert saved["config"]["optim"]["lr"] == 0.003 and saved["model_config"]["vocab_size"] == 512
    assert saved["data"]["tokenizer_sha256"] and saved["versions"]["deepspeed"] and "commit" in saved["code_version"]
    assert (tag / "tokenizer.json").is_file()

    refused = train(tiny_shards, run, "--max-steps", "4", "--set", "optim.lr=0.001")
    assert refused.returncode == 2
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")] == [
        f"error: optim.lr was 0.003 in checkpoint {tag} and is 0.001 now; to continue with the new value pass "
        "--allow-config-change optim.lr, else set it back, or pass --resume none to start over"]
    assert "Traceback" not in refused.stderr
    assert yaml_lr(run) == 0.003  # a refused start leaves the run's files alone

    allowed = train(tiny_shards, run, "--max-steps", "4", "--set", "optim.lr=0.001", "--allow-config-change", "optim.lr")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "[atma] optim.lr: 0.003 -> 0.001 (allowed by --allow-config-change)" in allowed.stdout
    rows = {r["step"]: r for r in map(json.loads, open(run / "metrics.jsonl"))}
    # Warmup of 5 steps: step 4 runs at 4/5 of the peak, the new peak (the checkpoint's would give 0.0024).
    assert rows[4]["lr"] == pytest.approx(0.0008)
    assert json.loads((run / "checkpoints" / "step_00000004" / "run.json").read_text())["config"]["optim"]["lr"] == 0.001


def yaml_lr(run):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"]


def test_resume_none_moves_the_earlier_checkpoints_and_dashboards_aside(tmp_path, monkeypatch):
    from pretrain import checkpoint
    from pretrain.trainer import start_over

    monkeypatch.setattr(checkpoint.time, "strftime", lambda fmt: "20261202-141500")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    (run / "checkpoints" / "step_00000003" / "COMPLETE").write_text("3\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    (run / "wandb").mkdir()
    (run / "wandb_id.txt").write_text("abc\n")
    (run / "profile").mkdir()
    (run / "profile" / "steps10-12-rank0-ops.txt").write_text("ops\n")
    (run / "config.yaml").write_text("name: x\n")
    assert start_over(str(run)) == (
        f"[atma] --resume none: starting over at step 0; the earlier run's files in {run} are moved aside: "
        "checkpoints -> checkpoints-before-20261202-141500, metrics.jsonl -> metrics-before-20261202-141500.jsonl, "
        "tensorboard -> tensorboard-before-20261202-141500, wandb -> wandb-before-20261202-141500, "
        "wandb_id.txt -> wandb_id-before-20261202-141500.txt, profile -> profile-before-20261202-141500")
    assert sorted(os.listdir(run)) == [
        "checkpoints-before-20261202-141500", "config.yaml", "metrics-before-20261202-141500.jsonl",
        "profile-before-20261202-141500", "tensorboard-before-20261202-141500", "wandb-before-20261202-141500",
        "wandb_id-before-20261202-141500.txt"]
    assert (run / "checkpoints-before-20261202-141500" / "step_00000003" / "COMPLETE").is_file()
    assert (run / "metrics-before-20261202-141500.jsonl").read_text() == '{"step": 1}\n'
    assert start_over(str(run)) is None
    # A second start over in the same second: no earlier file is overwritten.
    (run / "metrics.jsonl").write_text('{"step": 2}\n')
    (run / "checkpoints").mkdir()  # without complete tags it stays
    assert start_over(str(run)).endswith("moved aside: metrics.jsonl -> metrics-before-20261202-141500-2.jsonl")
    assert (run / "metrics-before-20261202-141500.jsonl").read_text() == '{"step": 1}\n'
    assert (run / "checkpoints").is_dir()


def test_universal_load_gets_one_step_counter_per_group():
    import torch

    from pretrain.universal import untie_step_counters

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [a]}, {"params": [b]}])
    shared = torch.tensor(3.0)
    optimizer.state[a]["step"], optimizer.state[b]["step"] = shared, shared  # as DeepSpeed 0.19.8 loads it
    assert untie_step_counters(optimizer) == 1
    assert optimizer.state[a]["step"] is not optimizer.state[b]["step"]
    assert optimizer.state[a]["step"].item() == optimizer.state[b]["step"].item() == 3.0
