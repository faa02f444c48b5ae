"""Corpus to token shards, and one way to read them back.

Public API: ``SplitReader`` (every reader of the shards goes through it), ``load_manifest`` /
``Manifest``, the end-of-document token lookup and the error types. The two entry modules are
imported by name: ``data_pipeline.prepare.prepare`` writes a dataset, and
``data_pipeline.loader.build_loader`` feeds training. The loader needs torch, so importing this
package loads neither torch nor webdataset (tokenizer worker processes import it).
"""

from data_pipeline.errors import DataError, ShardError
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.split_reader import SplitReader, StoredSample
from data_pipeline.tokenizer import EOS_CANDIDATES, find_eos

__all__ = [
    "DataError",
    "EOS_CANDIDATES",
    "Manifest",
    "ShardError",
    "SplitReader",
    "StoredSample",
    "find_eos",
    "load_manifest",
]
