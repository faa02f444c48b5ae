"""The output directory of ``prepare``: refuse to clobber, resume, or start fresh."""

from __future__ import annotations

import contextlib
import glob
import logging
import os

from data_pipeline.errors import DataError
from data_pipeline.journal import PROGRESS_FILE, Journal, keep_valid_prefix, load_journal
from data_pipeline.manifest import MANIFEST_FILE
from data_pipeline.mixing import SPLITS
from data_pipeline.shard_format import SHARD_SUFFIX
from data_pipeline.shard_writer import TMP_SUFFIX
from data_pipeline.tokenizer import TOKENIZER_FILE

log = logging.getLogger("data_pipeline")


def open_output(out: str, settings: dict, overwrite: bool) -> Journal:
    """Refuse to clobber a finished or unrelated run; resume a matching unfinished one."""
    _make_dir(out)
    progress = os.path.join(out, PROGRESS_FILE)
    if os.path.exists(os.path.join(out, MANIFEST_FILE)) and not overwrite:
        raise DataError(f"{out}: already holds a finished dataset ({MANIFEST_FILE}); "
                        "pass --overwrite to replace it")
    if overwrite:
        _clear(out)
    elif os.path.exists(progress):
        journal = load_journal(progress)
        if journal.settings != settings:
            changed = sorted(k for k in settings.keys() | journal.settings.keys()
                             if settings.get(k) != journal.settings.get(k))
            raise DataError(f"{out}: holds an unfinished run with other settings "
                            f"({', '.join(changed)}); pass --overwrite to discard it")
        for problem in keep_valid_prefix(journal, out):
            log.warning("redoing %s", problem)
        _remove_unrecorded(out, journal)
        log.info("resuming: %s", ", ".join(f"{s} {len(e)} shards done"
                                           for s, e in journal.entries.items()))
        return journal
    elif _our_files(out):
        raise DataError(f"{out}: holds shards of an unknown run; pass --overwrite to replace them")
    journal = Journal(progress, settings)
    journal.save()
    return journal


def _make_dir(out: str) -> None:
    """Create the output directory; DataError when the path is a file or cannot be created."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"{out}: exists and is not a directory; --output names the directory the dataset is written to")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the output directory ({e.strerror})") from None


def discard_output(out: str) -> None:
    """Remove what prepare wrote into `out`, and `out` itself when that leaves it empty."""
    _clear(out)
    with contextlib.suppress(OSError):
        os.rmdir(out)


def _our_files(out: str) -> list[str]:
    patterns = [f"{s}-*{SHARD_SUFFIX}" for s in SPLITS] + [f"{s}-*{TMP_SUFFIX}" for s in SPLITS]
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(out, pattern)))


def _clear(out: str) -> None:
    for name in (MANIFEST_FILE, PROGRESS_FILE, TOKENIZER_FILE):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    for path in _our_files(out):
        os.remove(path)


def _remove_unrecorded(out: str, journal: Journal) -> None:
    recorded = {info.file for entries in journal.entries.values() for info, _ in entries}
    for path in _our_files(out):
        if os.path.basename(path) not in recorded:
            os.remove(path)
