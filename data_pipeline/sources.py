"""Corpus readers: turn each input (file, directory, dataset, built-in corpus) into raw records.

A reader only reads; it never decodes or validates text (that happens in ``records.py``, inside
the tokenizer workers). Every record names where it came from (``origin``, used in messages) and
carries a stable ``key`` (used to hash documents into splits), both independent of the machine.
"""

from __future__ import annotations

import gzip
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from data_pipeline.config import BUILTIN_CORPUS, PrepareConfig
from data_pipeline.errors import DataError, one_line

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
HF_PREFIX = "hf:"
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class Record(NamedTuple):
    """One raw record; ``kind`` says how ``payload`` is decoded (see ``records.parse_record``)."""

    kind: str
    payload: object
    origin: str
    key: str


@dataclass(frozen=True)
class Source:
    """One resolved input: what it is, where it lives and how much weight it gets."""

    spec: str
    kind: str
    path: str
    weight: float = 1.0


def resolve_sources(inputs: list[str], weights: list[float] | None) -> list[Source]:
    """Check every input exists and decide how to read it; raises DataError for a bad one."""
    weights = weights or [1.0] * len(inputs)
    return [_resolve_one(spec, weight) for spec, weight in zip(inputs, weights, strict=True)]


def _resolve_one(spec: str, weight: float) -> Source:
    if spec == BUILTIN_CORPUS:
        return Source(spec, "builtin", sysconfig.get_paths()["stdlib"], weight)
    if spec.startswith(HF_PREFIX):
        return Source(spec, "hf_hub", spec[len(HF_PREFIX):], weight)
    if not os.path.exists(spec):
        raise DataError(f"{spec}: no such file or directory (use {HF_PREFIX}NAME for a hub dataset)")
    if os.path.isdir(spec):
        if _is_saved_dataset(spec):
            return Source(spec, "hf_disk", spec, weight)
        return Source(spec, "dir", spec, weight)
    return Source(spec, "file", spec, weight)


def _is_saved_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    return "dataset_dict.json" in names or {"state.json", "dataset_info.json"} <= names


def read_source(source: Source, config: PrepareConfig) -> Iterator[Record]:
    """Yield the records of one source, then a problem record if it held none (and said nothing)."""
    num_records = num_problems = 0
    for record in _read_any(source, config):
        num_problems += record.kind == "problem"
        num_records += record.kind != "problem"
        yield record
    if num_records == 0 and num_problems == 0:
        yield problem(source.spec, "empty_source", "no documents found")


def problem(origin: str, reason: str, message: str) -> Record:
    """A record that stands for a source-level problem (counted and reported like a bad record)."""
    return Record("problem", (reason, one_line(message)), origin, origin)


def _read_any(source: Source, config: PrepareConfig) -> Iterator[Record]:
    if source.kind == "builtin":
        yield from _read_tree(source.path, "stdlib", (".py",), config, _STDLIB_SKIP_DIRS)
    elif source.kind == "dir":
        yield from _read_tree(source.path, "", config.text_extensions, config, set())
    elif source.kind == "file":
        yield from _read_file(source.path, os.path.basename(source.path), config)
    elif source.kind == "hf_disk":
        yield from _read_saved_dataset(source, config)
    else:
        yield from _read_hub_dataset(source, config)


def _read_tree(root, key_prefix, text_exts, config, skip_dirs) -> Iterator[Record]:
    """Walk a directory in sorted order; hidden entries and ``skip_dirs`` are left out."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            key = f"{key_prefix}/{rel}" if key_prefix else rel
            if name.endswith(JSONL_SUFFIXES):
                yield from _read_jsonl(path, key)
            elif name.endswith(PARQUET_SUFFIXES):
                yield from _read_parquet(path, key, config.text_field)
            elif name.endswith(tuple(text_exts)):
                yield _read_text(path, key)


def _read_file(path: str, key: str, config: PrepareConfig) -> Iterator[Record]:
    if path.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(path, key)
    elif path.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(path, key, config.text_field)
    else:
        yield _read_text(path, key)


def _read_text(path: str, key: str) -> Record:
    try:
        with open(path, "rb") as f:
            return Record("text", f.read(), path, key)
    except OSError as e:
        return problem(path, "source_error", f"cannot read ({e.strerror})")


def _read_jsonl(path: str, key: str) -> Iterator[Record]:
    opener = gzip.open if path.endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield Record("json", line, f"{path}:{line_no}", f"{key}:{line_no}")
    except (OSError, EOFError, zlib.error) as e:
        yield problem(path, "source_error", f"unreadable after line {line_no} ({e})")


def _read_parquet(path: str, key: str, text_field: str) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            yield problem(path, "missing_field", f"no column '{text_field}'")
            return
        row = 0
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield Record("value", value, f"{path}:row {row}", f"{key}:{row}")
                row += 1
    except (OSError, pyarrow.ArrowException) as e:
        yield problem(path, "source_error", f"unreadable parquet ({e})")


def _read_saved_dataset(source: Source, config: PrepareConfig) -> Iterator[Record]:
    import datasets

    def rows():
        dataset = datasets.load_from_disk(source.path)
        if isinstance(dataset, datasets.DatasetDict):
            if config.hf_split not in dataset:
                raise KeyError(f"no split '{config.hf_split}' (has {', '.join(dataset)})")
            dataset = dataset[config.hf_split]
        return iter(dataset)

    name = os.path.basename(os.path.normpath(source.path))
    yield from _read_rows(source, rows, name, config.text_field)


def _read_hub_dataset(source: Source, config: PrepareConfig) -> Iterator[Record]:
    import datasets

    def rows():
        return iter(datasets.load_dataset(source.path, config.hf_config, split=config.hf_split,
                                          streaming=True))

    yield from _read_rows(source, rows, source.path, config.text_field)


def _read_rows(source: Source, open_rows, name: str, text_field: str) -> Iterator[Record]:
    """Records from a ``datasets`` row iterator; any failure of the library is a source problem."""
    try:
        for row, item in enumerate(open_rows()):
            if row == 0 and text_field not in item:
                yield problem(source.spec, "missing_field", f"no column '{text_field}'")
                return
            yield Record("value", item.get(text_field), f"{source.spec}:row {row}", f"{name}:{row}")
    except Exception as e:  # datasets raises many unrelated types for one unreadable input
        yield problem(source.spec, "source_error", f"cannot read dataset ({type(e).__name__}: {e})")
