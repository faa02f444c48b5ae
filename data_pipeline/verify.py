"""``verify``: re-hash every shard and check its structure against manifest.json."""

from __future__ import annotations

import glob
import os

from data_pipeline.journal import file_sha256
from data_pipeline.manifest import Manifest, ShardInfo
from data_pipeline.shard_format import SHARD_SUFFIX
from data_pipeline.split_reader import SplitReader


def verify_dataset(manifest: Manifest) -> tuple[int, list[str]]:
    """Check every listed shard and the tokenizer; returns (shards checked, problem lines)."""
    problems = []
    listed = set()
    num_shards = 0
    for split, info in manifest.splits.items():
        with SplitReader(manifest, split, check_sizes=False) as reader:
            for i, shard in enumerate(info.shards):
                num_shards += 1
                listed.add(shard.file)
                path = reader.shard_paths[i]
                problem = check_shard(reader, i, shard)
                if problem:
                    problems.append(f"{path}: {problem}")
    for path in sorted(glob.glob(os.path.join(manifest.data_dir, f"*{SHARD_SUFFIX}"))):
        if os.path.basename(path) not in listed:
            problems.append(f"{path}: not listed in manifest.json")
    tokenizer = manifest.tokenizer_path
    if not os.path.isfile(tokenizer):
        problems.append(f"{tokenizer}: missing")
    elif file_sha256(tokenizer) != manifest.tokenizer_sha256:
        problems.append(f"{tokenizer}: sha256 does not match manifest.json")
    return num_shards, problems


def check_shard(reader: SplitReader, index: int, shard: ShardInfo) -> str | None:
    """One line describing what is wrong with shard ``index`` of the reader's split, or None.

    A shard whose size and sha256 match the manifest is fine; otherwise the line says which and
    adds where the shard first stops matching its samples (``SplitReader.check_shard``).
    """
    path = reader.shard_paths[index]
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    digest = file_sha256(path)
    if size == shard.bytes and digest == shard.sha256:
        return None
    structure = reader.check_shard(index)
    detail = f"; {structure}" if structure else ""
    if size != shard.bytes:
        return f"{size} bytes, manifest.json says {shard.bytes}{detail}"
    return f"sha256 {digest[:12]}... does not match manifest.json ({shard.sha256[:12]}...){detail}"
