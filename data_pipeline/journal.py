"""The progress journal that makes ``prepare`` restartable.

After every finished shard the journal records the shard (size, sha256) and the stream cursor
right after it. A restarted run with the same settings keeps the longest prefix of recorded
shards that still match their hashes and continues each split from its last cursor.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from data_pipeline.errors import DataError
from data_pipeline.manifest import ShardInfo, write_json_atomic
from data_pipeline.pack import Cursor

PROGRESS_FILE = "prepare.progress.json"
JOURNAL_VERSION = 1


@dataclass
class SplitStart:
    """Where one split resumes: next shard number, next sample and the stream cursor."""

    num_shards: int = 0
    num_samples: int = 0
    cursor: Cursor | None = None
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class Journal:
    """Finished shards per split, each with the cursor that follows it."""

    path: str
    settings: dict
    tokenizer_sha256: str | None = None
    entries: dict[str, list[tuple[ShardInfo, Cursor]]] = field(default_factory=dict)

    def record(self, split: str, info: ShardInfo, cursor: Cursor) -> None:
        """Append a finished shard and persist the journal atomically."""
        self.entries.setdefault(split, []).append((info, cursor))
        self.save()

    def save(self) -> None:
        """Write the journal to disk."""
        write_json_atomic(self.path, {
            "version": JOURNAL_VERSION,
            "settings": self.settings,
            "tokenizer_sha256": self.tokenizer_sha256,
            "splits": {s: [{"shard": asdict(i), "cursor": list(c)} for i, c in e]
                       for s, e in self.entries.items()},
        })

    def start(self, split: str) -> SplitStart:
        """Where ``split`` continues (the beginning when nothing was recorded)."""
        entries = self.entries.get(split, [])
        if not entries:
            return SplitStart()
        last, cursor = entries[-1]
        return SplitStart(len(entries), last.first_sample + last.num_samples, cursor,
                          [info for info, _ in entries])


def load_journal(path: str) -> Journal:
    """Read a journal; raises DataError if it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        entries = {
            split: [(ShardInfo(**e["shard"]), Cursor(*e["cursor"])) for e in items]
            for split, items in raw["splits"].items()
        }
        return Journal(path, raw["settings"], raw.get("tokenizer_sha256"), entries)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable progress journal ({e}); pass --overwrite to start over") from None


def keep_valid_prefix(journal: Journal, out_dir: str) -> list[str]:
    """Drop recorded shards from the first one that is missing or changed; return what was dropped."""
    dropped = []
    for split, entries in journal.entries.items():
        for i, (info, _) in enumerate(entries):
            problem = _check_shard(os.path.join(out_dir, info.file), info)
            if problem:
                dropped.append(f"{info.file}: {problem}")
                journal.entries[split] = entries[:i]
                break
    journal.save()
    return dropped


def _check_shard(path: str, info: ShardInfo) -> str | None:
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if size != info.bytes:
        return f"size {size}, expected {info.bytes}"
    if file_sha256(path) != info.sha256:
        return "sha256 differs from the one recorded"
    return None


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
