"""`inferencecenter keys migrate`: rewrite a clients file so that it holds hashes, not keys
(also `python -m inferencecenter.clients.keys migrate`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inferencecenter.protocol import clientsfile, credentialsfile

EXIT_ERROR = 1


def add_keys_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `keys migrate` (sets `func(args) -> exit code`)."""
    keys = subparsers.add_parser("keys", help="manage the api keys at rest")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "migrate",
        help="store every key of the clients file as its SHA-256 only",
        description="Rewrite the clients file (mode 0600) with api_key_sha256 in place of each "
        "api_key; a running daemon re-reads it. The key of `local` is first copied to this "
        "user's credentials file, so the CLI on this machine keeps working; every other "
        "client keeps the key it was given.",
    )
    p.add_argument(
        "--clients",
        type=Path,
        default=None,
        help=f"clients file (default {clientsfile.default_path()})",
    )
    p.add_argument(
        "--credentials",
        type=Path,
        default=None,
        help=f"where `local`'s key goes (default {credentialsfile.default_path()})",
    )
    p.set_defaults(func=migrate_command)


def migrate_command(args: argparse.Namespace) -> int:
    path: Path = args.clients if args.clients is not None else clientsfile.default_path()
    credentials: Path = args.credentials or credentialsfile.default_path()
    try:
        entries = clientsfile.load(path)
        local = next(
            (e for e in entries if e.client_id == clientsfile.LOCAL_CLIENT_ID and e.api_key), None
        )
        if local is not None:
            credentialsfile.store(credentials, local.client_id, local.api_key)
        migrated = clientsfile.migrate(path)
    except (clientsfile.ClientsFileError, credentialsfile.CredentialsFileError) as exc:
        print(f"inferencecenter: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"inferencecenter: cannot write: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not migrated:
        print(f"{path} already holds only hashes")
        return 0
    print(f"{path}: {len(migrated)} key(s) now stored as SHA-256: {', '.join(migrated)}")
    if local is not None:
        print(f"the key of {local.client_id!r} is in {credentials} (mode 0600)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inferencecenter")
    add_keys_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["keys", *(sys.argv[1:] if argv is None else argv)])
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
