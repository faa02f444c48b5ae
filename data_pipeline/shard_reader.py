"""Random access to the samples of a prepared split, through the fixed record layout."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from data_pipeline.errors import ShardError
from data_pipeline.manifest import Manifest
from data_pipeline.shard_format import MASK_MEMBER, TAR_BLOCK, TOKENS_MEMBER, sample_key

_MAX_OPEN_FILES = 16


class ShardReader:
    """Reads sample tokens by (shard, local index) with one ``pread`` each.

    Opening checks that every shard exists with the size the manifest records (unless
    ``check_sizes`` is False); each read checks the sample's tar member name and .npy header, so
    a shard that does not match its manifest fails loudly instead of yielding wrong tokens. File
    handles open lazily (the reader can be sent to DataLoader worker processes before its first
    read).
    """

    def __init__(self, manifest: Manifest, split: str, *, check_sizes: bool = True):
        self.layout = manifest.layout
        self.paths = manifest.shard_paths(split)
        info = manifest.split(split)
        self.num_samples = np.array([s.num_samples for s in info.shards], dtype=np.int64)
        self.first_sample = np.array([s.first_sample for s in info.shards], dtype=np.int64)
        if check_sizes:
            for path, shard in zip(self.paths, info.shards, strict=True):
                check_shard_size(path, shard.bytes)
        header = self.layout.tokens_header
        self._tokens_read = TAR_BLOCK + len(header) + self.layout.num_tokens * self.layout.dtype.itemsize
        self._header = header
        self._files: OrderedDict[int, int] = OrderedDict()

    def read_into(self, shard: int, local: int, out: np.ndarray) -> None:
        """Copy the tokens of sample ``local`` of shard ``shard`` into ``out`` (length seq_len+1)."""
        layout = self.layout
        offset = local * layout.record_bytes + layout.tokens_member_offset
        data = os.pread(self._fd(shard), self._tokens_read, offset)
        if len(data) != self._tokens_read:
            raise ShardError(f"{self.paths[shard]}: truncated at sample {local} "
                             f"(byte {offset + len(data)})")
        name = f"{sample_key(self.first_sample[shard] + local)}.{TOKENS_MEMBER}".encode()
        if data[: len(name)] != name or data[len(name)] != 0 or \
                data[TAR_BLOCK: TAR_BLOCK + len(self._header)] != self._header:
            raise ShardError(f"{self.paths[shard]}: sample {local} is not where the manifest says "
                             "(corrupt shard, or a manifest of other shards)")
        out[:] = np.frombuffer(data, dtype=layout.dtype, count=layout.num_tokens,
                               offset=TAR_BLOCK + len(self._header))

    def read_doc_starts(self, shard: int, local: int) -> np.ndarray:
        """Positions in sample ``local`` of shard ``shard`` where a document starts."""
        layout = self.layout
        offset = local * layout.record_bytes
        size = TAR_BLOCK + len(layout.mask_header) + layout.mask_bytes
        data = os.pread(self._fd(shard), size, offset)
        name = f"{sample_key(self.first_sample[shard] + local)}.{MASK_MEMBER}".encode()
        if len(data) != size or data[: len(name)] != name:
            raise ShardError(f"{self.paths[shard]}: sample {local} has no readable {MASK_MEMBER}")
        return layout.decode_mask(data[TAR_BLOCK:])

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


def check_shard_size(path: str, expected: int) -> None:
    """Raise ShardError unless ``path`` exists with exactly ``expected`` bytes."""
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ShardError(f"{path}: missing (listed in manifest.json)") from None
    if size != expected:
        raise ShardError(f"{path}: {size} bytes, manifest.json says {expected} "
                         "(truncated shard, or a manifest of other shards)")
