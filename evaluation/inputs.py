"""The evaluation's inputs, built and checked up front: long documents per data source and the haystacks."""

from __future__ import annotations

import numpy as np

from .errors import EvaluationError
from .haystack import REAL_HAYSTACK_MARGIN, needle_budget, synthetic_haystack
from .heldout import long_documents, token_stream


def check_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    """EvaluationError when token ids fall outside the model's vocabulary (data from another tokenizer)."""
    if len(ids) and int(ids.max()) >= vocab_size:
        raise EvaluationError(
            f"{where}: token id {int(ids.max())} is outside the model's vocabulary ({vocab_size}); "
            "the data was tokenized with another tokenizer"
        )


def perplexity_documents(sources, codec, need, *, max_docs, concat, vocab_size) -> dict[str, tuple[list, dict]]:
    """Long documents per source; EvaluationError when a source has none long enough."""
    prepared = {}
    for source in sources:
        docs, info = long_documents(source, codec, need, max_docs=max_docs, concat=concat)
        if not docs:
            if info["mode"] == "documents":
                raise EvaluationError(
                    f"{source.path}: no document has {need} tokens (max length + target; longest "
                    f"{info['longest_tokens']} of {info['scanned']}); use longer text, shorter --lengths or --concat-docs"
                )
            raise EvaluationError(
                f"{source.path}: holds {info['stream_tokens']} tokens, fewer than the {need} needed "
                "(max length + target); use more data or shorter --lengths"
            )
        for doc in docs:
            check_ids(doc, vocab_size, source.path)
        name = source.name if source.name not in prepared else f"{source.name}#{len(prepared)}"
        prepared[name] = (docs, {"path": source.path, "kind": source.kind, **info})
    return prepared


def build_haystacks(haystacks, codec, needles, sources, lengths, vocab_size) -> tuple[dict, dict]:
    """Token arrays for each haystack, long enough for the largest context."""
    has_eos = codec.eos_id is not None
    all_needles = [n for ns in needles.values() for n in ns]
    overhead = max(lengths[0] - needle_budget(lengths[0], n, has_eos=has_eos) for n in all_needles)
    if overhead > lengths[0]:
        raise EvaluationError(
            f"length {lengths[0]} is too short for retrieval: the needle and query take up to {overhead} tokens"
        )
    max_length = lengths[-1]
    need = max(needle_budget(max_length, n, has_eos=has_eos) for n in all_needles)
    arrays, info = {}, {}
    if "synthetic" in haystacks:
        arrays["synthetic"] = synthetic_haystack(codec, need)
        info["synthetic"] = {"tokens": int(len(arrays["synthetic"]))}
    if "real" in haystacks:
        source = sources[0]
        stream, read = token_stream(source, codec, max_length + REAL_HAYSTACK_MARGIN)
        if len(stream) < need:
            raise EvaluationError(
                f"{source.path}: real haystack has {len(stream)} tokens, the longest context needs {need}; "
                "use more data, shorter --lengths or --haystacks synthetic"
            )
        check_ids(stream, vocab_size, source.path)
        arrays["real"] = stream
        info["real"] = {"path": source.path, "tokens": int(len(stream)), **read}
    return arrays, info
