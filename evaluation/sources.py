"""Held-out text for the evaluation: validation shards (val-*.tar) or a .txt / .md / .jsonl(.gz) file."""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .codec import TextCodec
from .errors import EvaluationError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SAMPLE_SUFFIX = ".tokens.npy"
MAX_SCANNED_DOCUMENTS = 100_000


@dataclass
class DataSource:
    """One place held-out text comes from: kind "shards" (token ids) or "text" (documents to tokenize)."""

    path: str
    kind: str
    name: str
    text_field: str = "text"
    shards: list[str] = field(default_factory=list)


def open_source(path: str, *, text_field: str = "text") -> DataSource:
    """Check `path` and say what it is: a shard directory, one .tar shard, or a text/jsonl file."""
    name = os.path.basename(os.path.normpath(path)) or path
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "val-*.tar")))
        if not shards:
            raise EvaluationError(f"{path}: no validation shards (val-*.tar) in this directory")
        return DataSource(path=path, kind="shards", name=name, shards=shards)
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: data file or directory not found")
    if path.endswith(".tar"):
        return DataSource(path=path, kind="shards", name=name, shards=[path])
    if path.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        return DataSource(path=path, kind="text", name=name, text_field=text_field)
    raise EvaluationError(f"{path}: unsupported data file; use a val-*.tar directory, a .tar shard, .txt, .md, .jsonl or .jsonl.gz")


# ---------------------------------------------------------------------- shards
def iter_shard_samples(shards: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (member name, token ids) for every `*.tokens.npy` sample of the shards, in order."""
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(SAMPLE_SUFFIX):
                        data = tar.extractfile(member).read()
                        yield f"{shard}:{member.name}", np.load(io.BytesIO(data), allow_pickle=False).reshape(-1)
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            raise EvaluationError(f"{shard}: unreadable shard ({err})") from None


def read_shard_stream(shards: list[str], *, max_tokens: int | None = None) -> tuple[np.ndarray, dict]:
    """Rebuild the token stream from consecutive samples, dropping the one token each shares with the previous.

    Stops once `max_tokens` tokens are read. Returns the stream (int64) and counts: samples read and
    sample boundaries where the expected one-token overlap was absent (those tokens are kept).
    """
    pieces, total, previous_last = [], 0, None
    info = {"samples": 0, "boundaries_without_overlap": 0}
    for _, sample in iter_shard_samples(shards):
        sample = sample.astype(np.int64)
        if sample.size == 0:
            continue
        last = int(sample[-1])
        if previous_last is not None:
            if int(sample[0]) == previous_last:
                sample = sample[1:]
            else:
                info["boundaries_without_overlap"] += 1
        pieces.append(sample)
        total += sample.size
        previous_last = last
        info["samples"] += 1
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return stream, info


# ---------------------------------------------------------------------- text files
def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(source: DataSource) -> Iterator[str]:
    """Yield the documents of a text source: a whole .txt/.md file, or one `text_field` per .jsonl line."""
    try:
        with _open_text(source.path) as f:
            if source.path.endswith(TEXT_SUFFIXES):
                yield f.read()
                return
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise EvaluationError(f"{source.path}:{lineno}: not valid JSON ({err.msg})") from None
                text = record.get(source.text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise EvaluationError(f"{source.path}:{lineno}: no string field {source.text_field!r} (see --text-field)")
                yield text
    except UnicodeDecodeError as err:
        raise EvaluationError(f"{source.path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except (OSError, EOFError) as err:
        raise EvaluationError(f"{source.path}: unreadable ({err})") from None


def _text_stream(source: DataSource, codec: TextCodec, num_tokens: int) -> tuple[np.ndarray, dict]:
    """Each document's text + "\\n", tokenized and concatenated until `num_tokens` tokens are reached."""
    pieces, total, num_docs = [], 0, 0
    for text in iter_documents(source):
        ids = codec.encode(text + "\n")
        pieces.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        num_docs += 1
        if total >= num_tokens:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return stream, {"documents_read": num_docs}


# ---------------------------------------------------------------------- what the evaluations ask for
def token_stream(source: DataSource, codec: TextCodec, num_tokens: int) -> tuple[np.ndarray, dict]:
    """At most about `num_tokens` tokens of the source as one stream (may be shorter when the source is)."""
    if source.kind == "shards":
        return read_shard_stream(source.shards, max_tokens=num_tokens)
    return _text_stream(source, codec, num_tokens)


def cut_windows(stream: np.ndarray, window: int, max_windows: int) -> list[np.ndarray]:
    """Consecutive non-overlapping `window`-token slices of `stream`, at most `max_windows` of them."""
    count = min(len(stream) // window, max_windows)
    return [stream[i * window : (i + 1) * window] for i in range(count)]


def long_documents(
    source: DataSource, codec: TextCodec, num_tokens: int, *, max_docs: int, concat: bool = False
) -> tuple[list[np.ndarray], dict]:
    """Up to `max_docs` token sequences of exactly `num_tokens` tokens, with counts of what was used and skipped.

    Text sources: each document is tokenized on its own (no end-of-text prefix); documents shorter
    than `num_tokens` are skipped, longer ones cut to their first `num_tokens` tokens. Shards (and
    text with `concat=True`) are read as one stream cut into consecutive windows.
    """
    if source.kind == "shards" or concat:
        stream, info = token_stream(source, codec, num_tokens * max_docs)
        docs = cut_windows(stream, num_tokens, max_docs)
        return docs, {**info, "mode": "stream windows", "documents": len(docs), "stream_tokens": int(len(stream))}
    docs, scanned, longest = [], 0, 0
    for text in iter_documents(source):
        scanned += 1
        ids = codec.encode(text)
        longest = max(longest, len(ids))
        if len(ids) >= num_tokens:
            docs.append(np.asarray(ids[:num_tokens], dtype=np.int64))
            if len(docs) == max_docs:
                break
        if scanned >= MAX_SCANNED_DOCUMENTS:
            break
    info = {"mode": "documents", "documents": len(docs), "scanned": scanned,
            "skipped_short": scanned - len(docs), "longest_tokens": longest}
    return docs, info
