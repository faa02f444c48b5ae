"""Shared pytest configuration: `gpu` tests are skipped where CUDA is unavailable."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Small real shards of the built-in corpus (seq_len 64, a 512-token BPE) shared by tests."""
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "tiny"
    prepare(output=str(out), seq_len=64, vocab_size=512, max_docs=200, val_fraction=0.1, progress=False)
    return str(out)
