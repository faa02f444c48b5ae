"""The public reader of a prepared split: samples in order or by index, the token stream, checks.

Everything that reads the shards outside training (``verify``, ``inspect``, the evaluation, the
tests) goes through ``SplitReader``; the training loader uses the same ``ShardReader``
underneath. Samples are read by offset through the fixed record layout (``shard_format.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from data_pipeline.errors import ShardError
from data_pipeline.manifest import Manifest, as_manifest
from data_pipeline.shard_format import TAR_BLOCK, TOKENS_MEMBER, member_name, sample_key
from data_pipeline.shard_reader import ShardReader

_TAIL_CHUNK = 1 << 20


class StoredSample(NamedTuple):
    """One stored sample: its index in the split, its ``seq_len + 1`` token ids and, when asked
    for, the positions in ``tokens`` where a document starts (else None)."""

    index: int
    tokens: np.ndarray
    doc_starts: np.ndarray | None


class SplitReader:
    """One split of a prepared dataset, read through its manifest.

    Args:
        dataset: a directory written by ``prepare``, or its already loaded ``Manifest``.
        split: "train" or "val".
        check_sizes: check on opening that every shard of the split has the size manifest.json
            records. Without it only the shards actually read must be present (each sample is
            still checked as it is read); ``verify`` turns it off to report sizes itself.

    Reading a sample whose tar member name or .npy header is not where the layout puts it, whose
    bytes do not match the digests stored with it, or that holds a token id outside the
    manifest's vocabulary raises a one-line ``ShardError`` naming the shard, the sample and
    ``verify``. Use as a context manager, or call ``close()``.
    """

    def __init__(self, dataset: str | os.PathLike | Manifest, split: str = "train", *,
                 check_sizes: bool = True):
        self.manifest = as_manifest(dataset)
        self.split = split
        self.layout = self.manifest.layout
        self._shards = ShardReader(self.manifest, split, check_sizes=check_sizes)

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return self.manifest.num_samples(self.split)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def shard_paths(self) -> list[str]:
        """Absolute paths of the split's shards, in order."""
        return self._shards.paths

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, index within that shard) of sample ``index`` (IndexError when there is none)."""
        return self._shards.locate(index)

    def shard_path(self, index: int) -> str:
        """Path of the shard holding sample ``index``."""
        return self._shards.paths[self.locate(index)[0]]

    def sample(self, index: int, *, doc_starts: bool = False) -> StoredSample:
        """Sample ``index`` of the split (IndexError when there is none)."""
        shard, local = self._shards.locate(index)
        tokens = np.empty(self.layout.num_tokens, dtype=self.layout.dtype)
        self._shards.read_into(shard, local, tokens)
        bad = self._shards.id_problem(tokens)
        if bad is not None:
            raise self._shards.sample_error(shard, local, bad[1])
        starts = self._shards.read_doc_starts(shard, local) if doc_starts else None
        return StoredSample(index, tokens, starts)

    def samples(self, start: int = 0, stop: int | None = None, *,
                doc_starts: bool = False) -> Iterator[StoredSample]:
        """Samples ``start .. stop - 1`` of the split (default: all of them), in order."""
        stop = self.num_samples if stop is None else stop
        if not 0 <= start <= stop <= self.num_samples:
            raise IndexError(f"samples {start}..{stop} are out of range "
                             f"(split {self.split!r} has {self.num_samples})")
        for index in range(start, stop):
            yield self.sample(index, doc_starts=doc_starts)

    def token_stream(self, start: int = 0, stop: int | None = None, *,
                     max_tokens: int | None = None) -> np.ndarray:
        """The split's token stream, rebuilt from samples ``start .. stop - 1`` (default: all).

        Sample ``i`` is ``stream[i * seq_len : i * seq_len + seq_len + 1]``, so consecutive
        samples share one token, kept once here. Reading stops after the sample that brings the
        stream to ``max_tokens``. Raises ShardError when a sample does not begin with the last
        token of the one before it (the samples are not consecutive pieces of one stream).
        """
        pieces, total, previous = [], 0, None
        for sample in self.samples(start, stop):
            tokens = sample.tokens
            if previous is not None:
                if tokens[0] != previous.tokens[-1]:
                    raise ShardError(
                        f"{self.shard_path(sample.index)}: sample {sample.index} does not begin with "
                        f"the last token of sample {previous.index}; consecutive samples of a "
                        "prepared split overlap by one token")
                tokens = tokens[1:]
            pieces.append(tokens)
            total += len(tokens)
            previous = sample
            if max_tokens is not None and total >= max_tokens:
                break
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.layout.dtype)

    def check_sample(self, index: int) -> str | None:
        """What is wrong with the stored bytes of sample ``index``, or None.

        Checks the member names, the tar and .npy headers, the stored digests (format 2), and that
        every token id is below the manifest's vocabulary size. The line does not repeat the shard's path
        (``shard_path(index)`` gives it).
        """
        shard, local = self._shards.locate(index)
        return self._record_problem(shard, local)

    def check_shard(self, shard: int) -> str | None:
        """The first thing in shard ``shard`` that does not match manifest.json, or None.

        Every listed sample is checked as ``check_sample`` does; then the file must hold no more
        samples than listed: nothing but the tar end-of-archive follows the last one.
        """
        record = self.layout.record_bytes
        info = self.manifest.split(self.split).shards[shard]
        size = self._shards.file_size(shard)
        for local in range(info.num_samples):
            if size <= local * record:
                return f"holds {local} samples, manifest.json says {info.num_samples}"
            problem = self._record_problem(shard, local)
            if problem:
                return problem
        return self._tail_problem(shard, info.num_samples * record, size, info.num_samples)

    def close(self) -> None:
        """Close every open shard file."""
        self._shards.close()

    def __enter__(self) -> SplitReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record_problem(self, shard: int, local: int) -> str | None:
        layout = self.layout
        index = int(self._shards.first_sample[shard]) + local
        record = self._shards.read_at(shard, local * layout.record_bytes, layout.record_bytes)
        problem = layout.record_problem(record, index)
        if problem:
            return problem
        top = int(layout.decode_tokens(record).max())
        if top >= self.manifest.vocab_size:
            return (f"{sample_key(index)}.{TOKENS_MEMBER}: token id {top} is not below the "
                    f"vocabulary size {self.manifest.vocab_size}")
        return None

    def _tail_problem(self, shard: int, end: int, size: int, num_samples: int) -> str | None:
        """What follows the last listed sample, if it is not a tar end-of-archive."""
        first = self._shards.read_at(shard, end, TAR_BLOCK)
        if first.strip(b"\0"):
            return (f"unexpected member {member_name(first)!r} after the {num_samples} samples "
                    "manifest.json lists")
        if size - end < 2 * TAR_BLOCK:
            return f"no tar end-of-archive after the last of its {num_samples} samples"
        for offset in range(end + TAR_BLOCK, size, _TAIL_CHUNK):
            if self._shards.read_at(shard, offset, _TAIL_CHUNK).strip(b"\0"):
                return "data after the tar end-of-archive"
        return None
