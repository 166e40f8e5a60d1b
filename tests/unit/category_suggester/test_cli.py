"""The one command line, `python -m category_suggester`: every documented subcommand is there."""

from __future__ import annotations

import argparse
import re

import pytest

from category_suggester import __main__ as cli
from category_suggester.ops import ledger
from category_suggester.settings import Settings
from tests.conftest import REPO_ROOT

# Where the commands are documented for operators and developers.
DOCUMENTS = (
    "README.md",
    "docs/DESIGN.md",
    "deploy/OPERATIONS.md",
    "bench/PERFORMANCE.md",
    "tests/integration/faults/GUARANTEES.md",
)


def documented_commands() -> set[str]:
    found: set[str] = set()
    for name in DOCUMENTS:
        text = (REPO_ROOT / name).read_text()
        found |= set(re.findall(r"python -m category_suggester ([a-z][a-z-]*)", text))
    return found


def test_every_documented_subcommand_exists() -> None:
    commands = documented_commands()
    assert {"run", "web", "ledger", "replay-dlq", "produce-sample"} <= commands
    parser = cli.build_parser()
    for command in sorted(commands):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([command, "--help"])
        assert exited.value.code == 0, command


def test_ledger_is_a_subcommand_with_the_ledgers_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[argparse.Namespace, Settings]] = []

    def run(args: argparse.Namespace, settings: Settings) -> int:
        seen.append((args, settings))
        return 1  # as when an event was lost

    monkeypatch.setattr(ledger, "run", run)
    with pytest.raises(SystemExit) as exited:
        cli.main(["ledger", "--input", "in", "--output", "out", "--dlq", "dlq", "--json"])
    assert exited.value.code == 1
    [(args, settings)] = seen
    assert (args.input, args.output, args.dlq, args.json) == ("in", "out", "dlq", True)
    assert settings == Settings()
