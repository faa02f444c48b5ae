"""Human-readable summaries: the ``inspect`` report and the end-of-``prepare`` line."""

from __future__ import annotations

import os

from tokenizers import Tokenizer

from data_pipeline.errors import DataError, one_line
from data_pipeline.journal import file_sha256
from data_pipeline.manifest import Manifest
from data_pipeline.split_reader import SplitReader


def manifest_report(manifest: Manifest) -> list[str]:
    """Lines describing a prepared dataset: format, tokenizer, splits and corpus statistics."""
    lines = [
        f"dataset     {manifest.data_dir}",
        f"samples     seq_len {manifest.seq_len} (+1 stored), dtype {manifest.dtype}, "
        f"{manifest.samples_per_shard} per shard, {manifest.record_bytes} bytes each",
        f"tokenizer   {manifest.tokenizer_file} ({manifest.tokenizer_origin}), vocab "
        f"{manifest.vocab_size}, eos {manifest.eos_token!r}={manifest.eos_id}, "
        f"sha256 {manifest.tokenizer_sha256[:16]}",
    ]
    for name, split in manifest.splits.items():
        lines.append(
            f"{name:<11} {split.num_documents:,} documents, {split.num_samples:,} samples, "
            f"{split.num_tokens:,} tokens in {len(split.shards)} shards "
            f"({split.num_dropped_tokens:,} tail tokens dropped)")
    corpus = manifest.corpus
    if corpus:
        skipped = ", ".join(f"{k} {v}" for k, v in corpus["skipped"].items()) or "none"
        lines.append(f"corpus      {corpus['num_documents_read']:,} documents read, "
                     f"{corpus['num_documents_used']:,} used; skipped: {skipped}")
        for source in corpus["sources"]:
            lines.append(f"  source    {source['input']} (weight {source['weight']:g}): "
                         f"{source['num_documents_read']:,} read, {source['num_documents_used']:,} used")
    return lines


def sample_report(manifest: Manifest, split: str, index: int, max_chars: int) -> list[str]:
    """Lines showing one sample: its document starts and its decoded text."""
    if not 0 <= index < manifest.num_samples(split):
        raise DataError(f"{manifest.data_dir}: {split} has {manifest.num_samples(split)} samples, "
                        f"no sample {index}")
    with SplitReader(manifest, split) as reader:
        sample = reader.sample(index, doc_starts=True)
        shard, local = reader.locate(index)
        path = reader.shard_paths[shard]
    tokens = sample.tokens
    tokenizer = _stored_tokenizer(manifest)
    text = tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
    shown = text if len(text) <= max_chars else text[:max_chars] + f"... [{len(text) - max_chars} more chars]"
    return [
        f"{split} sample {index} ({path}, #{local}): {len(tokens)} tokens, "
        f"documents start at {sample.doc_starts.tolist()}",
        f"first ids   {tokens[:16].tolist()}",
        "text:",
        shown,
    ]


def _stored_tokenizer(manifest: Manifest) -> Tokenizer:
    """The tokenizer.json beside the shards; DataError, as `verify` reports it, when missing, changed or unreadable."""
    path = manifest.tokenizer_path
    verify = f"run `python -m data_pipeline verify {manifest.data_dir}`"
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; {verify}")
    if file_sha256(path) != manifest.tokenizer_sha256:
        raise DataError(f"{path}: sha256 does not match manifest.json; {verify}")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers reports a malformed file as plain Exception
        raise DataError(one_line(f"{path}: unreadable tokenizer ({e}); {verify}")) from None


def prepare_summary(manifest: Manifest, seconds: float, num_encoded: int) -> str:
    """One line summing up a prepare run."""
    corpus = manifest.corpus
    parts = [f"{name} {s.num_samples:,} samples / {len(s.shards)} shards"
             for name, s in manifest.splits.items()]
    rate = num_encoded / seconds if seconds > 0 else 0.0
    per_input = ""
    if len(corpus["sources"]) > 1:
        per_input = " (" + ", ".join(f"{s['input']} {s['num_documents_used']:,} of {s['num_documents_read']:,}"
                                     for s in corpus["sources"]) + ")"
    return (f"prepared {manifest.data_dir}: {corpus['num_documents_used']:,} of "
            f"{corpus['num_documents_read']:,} documents{per_input}, {', '.join(parts)}; "
            f"{num_encoded:,} tokens encoded in {seconds:.1f}s ({rate:,.0f} tokens/s)")
