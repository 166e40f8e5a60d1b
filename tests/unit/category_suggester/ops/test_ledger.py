"""The ledger's counting, on records made here (the reading is covered by tests/integration)."""

from __future__ import annotations

from category_suggester.ops.ledger import InputRecord, LedgerRecords, tally


def records(
    inputs: dict[tuple[int, int], tuple[bytes, str | None]],
    suggestions: list[tuple[int, int, str]] = (),  # type: ignore[assignment]
    dead_letters: list[tuple[tuple[int, int] | None, str, str | None]] = (),  # type: ignore[assignment]
) -> LedgerRecords:
    out = LedgerRecords()
    for position, (key, event_id) in inputs.items():
        out.inputs[position] = InputRecord(key, event_id)
        if event_id is not None:
            out.by_event_id[event_id].append(position)
    out.suggestions = list(suggestions)
    out.dead_letters = list(dead_letters)
    return out


def test_each_event_is_once_duplicated_or_lost() -> None:
    totals = tally(
        records(
            {
                (0, 0): (b"k1", "a"),
                (0, 1): (b"k1", "b"),
                (1, 0): (b"k2", "c"),
                (1, 1): (b"x", None),
            },
            suggestions=[(0, 0, "a"), (0, 1, "b"), (0, 2, "b"), (0, 3, "b")],
            dead_letters=[((1, 1), "event_undecodable", None)],
        )
    )
    assert (totals.events, totals.answered_once, totals.duplicated, totals.lost) == (4, 2, 1, 1)
    assert totals.extra_answers == 2
    assert totals.suggested == 2
    assert totals.dead_lettered == {"event_undecodable": 1}
    assert totals.lost_sample == ("1:0",)
    assert totals.duplicated_sample == ("0:1",)
    assert totals.foreign == 0


def test_a_suggestion_and_a_dlq_record_for_one_event_is_a_duplicate() -> None:
    totals = tally(
        records(
            {(0, 5): (b"k", "a")},
            suggestions=[(0, 0, "a")],
            dead_letters=[((0, 5), "fetch_failed", "a")],
        )
    )
    assert totals.duplicated == 1
    assert totals.suggested == 1
    assert totals.dead_lettered == {}


def test_answers_naming_no_input_are_foreign() -> None:
    totals = tally(
        records(
            {(0, 0): (b"k", "a")},
            suggestions=[(0, 0, "a"), (0, 1, "zzz")],
            dead_letters=[((3, 9), "fetch_failed", None)],
        )
    )
    assert totals.foreign == 2
    assert totals.answered_once == 1


def test_dlq_records_match_by_event_id_when_their_position_is_unknown() -> None:
    totals = tally(records({(0, 0): (b"k", "a")}, dead_letters=[(None, "fetch_failed", "a")]))
    assert totals.dead_lettered == {"fetch_failed": 1}
    assert totals.lost == 0


def test_one_event_id_at_two_offsets_shares_its_answers() -> None:
    # A DLQ record replayed into the input: the same event id at a second offset.
    totals = tally(
        records(
            {(0, 0): (b"k", "a"), (0, 7): (b"k", "a")},
            suggestions=[(0, 0, "a"), (0, 1, "a")],
        )
    )
    assert (totals.answered_once, totals.duplicated, totals.lost) == (2, 0, 0)


def test_order_per_key_follows_the_output_and_ignores_later_duplicates() -> None:
    inputs = {
        (0, 0): (b"k1", "a"),
        (0, 1): (b"k1", "b"),
        (0, 2): (b"k2", "c"),
        (0, 3): (b"k2", "d"),
    }
    totals = tally(
        records(
            inputs,
            # k1 in order (a repeat of "a" after "b" is a duplicate, not a reordering);
            # k2 answered d before c.
            suggestions=[(0, 0, "a"), (0, 1, "b"), (0, 2, "a"), (1, 0, "d"), (1, 1, "c")],
        )
    )
    assert totals.keys == 2
    assert totals.keys_out_of_order == 1
