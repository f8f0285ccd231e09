"""JSON payloads (job arguments and results): encoded once, refused when jsonb cannot store them."""

from __future__ import annotations

import json
import re
from typing import Any

# One encoder for all: json.dumps with options builds a new encoder on every call,
# which was half the cost of preparing a job for bulk enqueue.
JSON_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
# jsonb cannot store U+0000; the encoder writes it as \u0000 (an escaped backslash
# before "u0000" is an ordinary string and allowed)
JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class UnstorableJson(ValueError):
    """Valid JSON that PostgreSQL's jsonb cannot hold, or more of it than pgqueue accepts."""


def encode_json(value: Any, limit: int) -> str:
    """`value` as compact JSON text.

    Raises TypeError or ValueError when it is not JSON (a set, NaN, an object), and
    UnstorableJson when it contains U+0000 or is longer than `limit` characters.
    """
    text = JSON_ENCODER.encode(value)
    if "\\u0000" in text and JSON_NUL.search(text):
        raise UnstorableJson("it contains a NUL character (\\u0000), which jsonb cannot store")
    if len(text) > limit:
        raise UnstorableJson(
            f"it is {len(text)} bytes of JSON; the limit is {limit}: "
            "store large data elsewhere and pass its key"
        )
    return text
