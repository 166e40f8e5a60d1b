"""The one command line, `python -m consumer`: every documented subcommand is there."""

from __future__ import annotations

import argparse

import pytest

from consumer import __main__ as cli
from consumer import ledger


def test_ledger_is_a_subcommand_with_the_ledgers_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[argparse.Namespace] = []

    def run(args: argparse.Namespace) -> int:
        seen.append(args)
        return 1  # as when an event was lost

    monkeypatch.setattr(ledger, "run", run)
    with pytest.raises(SystemExit) as exited:
        cli.main(["ledger", "--input", "in", "--output", "out", "--dlq", "dlq", "--json"])
    assert exited.value.code == 1
    [args] = seen
    assert (args.input, args.output, args.dlq, args.json) == ("in", "out", "dlq", True)
