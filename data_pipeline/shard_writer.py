"""Writes one split's samples into fixed-size WebDataset tar shards, atomically and hashed."""

from __future__ import annotations

import hashlib
import os

from webdataset import TarWriter

from data_pipeline.manifest import ShardInfo
from data_pipeline.pack import Sample
from data_pipeline.shard_format import SampleLayout, shard_name

TMP_SUFFIX = ".tmp"


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        """Hash, count and pass on ``data``."""
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)


class SplitWriter:
    """Shards of one split: ``samples_per_shard`` samples each, the last one possibly fewer.

    A shard is written under a temporary name and renamed only when complete, so a crash never
    leaves a truncated file under a shard's real name.
    """

    def __init__(self, out_dir: str, split: str, layout: SampleLayout, samples_per_shard: int,
                 start_shard: int = 0):
        self.out_dir = out_dir
        self.split = split
        self.layout = layout
        self.samples_per_shard = samples_per_shard
        self.next_shard = start_shard
        self._file = None
        self._hashing = None
        self._tar = None
        self._count = 0
        self._first_sample = 0

    def write(self, sample: Sample) -> ShardInfo | None:
        """Add a sample; returns the shard's info when this sample completed it."""
        if self._tar is None:
            self._open(sample.index)
        self._tar.write(self.layout.encode(sample.index, sample.tokens, sample.doc_starts))
        self._count += 1
        if self._count == self.samples_per_shard:
            return self._finish()
        return None

    def close(self) -> ShardInfo | None:
        """Finish the last, partly filled shard (if any) and return its info."""
        return self._finish() if self._tar is not None else None

    def abort(self) -> None:
        """Drop the shard being written; finished shards are untouched."""
        if self._tar is None:
            return
        try:
            self._tar.close()  # flushes into the file about to be deleted; keeps tarfile quiet
        except OSError:
            pass
        self._file.close()
        os.remove(self._tmp_path)
        self._tar = None

    @property
    def _path(self) -> str:
        return os.path.join(self.out_dir, shard_name(self.split, self.next_shard))

    @property
    def _tmp_path(self) -> str:
        return self._path + TMP_SUFFIX

    def _open(self, first_sample: int) -> None:
        self._file = open(self._tmp_path, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = TarWriter(self._hashing, encoder=False, mtime=0)
        self._count = 0
        self._first_sample = first_sample

    def _finish(self) -> ShardInfo:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_path, self._path)
        info = ShardInfo(
            file=os.path.basename(self._path),
            first_sample=self._first_sample,
            num_samples=self._count,
            num_tokens=self._count * self.layout.seq_len,
            bytes=self._hashing.size,
            sha256=self._hashing.sha256.hexdigest(),
        )
        self._tar = None
        self.next_shard += 1
        return info
