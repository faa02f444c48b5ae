"""Settings of one ``prepare`` run, validated once at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from data_pipeline.errors import DataError

BUILTIN_CORPUS = "builtin:stdlib"
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 260


@dataclass(kw_only=True, slots=True)
class PrepareConfig:
    """Every setting of ``prepare``; each CLI flag sets its field (--input: inputs, --quiet: progress), errors name the flag."""

    output: str
    """Directory that receives the shards, manifest.json and tokenizer.json."""

    seq_len: int
    """Tokens per training sample; every stored sample holds seq_len + 1 token ids."""

    inputs: list[str] = field(default_factory=list)
    """Corpus sources: files, directories, saved datasets, ``hf:NAME``; empty means the built-in corpus.

    An input names its own text field with a ``:FIELD`` suffix (``man.jsonl:body``)."""

    weights: list[float] | None = None
    """Per-input weight: expected number of times each document is used (2.0 doubles, 0.5 halves)."""

    tokenizer: str | None = None
    """A tokenizer.json file, a directory holding one, or a Hugging Face tokenizer name."""

    vocab_size: int | None = None
    """Train a byte-level BPE of this size on the training split (when no tokenizer is given)."""

    eos_token: str | None = None
    """End-of-document token; detected from common names when not given."""

    val_fraction: float = 0.01
    """Fraction of documents (chosen by a hash of their name) that go to the validation split."""

    seed: int = 0
    """Seed of the document-level split and of weighted subsampling."""

    workers: int = 1
    """Tokenizer processes; the output is identical for any value."""

    strict: bool = False
    """Fail on the first bad record instead of skipping and counting it."""

    shard_mb: float = 256.0
    """Target shard size in MiB; every shard but the last of a split has the same sample count."""

    text_field: str = "text"
    """Field (JSON lines) or column (parquet, datasets) that holds the document text, for every
    input that does not name its own."""

    allow_empty_inputs: bool = False
    """Go on (with a warning) when an input yields no documents, instead of stopping."""

    text_extensions: tuple[str, ...] = (".txt", ".md")
    """File name endings read as one-document-per-file text, inside input directories and of input files."""

    max_docs: int | None = None
    """Read at most this many records from each source (useful for quick runs)."""

    tokenizer_train_docs: int | None = None
    """Train the tokenizer on at most this many training documents (all when None)."""

    hf_split: str = "train"
    """Split to read from Hugging Face datasets."""

    hf_config: str | None = None
    """Configuration name for Hugging Face hub datasets."""

    recall_episodes: tuple[int, int] = (1, 3)
    """Key-value episodes per ``recall:INPUT`` document (inclusive range)."""

    recall_gap_chars: tuple[int, int] = (0, 400)
    """Characters of the document's own text between a recall fact and its query (inclusive range)."""

    recall_digits: int = 5
    """Digits of each recalled value (the evaluation's values have five; fewer make an easier first stage)."""

    overwrite: bool = False
    """Replace a finished or unrelated earlier run in the output directory."""

    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self):
        if self.seq_len < 1:
            raise DataError(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.tokenizer is not None and self.vocab_size is not None:
            raise DataError("give either --tokenizer or --vocab-size, not both")
        if self.tokenizer is None and self.vocab_size is None:
            self.vocab_size = DEFAULT_VOCAB_SIZE
        if self.vocab_size is not None and self.vocab_size < MIN_VOCAB_SIZE:
            raise DataError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + specials)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 1:
            raise DataError(f"--workers must be at least 1, got {self.workers}")
        if self.shard_mb <= 0:
            raise DataError(f"--shard-mb must be positive, got {self.shard_mb}")
        if self.max_docs is not None and self.max_docs < 1:
            raise DataError(f"--max-docs must be at least 1, got {self.max_docs}")
        if self.tokenizer_train_docs is not None and self.tokenizer_train_docs < 1:
            raise DataError(f"--tokenizer-train-docs must be at least 1, got {self.tokenizer_train_docs}")
        if not self.text_field:
            raise DataError("--text-field must name a field, got ''")
        self.inputs = list(self.inputs) or [BUILTIN_CORPUS]
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if len(self.weights) != len(self.inputs):
                raise DataError(
                    f"--weights has {len(self.weights)} values for {len(self.inputs)} inputs"
                )
            if any(w <= 0 for w in self.weights):
                raise DataError(f"--weights must all be positive, got {self.weights}")
        self.text_extensions = tuple(self.text_extensions)
        self.recall_episodes = _inclusive_range(self.recall_episodes, "--recall-episodes", low=1)
        self.recall_gap_chars = _inclusive_range(self.recall_gap_chars, "--recall-gap-chars", low=0)
        if not 1 <= self.recall_digits <= 10:
            raise DataError(f"--recall-digits must be between 1 and 10, got {self.recall_digits}")

    def to_dict(self) -> dict:
        """All settings as a JSON-friendly dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _inclusive_range(value, flag: str, *, low: int) -> tuple[int, int]:
    """(lo, hi) integers with low <= lo <= hi, or a DataError naming the flag."""
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"{flag} takes two integers LO HI, got {value!r}") from None
    if not low <= lo <= hi:
        raise DataError(f"{flag} needs {low} <= LO <= HI, got {lo} {hi}")
    return lo, hi
