"""Shared pytest configuration: `gpu` tests are skipped where CUDA is unavailable."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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
