"""The on-disk sample format shared by the shard writer, the reader and ``verify``.

A shard is a plain tar (ustar headers, written by ``webdataset.TarWriter``). Sample ``i`` of a
split has key ``f"{i:010d}"`` and three members, in this order (the writer sorts names):

* ``KEY.doc_mask.npy``: uint8, ``ceil((seq_len + 1) / 8)`` bytes of ``np.packbits`` output; bit
  ``j`` is set when a document starts at ``tokens[j]``.
* ``KEY.tokens.npy``: ``seq_len + 1`` token ids (uint16 or uint32, little endian).
* ``KEY.xxh3.npy``: two big-endian uint64, the XXH3-64 digests of the array data (the bytes after
  the .npy header) of ``doc_mask`` and of ``tokens``, each seeded with the sample's index ``i``,
  so a reader finds a changed byte, or a sample that is not where the manifest puts it, in the
  sample it reads. Shards of manifest format 1 have no such member (``checksums=False``).

Every member has the same name length and payload size, so every sample occupies exactly
``record_bytes`` bytes and sample ``j`` of a shard starts at byte ``j * record_bytes``. The
loader uses this for O(1) random access; readers that do not care can stream the tar. The
checksum member comes last, so the loader reads a sample's tokens and their digest with one
``pread``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import xxhash

TAR_BLOCK = 512
KEY_DIGITS = 10
MASK_MEMBER = "doc_mask.npy"
TOKENS_MEMBER = "tokens.npy"
CHECKSUM_MEMBER = "xxh3.npy"
CHECKSUM_NAME = "xxh3_64"
DIGEST_BYTES = 8
SHARD_SUFFIX = ".tar"
_DIGEST_DTYPE = np.dtype(">u8")


# digest(data, seed) -> bytes: the 8-byte XXH3-64 digest (canonical, big endian) of a bytes-like
# object; the seed is the sample's index. Bound directly (no wrapper): the loader calls it per sample.
digest = xxhash.xxh3_64_digest


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def sample_key(index: int) -> str:
    """The WebDataset key of sample ``index`` of a split."""
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}{SHARD_SUFFIX}"


def npy_header(length: int, dtype: np.dtype) -> bytes:
    """The exact .npy header numpy writes for a 1-D array of ``length`` items of ``dtype``."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(length, dtype=dtype))
    return buffer.getvalue()[: -length * dtype.itemsize or None]


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def member_name(header: bytes) -> str:
    """The member name in a tar header block (its NUL-terminated first 100 bytes)."""
    return header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")


def member_size(header: bytes) -> int | None:
    """The payload size in a tar header block (octal, bytes 124-135), or None if unreadable."""
    try:
        return int(header[124:136].strip(b"\0 "), 8)
    except ValueError:
        return None


@dataclass(frozen=True)
class SampleLayout:
    """Byte layout of one sample record for a given sequence length and token dtype.

    ``checksums`` is False only for shards of manifest format 1, written before samples carried
    their digests.
    """

    seq_len: int
    dtype: np.dtype
    checksums: bool = True

    @property
    def num_tokens(self) -> int:
        """Token ids stored per sample (seq_len + 1: inputs plus the last target)."""
        return self.seq_len + 1

    @property
    def mask_bytes(self) -> int:
        """Bytes of the packed document-start bitmap."""
        return -(-self.num_tokens // 8)

    @cached_property
    def mask_header(self) -> bytes:
        """The .npy header of the doc_mask member."""
        return npy_header(self.mask_bytes, np.dtype("u1"))

    @cached_property
    def tokens_header(self) -> bytes:
        """The .npy header of the tokens member."""
        return npy_header(self.num_tokens, self.dtype)

    @property
    def mask_offset(self) -> int:
        """Offset of the doc_mask .npy payload (its header included) inside a record."""
        return TAR_BLOCK

    @cached_property
    def tokens_member_offset(self) -> int:
        """Offset of the tokens member's tar header inside a record."""
        return TAR_BLOCK + _padded(len(self.mask_header) + self.mask_bytes)

    @cached_property
    def tokens_offset(self) -> int:
        """Offset of the first token id inside a record."""
        return self.tokens_member_offset + TAR_BLOCK + len(self.tokens_header)

    @property
    def tokens_data_bytes(self) -> int:
        """Bytes of the token ids of one sample."""
        return self.num_tokens * self.dtype.itemsize

    @cached_property
    def checksum_header(self) -> bytes:
        """The .npy header of the checksum member."""
        return npy_header(2, _DIGEST_DTYPE)

    @cached_property
    def checksum_member_offset(self) -> int:
        """Offset of the checksum member's tar header inside a record (the end of the tokens member)."""
        return self.tokens_member_offset + TAR_BLOCK + _padded(len(self.tokens_header) + self.tokens_data_bytes)

    @cached_property
    def mask_digest_offset(self) -> int:
        """Offset of the doc_mask digest inside a record; the tokens digest follows it."""
        return self.checksum_member_offset + TAR_BLOCK + len(self.checksum_header)

    @cached_property
    def record_bytes(self) -> int:
        """Bytes one sample occupies in a shard."""
        if not self.checksums:
            return self.checksum_member_offset
        return self.checksum_member_offset + TAR_BLOCK + _padded(len(self.checksum_header) + 2 * DIGEST_BYTES)

    def encode(self, index: int, tokens: np.ndarray, doc_starts: np.ndarray) -> dict:
        """The sample as a ``TarWriter`` dict of raw bytes (``doc_starts``: positions in tokens)."""
        mask = np.zeros(self.num_tokens, dtype=bool)
        mask[doc_starts] = True
        mask_data = np.packbits(mask).tobytes()
        tokens_data = tokens.astype(self.dtype, copy=False).tobytes()
        sample = {
            "__key__": sample_key(index),
            MASK_MEMBER: self.mask_header + mask_data,
            TOKENS_MEMBER: self.tokens_header + tokens_data,
        }
        if self.checksums:
            sample[CHECKSUM_MEMBER] = self.checksum_header + digest(mask_data, index) + digest(tokens_data, index)
        return sample

    def _members(self) -> list[tuple[int, str, bytes, int]]:
        """(offset, member, .npy header, data bytes) of each member of a record."""
        members = [
            (0, MASK_MEMBER, self.mask_header, self.mask_bytes),
            (self.tokens_member_offset, TOKENS_MEMBER, self.tokens_header, self.tokens_data_bytes),
        ]
        if self.checksums:
            members.append((self.checksum_member_offset, CHECKSUM_MEMBER, self.checksum_header, 2 * DIGEST_BYTES))
        return members

    def record_problem(self, record: bytes, index: int) -> str | None:
        """What in ``record`` (the bytes of sample ``index``) breaks this layout, or None.

        Checks each member's tar header (name and size) and its .npy header, then that the
        doc_mask and tokens data match their digests; the token ids themselves are the caller's
        to check.
        """
        if len(record) < self.record_bytes:
            return f"ends inside sample {index}"
        for offset, member, header, data_bytes in self._members():
            block = record[offset: offset + TAR_BLOCK]
            expected = f"{sample_key(index)}.{member}"
            found = member_name(block)
            if found != expected:
                return f"unexpected member {found!r} where {expected!r} belongs"
            size = member_size(block)
            if size != len(header) + data_bytes:
                return f"{expected}: tar header gives {size} bytes, the layout {len(header) + data_bytes}"
            if record[offset + TAR_BLOCK: offset + TAR_BLOCK + len(header)] != header:
                return (f"{expected}: .npy header does not match seq_len {self.seq_len} "
                        f"and dtype {self.dtype.name}")
        if self.checksums:
            return self.digest_problem(record, index)
        return None

    def digest_problem(self, record: bytes, index: int) -> str | None:
        """Which data member of a whole ``record`` does not match its stored digest, or None."""
        view = memoryview(record)
        mask_start = TAR_BLOCK + len(self.mask_header)
        stored = record[self.mask_digest_offset: self.mask_digest_offset + 2 * DIGEST_BYTES]
        if digest(view[mask_start: mask_start + self.mask_bytes], index) != stored[:DIGEST_BYTES]:
            return f"{sample_key(index)}.{MASK_MEMBER}: does not match its {CHECKSUM_NAME} digest"
        if digest(view[self.tokens_offset: self.tokens_offset + self.tokens_data_bytes], index) != stored[DIGEST_BYTES:]:
            return f"{sample_key(index)}.{TOKENS_MEMBER}: does not match its {CHECKSUM_NAME} digest"
        return None

    def decode_tokens(self, record: bytes) -> np.ndarray:
        """The token ids of a whole sample record (a view of its bytes)."""
        return np.frombuffer(record, dtype=self.dtype, count=self.num_tokens, offset=self.tokens_offset)

    def decode_mask(self, payload: bytes) -> np.ndarray:
        """Document-start positions from a doc_mask payload (header included)."""
        bits = np.frombuffer(payload, dtype=np.uint8, offset=len(self.mask_header))
        return np.flatnonzero(np.unpackbits(bits, count=self.num_tokens)).astype(np.int64)

    def samples_per_shard(self, shard_mb: float) -> int:
        """Samples per shard for a target shard size in MiB (at least one)."""
        return max(1, int(shard_mb * 2**20) // self.record_bytes)

    def describe(self) -> dict:
        """The layout facts recorded in manifest.json."""
        facts = {
            "members": [member for _, member, _, _ in self._members()],
            "record_bytes": self.record_bytes,
            "tokens_offset": self.tokens_offset,
            "mask_offset": self.mask_offset,
        }
        if self.checksums:
            facts["checksum"] = CHECKSUM_NAME
        return facts
