"""Command line: `python -m category_suggester run | web | ledger | replay-dlq | produce-sample`.

`run` and `web` start the service and the try-a-photo page; the operator commands live in
`category_suggester/ops/`, one module each.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from pydantic import ValidationError

from category_suggester import logs
from category_suggester.errors import SuggesterError
from category_suggester.ops import Command, ledger, produce_sample, replay_dlq
from category_suggester.settings import Settings

OPERATOR_COMMANDS: dict[str, Command] = {
    "ledger": ledger,
    "replay-dlq": replay_dlq,
    "produce-sample": produce_sample,
}


def settings_error_text(error: ValidationError) -> str:
    """One line per invalid setting, naming its environment variable and what is wrong."""
    lines = []
    for problem in error.errors(include_url=False):
        path = [str(part) for part in problem["loc"]]
        variable = "SUGGESTER_" + "__".join(part.upper() for part in path)
        lines.append(f"  {variable}: {problem['msg']}")
    return "\n".join(lines)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        sys.exit(f"invalid configuration:\n{settings_error_text(exc)}")


async def _run_service(settings: Settings) -> None:
    from category_suggester.malloc import limit_arenas
    from category_suggester.service import Service

    limit_arenas()  # before any thread of the service starts (category_suggester/malloc.py)

    service = Service.from_settings(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_shutdown)
    try:
        await service.run()
    except SuggesterError as exc:
        sys.exit(f"could not start: {exc.message}")
    if service.failure is not None:
        sys.exit(f"stopped: {service.failure.message}")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m category_suggester", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the service until SIGTERM/SIGINT")
    commands.add_parser(
        "web", help="serve the try-a-photo page (SUGGESTER_WEB__HOST/PORT) until SIGTERM/SIGINT"
    )
    for name, command in OPERATOR_COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.HELP))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = _settings()
    logs.configure(settings.observability.log_level)

    if args.command == "run":
        asyncio.run(_run_service(settings))
    elif args.command == "web":
        from category_suggester.web import serve

        try:
            asyncio.run(serve(settings))
        except (RuntimeError, OSError) as exc:
            sys.exit(f"the page could not start: {exc}")
    else:
        sys.exit(OPERATOR_COMMANDS[args.command].run(args, settings))


if __name__ == "__main__":
    main()
