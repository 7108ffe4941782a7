"""The `inferencecenter` command: `serve` runs the daemon; the client commands talk to it."""

from __future__ import annotations

import argparse
import sys

from ..actors.config import ConfigError, add_serve_arguments, config_from_args
from ..actors.logs import EventLog, setup_logging
from ..protocol import credentialsfile


def serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
    try:
        config, created = config_from_args(args)
    except ConfigError as exc:
        print(f"inferencecenter: {exc}", file=sys.stderr)
        return 2
    if created:
        EventLog("supervisor").info(
            "wrote a new clients file with client local (only its key's hash; the key is in "
            "this user's credentials file)",
            path=config.clients,
            credentials=str(credentialsfile.default_path()),
        )
    from .supervisor import Supervisor

    return Supervisor(config).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferencecenter",
        description="A self-hosted LLM inference daemon for the LAN (GGUF through llama.cpp).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the daemon")
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(func=serve)
    from .bench import add_bench_command

    add_bench_command(commands)
    from ..actors.engine.fit import add_fit_command

    add_fit_command(commands)
    try:
        from ..clients.cli import add_commands
    except ImportError:
        pass
    else:
        add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
