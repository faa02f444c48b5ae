"""Decode and validate one raw record into document text, or say in one line why it is skipped."""

from __future__ import annotations

import json
from typing import NamedTuple

from data_pipeline.errors import one_line
from data_pipeline.recall import recall_document

# Reasons a record is skipped; each is counted under this name in manifest.json.
INVALID_UTF8 = "invalid_utf8"
EMPTY = "empty"
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"


class Parsed(NamedTuple):
    """Either ``text`` (a usable document) or ``reason`` + ``message`` (why it was skipped)."""

    text: str | None
    reason: str | None = None
    message: str | None = None


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = one_line(message)


def parse_record(kind: str, payload: object, text_field: str) -> Parsed:
    """Turn a raw record (see ``sources.Record``) into document text or a skip reason."""
    if kind == "problem":
        reason, message = payload
        return Parsed(None, reason, message)
    if kind == "missing":
        return Parsed(None, MISSING_FIELD, f"no column '{payload}'")
    if kind == "recall":
        inner_kind, inner_payload, seed, settings = payload
        parsed = parse_record(inner_kind, inner_payload, text_field)
        return parsed if parsed.text is None else Parsed(recall_document(parsed.text, seed, settings))
    try:
        if kind == "text":
            value = _decode(payload)
        elif kind == "json":
            value = _field(_json_object(_decode(payload)), text_field)
        else:
            value = payload
        text = _as_text(value, text_field)
    except _Skip as skip:
        return Parsed(None, skip.reason, skip.message)
    if not text.strip():
        return Parsed(None, EMPTY, "empty document")
    return Parsed(text)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Skip(INVALID_UTF8, f"invalid UTF-8 at byte {e.start}") from None


def _json_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Skip(MALFORMED_JSON, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _Skip(MALFORMED_JSON, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(obj: dict, text_field: str) -> object:
    if text_field not in obj:
        raise _Skip(MISSING_FIELD, f"no '{text_field}' field")
    return obj[text_field]


def _as_text(value: object, text_field: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise _Skip(MISSING_FIELD, f"'{text_field}' is null")
    raise _Skip(MISSING_FIELD, f"'{text_field}' is a {type(value).__name__}, not a string")
