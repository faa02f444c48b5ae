"""Shared pytest configuration: `gpu` tests are skipped where CUDA is unavailable, and tests marked
`nan_poison` see NaN-filled `torch.empty` buffers."""

import functools
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# DeepSpeed's JIT-built ops (CPU Adam under optimizer offload) go to a cache of this checkout's own, so a
# lock or a half-built op left in ~/.cache/torch_extensions by another process cannot stall the tests.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "nan_poison: torch.empty, torch.empty_like and Tensor.new_empty return NaN-filled float tensors, "
        "so an output element a kernel never writes shows up",
    )


def pytest_collection_modifyitems(config, items):
    """Route Triton interpreter tests to the right process; skip `gpu` tests without CUDA.

    Triton fixes interpreter mode at import, so `interpreter` tests run only in a process started
    with TRITON_INTERPRET=1 (the child that each file's `interpreter_driver` test starts), and the
    driver itself only outside it.
    """
    interpreting = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")
    unwanted = "interpreter_driver" if interpreting else "interpreter"
    kept = [item for item in items if unwanted not in item.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if unwanted in item.keywords])
        items[:] = kept
    shard = os.environ.get("ATMA_TEST_SHARD")  # "i/n": one of n interpreter children (helpers.run_interpreter_tests)
    if interpreting and shard:
        index, count = map(int, shard.split("/"))
        config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % count != index])
        items[:] = [item for k, item in enumerate(items) if k % count == index]
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Small real shards of the built-in corpus (seq_len 64, a 512-token BPE) shared by tests.

    They are the shards of the golden-loss run (tests/golden_loss.py).
    """
    from golden_loss import prepare_shards

    return prepare_shards(str(tmp_path_factory.mktemp("shards") / "tiny"))


@pytest.fixture(scope="session")
def golden_run(tiny_shards, tmp_path_factory):
    """The golden-loss run (tests/golden_loss.py: 20 steps on one rank), trained once: its directory."""
    from golden_loss import run_losses

    run_dir = tmp_path_factory.mktemp("golden") / "run"
    run_losses(tiny_shards, str(run_dir))
    return run_dir


@pytest.fixture(scope="session")
def golden_run_losses(golden_run):
    """The 20 logged losses of the golden-loss run."""
    from golden_loss import read_losses

    return read_losses(str(golden_run))


def _shared_run(tiny_shards, tmp_path_factory, name, ranks, *extra):
    """A 3-step fp32 run of the tiny-cpu config (ZeRO-3, fixed sample order) on `ranks` CPU ranks, validated
    after its last step on 4 micro-batches."""
    from test_pretrain_distributed import train

    run = tmp_path_factory.mktemp(name) / "run"
    train(tiny_shards, run, "--max-steps", "3", "--set", "checkpoint.every=100", "--set", "logging.val_every=3",
          "--set", "logging.val_batches=4", *extra, ranks=ranks)
    return run


@pytest.fixture(scope="session")
def one_rank_run(tiny_shards, tmp_path_factory):
    """A 3-step run on one rank. Tests read it or copy it, never write into it."""
    return _shared_run(tiny_shards, tmp_path_factory, "one-rank", ranks=1)


@pytest.fixture(scope="session")
def two_rank_run(tiny_shards, tmp_path_factory):
    """The same run on two ranks (eager, no activation checkpointing); read or copied like `one_rank_run`."""
    return _shared_run(tiny_shards, tmp_path_factory, "two-rank", ranks=2)


@pytest.fixture(scope="session")
def two_rank_sharded_run(tiny_shards, tmp_path_factory):
    """The two-rank run with ZeRO-3 sharding every tensor (persistence threshold 0); the shipped JSON's
    threshold, sized for atma-378m, keeps every tensor of the tiny model whole."""
    config = json.load(open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "ds_configs",
                                         "zero3_bf16.json")))
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("sharded-config") / "zero3_sharded.json"
    path.write_text(json.dumps(config))
    return _shared_run(tiny_shards, tmp_path_factory, "two-rank-sharded", 2, "--set", f"deepspeed_config={path}")


def _nan_filled(factory):
    """Wrap a torch allocator so that the floating-point tensors it returns are filled with NaN."""

    @functools.wraps(factory)
    def allocate(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point() or out.is_complex():
            with torch.no_grad():
                out.fill_(float("nan"))
        return out

    return allocate


@pytest.fixture(autouse=True)
def _nan_poisoned_buffers(request, monkeypatch):
    """For tests marked `nan_poison`: uninitialised allocations read as NaN (every output a kernel
    returns must be written in full or zeroed explicitly)."""
    if request.node.get_closest_marker("nan_poison") is not None:
        monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
        monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
        monkeypatch.setattr(torch.Tensor, "new_empty", _nan_filled(torch.Tensor.new_empty))
    yield
