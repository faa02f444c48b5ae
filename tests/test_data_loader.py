"""The training loader: rank/worker splitting, shuffling, epochs and exact resume."""

import os
import shutil
from collections import Counter
from itertools import islice

import pytest
import torch
from data_fixtures import stored_samples, synthetic_docs, write_jsonl

from data_pipeline.errors import DataError
from data_pipeline.loader import build_loader
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import prepare
from data_pipeline import shard_reader

SEQ_LEN = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    corpus = write_jsonl(str(root / "c.jsonl"), synthetic_docs(150, seed=7))
    out = str(root / "data")
    prepare(inputs=[corpus], output=out, seq_len=SEQ_LEN, vocab_size=300, val_fraction=0.1,
            shard_mb=37 * 2048 / 2**20, progress=False)
    return out


@pytest.fixture(scope="module")
def all_samples(data_dir):
    return [tuple(sample.tokens.tolist()) for sample in stored_samples(data_dir, "train")]


def _rows(batch):
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


def _stream(loader, num_batches=None):
    rows = []
    for batch in islice(loader, num_batches):
        rows.append(_rows(batch))
    return rows


def test_dataset_shape_for_these_tests(data_dir, all_samples):
    manifest = load_manifest(data_dir)
    shards = manifest.split("train").shards
    assert len(shards) >= 4 and shards[-1].num_samples < shards[0].num_samples
    assert manifest.seq_len == SEQ_LEN and manifest.dtype == "uint16"
    assert manifest.vocab_size == 300 and os.path.isfile(manifest.tokenizer_path)
    assert manifest.num_samples("train") == len(all_samples) > 100
    assert manifest.num_samples("val") > 0


def test_batches_are_int64_inputs_and_shifted_labels(data_dir):
    batch = next(iter(build_loader(data_dir, batch_size=6)))
    assert set(batch) == {"input_ids", "labels"}
    for t in batch.values():
        assert t.dtype == torch.int64 and t.shape == (6, SEQ_LEN) and t.is_contiguous()
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


@pytest.mark.parametrize("num_epochs", [1, 2])
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(data_dir, all_samples, num_epochs):
    seen = Counter()
    per_rank = []
    for rank in (0, 1):
        loader = build_loader(data_dir, batch_size=5, rank=rank, world_size=2, num_workers=2,
                              num_epochs=num_epochs, drop_last=False, seed=3)
        expected = len(loader)
        batches = _stream(loader)
        assert len(batches) == expected and len(loader) == 0
        per_rank.append(batches)
        for batch in batches:
            seen.update(batch)
    assert seen == Counter({s: num_epochs for s in all_samples})
    assert set(per_rank[0][0]).isdisjoint(per_rank[1][0])


def test_drop_last_gives_every_rank_the_same_full_batches(data_dir, all_samples):
    world, batch = 3, 4
    counts = []
    for rank in range(world):
        loader = build_loader(data_dir, batch_size=batch, rank=rank, world_size=world,
                              num_epochs=1, drop_last=True)
        expected = len(loader)
        batches = _stream(loader)
        assert all(len(b) == batch for b in batches) and len(batches) == expected
        counts.append(len(batches))
    assert counts == [len(all_samples) // (world * batch)] * world


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_equals_the_uninterrupted_stream(data_dir, all_samples, num_workers):
    kwargs = dict(batch_size=4, rank=1, world_size=2, num_workers=num_workers, seed=5)
    steps = len(all_samples) // 8 + 9  # crosses the first epoch boundary
    straight = _stream(build_loader(data_dir, **kwargs), steps)
    first = build_loader(data_dir, **kwargs)
    head = _stream(first, 7)
    state = first.state_dict()
    assert state["position"] == 7 * 4 * 2
    resumed = build_loader(data_dir, **kwargs)
    resumed.load_state_dict(state)
    tail = _stream(resumed, steps - 7)
    assert head + tail == straight
    assert resumed.epoch == 1


def test_loader_takes_a_loaded_manifest_without_reading_it_again(data_dir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(data_dir, copy)
    manifest = load_manifest(copy)
    os.remove(os.path.join(copy, "manifest.json"))
    kwargs = dict(batch_size=4, rank=1, world_size=2, seed=3, num_epochs=1)
    from_manifest = build_loader(manifest, **kwargs)
    from_dir = build_loader(data_dir, **kwargs)
    assert _stream(from_manifest) == _stream(from_dir)
    assert from_manifest.state_dict() == from_dir.state_dict()


def test_resume_reads_only_what_comes_after_the_saved_position(data_dir, monkeypatch):
    reads = []
    original = shard_reader._preadv
    monkeypatch.setattr(shard_reader, "_preadv", lambda *args: reads.append(1) or original(*args))
    loader = build_loader(data_dir, batch_size=4)
    _stream(loader, 10)
    state = loader.state_dict()
    reads.clear()
    resumed = build_loader(data_dir, batch_size=4)
    resumed.load_state_dict(state)
    _stream(resumed, 3)
    assert len(reads) == 12


def test_order_does_not_depend_on_worker_count(data_dir):
    base = dict(batch_size=3, rank=0, world_size=2, seed=1, num_epochs=1, drop_last=False)
    reference = _stream(build_loader(data_dir, num_workers=0, **base))
    assert _stream(build_loader(data_dir, num_workers=2, **base)) == reference


def test_changed_world_size_continues_the_same_global_stream(data_dir):
    two = [build_loader(data_dir, batch_size=4, rank=r, world_size=2, seed=2) for r in (0, 1)]
    iters = [iter(loader) for loader in two]
    steps = [[next(it) for it in iters] for _ in range(6)]
    state = two[0].state_dict()
    assert state == two[1].state_dict()
    one = build_loader(data_dir, batch_size=8, seed=2)
    global_rows = _stream(one, 9)
    for j, (b0, b1) in enumerate(steps):
        interleaved = [row for pair in zip(_rows(b0), _rows(b1), strict=True) for row in pair]
        assert interleaved == global_rows[j]
    resumed = build_loader(data_dir, batch_size=8, seed=2)
    resumed.load_state_dict(state)
    assert _stream(resumed, 3) == global_rows[6:9]


def test_shuffle_follows_seed_and_epoch_and_can_be_off(data_dir, all_samples):
    n = len(all_samples)
    ordered = [r for b in _stream(build_loader(data_dir, batch_size=n, shuffle=False, num_epochs=1))
               for r in b]
    assert ordered == all_samples
    epochs = [r for b in _stream(build_loader(data_dir, batch_size=n, seed=0, num_epochs=2,
                                              shuffle_window=10)) for r in b]
    assert sorted(epochs[:n]) == sorted(all_samples) and epochs[:n] != all_samples
    assert epochs[:n] != epochs[n:]
    other_seed = [r for b in _stream(build_loader(data_dir, batch_size=n, seed=1, num_epochs=1,
                                                  shuffle_window=10)) for r in b]
    assert other_seed != epochs[:n]


def test_validation_split_and_reset(data_dir):
    loader = build_loader(data_dir, split="val", batch_size=2, shuffle=False, num_epochs=1,
                          drop_last=False)
    first = _stream(loader)
    assert first and _stream(loader) == []
    loader.reset()
    assert _stream(loader) == first


def test_state_from_another_configuration_is_refused(data_dir):
    state = build_loader(data_dir, batch_size=2, seed=1).state_dict()
    with pytest.raises(DataError, match="seed=1"):
        build_loader(data_dir, batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="split='train'"):
        build_loader(data_dir, split="val", batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="rank must be"):
        build_loader(data_dir, batch_size=2, rank=2, world_size=2)
