"""Helpers shared by the data_pipeline tests: small corpora and independent shard readers.

The readers here use only ``tarfile``/``webdataset`` and numpy, never data_pipeline's own
reader, so tests compare the pipeline against an independent view of its output.
"""

from __future__ import annotations

import io
import json
import os
import random
import sysconfig
import tarfile

import numpy as np

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


def read_manifest(data_dir: str) -> dict:
    """manifest.json as plain JSON."""
    with open(os.path.join(data_dir, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def tar_samples(data_dir: str, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, tokens, doc_start positions) of every sample of a split, read with ``tarfile``."""
    manifest = read_manifest(data_dir)
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(os.path.join(data_dir, shard["file"])) as tar:
            members = {}
            for member in tar:
                members[member.name] = np.load(io.BytesIO(tar.extractfile(member).read()))
        keys = sorted({name.split(".", 1)[0] for name in members})
        for key in keys:
            bits = np.unpackbits(members[f"{key}.doc_mask.npy"])[: manifest["seq_len"] + 1]
            samples.append((key, members[f"{key}.tokens.npy"], np.flatnonzero(bits)))
    return samples


def stream_of(samples) -> np.ndarray:
    """Rebuild the token stream from consecutive samples that overlap by one token."""
    if not samples:
        return np.zeros(0, dtype=np.int64)
    parts = [samples[0][1]] + [s[1][1:] for s in samples[1:]]
    return np.concatenate(parts).astype(np.int64)


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

    manifest = read_manifest(data_dir)
    tokenizer = Tokenizer.from_file(os.path.join(data_dir, "tokenizer.json"))
    stream = stream_of(tar_samples(data_dir, split))
    ends = np.flatnonzero(stream == manifest["eos_id"])
    if len(ends) == 0:
        return []
    pieces = np.split(stream[: ends[-1]], ends[:-1] + 1)
    return [tokenizer.decode(p[p != manifest["eos_id"]].tolist()) for p in pieces]
