"""Tokenizer worker: parse a chunk of raw records and encode the usable ones.

Runs in worker processes (or in-process for one worker). It imports neither torch nor
webdataset, so a worker starts quickly.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import numpy as np

from data_pipeline.records import parse_record
from data_pipeline.tokenizer import TokenizerInfo

_PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"
_state: dict = {}


class Job(NamedTuple):
    """One record to parse with its input's text field; ``tokenize`` is False for documents
    already in finished shards."""

    kind: str
    payload: object
    tokenize: bool
    text_field: str


class ChunkResult(NamedTuple):
    """Per-record skip reason/message, token count (EOS included, 0 if none) and all tokens."""

    reasons: list
    messages: list
    lengths: np.ndarray
    tokens: np.ndarray


def init_worker(tokenizer: TokenizerInfo, dtype: str) -> None:
    """Process initializer: one tokenizer per process, encoding on this process's thread only."""
    os.environ[_PARALLELISM_ENV] = "false"
    load_state(tokenizer, dtype)


def load_state(tokenizer: TokenizerInfo, dtype: str) -> None:
    """Set up the tokenizer used by ``encode_chunk`` in this process."""
    _state.update(tokenizer=tokenizer.build(), eos_id=tokenizer.eos_id, dtype=np.dtype(dtype))


@contextlib.contextmanager
def serial_tokenizers():
    """Keep ``encode_batch`` on the calling thread while inside (one worker = one core)."""
    previous = os.environ.get(_PARALLELISM_ENV)
    os.environ[_PARALLELISM_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_PARALLELISM_ENV, None)
        else:
            os.environ[_PARALLELISM_ENV] = previous


def encode_chunk(jobs: list[Job]) -> ChunkResult:
    """Parse every job, encode those to tokenize, and append EOS to each document."""
    reasons, messages, texts, slots = [], [], [], []
    for i, job in enumerate(jobs):
        parsed = parse_record(job.kind, job.payload, job.text_field)
        reasons.append(parsed.reason)
        messages.append(parsed.message)
        if parsed.text is not None and job.tokenize:
            texts.append(parsed.text)
            slots.append(i)
    encodings = _state["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)
    ids = [encoding.ids for encoding in encodings]
    lengths = np.zeros(len(jobs), dtype=np.int64)
    lengths[slots] = [len(x) + 1 for x in ids]
    tokens = np.empty(int(lengths.sum()), dtype=_state["dtype"])
    position = 0
    for doc_ids in ids:
        end = position + len(doc_ids)
        tokens[position:end] = doc_ids
        tokens[end] = _state["eos_id"]
        position = end + 1
    return ChunkResult(reasons, messages, lengths, tokens)
