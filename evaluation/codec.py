"""The model directory's tokenizer.json: encode/decode, the end-of-text token, digit tokens."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tokenizers import Tokenizer

from .errors import EvaluationError

TOKENIZER_NAME = "tokenizer.json"
# Names an end-of-text / end-of-document token goes by in common tokenizer files, in order of preference.
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|eot|>", "<eot>", "[EOS]")


@dataclass
class TextCodec:
    """A Hugging Face tokenizer plus the end-of-text token the evaluation puts first in every context."""

    tokenizer: Tokenizer
    path: str
    eot_id: int | None
    eot_token: str | None

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


def find_eot(tokenizer: Tokenizer) -> tuple[int | None, str | None]:
    """The id and text of the tokenizer's end-of-text token, or (None, None) when it has none."""
    for name in EOT_CANDIDATES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id, name
    return None, None


def load_codec(model_dir: str) -> TextCodec:
    """Load `model_dir/tokenizer.json`, raising EvaluationError with the path when it is missing or unreadable."""
    path = os.path.join(model_dir, TOKENIZER_NAME)
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: missing (an exported model directory holds its tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as err:  # the tokenizers library raises a bare Exception for bad files
        raise EvaluationError(f"{path}: not a readable tokenizers file ({str(err).splitlines()[0]})") from None
    eot_id, eot_token = find_eot(tokenizer)
    return TextCodec(tokenizer=tokenizer, path=path, eot_id=eot_id, eot_token=eot_token)
