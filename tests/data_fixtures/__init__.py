"""Helpers shared by the data_pipeline tests: small corpora, and prepared shards read back.

Shards are read through data_pipeline's public reader (``SplitReader``) and manifest; the one
check of the on-disk format that does not rely on that reader is in test_data_prepare.py
(``webdataset`` reads the same shards).
"""

from __future__ import annotations

import json
import os
import random
import sysconfig

import numpy as np

from data_pipeline import SplitReader, StoredSample, load_manifest

STDLIB = sysconfig.get_paths()["stdlib"]
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
          "rho sigma tau upsilon phi chi psi omega naïve café über straße 東京 😀").split()


def stdlib_files(limit: int) -> list[tuple[str, str]]:
    """The first ``limit`` (path, key) pairs of the built-in corpus, in its documented order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(STDLIB):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("."):
                path = os.path.join(dirpath, name)
                found.append((path, "stdlib/" + os.path.relpath(path, STDLIB).replace(os.sep, "/")))
                if len(found) == limit:
                    return found
    return found


def synthetic_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 80) -> list[str]:
    """``n`` short documents of random words (some non-ASCII), reproducible from ``seed``."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(f"doc {i}: " + " ".join(words) + ("\n" if i % 3 == 0 else ""))
    return docs


def write_jsonl(path: str, docs: list[str], field: str = "text") -> str:
    """Write one JSON object per line with the text under ``field``."""
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}) + "\n")
    return path


def stored_samples(data_dir: str, split: str) -> list[StoredSample]:
    """Every sample of a split, in order, with its document starts."""
    with SplitReader(data_dir, split) as reader:
        return list(reader.samples(doc_starts=True))


def token_stream(data_dir: str, split: str) -> np.ndarray:
    """The split's token stream (consecutive samples overlap by one token, kept once)."""
    with SplitReader(data_dir, split) as reader:
        return reader.token_stream()


def dir_bytes(data_dir: str) -> dict[str, bytes]:
    """Every file of a directory, by name."""
    out = {}
    for name in sorted(os.listdir(data_dir)):
        with open(os.path.join(data_dir, name), "rb") as f:
            out[name] = f.read()
    return out


def decoded_documents(data_dir: str, split: str) -> list[str]:
    """The documents of a split whose end (EOS) made it into a sample, decoded."""
    from tokenizers import Tokenizer

    manifest = load_manifest(data_dir)
    tokenizer = Tokenizer.from_file(manifest.tokenizer_path)
    stream = token_stream(data_dir, split).astype(np.int64)
    ends = np.flatnonzero(stream == manifest.eos_id)
    if len(ends) == 0:
        return []
    pieces = np.split(stream[: ends[-1]], ends[:-1] + 1)
    return [tokenizer.decode(p[p != manifest.eos_id].tolist()) for p in pieces]


def write_tokens(data_dir: str, split: str, index: int, position: int, values, *, reseal: bool) -> str:
    """Overwrite token ids of sample ``index`` from ``position`` on, in place; returns the shard path.

    With ``reseal`` the sample's stored digest is rewritten to match, as a faulty writer would
    leave it (only what the ids mean is wrong); without, the change looks like damage on disk.
    """
    import xxhash

    manifest = load_manifest(data_dir)
    layout = manifest.layout
    with SplitReader(manifest, split, check_sizes=False) as reader:
        shard, local = reader.locate(index)
        path = reader.shard_paths[shard]
    start = local * manifest.record_bytes
    with open(path, "r+b") as f:
        f.seek(start + layout.tokens_offset + position * layout.dtype.itemsize)
        f.write(np.asarray(values, dtype=layout.dtype).tobytes())
        if reseal:
            f.seek(start + layout.tokens_offset)
            data = f.read(layout.num_tokens * layout.dtype.itemsize)
            f.seek(start + layout.mask_digest_offset + 8)
            f.write(xxhash.xxh3_64_digest(data, index))
    return path
