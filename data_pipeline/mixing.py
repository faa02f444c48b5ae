"""Deterministic document selection: weighted mixing of sources and the train/val split.

Both decisions hash a document's stable key with the seed, so they do not depend on the order
of reading, on the number of workers or on the machine. A document repeated by a weight above
1 always lands in the same split, so weights never leak validation text into training.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from itertools import islice
from typing import NamedTuple

from data_pipeline.config import PrepareConfig
from data_pipeline.sources import Record, Source, read_source

TRAIN = "train"
VAL = "val"
SPLITS = (TRAIN, VAL)


class MixedRecord(NamedTuple):
    """A record in the final mixed order; ``index`` is its position in that order."""

    index: int
    source: int
    first_pass: bool
    record: Record


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) that depends only on ``parts``."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def split_of(key: str, val_fraction: float, seed: int) -> str:
    """The split a document belongs to, from its key alone."""
    return VAL if unit_hash("split", seed, key) < val_fraction else TRAIN


def iter_mixed(sources: list[Source], config: PrepareConfig) -> Iterator[MixedRecord]:
    """Interleave sources one record at a time (round robin), each expanded by its weight."""
    streams = [_weighted(i, s, config) for i, s in enumerate(sources)]
    index = 0
    while streams:
        alive = []
        for stream in streams:
            item = next(stream, None)
            if item is None:
                continue
            alive.append(stream)
            yield MixedRecord(index, *item)
            index += 1
        streams = alive


def _weighted(source_index: int, source: Source, config: PrepareConfig):
    """Pass p over the source keeps a record when p < floor(w), or by hash for the fraction."""
    whole = math.floor(source.weight)
    for p in range(math.ceil(source.weight)):
        for record in islice(read_source(source, config), config.max_docs):
            if record.kind == "problem":
                if p == 0:
                    yield source_index, True, record
                continue
            if p >= whole and unit_hash("mix", config.seed, record.key, p) >= source.weight - whole:
                continue
            if record.kind == "recall" and p > 0:  # new episodes on every pass over the input
                inner_kind, inner_payload, _, settings = record.payload
                record = record._replace(payload=(inner_kind, inner_payload, f"{record.key}#{p}", settings))
            yield source_index, p == 0, record
