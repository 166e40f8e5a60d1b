"""Schema evolution guard: the current schemas read everything their released versions wrote.

Schema Registry BACKWARD rules, checked against every released version (so, transitively):
a field the reader adds needs a default; a type may change only by Avro promotion (int to
long/float/double, long to float/double, float to double, string and bytes either way) or
by widening into a union; records keep their names. Checked twice: structurally (the rules
above, with a readable list of problems) and by Avro schema resolution itself (data
written with the old schema by fastavro, read with the current one as reader schema, and
through `EventCodec`, which must know every released fingerprint).

Releasing a changed schema: copy the new `.avsc` to `schemas/history/<name>/v<N+1>.avsc`.
"""

from __future__ import annotations

import copy
import io
import uuid
from datetime import UTC, datetime
from typing import Any

import fastavro
import pytest
from fastavro.read import SchemaResolutionError

from category_suggester import events
from category_suggester.events import EventCodec

EVENTS = [events.UPLOADED_SCHEMA, events.SUGGESTION_SCHEMA]
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
PROMOTIONS = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}


# ------------------------------------------------------------------ structural check


def _fullname(name: str, namespace: str | None) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _index_names(schema: Any, namespace: str | None, names: dict[str, Any]) -> None:
    """Every named type (record, enum, fixed) in `schema`, by full name."""
    if isinstance(schema, list):
        for branch in schema:
            _index_names(branch, namespace, names)
    elif isinstance(schema, dict):
        kind = schema["type"]
        if kind in ("record", "error", "enum", "fixed"):
            full = _fullname(schema["name"], schema.get("namespace", namespace))
            names[full] = schema
            namespace = full.rpartition(".")[0] or None
            for field in schema.get("fields", []):
                _index_names(field["type"], namespace, names)
        elif kind == "array":
            _index_names(schema["items"], namespace, names)
        elif kind == "map":
            _index_names(schema["values"], namespace, names)


class _Side:
    """One schema with its named types, to follow references."""

    def __init__(self, schema: Any) -> None:
        self.names: dict[str, Any] = {}
        _index_names(schema, None, self.names)

    def resolve(self, schema: Any) -> Any:
        if isinstance(schema, str) and schema not in PRIMITIVES:
            matches = [full for full in self.names if full == schema or full.endswith("." + schema)]
            if matches:
                return self.names[matches[0]]
        return schema


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, str):
        return schema
    return str(schema["type"])


def _logical(schema: Any) -> str | None:
    return schema.get("logicalType") if isinstance(schema, dict) else None


def _name(schema: dict[str, Any]) -> str:
    return _fullname(schema["name"], schema.get("namespace")).rpartition(".")[2]


def resolution_problems(writer: Any, reader: Any) -> list[str]:
    """Why data written with `writer` cannot be read with `reader` (empty: it can)."""
    writer_side, reader_side = _Side(writer), _Side(reader)
    problems: list[str] = []
    seen: set[tuple[int, int]] = set()

    def check(w: Any, r: Any, path: str) -> bool:
        w, r = writer_side.resolve(w), reader_side.resolve(r)
        if (id(w), id(r)) in seen:  # recursive types: assume the pair already being checked
            return True
        if _kind(w) == "union":
            ok = True
            for branch in w:
                ok &= check(branch, r, f"{path}<{_kind(branch)}>")
            return ok
        if _kind(r) == "union":
            for branch in r:
                if not _quick_mismatch(writer_side.resolve(w), reader_side.resolve(branch)):
                    return check(w, branch, path)
            problems.append(f"{path}: {_kind(w)} matches no branch of the reader's union")
            return False
        wk, rk = _kind(w), _kind(r)
        if wk != rk and rk not in PROMOTIONS.get(wk, set()):
            problems.append(f"{path}: type changed from {wk} to {rk}")
            return False
        if _logical(w) != _logical(r):
            problems.append(f"{path}: logicalType changed from {_logical(w)} to {_logical(r)}")
            return False
        if wk in ("record", "error", "enum", "fixed"):
            aliases = {a.rpartition(".")[2] for a in r.get("aliases", [])}
            if _name(w) != _name(r) and _name(w) not in aliases:
                problems.append(f"{path}: named type {_name(w)} became {_name(r)}")
                return False
        seen.add((id(w), id(r)))
        if wk in ("record", "error"):
            written = {f["name"]: f for f in w["fields"]}
            ok = True
            for field in r["fields"]:
                names = [field["name"], *field.get("aliases", [])]
                old = next((written[n] for n in names if n in written), None)
                if old is None:
                    if "default" not in field:
                        problems.append(f"{path}.{field['name']}: added without a default")
                        ok = False
                else:
                    ok &= check(old["type"], field["type"], f"{path}.{field['name']}")
            return ok
        if wk == "array":
            return check(w["items"], r["items"], f"{path}[]")
        if wk == "map":
            return check(w["values"], r["values"], f"{path}{{}}")
        if wk == "enum":
            missing = set(w["symbols"]) - set(r["symbols"])
            if missing and "default" not in r:
                problems.append(f"{path}: enum symbols {sorted(missing)} dropped without a default")
                return False
        if wk == "fixed" and w["size"] != r["size"]:
            problems.append(f"{path}: fixed size changed from {w['size']} to {r['size']}")
            return False
        return True

    check(writer, reader, _name(reader) if isinstance(reader, dict) else "$")
    return problems


def _quick_mismatch(w: Any, r: Any) -> bool:
    """Whether a reader union branch obviously cannot take the writer type (Avro's first match)."""
    wk, rk = _kind(w), _kind(r)
    if wk != rk:
        return rk not in PROMOTIONS.get(wk, set())
    if wk in ("record", "error", "enum", "fixed"):
        return bool(_name(w) != _name(r))
    return False


# -------------------------------------------------------------------- data check


def sample(schema: Any, side: _Side, *, rich: bool) -> Any:
    """A value of `schema`: `rich` takes the last union branch (set optionals), else the first."""
    schema = side.resolve(schema)
    kind = _kind(schema)
    if kind == "union":
        return sample(schema[-1] if rich else schema[0], side, rich=rich)
    logical = _logical(schema)
    if logical == "uuid":
        return str(uuid.UUID(int=0x1234))
    if logical == "timestamp-millis":
        return datetime(2024, 5, 17, 9, 30, 15, 123000, tzinfo=UTC)
    simple: dict[str, Any] = {
        "null": None,
        "boolean": True,
        "int": 7,
        "long": 7,
        "float": 0.5,
        "double": 0.25,
        "bytes": b"x",
        "string": "s",
    }
    if kind in simple:
        return simple[kind]
    if kind in ("record", "error"):
        return {f["name"]: sample(f["type"], side, rich=rich) for f in schema["fields"]}
    if kind == "array":
        return [sample(schema["items"], side, rich=rich)]
    if kind == "map":
        return {"k": sample(schema["values"], side, rich=rich)}
    if kind == "enum":
        return schema["symbols"][0]
    if kind == "fixed":
        return b"\x00" * schema["size"]
    raise AssertionError(f"no sample for {schema!r}")


def read_with(writer: dict[str, Any], reader: dict[str, Any], record: Any) -> Any:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(writer), record)
    buffer.seek(0)
    return fastavro.schemaless_reader(
        buffer, fastavro.parse_schema(writer), fastavro.parse_schema(reader)
    )


def fastavro_resolves(writer: dict[str, Any], reader: dict[str, Any]) -> bool:
    try:
        for rich in (False, True):
            read_with(writer, reader, sample(writer, _Side(writer), rich=rich))
    except SchemaResolutionError:
        return False
    return True


def released() -> list[tuple[str, int]]:
    return [(name, v) for name in EVENTS for v in events.load_schema_history(name)]


# -------------------------------------------------------------------- the guard


@pytest.mark.parametrize("name", EVENTS)
def test_history_is_complete_and_ends_with_the_current_schema(name: str) -> None:
    history = events.load_schema_history(name)
    assert list(history) == list(range(1, len(history) + 1)), "versions must be v1..vN"
    current = fastavro.schema.to_parsing_canonical_form(events.load_schema(name))
    latest = fastavro.schema.to_parsing_canonical_form(history[max(history)])
    assert current == latest, (
        f"{name}.avsc changed: release it as history/{name}/v{max(history) + 1}.avsc"
    )


@pytest.mark.parametrize(("name", "version"), released())
def test_current_schema_reads_every_released_version(name: str, version: int) -> None:
    old = events.load_schema_history(name)[version]
    current = events.load_schema(name)
    assert resolution_problems(old, current) == []
    for rich in (False, True):
        record = sample(old, _Side(old), rich=rich)
        read = read_with(old, current, record)
        for field in old["fields"]:
            if field["name"] in read and isinstance(record[field["name"]], str | int | float):
                assert str(read[field["name"]]) == str(record[field["name"]])


def _single_object(schema: dict[str, Any], record: Any) -> bytes:
    buffer = io.BytesIO()
    buffer.write(events.SINGLE_OBJECT_MARKER + events.schema_fingerprint(schema))
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), record)
    return buffer.getvalue()


@pytest.mark.parametrize("version", list(events.load_schema_history(events.UPLOADED_SCHEMA)))
def test_codec_decodes_events_from_every_released_uploaded_version(version: int) -> None:
    old = events.load_schema_history(events.UPLOADED_SCHEMA)[version]
    record = sample(old, _Side(old), rich=True)
    event = EventCodec().decode_uploaded(_single_object(old, record))
    assert str(event.event_id) == record["event_id"]


@pytest.mark.parametrize("version", list(events.load_schema_history(events.SUGGESTION_SCHEMA)))
def test_codec_decodes_suggestions_from_every_released_version(version: int) -> None:
    old = events.load_schema_history(events.SUGGESTION_SCHEMA)[version]
    record = sample(old, _Side(old), rich=True)
    # A sample that also keeps the suggestion's contract (one score, the top one).
    record.update(
        category="books",
        score=0.75,
        scores=[{"category": "books", "score": 0.75}],
        confident=True,
        confidence_threshold=0.5,
    )
    assert EventCodec().decode_suggestion(_single_object(old, record)).category == "books"


# --------------------------------------------------------- the guard catches breakage


def _current() -> dict[str, Any]:
    return copy.deepcopy(events.load_schema(events.UPLOADED_SCHEMA))


def _field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


def test_a_field_added_without_default_is_caught() -> None:
    old, new = _current(), _current()
    new["fields"].append({"name": "brand", "type": "string", "doc": "x"})
    assert resolution_problems(old, new) == ["ListingImageUploaded.brand: added without a default"]
    assert not fastavro_resolves(old, new)
    with pytest.raises(SchemaResolutionError):
        read_with(old, new, sample(old, _Side(old), rich=True))


def test_a_field_added_with_default_passes() -> None:
    old, new = _current(), _current()
    new["fields"].append({"name": "brand", "type": ["null", "string"], "default": None})
    assert resolution_problems(old, new) == []
    assert fastavro_resolves(old, new)


@pytest.mark.parametrize(
    ("field", "new_type", "compatible"),
    [
        ("listing_id", "long", False),  # string to long: no promotion
        ("listing_id", "bytes", True),  # string to bytes: promotion
        ("listing_id", ["null", "string"], True),  # widened into a union
        ("seller_id", "string", False),  # a union narrowed: null no longer readable
        ("uploaded_at", "double", False),  # long to double promotes, the logical type is lost
        ("uploaded_at", {"type": "long", "logicalType": "timestamp-micros"}, False),
    ],
)
def test_type_changes_follow_avro_promotion(field: str, new_type: Any, compatible: bool) -> None:
    old, new = _current(), _current()
    _field(new, field)["type"] = new_type
    if not isinstance(new_type, list):
        _field(new, field).pop("default", None)  # a null default fits only the union
    assert (resolution_problems(old, new) == []) is compatible
    if field != "uploaded_at":  # fastavro ignores logical types when resolving
        assert fastavro_resolves(old, new) is compatible


def test_promotion_int_to_long_and_removed_fields_pass() -> None:
    old = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "n", "type": "int"}, {"name": "gone", "type": "string"}],
    }
    new = {"type": "record", "name": "R", "fields": [{"name": "n", "type": "long"}]}
    assert resolution_problems(old, new) == []
    assert fastavro_resolves(old, new)
    assert resolution_problems(new, old) == [
        "R.n: type changed from long to int",
        "R.gone: added without a default",
    ]


def test_renamed_record_is_caught_unless_aliased() -> None:
    old, new = _current(), _current()
    new["name"] = "ImageUploaded"
    assert resolution_problems(old, new) == [
        "ImageUploaded: named type ListingImageUploaded became ImageUploaded"
    ]
    new["aliases"] = ["ListingImageUploaded"]
    assert resolution_problems(old, new) == []


def test_nested_record_changes_are_caught() -> None:
    old = copy.deepcopy(events.load_schema(events.SUGGESTION_SCHEMA))
    new = copy.deepcopy(old)
    timings = _field(new, "timings")["type"]
    timings["fields"].append({"name": "publish_ms", "type": "double"})
    assert resolution_problems(old, new) == [
        "CategorySuggestion.timings.publish_ms: added without a default"
    ]
    assert not fastavro_resolves(old, new)
