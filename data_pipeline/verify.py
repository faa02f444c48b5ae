"""``verify``: re-hash every shard and check its structure against manifest.json."""

from __future__ import annotations

import glob
import os
import tarfile

import numpy as np

from data_pipeline.journal import file_sha256
from data_pipeline.manifest import Manifest, ShardInfo
from data_pipeline.shard_format import MASK_MEMBER, SHARD_SUFFIX, TOKENS_MEMBER, sample_key


def verify_dataset(manifest: Manifest) -> tuple[int, list[str]]:
    """Check every listed shard and the tokenizer; returns (shards checked, problem lines)."""
    problems = []
    listed = set()
    num_shards = 0
    for info in manifest.splits.values():
        for shard in info.shards:
            num_shards += 1
            listed.add(shard.file)
            problem = check_shard(manifest, os.path.join(manifest.data_dir, shard.file), shard)
            if problem:
                problems.append(f"{os.path.join(manifest.data_dir, shard.file)}: {problem}")
    for path in sorted(glob.glob(os.path.join(manifest.data_dir, f"*{SHARD_SUFFIX}"))):
        if os.path.basename(path) not in listed:
            problems.append(f"{path}: not listed in manifest.json")
    tokenizer = manifest.tokenizer_path
    if not os.path.isfile(tokenizer):
        problems.append(f"{tokenizer}: missing")
    elif file_sha256(tokenizer) != manifest.tokenizer_sha256:
        problems.append(f"{tokenizer}: sha256 does not match manifest.json")
    return num_shards, problems


def check_shard(manifest: Manifest, path: str, shard: ShardInfo) -> str | None:
    """One line describing what is wrong with a shard, or None if it matches the manifest."""
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    digest = file_sha256(path)
    if size == shard.bytes and digest == shard.sha256:
        return None
    structure = _structure_problem(manifest, path, shard)
    detail = f"; {structure}" if structure else ""
    if size != shard.bytes:
        return f"{size} bytes, manifest.json says {shard.bytes}{detail}"
    return f"sha256 {digest[:12]}... does not match manifest.json ({shard.sha256[:12]}...){detail}"


def _structure_problem(manifest: Manifest, path: str, shard: ShardInfo) -> str | None:
    """Walk the tar and say where it stops matching the expected samples."""
    layout = manifest.layout
    expected = []
    for i in range(shard.first_sample, shard.first_sample + shard.num_samples):
        expected += [f"{sample_key(i)}.{MASK_MEMBER}", f"{sample_key(i)}.{TOKENS_MEMBER}"]
    count = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if count >= len(expected) or member.name != expected[count]:
                    return f"unexpected member {member.name!r} at position {count}"
                if member.name.endswith(TOKENS_MEMBER):
                    payload = tar.extractfile(member).read()
                    tokens = np.frombuffer(payload, dtype=layout.dtype,
                                           offset=len(layout.tokens_header))
                    if len(tokens) != layout.num_tokens or int(tokens.max()) >= manifest.vocab_size:
                        return f"{member.name}: bad token array"
                count += 1
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        return f"unreadable tar after {count // 2} samples ({e})"
    if count != len(expected):
        return f"holds {count // 2} samples, manifest.json says {shard.num_samples}"
    return None
