"""Random access to the samples of a prepared split, through the fixed record layout."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from data_pipeline.errors import ShardError
from data_pipeline.manifest import Manifest
from data_pipeline.shard_format import (
    CHECKSUM_NAME,
    DIGEST_BYTES,
    MASK_MEMBER,
    TAR_BLOCK,
    TOKENS_MEMBER,
    digest,
    sample_key,
)

log = logging.getLogger("data_pipeline")

_MAX_OPEN_FILES = 16
_HAS_PREADV = hasattr(os, "preadv")
_unchecked_notice_given = False


class ShardReader:
    """Reads sample tokens by (shard, local index) with one ``preadv`` each.

    Opening checks that every shard exists with the size the manifest records (unless
    ``check_sizes`` is False). Each read checks the sample's tar member names and .npy headers
    and, with ``verify`` (the default), that its bytes match the digests stored with it;
    ``check_token_ids`` checks ids against the manifest's vocabulary. A shard that does not
    match its manifest fails with a one-line ``ShardError`` naming the shard, the sample and
    ``verify`` instead of yielding wrong tokens. Shards of manifest format 1 carry no digests:
    they are read with a one-line notice (once per process). File handles open lazily (the
    reader can be sent to DataLoader worker processes before its first read).
    """

    def __init__(self, manifest: Manifest, split: str, *, check_sizes: bool = True, verify: bool = True):
        self.layout = manifest.layout
        self.split = split
        self.data_dir = manifest.data_dir
        self.paths = manifest.shard_paths(split)
        info = manifest.split(split)
        self.num_samples = np.array([s.num_samples for s in info.shards], dtype=np.int64)
        self.first_sample = np.array([s.first_sample for s in info.shards], dtype=np.int64)
        if check_sizes:
            for path, shard in zip(self.paths, info.shards, strict=True):
                check_shard_size(path, shard.bytes)
        layout = self.layout
        self.verify_digests = verify and layout.checksums
        self.vocab_size = manifest.vocab_size if verify else None
        self._first = [int(s.first_sample) for s in info.shards]
        # One read per sample, scattered: the tokens member's tar and .npy headers into a scratch
        # buffer, the ids straight into the caller's array and, when the layout has them, the
        # bytes up to the tokens digest into a scratch buffer and the digest into its own.
        self._row_bytes = layout.tokens_data_bytes
        self._head = bytearray(TAR_BLOCK + len(layout.tokens_header))
        self._stored_digest = bytearray(DIGEST_BYTES)
        self._sizes = [len(self._head), self._row_bytes]
        self._tail: list[bytearray] = []
        if layout.checksums:
            gap = layout.mask_digest_offset + DIGEST_BYTES - layout.tokens_offset - layout.tokens_data_bytes
            self._tail = [bytearray(gap), self._stored_digest]
            self._sizes += [gap, DIGEST_BYTES]
        self._read_bytes = sum(self._sizes)
        self._files: OrderedDict[int, int] = OrderedDict()
        if not layout.checksums:
            _notice_unchecked(self.data_dir)

    def read_into(self, shard: int, local: int, out: np.ndarray) -> None:
        """Read and check the tokens of sample ``local`` of shard ``shard`` into ``out`` (seq_len + 1 ids)."""
        self.read_rows([(shard, local)], out)

    def read_rows(self, places: Sequence[tuple[int, int]], out: np.ndarray) -> None:
        """Read and check the samples at ``places`` ((shard, local index) each) into the rows of ``out``.

        ``out`` is a C-contiguous array of ``len(places)`` rows of ``seq_len + 1`` ids of the
        layout's dtype; the bytes land in it directly. Each sample's tar member name and .npy header
        are checked, then its digest (seeded with the sample's index, so it also fails for a sample
        read from the wrong place). The ids of all rows are then checked with one reduction.
        """
        rows, n = memoryview(out).cast("B"), self._row_bytes
        head, header, stored = self._head, self.layout.tokens_header, self._stored_digest
        record, member = self.layout.record_bytes, self.layout.tokens_member_offset
        for i, (shard, local) in enumerate(places):
            view = rows[i * n: (i + 1) * n]
            index = self._first[shard] + local
            if _preadv(self._fd(shard), [head, view, *self._tail], self._sizes,
                       local * record + member) != self._read_bytes:
                raise self.sample_error(shard, local, f"is cut short: the shard ends at byte {self.file_size(shard)}")
            if head[TAR_BLOCK:] != header or not _named(head, index):
                raise self.sample_error(shard, local, "is not where manifest.json says (corrupt shard, or a "
                                        "manifest of other shards)")
            if self.verify_digests and stored != digest(view, index):
                raise self.sample_error(shard, local, f"has token bytes that do not match their {CHECKSUM_NAME} "
                                        "digest (the shard changed after prepare wrote it)")
        bad = self.id_problem(out)
        if bad is not None:
            raise self.sample_error(*places[bad[0]], bad[1])

    def id_problem(self, rows: np.ndarray) -> tuple[int, str] | None:
        """(row, what is wrong) for the first row of ``rows`` (samples as read, or one sample)
        holding a token id not below the manifest's vocabulary size; None when all fit."""
        if self.vocab_size is None or rows.size == 0 or int(rows.max()) < self.vocab_size:
            return None
        rows = rows.reshape(-1, self.layout.num_tokens)
        row = int(np.flatnonzero(rows.max(axis=1) >= self.vocab_size)[0])
        position = int(np.flatnonzero(rows[row] >= self.vocab_size)[0])
        return row, (f"has token id {int(rows[row, position])} at position {position}, not below the "
                     f"vocabulary size {self.vocab_size} of manifest.json")

    def read_doc_starts(self, shard: int, local: int) -> np.ndarray:
        """Positions in sample ``local`` of shard ``shard`` where a document starts."""
        layout = self.layout
        size = layout.record_bytes if self.verify_digests else TAR_BLOCK + len(layout.mask_header) + layout.mask_bytes
        data = os.pread(self._fd(shard), size, local * layout.record_bytes)
        name = f"{sample_key(self.first_sample[shard] + local)}.{MASK_MEMBER}".encode()
        if len(data) != size or data[: len(name)] != name:
            raise self.sample_error(shard, local, f"has no readable {MASK_MEMBER}")
        if self.verify_digests:
            problem = layout.digest_problem(data, int(self.first_sample[shard]) + local)
            if problem:
                raise self.sample_error(shard, local, f"fails its checksum ({problem})")
        return layout.decode_mask(data[TAR_BLOCK:])

    def sample_error(self, shard: int, local: int, what: str) -> ShardError:
        """The one-line error for sample ``local`` of shard ``shard``: where it is, what is wrong, what to run."""
        index = int(self.first_sample[shard]) + local
        return ShardError(f"{self.paths[shard]}: sample {local} ({self.split} sample {index}) {what}; "
                          f"run `python -m data_pipeline verify {self.data_dir}`")

    def read_at(self, shard: int, offset: int, size: int) -> bytes:
        """Up to ``size`` raw bytes of shard ``shard`` from byte ``offset`` (fewer at its end)."""
        return os.pread(self._fd(shard), size, offset)

    def file_size(self, shard: int) -> int:
        """The size in bytes of shard ``shard`` as it is on disk now."""
        return os.fstat(self._fd(shard)).st_size

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, local index) of sample ``index`` of the split."""
        shard = int(np.searchsorted(self.first_sample, index, side="right")) - 1
        if index < 0 or shard < 0 or index >= self.first_sample[shard] + self.num_samples[shard]:
            raise IndexError(f"sample {index} is out of range")
        return shard, index - int(self.first_sample[shard])

    def close(self) -> None:
        """Close every open shard file."""
        while self._files:
            os.close(self._files.popitem()[1])

    def _fd(self, shard: int) -> int:
        fd = self._files.get(shard)
        if fd is not None:
            self._files.move_to_end(shard)
            return fd
        try:
            fd = os.open(self.paths[shard], os.O_RDONLY)
        except OSError as e:
            raise ShardError(f"{self.paths[shard]}: cannot open ({e.strerror})") from None
        self._files[shard] = fd
        if len(self._files) > _MAX_OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        return state

    def __del__(self):
        if "_files" in self.__dict__:
            self.close()


def _named(head: bytearray, index: int) -> bool:
    """Whether a tokens member's tar header (``head``) names sample ``index`` of the split."""
    name = f"{sample_key(index)}.{TOKENS_MEMBER}".encode()
    return head[: len(name)] == name and head[len(name)] == 0


def _preadv(fd: int, buffers: list, sizes: list[int], offset: int) -> int:
    """Fill ``buffers`` (of ``sizes`` bytes) from consecutive bytes at ``offset``; returns bytes read."""
    if _HAS_PREADV:
        return os.preadv(fd, buffers, offset)
    data = os.pread(fd, sum(sizes), offset)
    start = 0
    for buffer, size in zip(buffers, sizes, strict=True):
        part = data[start: start + size]
        memoryview(buffer).cast("B")[: len(part)] = part
        start += size
    return len(data)


def _notice_unchecked(data_dir: str) -> None:
    """Say once per process that a dataset's samples carry no digests to check."""
    global _unchecked_notice_given
    if not _unchecked_notice_given:
        _unchecked_notice_given = True
        log.warning("%s: shards of manifest format 1 carry no per-sample checksums; their samples are read "
                    "unchecked (prepare the data again to add them)", data_dir)


def check_shard_size(path: str, expected: int) -> None:
    """Raise ShardError unless ``path`` exists with exactly ``expected`` bytes."""
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ShardError(f"{path}: missing (listed in manifest.json)") from None
    if size != expected:
        raise ShardError(f"{path}: {size} bytes, manifest.json says {expected} "
                         "(truncated shard, or a manifest of other shards)")
