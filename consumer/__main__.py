"""Command line: `python -m consumer run | web | replay-dlq | produce-sample`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from pydantic import ValidationError

from consumer import logs
from consumer.errors import SuggesterError
from consumer.settings import Settings


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
    from consumer.malloc import limit_arenas
    from consumer.service import Service

    limit_arenas()  # before any thread of the service starts (consumer/malloc.py)

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m consumer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the service until SIGTERM/SIGINT")
    commands.add_parser(
        "web", help="serve the try-a-photo page (SUGGESTER_WEB__HOST/PORT) until SIGTERM/SIGINT"
    )

    replay = commands.add_parser(
        "replay-dlq", help="re-publish dead-letter records into the input topic"
    )
    replay.add_argument("--reason", action="append", help="only records with this reason")
    replay.add_argument("--max", type=int, default=None, help="stop after this many records")
    replay.add_argument("--dry-run", action="store_true", help="list, do not publish")
    replay.add_argument(
        "--group", default="category-suggester-replay", help="consumer group of the replayer"
    )

    sample = commands.add_parser(
        "produce-sample", help="publish events for images in a folder or a URL list"
    )
    sample.add_argument(
        "--images", required=True, help="a folder of images, or a text file of image URLs"
    )
    sample.add_argument("--serve-host", default="127.0.0.1")
    sample.add_argument("--serve-port", type=int, default=8090, help="port the folder is served on")
    sample.add_argument("--count", type=int, default=None, help="events to publish (cycles)")
    sample.add_argument(
        "--wait-s", type=float, default=60.0, help="wait this long for the answers (0: don't)"
    )

    from consumer import ledger

    ledger.add_arguments(
        commands.add_parser(
            "ledger", help="check that every input event was answered once (read_committed)"
        )
    )

    args = parser.parse_args(argv)
    settings = _settings()
    logs.configure(settings.observability.log_level)

    if args.command == "run":
        asyncio.run(_run_service(settings))
    elif args.command == "web":
        from consumer.web import serve

        try:
            asyncio.run(serve(settings))
        except (RuntimeError, OSError) as exc:
            sys.exit(f"the page could not start: {exc}")
    elif args.command == "replay-dlq":
        from consumer.tools import replay_dlq

        replayed = replay_dlq(
            settings, reasons=args.reason, limit=args.max, dry_run=args.dry_run, group=args.group
        )
        print(f"{'would replay' if args.dry_run else 'replayed'} {replayed} record(s)")
    elif args.command == "produce-sample":
        from consumer.tools import produce_sample

        ok = produce_sample(
            settings,
            source=args.images,
            host=args.serve_host,
            port=args.serve_port,
            count=args.count,
            wait_s=args.wait_s,
        )
        sys.exit(0 if ok else 1)
    elif args.command == "ledger":
        sys.exit(ledger.run(args))


if __name__ == "__main__":
    main()
