"""Held-out text for the evaluation: a prepared shard directory (its val split), one of its shards, or a .txt / .md / .jsonl(.gz) file."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from tokenizers import Tokenizer

from data_pipeline import DataError, Manifest, SplitReader, load_manifest

from .codec import TextCodec
from .errors import EvaluationError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SHARD_SUFFIX = ".tar"
HELDOUT_SPLIT = "val"
MAX_SCANNED_DOCUMENTS = 100_000


@dataclass
class DataSource:
    """One place held-out text comes from: kind "shards" (token ids of a prepared split) or "text" (documents to tokenize).

    Shards: `samples` are the indices of the split's samples to read (the whole split, or one shard's).
    """

    path: str
    kind: str
    name: str
    text_field: str = "text"
    manifest: Manifest | None = None
    split: str = HELDOUT_SPLIT
    samples: range = range(0)


def open_source(path: str, *, text_field: str = "text") -> DataSource:
    """Check `path` and say what it is: a prepared shard directory, one of its .tar shards, or a text/jsonl file."""
    name = os.path.basename(os.path.normpath(path)) or path
    if os.path.isdir(path):
        manifest = _manifest(path)
        num_samples = manifest.num_samples(HELDOUT_SPLIT) if HELDOUT_SPLIT in manifest.splits else 0
        if num_samples == 0:
            raise EvaluationError(f"{path}: the prepared dataset has no {HELDOUT_SPLIT} samples (prepare with --val-fraction > 0)")
        return DataSource(path=path, kind="shards", name=name, manifest=manifest, samples=range(num_samples))
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: data file or directory not found")
    if path.endswith(SHARD_SUFFIX):
        return _shard_source(path, name)
    if path.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        return DataSource(path=path, kind="text", name=name, text_field=text_field)
    raise EvaluationError(
        f"{path}: unsupported data file; use a prepared shard directory, one of its .tar shards, .txt, .md, .jsonl or .jsonl.gz"
    )


def _manifest(directory: str) -> Manifest:
    try:
        return load_manifest(directory)
    except DataError as err:
        raise EvaluationError(str(err)) from None


def _shard_source(path: str, name: str) -> DataSource:
    """One shard, read through the manifest.json beside it."""
    manifest = _manifest(os.path.dirname(os.path.abspath(path)))
    for split, info in manifest.splits.items():
        for shard in info.shards:
            if shard.file == os.path.basename(path):
                samples = range(shard.first_sample, shard.first_sample + shard.num_samples)
                return DataSource(path=path, kind="shards", name=name, manifest=manifest, split=split, samples=samples)
    raise EvaluationError(f"{path}: not a shard listed in the manifest.json beside it")


# ---------------------------------------------------------------------- shards
def check_tokenizer(source: DataSource, codec: TextCodec) -> None:
    """EvaluationError when the source's shards were tokenized with another tokenizer than the model's.

    The manifest's tokenizer sha256 must be that of the model's tokenizer.json; a file that differs
    only in its formatting (the same tokenizer written again) is accepted.
    """
    if source.kind != "shards":
        return
    manifest = source.manifest
    model_sha = _sha256(codec.path)
    if model_sha == manifest.tokenizer_sha256 or _same_tokenizer(manifest.tokenizer_path, manifest.tokenizer_sha256, codec):
        return
    raise EvaluationError(
        f"{source.path}: tokenized with tokenizer sha256 {manifest.tokenizer_sha256[:12]} ({manifest.tokenizer_path}, "
        f"per its manifest.json), but the model's {codec.path} has sha256 {model_sha[:12]}; "
        "evaluate on data prepared with the model's tokenizer (prepare --tokenizer MODEL_DIR)"
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_tokenizer(path: str, sha256: str, codec: TextCodec) -> bool:
    """Whether `path` is the manifest's tokenizer (by hash) and serializes exactly as the model's."""
    try:
        if _sha256(path) != sha256:
            return False
        return Tokenizer.from_file(path).to_str() == codec.tokenizer.to_str()
    except Exception:  # a missing or unreadable file: only the hashes can be compared
        return False


def read_shard_stream(source: DataSource, *, max_tokens: int | None = None) -> tuple[np.ndarray, dict]:
    """The token stream of the source's samples (int64), through data_pipeline's reader; stops once `max_tokens` are read.

    Returns the stream and counts: the split and the number of samples read.
    """
    try:
        # Each sample's member name and header are checked as it is read, so only the shards read need to be present.
        with SplitReader(source.manifest, source.split, check_sizes=False) as reader:
            stream = reader.token_stream(source.samples.start, source.samples.stop, max_tokens=max_tokens)
    except DataError as err:
        raise EvaluationError(str(err)) from None
    num_samples = (len(stream) - 1) // source.manifest.seq_len if len(stream) else 0
    return stream.astype(np.int64), {"split": source.split, "samples": num_samples}


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
        return read_shard_stream(source, max_tokens=num_tokens)
    return _text_stream(source, codec, num_tokens)


def cut_windows(stream: np.ndarray, window: int, max_windows: int) -> list[np.ndarray]:
    """Consecutive non-overlapping `window`-token slices of `stream`, at most `max_windows` of them."""
    count = min(len(stream) // window, max_windows)
    return [stream[i * window : (i + 1) * window] for i in range(count)]


def long_documents(
    source: DataSource, codec: TextCodec, num_tokens: int, *, max_docs: int, concat: bool = False
) -> tuple[list[np.ndarray], dict]:
    """Up to `max_docs` token sequences of exactly `num_tokens` tokens, with counts of what was used and skipped.

    Text sources: each document is tokenized on its own (no end-of-document prefix); documents shorter
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
