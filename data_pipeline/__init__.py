"""Corpus to token shards (``prepare``), and shards to training batches (``loader``).

Imports are lazy: importing the package (as tokenizer workers do where processes are spawned)
loads neither torch nor webdataset.
"""

import importlib

__all__ = ["prepare", "load_manifest", "Manifest", "build_loader", "TokenLoader", "DataError"]

_HOMES = {
    "prepare": "data_pipeline.prepare",
    "load_manifest": "data_pipeline.manifest",
    "Manifest": "data_pipeline.manifest",
    "build_loader": "data_pipeline.loader",
    "TokenLoader": "data_pipeline.loader",
    "DataError": "data_pipeline.errors",
}


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
