"""Fuzz target: the event decoder (`EventCodec.decode_uploaded`, `decode_suggestion`).

    python -m fuzz.events [libFuzzer options] [corpus dirs or files]

Properties, for any bytes: decoding raises nothing but `EventDecodeError` with a reason in
`DECODE_REASONS`; an event that decodes encodes again and decodes to an equal event.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["category_suggester", "fastavro"]):
    from category_suggester.errors import EventDecodeError
    from category_suggester.events import DECODE_REASONS, EventCodec

CODEC = EventCodec()


def test_one_input(data: bytes) -> None:
    for decode, encode in (
        (CODEC.decode_uploaded, CODEC.encode_uploaded),
        (CODEC.decode_suggestion, CODEC.encode_suggestion),
    ):
        try:
            event = decode(data)
        except EventDecodeError as exc:
            if exc.reason not in DECODE_REASONS:
                raise AssertionError(f"unknown decode reason {exc.reason!r}") from exc
            continue
        again = decode(encode(event))  # type: ignore[arg-type]
        if again != event:
            raise AssertionError(f"re-encoding changed the event: {event!r} -> {again!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
