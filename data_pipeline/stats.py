"""Corpus statistics: documents read, used and skipped (with the reason), overall and per source."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

_EXAMPLES_PER_REASON = 5


@dataclass
class SourceStats:
    """Counts for one input."""

    input: str
    weight: float
    num_read: int = 0
    num_used: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skips: dict[str, str] = field(default_factory=dict)
    """The first message of each skip reason (not written to the manifest)."""

    def to_dict(self) -> dict:
        """JSON form for the manifest."""
        return {"input": self.input, "weight": self.weight, "num_documents_read": self.num_read,
                "num_documents_used": self.num_used, "skipped": dict(sorted(self.skipped.items()))}


@dataclass
class CorpusStats:
    """Counts over all inputs, plus the first few messages for each skip reason."""

    sources: list[SourceStats]
    examples: dict[str, list[str]] = field(default_factory=dict)

    def used(self, source: int) -> None:
        """Count a document that went into a split."""
        self.sources[source].num_read += 1
        self.sources[source].num_used += 1

    def skipped(self, source: int, reason: str, message: str, is_document: bool) -> bool:
        """Count a skipped record; returns True if its message is among the first few kept."""
        stats = self.sources[source]
        stats.num_read += is_document
        stats.skipped[reason] += 1
        stats.first_skips.setdefault(reason, message)
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(message)
            return True
        return False

    @property
    def num_read(self) -> int:
        """Documents read from all inputs (source-level problems are not documents)."""
        return sum(s.num_read for s in self.sources)

    @property
    def num_used(self) -> int:
        """Documents that went into a split."""
        return sum(s.num_used for s in self.sources)

    @property
    def skipped_total(self) -> Counter:
        """Skip counts by reason over all inputs."""
        return sum((s.skipped for s in self.sources), Counter())

    def to_dict(self) -> dict:
        """JSON form for the manifest."""
        skipped = self.skipped_total
        return {
            "num_documents_read": self.num_read,
            "num_documents_used": self.num_used,
            "num_documents_skipped": self.num_read - self.num_used,
            "skipped": dict(sorted(skipped.items())),
            "skip_examples": {k: self.examples[k] for k in sorted(self.examples)},
            "sources": [s.to_dict() for s in self.sources],
        }
