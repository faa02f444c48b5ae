"""Tokenizer training and loading (Hugging Face ``tokenizers``), plus its identity (sha256)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.errors import DataError, one_line

DEFAULT_EOS = "<|endoftext|>"
# Names an end-of-document token goes by in common tokenizer files, in order of preference.
EOS_CANDIDATES = (DEFAULT_EOS, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|eot|>", "<eot>", "[EOS]")
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenizerInfo:
    """A tokenizer as stored next to the shards: its exact JSON text and its special ids."""

    json_text: str
    eos_token: str
    eos_id: int
    vocab_size: int
    origin: str

    @property
    def sha256(self) -> str:
        """Hash of the tokenizer.json bytes; it identifies the tokenizer in the manifest."""
        return hashlib.sha256(self.json_text.encode("utf-8")).hexdigest()

    def build(self) -> Tokenizer:
        """A ready tokenizer that encodes special-token text literally (no injected EOS)."""
        tokenizer = Tokenizer.from_str(self.json_text)
        tokenizer.encode_special_tokens = True
        return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str = DEFAULT_EOS) -> TokenizerInfo:
    """Train a byte-level BPE (lossless on any UTF-8 text) with ``eos_token`` as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return describe(tokenizer.to_str(pretty=True), eos_token, trained_origin(vocab_size))


def trained_origin(vocab_size: int) -> str:
    """How a trained tokenizer is described in the manifest."""
    return f"trained byte-level BPE, vocab {vocab_size}"


def load_tokenizer(spec: str, eos_token: str | None = None) -> TokenizerInfo:
    """Load a tokenizer.json file, a directory holding one, or a Hugging Face hub name."""
    if os.path.isdir(spec):
        path = os.path.join(spec, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise DataError(f"{spec}: directory has no {TOKENIZER_FILE}")
        return _load_file(path, eos_token)
    if os.path.isfile(spec):
        return _load_file(spec, eos_token)
    try:
        tokenizer = Tokenizer.from_pretrained(spec)
    except Exception as e:  # the hub client raises several types for "not found / offline"
        raise DataError(one_line(f"{spec}: not a file, directory or loadable hub tokenizer ({e})")) from None
    return describe(tokenizer.to_str(), eos_token, f"hub:{spec}")


def _load_file(path: str, eos_token: str | None) -> TokenizerInfo:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
        Tokenizer.from_str(text)
    except Exception as e:  # tokenizers reports JSON and schema errors as plain Exception
        raise DataError(one_line(f"{path}: not a valid tokenizer.json ({e})")) from None
    return describe(text, eos_token, os.path.abspath(path))


def data_vocab_size(manifest) -> int:
    """Token ids a model must embed to train on a prepared dataset (``manifest``: its ``Manifest``).

    The manifest's vocabulary size, or more when the tokenizer.json beside the shards knows a
    larger id (a tokenizer replaced after prepare); raises DataError when that file is unreadable.
    """
    path = manifest.tokenizer_path
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers reports a missing or malformed file as plain Exception
        raise DataError(one_line(f"{path}: unreadable tokenizer of the prepared data ({e}); "
                                 f"run `python -m data_pipeline verify {manifest.data_dir}`")) from None
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values())
    return max(manifest.vocab_size, largest + 1)


def number_token_ids(path: str) -> list[int]:
    """Ids of the tokens that decode to digits only (with optional surrounding spaces), e.g. " 7" or "2024"."""
    tokenizer = Tokenizer.from_file(path)
    ids = []
    for token_id in sorted(tokenizer.get_vocab(with_added_tokens=False).values()):
        text = tokenizer.decode([token_id]).strip()
        if text and text.isascii() and text.isdigit():
            ids.append(token_id)
    return ids


def find_eos(tokenizer: Tokenizer, candidates: Iterable[str] = EOS_CANDIDATES) -> tuple[str, int] | None:
    """The first of ``candidates`` the tokenizer knows, with its id; None when it knows none."""
    for candidate in candidates:
        eos_id = tokenizer.token_to_id(candidate)
        if eos_id is not None:
            return candidate, eos_id
    return None


def describe(json_text: str, eos_token: str | None, origin: str) -> TokenizerInfo:
    """Wrap tokenizer JSON with its end-of-document token, found by name when not given."""
    tokenizer = Tokenizer.from_str(json_text)
    found = find_eos(tokenizer, (eos_token,) if eos_token else EOS_CANDIDATES)
    if found is not None:
        vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        return TokenizerInfo(json_text, found[0], found[1], vocab_size, origin)
    if eos_token:
        raise DataError(f"{origin}: tokenizer has no token {eos_token!r}")
    raise DataError(f"{origin}: no end-of-document token found (tried {', '.join(EOS_CANDIDATES)}); "
                    "pass --eos-token")
