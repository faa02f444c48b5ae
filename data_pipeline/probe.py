"""Before any work: check that every input yields at least one document, and say why not.

Each input is read only up to its first usable document, so a healthy corpus costs a few
records here; an input that yields nothing is read through once (bounded by ``--max-docs``)
to count what was skipped and why. A pipe (``<(zcat corpus.jsonl.gz)``) cannot be read twice,
so it is left to the check at the end of the run (``no_documents``).
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Iterator
from itertools import islice

from data_pipeline.config import PrepareConfig
from data_pipeline.records import MISSING_FIELD, parse_record
from data_pipeline.sources import FIELD_SEPARATOR, Source, read_source
from data_pipeline.stats import SourceStats

EMPTY_INPUT_HINT = "pass --allow-empty-inputs to go on without it"


def empty_inputs(sources: list[Source], config: PrepareConfig) -> Iterator[tuple[Source, str]]:
    """(source, why it yields no documents) for each input that can be read twice and yields none."""
    for source in sources:
        if not rereadable(source):
            continue
        why = _why_empty(source, config)
        if why is not None:
            yield source, why


def no_documents(source: Source, stats: SourceStats) -> str:
    """Why an input that contributed no documents to a finished pass yielded none."""
    return _describe(source, stats.num_read, stats.skipped, stats.first_skips)


def rereadable(source: Source) -> bool:
    """False for an input that is a pipe or device: read once, it is gone."""
    if source.kind != "file":
        return True
    try:
        return stat.S_ISREG(os.stat(source.path).st_mode)
    except OSError:
        return True  # the read itself reports it


def _why_empty(source: Source, config: PrepareConfig) -> str | None:
    skipped: Counter = Counter()
    first: dict[str, str] = {}
    num_records = 0
    for record in islice(read_source(source, config), config.max_docs):
        parsed = parse_record(record.kind, record.payload, source.text_field)
        if parsed.text is not None:
            return None
        num_records += record.kind != "problem"
        skipped[parsed.reason] += 1
        first.setdefault(parsed.reason, parsed.message)
    return _describe(source, num_records, skipped, first)


def _describe(source: Source, num_records: int, skipped: Counter, first: dict[str, str]) -> str:
    if num_records:
        reasons = "; ".join(f"{reason} {count:,}: {first[reason]}" for reason, count in skipped.most_common())
        why = f"all {num_records:,} records were skipped ({reasons})"
    else:
        why = "; ".join(first.values()) or "no records"
    if MISSING_FIELD in skipped:
        location = source.spec.rsplit(FIELD_SEPARATOR, 1)[0] if source.field_given else source.spec
        why += f"; name its text field as {location}{FIELD_SEPARATOR}FIELD or with --text-field"
    return why
