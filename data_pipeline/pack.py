"""Packing: one split's documents, in order and each ending with EOS, cut into fixed samples.

Sample ``i`` is ``stream[i * seq_len : i * seq_len + seq_len + 1]``: consecutive samples share
one token, so every input position has its target. A short tail that cannot fill a sample is
dropped and counted. Each sample also says where the stream continues after it (``Cursor``), so
an interrupted run can restart at any sample boundary without re-tokenizing earlier documents.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Cursor(NamedTuple):
    """The document holding a stream position, and how many of its tokens come before it."""

    doc: int
    offset: int
    doc_tokens: int


class Sample(NamedTuple):
    """One packed sample: ``seq_len + 1`` tokens and the positions where documents start."""

    index: int
    tokens: np.ndarray
    doc_starts: np.ndarray
    resume: Cursor


class Packer:
    """Turns a split's documents into samples; restartable at any sample boundary."""

    def __init__(self, seq_len: int, dtype: np.dtype, start_sample: int = 0):
        self.seq_len = seq_len
        self.num_samples = start_sample
        self.stream_tokens = start_sample * seq_len
        self._base = self.stream_tokens
        self._buffer = np.empty(0, dtype=dtype)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._docs: list[tuple[int, int, int]] = []
        self.last_resume: Cursor | None = None

    def add(self, doc: int, tokens: np.ndarray, skip: int = 0) -> list[Sample]:
        """Append a document (EOS included), minus its first ``skip`` tokens; return new samples."""
        self._docs.append((doc, self.stream_tokens - skip, len(tokens)))
        part = tokens[skip:]
        self._pending.append(part)
        self._pending_len += len(part)
        self.stream_tokens += len(part)
        if len(self._buffer) + self._pending_len <= self.seq_len:
            return []
        return self._cut()

    def _cut(self) -> list[Sample]:
        buffer = np.concatenate([self._buffer, *self._pending])
        self._pending, self._pending_len = [], 0
        L = self.seq_len
        num_new = (len(buffer) - 1) // L
        starts = np.fromiter((d[1] for d in self._docs), dtype=np.int64, count=len(self._docs))
        samples = []
        for k in range(num_new):
            first = self._base + k * L
            lo = np.searchsorted(starts, first, side="left")
            hi = np.searchsorted(starts, first + L, side="right")
            samples.append(Sample(
                index=self.num_samples + k,
                tokens=buffer[k * L : k * L + L + 1],
                doc_starts=starts[lo:hi] - first,
                resume=self._locate(starts, first + L),
            ))
        self.num_samples += num_new
        if samples:
            self.last_resume = samples[-1].resume
        self._base += num_new * L
        self._buffer = buffer[num_new * L :]
        self._docs = [d for d in self._docs if d[1] + d[2] > self._base]
        return samples

    def _locate(self, starts: np.ndarray, position: int) -> Cursor:
        doc, start, length = self._docs[int(np.searchsorted(starts, position, side="right")) - 1]
        return Cursor(doc, position - start, length)

    @property
    def num_dropped_tokens(self) -> int:
        """Stream tokens that appear in no sample (the tail shorter than one sample)."""
        used = self.num_samples * self.seq_len + 1 if self.num_samples else 0
        return self.stream_tokens - used
