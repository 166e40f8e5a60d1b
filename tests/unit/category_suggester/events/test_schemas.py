"""Schema loading and fingerprints (category_suggester/events/schemas.py)."""

from __future__ import annotations

import json

import fastavro
import pytest

from category_suggester.events import schemas
from tests.support.events import SCHEMAS, rabin64


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        # Test vectors published with the Avro specification (share/test/data/schema-tests.txt).
        ('"null"', 7195948357588979594),
        ('"boolean"', -6970731678124411036),
        ('"int"', 8247732601305521295),
        ('{"type":"fixed","name":"foo","size":15}', 1756455273707447556),
        (
            '{"type":"record","name":"foo","fields":[{"name":"f1","type":"boolean"}]}',
            7843277075252814651,
        ),
    ],
)
def test_fingerprint_matches_avro_test_vectors(schema: str, expected: int) -> None:
    assert schemas.schema_fingerprint(schema) == expected.to_bytes(8, "little", signed=True)
    parsed = json.loads(schema)
    if isinstance(parsed, dict):
        assert schemas.schema_fingerprint(parsed) == expected.to_bytes(8, "little", signed=True)


@pytest.mark.parametrize("name", [schemas.UPLOADED_SCHEMA, schemas.SUGGESTION_SCHEMA])
def test_fingerprint_of_our_schemas_matches_the_spec_algorithm(name: str) -> None:
    schema = schemas.load_schema(name)
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    assert schemas.schema_fingerprint(schema) == rabin64(canonical.encode()).to_bytes(8, "little")


def test_load_schema_reads_the_packaged_files() -> None:
    for name in (schemas.UPLOADED_SCHEMA, schemas.SUGGESTION_SCHEMA, schemas.DLQ_HEADERS_SCHEMA):
        on_disk = json.loads((SCHEMAS / f"{name}.avsc").read_text())
        assert schemas.load_schema(name) == on_disk
        assert on_disk["namespace"] == schemas.NAMESPACE
    assert schemas.load_schema_history(schemas.UPLOADED_SCHEMA).keys() >= {1}
    assert schemas.load_schema_history("no_such_schema") == {}


@pytest.mark.parametrize("name", ["../settings", "Listing", "", "a/b"])
def test_load_schema_refuses_odd_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a schema name"):
        schemas.load_schema(name)
