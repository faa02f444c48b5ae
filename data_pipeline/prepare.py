"""``prepare``: read corpora, tokenize, pack and write shards plus manifest.json.

The main process reads records in one deterministic order and hands chunks to tokenizer
workers; results come back in the same order, so packing and writing see the same stream for
any number of workers and the bytes written are identical.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import NamedTuple

from tqdm import tqdm

from data_pipeline.config import PrepareConfig
from data_pipeline.encode import Job, encode_chunk, init_worker, serial_tokenizers
from data_pipeline.errors import DataError
from data_pipeline.executor import ordered_map
from data_pipeline.journal import Journal
from data_pipeline.manifest import MANIFEST_FILE, Manifest, SplitInfo, write_json_atomic
from data_pipeline.mixing import SPLITS, TRAIN, iter_mixed, split_of
from data_pipeline.output_dir import discard_output, open_output
from data_pipeline.pack import Packer
from data_pipeline.probe import EMPTY_INPUT_HINT, empty_inputs, no_documents, rereadable
from data_pipeline.records import parse_record
from data_pipeline.shard_format import SampleLayout, token_dtype
from data_pipeline.shard_writer import TMP_SUFFIX, SplitWriter
from data_pipeline.sources import Source, resolve_sources
from data_pipeline.stats import CorpusStats, SourceStats
from data_pipeline.tokenizer import (
    DEFAULT_EOS,
    TOKENIZER_FILE,
    TokenizerInfo,
    describe,
    load_tokenizer,
    train_bpe,
    trained_origin,
)

log = logging.getLogger("data_pipeline")

_CHUNK_RECORDS = 256
_CHUNK_BYTES = 1 << 18  # small enough that the last chunks balance across workers
# Settings that change how a run executes but not a byte of what it writes.
_EXECUTION_ONLY = ("output", "workers", "strict", "overwrite", "progress", "allow_empty_inputs")


class PrepareResult(NamedTuple):
    """What a prepare run wrote (``manifest``) and how long encoding and writing took."""

    manifest: Manifest
    num_encoded_tokens: int
    seconds: float


class _Meta(NamedTuple):
    index: int
    source: int
    first_pass: bool
    origin: str
    split: str
    is_document: bool


def prepare(**settings) -> PrepareResult:
    """Prepare a dataset from keyword settings (the fields of ``PrepareConfig``)."""
    return run_prepare(PrepareConfig(**settings))


def run_prepare(config: PrepareConfig) -> PrepareResult:
    """Run (or resume) a prepare; returns the manifest it wrote and its throughput figures."""
    started = time.perf_counter()
    sources = resolve_sources(config.inputs, config.weights, config.text_field, config.text_extensions)
    _check_inputs(sources, config)
    settings = _settings(config, sources)
    given = load_tokenizer(config.tokenizer, config.eos_token) if config.tokenizer else None
    journal = open_output(config.output, settings, config.overwrite)
    tokenizer = given or _trained_tokenizer(config, sources, journal)
    _save_tokenizer(config.output, tokenizer, journal)
    run = _Run(config, sources, tokenizer, journal)
    run.execute()
    empty = run.no_training_samples()
    if empty:
        discard_output(config.output)
        raise DataError(f"{config.output}: {empty}; nothing was written")
    manifest = run.manifest(settings)
    write_json_atomic(os.path.join(config.output, MANIFEST_FILE), manifest.to_dict())
    os.remove(journal.path)
    return PrepareResult(manifest, run.num_encoded, time.perf_counter() - started)


def _check_inputs(sources: list[Source], config: PrepareConfig) -> None:
    """Stop (or, when allowed, warn) for every input that yields no documents, before any work."""
    for source, why in empty_inputs(sources, config):
        if not config.allow_empty_inputs:
            raise DataError(f"{source.spec}: yields no documents: {why}; {EMPTY_INPUT_HINT}")
        log.warning("%s: yields no documents: %s (--allow-empty-inputs)", source.spec, why)


RECALL_SETTINGS = ("recall_episodes", "recall_gap_chars", "recall_digits")


def _settings(config: PrepareConfig, sources: list[Source]) -> dict:
    settings = {k: v for k, v in config.to_dict().items() if k not in _EXECUTION_ONLY}
    settings["inputs"] = [source.setting for source in sources]
    settings["text_extensions"] = list(config.text_extensions)
    if any(source.kind == "recall" for source in sources):
        settings["recall_episodes"] = list(config.recall_episodes)
        settings["recall_gap_chars"] = list(config.recall_gap_chars)
    else:  # they shape nothing without a recall input
        for name in RECALL_SETTINGS:
            settings.pop(name)
    if config.tokenizer and os.path.exists(config.tokenizer):
        settings["tokenizer"] = os.path.abspath(config.tokenizer)
    return settings


def _trained_tokenizer(config: PrepareConfig, sources: list[Source], journal: Journal):
    """Reuse the tokenizer of the run being resumed, or train one on the training split."""
    path = os.path.join(config.output, TOKENIZER_FILE)
    if journal.tokenizer_sha256 and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            reused = describe(f.read(), config.eos_token, trained_origin(config.vocab_size))
        if reused.sha256 == journal.tokenizer_sha256:
            return reused
    texts = _training_texts(config, sources)
    first = next(texts, None)
    if first is None:
        if not any(journal.entries.values()):  # a fresh run: leave no unfinished run behind
            discard_output(config.output)
        raise DataError("no usable training documents in the inputs")
    started = time.perf_counter()
    info = train_bpe(_prepend(first, texts), config.vocab_size, config.eos_token or DEFAULT_EOS)
    log.info("trained tokenizer (vocab %d) in %.1fs", config.vocab_size, time.perf_counter() - started)
    return info


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _training_texts(config: PrepareConfig, sources: list[Source]) -> Iterator[str]:
    """Training-split documents in order; bad records fail here already under --strict."""
    count = 0
    for mixed in iter_mixed(sources, config):
        record = mixed.record
        parsed = parse_record(record.kind, record.payload, sources[mixed.source].text_field)
        if parsed.text is None:
            if config.strict and mixed.first_pass:
                raise DataError(f"{record.origin}: {parsed.message} (--strict)")
            continue
        if split_of(record.key, config.val_fraction, config.seed) != TRAIN:
            continue
        yield parsed.text
        count += 1
        if config.tokenizer_train_docs is not None and count >= config.tokenizer_train_docs:
            return


def _save_tokenizer(out: str, tokenizer: TokenizerInfo, journal: Journal) -> None:
    path = os.path.join(out, TOKENIZER_FILE)
    if journal.tokenizer_sha256 not in (None, tokenizer.sha256):
        raise DataError(f"{path}: differs from the tokenizer of the interrupted run; "
                        "pass --overwrite to start over")
    with open(path + TMP_SUFFIX, "w", encoding="utf-8") as f:
        f.write(tokenizer.json_text)
    os.replace(path + TMP_SUFFIX, path)
    journal.tokenizer_sha256 = tokenizer.sha256
    journal.save()


class _Run:
    """One pass over the corpus: parse and encode (workers), then pack and write (here)."""

    def __init__(self, config: PrepareConfig, sources: list[Source], tokenizer: TokenizerInfo,
                 journal: Journal):
        self.config = config
        self.sources = sources
        self.tokenizer = tokenizer
        self.journal = journal
        self.layout = SampleLayout(config.seq_len, token_dtype(tokenizer.vocab_size))
        self.samples_per_shard = self.layout.samples_per_shard(config.shard_mb)
        self.starts = {s: journal.start(s) for s in SPLITS}
        self.packers = {s: Packer(config.seq_len, self.layout.dtype, self.starts[s].num_samples)
                        for s in SPLITS}
        self.writers = {s: SplitWriter(config.output, s, self.layout, self.samples_per_shard,
                                       self.starts[s].num_shards) for s in SPLITS}
        self.shards = {s: list(self.starts[s].shards) for s in SPLITS}
        self.num_documents = Counter()
        self.stats = CorpusStats([SourceStats(s.spec, s.weight) for s in sources])
        self.num_encoded = 0

    def execute(self) -> None:
        """Stream the corpus through the workers into the shard writers."""
        started = time.perf_counter()
        metas: deque = deque()
        bar = tqdm(unit="doc", desc="prepare", disable=not self.config.progress, leave=False)
        try:
            with serial_tokenizers():
                results = ordered_map(
                    encode_chunk, self._chunks(metas), workers=self.config.workers,
                    initializer=init_worker,
                    initargs=(self.tokenizer, self.layout.dtype.str))
                with contextlib.closing(results):
                    self._consume_all(results, metas, bar, started)
            for split in SPLITS:
                info = self.writers[split].close()
                if info is not None:
                    self.shards[split].append(info)
                    self.journal.record(split, info, self.packers[split].last_resume)
        except BaseException:
            for writer in self.writers.values():
                writer.abort()
            raise
        finally:
            bar.close()
        self._check_contributions()

    def no_training_samples(self) -> str | None:
        """Why the train split got no sample (a dataset no run can train on), or None when it has some."""
        if self.packers[TRAIN].num_samples > 0:
            return None
        if self.stats.num_used == 0:
            return f"no usable documents in the inputs (skipped: {dict(self.stats.skipped_total)})"
        documents = self.num_documents[TRAIN]
        if documents == 0:
            return (f"no training samples: none of the {self.stats.num_used:,} usable documents fell into the "
                    f"train split (--val-fraction {self.config.val_fraction}); add documents or lower --val-fraction")
        return (f"no training samples: the train split's {documents:,} documents hold "
                f"{self.packers[TRAIN].stream_tokens:,} tokens, fewer than the {self.config.seq_len + 1:,} "
                f"of one sample (--seq-len {self.config.seq_len} + 1); add text or lower --seq-len")

    def _check_contributions(self) -> None:
        """Every input gave documents; catches the pipes ``_check_inputs`` could not read ahead."""
        for source, stats in zip(self.sources, self.stats.sources, strict=True):
            if stats.num_used > 0 or rereadable(source):
                continue
            line = f"{source.spec}: yields no documents: {no_documents(source, stats)}"
            if not self.config.allow_empty_inputs:
                raise DataError(f"{line}; {EMPTY_INPUT_HINT}")
            log.warning("%s (--allow-empty-inputs)", line)

    def _consume_all(self, results, metas: deque, bar, started: float) -> None:
        for result in results:
            chunk_metas = metas.popleft()
            self._consume(chunk_metas, result)
            bar.update(len(chunk_metas))
            rate = self.num_encoded / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"tokens={self.num_encoded:,} tok/s={rate:,.0f}", refresh=False)

    def _chunks(self, metas: deque) -> Iterator[list[Job]]:
        jobs, chunk_metas, size = [], [], 0
        for mixed in iter_mixed(self.sources, self.config):
            record = mixed.record
            split = split_of(record.key, self.config.val_fraction, self.config.seed)
            cursor = self.starts[split].cursor
            tokenize = cursor is None or mixed.index >= cursor.doc
            jobs.append(Job(record.kind, record.payload, tokenize, self.sources[mixed.source].text_field))
            chunk_metas.append(_Meta(mixed.index, mixed.source, mixed.first_pass, record.origin,
                                     split, record.kind != "problem"))
            size += len(record.payload) if isinstance(record.payload, (bytes, str)) else 64
            if len(jobs) >= _CHUNK_RECORDS or size >= _CHUNK_BYTES:
                metas.append(chunk_metas)
                yield jobs
                jobs, chunk_metas, size = [], [], 0
        if jobs:
            metas.append(chunk_metas)
            yield jobs

    def _consume(self, metas: list[_Meta], result) -> None:
        position = 0
        for i, meta in enumerate(metas):
            if result.reasons[i] is not None:
                self._skip(meta, result.reasons[i], result.messages[i])
                continue
            self.stats.used(meta.source)
            self.num_documents[meta.split] += 1
            length = int(result.lengths[i])
            if length == 0:
                continue
            tokens = result.tokens[position:position + length]
            position += length
            self.num_encoded += length - 1
            self._pack(meta, tokens)

    def _skip(self, meta: _Meta, reason: str, message: str) -> None:
        if not meta.first_pass:
            return
        line = f"{meta.origin}: {message}"
        if self.config.strict:
            raise DataError(f"{line} (--strict)")
        if self.stats.skipped(meta.source, reason, line, meta.is_document):
            log.warning("skipped %s", line)

    def _pack(self, meta: _Meta, tokens) -> None:
        cursor = self.starts[meta.split].cursor
        skip = 0
        if cursor is not None and meta.index == cursor.doc:
            if len(tokens) != cursor.doc_tokens:
                raise DataError(f"{meta.origin}: changed since the interrupted run "
                                f"({len(tokens)} tokens, was {cursor.doc_tokens}); "
                                "pass --overwrite to start over")
            skip = cursor.offset
        for sample in self.packers[meta.split].add(meta.index, tokens, skip):
            info = self.writers[meta.split].write(sample)
            if info is not None:
                self.shards[meta.split].append(info)
                self.journal.record(meta.split, info, sample.resume)

    def manifest(self, settings: dict) -> Manifest:
        """The manifest describing what this run (and the runs it resumed) wrote."""
        splits = {}
        for split in SPLITS:
            packer, shards = self.packers[split], self.shards[split]
            if packer.num_samples == 0 and (split == TRAIN or self.config.val_fraction > 0):
                log.warning("split %r has no samples", split)
            splits[split] = SplitInfo(
                num_documents=self.num_documents[split],
                num_samples=packer.num_samples,
                num_tokens=packer.num_samples * self.config.seq_len,
                num_stream_tokens=packer.stream_tokens,
                num_dropped_tokens=packer.num_dropped_tokens,
                shards=tuple(shards),
            )
        return Manifest(
            seq_len=self.config.seq_len, dtype=self.layout.dtype.name,
            vocab_size=self.tokenizer.vocab_size, eos_id=self.tokenizer.eos_id,
            eos_token=self.tokenizer.eos_token, tokenizer_file=TOKENIZER_FILE,
            tokenizer_sha256=self.tokenizer.sha256, tokenizer_origin=self.tokenizer.origin,
            samples_per_shard=self.samples_per_shard, record_bytes=self.layout.record_bytes,
            splits=splits, corpus=self.stats.to_dict(), settings=settings,
            data_dir=os.path.abspath(self.config.output),
        )
