"""The Avro schemas of `category_suggester/schemas/`: loading them and their fingerprints.

`load_schema(name)` reads the current `<name>.avsc`, `load_schema_history(name)` every
released version under `schemas/history/<name>/v<N>.avsc`; `schema_fingerprint` is the
CRC-64-AVRO fingerprint that Avro single-object encoding puts in front of a body. Schema
names are the `*_SCHEMA` constants; a name that is not one raises `ValueError`, a missing
file `FileNotFoundError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any, Final

from fastavro.schema import fingerprint, to_parsing_canonical_form

NAMESPACE: Final = "com.marketplace.categorysuggester"

# Schema names: `<name>.avsc` in category_suggester/schemas, history in
# schemas/history/<name>/v<N>.avsc.
UPLOADED_SCHEMA: Final = "listing_image_uploaded"
SUGGESTION_SCHEMA: Final = "category_suggestion"
DLQ_HEADERS_SCHEMA: Final = "dlq_headers"

_SCHEMA_NAME = re.compile(r"[a-z][a-z0-9_]*")
_HISTORY_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")


def _schemas_dir() -> resources.abc.Traversable:
    return resources.files("category_suggester") / "schemas"


def _checked_name(name: str) -> str:
    if not _SCHEMA_NAME.fullmatch(name):
        raise ValueError(f"not a schema name: {name!r}")
    return name


def load_schema(name: str) -> dict[str, Any]:
    """The current schema `<name>.avsc` from the package, as parsed JSON (a fresh copy).

    Raises `FileNotFoundError` for an unknown name, `ValueError` for a malformed one.
    """
    text = (_schemas_dir() / f"{_checked_name(name)}.avsc").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def load_schema_history(name: str) -> dict[int, dict[str, Any]]:
    """Released versions of schema `name`, `{version: schema}` from `history/<name>/v<N>.avsc`.

    Empty when the package carries no history for `name`.
    """
    folder = _schemas_dir() / "history" / _checked_name(name)
    if not folder.is_dir():
        return {}
    versions: dict[int, dict[str, Any]] = {}
    for entry in folder.iterdir():
        match = _HISTORY_FILE.fullmatch(entry.name)
        if match:
            versions[int(match.group(1))] = json.loads(entry.read_text(encoding="utf-8"))
    return dict(sorted(versions.items()))


def schema_fingerprint(schema: Mapping[str, Any] | str) -> bytes:
    """CRC-64-AVRO (Rabin) fingerprint of the schema's Parsing Canonical Form.

    `schema` is a parsed `.avsc` (a mapping) or schema JSON text (e.g. `'"int"'`).

    Returned as the 8 little-endian bytes that follow `C3 01` in single-object encoding.
    """
    parsed = json.loads(schema) if isinstance(schema, str) else dict(schema)
    # fastavro renders the 64-bit value as hex of its little-endian bytes.
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
