"""The model directory's tokenizer.json: encode/decode, the end-of-document token (EOS), digit tokens."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tokenizers import Tokenizer

from data_pipeline import find_eos

from .errors import EvaluationError

TOKENIZER_NAME = "tokenizer.json"


@dataclass
class TextCodec:
    """A Hugging Face tokenizer plus the end-of-document token (EOS) the evaluation puts first in every context."""

    tokenizer: Tokenizer
    path: str
    eos_id: int | None
    eos_token: str | None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens left out."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def digit_ids(self, digit: int) -> list[int]:
        """Token ids of " d": one value digit as written in a needle, encoded on its own."""
        ids = self.encode(f" {digit}")
        if not ids:
            raise EvaluationError(f"{self.path}: the tokenizer encodes {f' {digit}'!r} to no tokens")
        return ids


def load_codec(model_dir: str) -> TextCodec:
    """Load `model_dir/tokenizer.json`, raising EvaluationError with the path when it is missing or unreadable."""
    path = os.path.join(model_dir, TOKENIZER_NAME)
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: missing; the evaluation encodes its text with the model's tokenizer: copy in "
                              "the tokenizer.json the model was trained with (the one beside its training shards)")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as err:  # the tokenizers library raises a bare Exception for bad files
        raise EvaluationError(f"{path}: not a readable tokenizers file ({str(err).splitlines()[0]})") from None
    eos_token, eos_id = find_eos(tokenizer) or (None, None)
    return TextCodec(tokenizer=tokenizer, path=path, eos_id=eos_id, eos_token=eos_token)
