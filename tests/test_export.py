"""Export: the weights equal DeepSpeed's own zero_to_fp32 consolidation bit for bit, export.json holds the
checkpoint's seq_len, tokens seen, weights sha256 and provenance (from the tag, not the run directory),
and the exported model's logits equal the training engine's at that checkpoint."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from pretrain import export as export_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENGINE_LOGITS = r"""
import sys, torch
from pretrain.config import load_run_config
from pretrain.shutdown import exit_without_teardown
from pretrain.trainer import Trainer
cfg = load_run_config(sys.argv[1] + "/config.yaml", ["checkpoint.resume=auto", "logging.tensorboard=false",
                                                     "logging.progress=false"])
trainer = Trainer(cfg)
ids = torch.load(sys.argv[2])
trainer.engine.module.eval()
with torch.no_grad():
    logits = trainer.engine(ids).logits
torch.save(logits, sys.argv[3])
trainer.close()
exit_without_teardown(0)  # as the trainer's entry point ends
"""


def run(cmd, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="offline")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_export_matches_zero_to_fp32_and_training_logits(tiny_shards, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    run([sys.executable, "-m", "pretrain.train", "--config", "pretrain/configs/tiny-cpu.yaml", "--data", tiny_shards, "--run-dir", str(run_dir),
         "--max-steps", "3", "--set", "batch.tokens=512", "--set", "logging.val_every=0",
         "--set", "logging.progress=false", "--set", "train.precision=fp32"])
    # Files of the run directory describe its latest start only; export reads the tag's own copies.
    tag = run_dir / "checkpoints" / "step_00000003"
    (run_dir / "model_config.json").write_text('{"hidden_size": 7}')
    (run_dir / "tokenizer.json").write_text("not this one")
    run([sys.executable, "-m", "pretrain.export", str(run_dir), str(out), "--max-shard-size", "2MB"])

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from model import AtmaForCausalLM
    from model.persistence import load_state_dict

    reference = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"))
    exported = load_state_dict(str(out))
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    assert os.path.isfile(out / "model.safetensors.index.json")  # sharded above 2 MB
    info = json.loads((out / "export.json").read_text())
    assert info["step"] == 3 and info["tokens_seen"] == 3 * 512 and info["seq_len"] == 64
    weights = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(weights) > 1 and sorted(info["weights_sha256"]) == weights
    for name, digest in info["weights_sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    prov = info["provenance"]
    assert prov["run_dir"] == str(run_dir) and prov["checkpoint"] == "step_00000003"
    assert prov["config_name"] == "tiny-cpu" and prov["versions"]["torch"] and "commit" in prov["code_version"]
    assert (out / "tokenizer.json").read_bytes() == (tag / "tokenizer.json").read_bytes()

    # Load the same checkpoint into a training engine (ZeRO-3, as trained) and compare logits.
    model = AtmaForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "engine_logits.py"
    script.write_text(ENGINE_LOGITS)
    run([sys.executable, str(script), str(run_dir), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")])
    engine_logits = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, engine_logits, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_export_of_deepspeeds_bf16_optimizer_takes_its_fp32_weights(tiny_shards, tmp_path):
    # ZeRO-1 in bf16 accumulates in fp32 as shipped, so DeepSpeed runs its BF16_Optimizer, whose optimizer states
    # zero_to_fp32 does not read. The export takes the fp32 master weights from DeepSpeed's universal copy: they
    # round to the module's bf16 weights and are not those weights.
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    run([sys.executable, "-m", "pretrain.train", "--config", "pretrain/configs/tiny-cpu.yaml", "--data", tiny_shards,
         "--run-dir", str(run_dir), "--max-steps", "3", "--set", "batch.tokens=512", "--set", "logging.val_every=0",
         "--set", "logging.progress=false", "--set", "train.precision=bf16",
         "--set", "deepspeed_config=ds_configs/zero1_bf16.json"])
    run([sys.executable, "-m", "pretrain.export", str(run_dir), str(out)])

    from model.persistence import load_state_dict
    from pretrain.universal import universal_path

    tag = run_dir / "checkpoints" / "step_00000003"
    module = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    exported = load_state_dict(str(out))
    assert exported.keys() == module.keys()
    assert all(t.dtype == torch.float32 for t in exported.values())
    assert all(torch.equal(exported[k].to(module[k].dtype), module[k]) for k in module)
    moved = [k for k in module if not torch.equal(exported[k], module[k].float())]
    assert len(moved) > len(module) // 2, moved  # the fp32 weights, not the bf16 ones widened
    for name in moved:
        universal = torch.load(os.path.join(universal_path(str(tag)), "zero", name, "fp32.pt"), weights_only=True)
        assert torch.equal(exported[name], universal["param"]), name


def fake_run(tmp_path, states: bytes = b""):
    """A run directory with one complete checkpoint whose model states file holds `states`."""
    tag = tmp_path / "run" / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").touch()
    (tag / "mp_rank_00_model_states.pt").write_bytes(states)
    return tmp_path / "run"


def test_max_shard_size_takes_sizes_and_names_the_forms_it_accepts(tmp_path, capsys):
    assert [export_module.parse_size(t) for t in ("5GB", "500mb", "1.5GB", "4096", "0")] == [
        5 * 2**30, 500 * 2**20, 3 * 2**29, 4096, None]
    for bad in ("abc", "-1GB", "GB"):
        with pytest.raises(SystemExit) as stop:
            export_module.main([str(fake_run(tmp_path / bad)), str(tmp_path / "out"), f"--max-shard-size={bad}"])
        assert stop.value.code == 2
        assert (f"argument --max-shard-size: expected a size such as 5GB, 500MB or a number of bytes (0: no "
                f"sharding), got '{bad}'") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_module.main(["--help"])
    assert "(0: never; default: 5GB)" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "out").exists()


def test_an_out_dir_inside_the_runs_checkpoints_is_refused(tmp_path, capsys):
    run = fake_run(tmp_path)
    for out in (run / "checkpoints", run / "checkpoints" / "exported", run / "checkpoints" / "step_00000002"):
        assert export_module.main([str(run), str(out)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {out}: is or lies inside the run's checkpoints directory {run / 'checkpoints'}; export to a "
            f"directory outside it")
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000002"]


def test_an_out_dir_that_cannot_be_made_is_reported_before_the_checkpoint_is_read(tmp_path, capsys):
    run = fake_run(tmp_path)  # its model states file is empty: reading it would fail first
    (tmp_path / "file").write_text("not a directory")
    assert export_module.main([str(run), str(tmp_path / "file" / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'file' / 'out'}: cannot create the output directory (Not a directory)")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_unreadable_model_states_file_is_named_in_one_line(tmp_path, capsys, damage):
    whole = tmp_path / "whole.pt"
    torch.save({"step": 2, "module": {"w": torch.zeros(256)}}, whole)
    run = fake_run(tmp_path, b"" if damage == "empty" else whole.read_bytes()[:600])
    out = tmp_path / "out"
    assert export_module.main([str(run), str(out)]) == 2
    path = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    assert capsys.readouterr().err.strip() == (
        f"error: {path}: cannot be read (empty, truncated or damaged); export another checkpoint with --tag STEP")
    assert not out.exists()  # made for this export and left empty: removed


def test_a_model_states_file_changed_after_saving_is_named_in_one_line(tmp_path, capsys):
    whole = tmp_path / "whole.pt"
    weights = torch.full((256,), 1.5)
    torch.save({"step": 2, "module": {"w": weights}}, whole)
    data = bytearray(whole.read_bytes())
    data[data.find(weights.numpy().tobytes()) + 501] ^= 0x10  # one bit of one weight: torch.load takes it
    run = fake_run(tmp_path, bytes(data))
    out = tmp_path / "out"
    assert export_module.main([str(run), str(out)]) == 2
    path = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    assert capsys.readouterr().err.strip() == (
        f"error: {path}: its data does not match the checksums stored when it was saved (the file was changed or "
        f"damaged since); export another checkpoint with --tag STEP")
    assert not out.exists()
