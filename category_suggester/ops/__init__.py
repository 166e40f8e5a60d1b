"""Operator commands of `python -m category_suggester`, one module per command.

- `ledger`: was every input event answered once (read_committed)? (`ops/ledger.py`)
- `replay-dlq`: re-publish dead-letter records into the input topic (`ops/replay_dlq.py`)
- `produce-sample`: publish events for a folder of images or a URL list and print the
  answers (`ops/produce_sample.py`, serving the folder with `ops/image_folder.py`)

Each command module has `HELP` (its one-line help), `add_arguments(parser)` and
`run(args, settings) -> int` (the exit status). They are plain synchronous Kafka clients
built on the service's public contracts (settings, events and their codec, the
producer's configuration); none imports the service's wiring, so none loads the Triton
or HTTP clients the service runs on.
"""

from __future__ import annotations

import argparse
from typing import Protocol

from category_suggester.settings import Settings


class Command(Protocol):
    """What `python -m category_suggester` needs of a command module."""

    @property
    def HELP(self) -> str: ...  # noqa: N802 (a module constant)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace, settings: Settings) -> int: ...
