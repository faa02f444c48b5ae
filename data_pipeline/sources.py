"""Corpus readers: turn each input (file, directory, dataset, built-in corpus) into raw records.

A reader only reads; it never decodes or validates text (that happens in ``records.py``, inside
the tokenizer workers). Every record names where it came from (``origin``, used in messages) and
carries a stable ``key`` (used to hash documents into splits), both independent of the machine.

``recall:INPUT`` reads ``INPUT`` and turns each of its documents into key-value recall episodes
(``data_pipeline/recall.py``).

An input names its own text field with a ``:FIELD`` suffix (``man.jsonl:body``,
``hf:user/name:content``); without one the global ``--text-field`` applies. A path that exists
as written is always a path, even when it holds a colon.
"""

from __future__ import annotations

import gzip
import os
import sysconfig
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from data_pipeline.config import BUILTIN_CORPUS, PrepareConfig
from data_pipeline.errors import DataError, one_line
from data_pipeline.recall import RECALL_PREFIX, RecallSettings

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_TEXT_SUFFIXES = (".txt", ".md")
# Endings of compressed files: of these, only gzip and only for JSON lines is read.
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz", ".lz4", ".lzma", ".zip", ".7z", ".tgz")
HF_PREFIX = "hf:"
FIELD_SEPARATOR = ":"
# Seconds to wait for the Hugging Face hub to answer before calling it unreachable.
HUB_TIMEOUT_S = 5.0
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class Record(NamedTuple):
    """One raw record; ``kind`` says how ``payload`` is decoded (see ``records.parse_record``)."""

    kind: str
    payload: object
    origin: str
    key: str


@dataclass(frozen=True)
class Source:
    """One resolved input: what it is, where it lives, its text field and how much weight it gets.

    ``field_given`` says whether the input named its text field itself (``PATH:FIELD``).
    """

    spec: str
    kind: str
    path: str
    weight: float = 1.0
    text_field: str = "text"
    field_given: bool = False
    inner: Source | None = None
    """For a ``recall:INPUT`` source, the input whose documents it rewrites."""

    @property
    def setting(self) -> str:
        """The input as recorded in the manifest's settings: absolute path, plus its own field."""
        if self.kind == "recall":
            return RECALL_PREFIX + self.inner.setting
        if self.kind == "builtin":
            location = self.spec
        elif self.kind == "hf_hub":
            location = HF_PREFIX + self.path
        else:
            location = os.path.abspath(self.path)
        return location + (FIELD_SEPARATOR + self.text_field if self.field_given else "")


def resolve_sources(inputs: list[str], weights: list[float] | None, text_field: str = "text",
                    text_extensions: tuple[str, ...] = DEFAULT_TEXT_SUFFIXES) -> list[Source]:
    """Check every input exists and decide how to read it; raises DataError for a bad one.

    ``text_field`` applies to the inputs that do not name their own (``PATH:FIELD``); a file named
    as an input is read as text when its name ends with one of ``text_extensions``.
    """
    weights = weights or [1.0] * len(inputs)
    return [_resolve_one(spec, weight, text_field, tuple(text_extensions))
            for spec, weight in zip(inputs, weights, strict=True)]


def split_field(spec: str) -> tuple[str, str | None]:
    """``(location, field)`` of an input spec; field is None when the spec names none.

    A spec that exists as a path is that path; otherwise a last ``:FIELD`` (a name without a
    path separator) is split off. ``hf:NAME:FIELD`` names a hub dataset's column.
    """
    if spec == BUILTIN_CORPUS or os.path.exists(spec):
        return spec, None
    if spec.startswith(HF_PREFIX):
        name = spec[len(HF_PREFIX):]
        if FIELD_SEPARATOR in name:
            name, field = name.rsplit(FIELD_SEPARATOR, 1)
            return HF_PREFIX + name, _field_name(spec, field)
        return spec, None
    location, sep, field = spec.rpartition(FIELD_SEPARATOR)
    if sep and location and "/" not in field and os.sep not in field and os.path.exists(location):
        return location, _field_name(spec, field)
    return spec, None


def _field_name(spec: str, field: str) -> str:
    if not field:
        raise DataError(f"{spec}: no field name after '{FIELD_SEPARATOR}' (write PATH{FIELD_SEPARATOR}FIELD)")
    return field


def _resolve_one(spec: str, weight: float, text_field: str, text_exts: tuple[str, ...]) -> Source:
    if spec.startswith(RECALL_PREFIX):
        if not spec[len(RECALL_PREFIX):]:
            raise DataError(f"{spec}: name the input whose text carries the recall episodes, e.g. "
                            f"{RECALL_PREFIX}{BUILTIN_CORPUS}")
        inner = _resolve_one(spec[len(RECALL_PREFIX):], weight, text_field, text_exts)
        if inner.kind == "recall":
            raise DataError(f"{spec}: {RECALL_PREFIX} applies once")
        return Source(spec, "recall", inner.path, weight, inner.text_field, inner.field_given, inner)
    location, field = split_field(spec)
    options = dict(weight=weight, text_field=field or text_field, field_given=field is not None)
    if location == BUILTIN_CORPUS:
        return Source(spec, "builtin", sysconfig.get_paths()["stdlib"], **options)
    if location.startswith(HF_PREFIX):
        return Source(spec, "hf_hub", location[len(HF_PREFIX):], **options)
    if not os.path.exists(location):
        raise DataError(f"{spec}: no such file or directory (use {HF_PREFIX}NAME for a hub dataset, "
                        f"PATH{FIELD_SEPARATOR}FIELD to name an input's text field)")
    if os.path.isdir(location):
        if _is_saved_dataset(location):
            return Source(spec, "hf_disk", location, **options)
        return Source(spec, "dir", location, **options)
    _check_file_ending(location, text_exts)
    if field is not None and not location.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
        raise DataError(f"{spec}: a text field applies to JSON lines, parquet and dataset inputs; "
                        f"{location} is read as one text document")
    return Source(spec, "file", location, **options)


def _check_file_ending(path: str, text_exts: tuple[str, ...]) -> None:
    """DataError for a file whose name ends in a form no reader takes (a name without one is text)."""
    name = os.path.basename(path)
    ending = os.path.splitext(name)[1]
    if not ending or name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES + text_exts):
        return
    supported = (f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} and text files ({', '.join(text_exts)}, "
                 "as set by --text-extensions)")
    if ending.lower() in COMPRESSION_SUFFIXES:
        raise DataError(f"{path}: unsupported compression {ending}: only JSON lines are read compressed, with gzip "
                        f"(.jsonl.gz, .ndjson.gz); decompress it first. Files read: {supported}")
    raise DataError(f"{path}: unsupported file ending {ending}; files read: {supported}; other inputs: "
                    "a directory, a saved dataset, hf:NAME, builtin:stdlib")


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
    if source.kind == "recall":
        for record in _read_any(source.inner, config):
            if record.kind in ("problem", "missing"):
                yield record
            else:  # parsed (and rewritten) in the tokenizer workers: records.parse_record
                settings = RecallSettings(config.recall_episodes, config.recall_gap_chars, config.recall_digits)
                yield Record("recall", (record.kind, record.payload, record.key, settings), record.origin, record.key)
    elif source.kind == "builtin":
        yield from _read_tree(source.path, "stdlib", (".py",), source.text_field, _STDLIB_SKIP_DIRS)
    elif source.kind == "dir":
        yield from _read_tree(source.path, "", config.text_extensions, source.text_field, set())
    elif source.kind == "file":
        yield from _read_file(source.path, os.path.basename(source.path), source.text_field)
    elif source.kind == "hf_disk":
        yield from _read_saved_dataset(source, config)
    else:
        yield from _read_hub_dataset(source, config)


def _read_tree(root, key_prefix, text_exts, text_field, skip_dirs) -> Iterator[Record]:
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
                yield from _read_parquet(path, key, text_field)
            elif name.endswith(tuple(text_exts)):
                yield _read_text(path, key)


def _read_file(path: str, key: str, text_field: str) -> Iterator[Record]:
    if path.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(path, key)
    elif path.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(path, key, text_field)
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
            # Every row is a document without text: counted as read and skipped, like JSON lines.
            for row in range(table.metadata.num_rows):
                yield Record("missing", text_field, f"{path}:row {row}", f"{key}:{row}")
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
    yield from _read_rows(source, rows, name, source.text_field)


def _read_hub_dataset(source: Source, config: PrepareConfig) -> Iterator[Record]:
    import datasets

    unreachable = hub_unreachable()
    if unreachable:
        yield problem(source.spec, "source_error", unreachable)
        return

    def rows():
        return iter(datasets.load_dataset(source.path, config.hf_config, split=config.hf_split,
                                          streaming=True))

    yield from _read_rows(source, rows, source.path, source.text_field)


def hub_unreachable(timeout: float = HUB_TIMEOUT_S, offline_hint: str = "save the dataset with `datasets` "
                    "(save_to_disk) and give its directory") -> str | None:
    """Why the Hugging Face hub cannot be reached (one line, ending in how to work offline), or None when it answers.

    Asked once, with a short timeout, before a hub dataset is opened: the hub client would
    otherwise retry for about half a minute before giving up. In offline mode
    (``HF_HUB_OFFLINE=1``) the client fails at once by itself, so nothing is asked.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return None
    endpoint = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered, if only with an error status
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return one_line(f"the Hugging Face hub at {endpoint} is unreachable ({reason}); to work offline, "
                        f"{offline_hint}")
    return None


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
