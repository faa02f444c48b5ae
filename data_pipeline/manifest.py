"""``manifest.json``: the contract between a prepared dataset and everything that reads it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.shard_format import SampleLayout

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "atma-token-shards"
# Version 2 added the per-sample checksum member; version 1 shards are still read (unchecked).
FORMAT_VERSION = 2
UNCHECKED_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One shard file; ``num_tokens`` counts trainable positions (num_samples * seq_len)."""

    file: str
    first_sample: int
    num_samples: int
    num_tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """Counts of one split and its shards, in order."""

    num_documents: int
    num_samples: int
    num_tokens: int
    num_stream_tokens: int
    num_dropped_tokens: int
    shards: tuple[ShardInfo, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset's description; ``data_dir`` is where it was loaded from.

    ``checksums`` is False for a dataset of manifest format 1, whose samples carry no digests.
    """

    seq_len: int
    dtype: str
    vocab_size: int
    eos_id: int
    eos_token: str
    tokenizer_file: str
    tokenizer_sha256: str
    tokenizer_origin: str
    samples_per_shard: int
    record_bytes: int
    splits: dict[str, SplitInfo]
    corpus: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    data_dir: str = ""
    checksums: bool = True

    @property
    def tokenizer_path(self) -> str:
        """Absolute path of the tokenizer.json stored with the shards."""
        return os.path.join(self.data_dir, self.tokenizer_file)

    @property
    def layout(self) -> SampleLayout:
        """The byte layout of this dataset's samples."""
        return SampleLayout(self.seq_len, np.dtype(self.dtype), checksums=self.checksums)

    def split(self, name: str) -> SplitInfo:
        """One split's info; raises DataError naming the known splits."""
        if name not in self.splits:
            raise DataError(f"{self.data_dir}: no split {name!r} (has {', '.join(self.splits)})")
        return self.splits[name]

    def num_samples(self, split: str) -> int:
        """Samples in a split."""
        return self.split(split).num_samples

    def num_tokens(self, split: str) -> int:
        """Trainable token positions in a split (samples * seq_len)."""
        return self.split(split).num_tokens

    def shard_paths(self, split: str) -> list[str]:
        """Absolute paths of a split's shards, in order."""
        return [os.path.join(self.data_dir, s.file) for s in self.split(split).shards]

    def to_dict(self) -> dict:
        """The JSON form written to manifest.json."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION if self.checksums else UNCHECKED_VERSION,
            "seq_len": self.seq_len,
            "sample_tokens": self.seq_len + 1,
            "dtype": self.dtype,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
            "tokenizer": {"file": self.tokenizer_file, "sha256": self.tokenizer_sha256,
                          "origin": self.tokenizer_origin},
            "layout": {**self.layout.describe(), "samples_per_shard": self.samples_per_shard},
            "splits": {name: asdict(info) for name, info in self.splits.items()},
            "corpus": self.corpus,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, d: dict, data_dir: str) -> Manifest:
        """Parse the JSON form; raises KeyError/TypeError on a malformed one."""
        splits = {
            name: SplitInfo(**{**s, "shards": tuple(ShardInfo(**x) for x in s["shards"])})
            for name, s in d["splits"].items()
        }
        return cls(
            seq_len=d["seq_len"], dtype=d["dtype"], vocab_size=d["vocab_size"],
            eos_id=d["eos_id"], eos_token=d["eos_token"],
            tokenizer_file=d["tokenizer"]["file"], tokenizer_sha256=d["tokenizer"]["sha256"],
            tokenizer_origin=d["tokenizer"]["origin"],
            samples_per_shard=d["layout"]["samples_per_shard"],
            record_bytes=d["layout"]["record_bytes"],
            splits=splits, corpus=d.get("corpus", {}), settings=d.get("settings", {}),
            data_dir=os.path.abspath(data_dir), checksums=d.get("version", FORMAT_VERSION) != UNCHECKED_VERSION,
        )


def load_manifest(data_dir: str) -> Manifest:
    """Read ``DIR/manifest.json``; raises DataError with a one-line reason if it is unusable."""
    path = os.path.join(data_dir, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: not found (not a prepared dataset, or prepare did not finish)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: not a {FORMAT_NAME} manifest")
    if raw.get("version") not in (UNCHECKED_VERSION, FORMAT_VERSION):
        raise DataError(f"{path}: format version {raw.get('version')}, this reader knows "
                        f"{UNCHECKED_VERSION} and {FORMAT_VERSION}")
    try:
        manifest = Manifest.from_dict(raw, data_dir)
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: missing or malformed field ({e})") from None
    if manifest.layout.record_bytes != manifest.record_bytes:
        raise DataError(f"{path}: record_bytes {manifest.record_bytes} does not match the sample "
                        f"layout ({manifest.layout.record_bytes})")
    return manifest


def as_manifest(dataset: str | os.PathLike | Manifest) -> Manifest:
    """``dataset`` itself when it is a loaded Manifest, else the manifest of that directory."""
    return dataset if isinstance(dataset, Manifest) else load_manifest(os.fspath(dataset))


def write_json_atomic(path: str, obj: dict) -> None:
    """Write JSON to a temporary file, fsync it and rename it over ``path``."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
