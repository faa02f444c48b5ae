"""Damage caught where samples are read: per-sample digests, token ids against the vocabulary,
old shards without digests, and the model's vocabulary against the data's at the start of training."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from data_fixtures import synthetic_docs, write_jsonl, write_tokens

from data_pipeline import DataError, ShardError, SplitReader, load_manifest
from data_pipeline.loader import build_loader
from data_pipeline.prepare import prepare
from data_pipeline.verify import verify_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_SHARDS = os.path.join(ROOT, "tests", "assets", "shards-v1")
VOCAB = 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    corpus = write_jsonl(str(root / "c.jsonl"), synthetic_docs(120, seed=31))
    out = str(root / "data")
    prepare(inputs=[corpus], output=out, seq_len=16, vocab_size=VOCAB, val_fraction=0.0, shard_mb=0.04,
            progress=False)
    return out


@pytest.fixture
def copy(data_dir, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(data_dir, target)
    return target


def _read_all(data_dir, num_workers):
    loader = build_loader(data_dir, batch_size=4, shuffle=False, num_epochs=1, drop_last=False,
                          num_workers=num_workers)
    return [batch["input_ids"] for batch in loader]


def _where(data_dir, index):
    with SplitReader(data_dir, "train") as reader:
        shard, local = reader.locate(index)
        return reader.shard_paths[shard], local


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_flipped_byte_is_caught_by_the_loader(copy, num_workers):
    index = 37
    path, local = _where(copy, index)
    with SplitReader(copy, "train") as reader:
        tokens = reader.sample(index).tokens
    # 16 bytes, the same size: only the sample's digest can tell.
    write_tokens(copy, "train", index, 3, tokens[3:11] ^ 1, reseal=False)
    assert os.path.getsize(path) == load_manifest(copy).split("train").shards[0].bytes
    with pytest.raises(ShardError) as err:
        _read_all(copy, num_workers)
    assert str(err.value) == (
        f"{path}: sample {local} (train sample {index}) has token bytes that do not match their xxh3_64 digest "
        f"(the shard changed after prepare wrote it); run `python -m data_pipeline verify {copy}`")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_token_ids_beyond_the_vocabulary_are_caught_by_the_loader(copy, num_workers):
    index = 22
    path, local = _where(copy, index)
    write_tokens(copy, "train", index, 5, [VOCAB + 7], reseal=True)
    with pytest.raises(ShardError) as err:
        _read_all(copy, num_workers)
    assert str(err.value) == (
        f"{path}: sample {local} (train sample {index}) has token id {VOCAB + 7} at position 5, not below the "
        f"vocabulary size {VOCAB} of manifest.json; run `python -m data_pipeline verify {copy}`")
    with SplitReader(copy, "train") as reader, pytest.raises(ShardError, match="has token id 307 at position 5"):
        reader.sample(index)


def test_split_reader_checks_the_document_mask_and_verify_names_the_sample(copy):
    path, local = _where(copy, 5)
    layout = load_manifest(copy).layout
    with open(path, "r+b") as f:
        f.seek(local * layout.record_bytes + layout.mask_offset + len(layout.mask_header))
        first = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([first[0] ^ 0x40]))
    with SplitReader(copy, "train") as reader:
        reader.sample(5)  # the tokens are intact
        with pytest.raises(ShardError, match=r"sample \d+ \(train sample 5\) fails its checksum \(0000000005\.doc_mask"):
            reader.sample(5, doc_starts=True)
    [problem] = verify_dataset(load_manifest(copy))[1]
    assert problem.startswith(f"{path}: sha256 ") and problem.endswith(
        "; 0000000005.doc_mask.npy: does not match its xxh3_64 digest")


def test_unchecked_reads_see_the_damage_the_checks_catch(copy):
    """The loader's unchecked mode (used by the benchmark only) really skips the checks."""
    write_tokens(copy, "train", 3, 0, [VOCAB + 1], reseal=False)
    loader = build_loader(copy, batch_size=4, shuffle=False, num_epochs=1, verify=False)
    assert int(next(iter(loader))["input_ids"][3, 0]) == VOCAB + 1


def test_old_shards_without_digests_load_with_one_notice():
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from data_fixtures import decoded_documents, synthetic_docs\n"
        "from data_pipeline import SplitReader\n"
        "from data_pipeline.loader import build_loader\n"
        f"d = {OLD_SHARDS!r}\n"
        "rows = sum(len(b['input_ids']) for b in build_loader(d, batch_size=4, num_epochs=1, drop_last=False))\n"
        "docs = decoded_documents(d, 'train')\n"
        "assert docs and docs == synthetic_docs(3, seed=3, min_words=6, max_words=10)[:len(docs)], docs\n"
        "print(rows, len(docs))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["18", "2"]
    assert proc.stderr.splitlines() == [
        f"{OLD_SHARDS}: shards of manifest format 1 carry no per-sample checksums; their samples are read "
        "unchecked (prepare the data again to add them)"]
    verify = subprocess.run([sys.executable, "-m", "data_pipeline", "verify", OLD_SHARDS], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0 and verify.stdout.startswith("ok: 1 shards"), verify.stderr


def test_a_manifest_of_an_unknown_format_version_is_refused(copy):
    path = os.path.join(copy, "manifest.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"version": 2', '"version": 3', 1))
    with pytest.raises(DataError, match="format version 3, this reader knows 1 and 2"):
        load_manifest(copy)


# ---------------------------------------------------------------------- through a real training run
TRAIN_ARGS = ["--config", "pretrain/configs/tiny-cpu.yaml", "--set", "batch.tokens=512", "--set", "logging.val_every=0",
              "--set", "logging.progress=false", "--set", "data.shuffle=false", "--set", "train.precision=fp32",
              "--max-steps", "3"]


def _train(data, run_dir, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pretrain.train", *TRAIN_ARGS, "--data", data, "--run-dir", str(run_dir), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped bytes", "id beyond the vocabulary"])
def test_training_stops_at_a_damaged_sample_with_one_line(tiny_shards, tmp_path, damage):
    data = str(tmp_path / "shards")
    shutil.copytree(tiny_shards, data)
    vocab = load_manifest(data).vocab_size
    if damage == "flipped bytes":
        # Sample 1 is in the first micro-batch (data.shuffle=false); read in process.
        with SplitReader(data, "train") as reader:
            tokens = reader.sample(1).tokens
        path = write_tokens(data, "train", 1, 4, tokens[4:12] ^ 2, reseal=False)
        expected = "has token bytes that do not match their xxh3_64 digest (the shard changed after prepare wrote it)"
        extra = []
    else:
        # Sample 2, read by a DataLoader worker process.
        path = write_tokens(data, "train", 2, 9, [vocab + 3], reseal=True)
        expected = f"has token id {vocab + 3} at position 9, not below the vocabulary size {vocab} of manifest.json"
        extra = ["--set", "data.num_workers=2"]
    sample = 1 if damage == "flipped bytes" else 2
    line = _one_error_line(_train(data, tmp_path / "run", *extra))
    assert line == (f"error: {path}: sample {sample} (train sample {sample}) {expected}; "
                    f"run `python -m data_pipeline verify {data}`")


@pytest.mark.slow
def test_training_refuses_a_model_vocabulary_smaller_than_the_data(tiny_shards, tmp_path):
    from tokenizers import Tokenizer

    data = str(tmp_path / "shards")
    shutil.copytree(tiny_shards, data)
    vocab = load_manifest(data).vocab_size
    tokenizer = Tokenizer.from_file(os.path.join(data, "tokenizer.json"))
    tokenizer.add_special_tokens(["<|extra|>"])  # a replaced tokenizer.json with one id more than manifest.json
    tokenizer.save(os.path.join(data, "tokenizer.json"))
    line = _one_error_line(_train(data, tmp_path / "run"))
    assert line == (f"error: model vocab_size {vocab} is below the {vocab + 1} token ids of the data in {data} "
                    f"(manifest.json, tokenizer.json): set model.overrides.vocab_size to at least {vocab + 1}, or run "
                    f"`python -m data_pipeline verify {data}` if tokenizer.json changed")
