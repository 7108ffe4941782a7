"""Find the client_id and api_key to authenticate with: arguments, then environment, then file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from inferencecenter.protocol import clientsfile

ENV_CLIENT_ID = "INFERENCECENTER_CLIENT_ID"
ENV_API_KEY = "INFERENCECENTER_API_KEY"
ENV_CLIENTS = "INFERENCECENTER_CLIENTS"
# CURVE: the daemon's public key (Z85 or its server.key file), this client's own certificate.
ENV_SERVER_KEY = "INFERENCECENTER_SERVER_KEY"
ENV_CURVE_CERT = "INFERENCECENTER_CURVE_CERT"


class CredentialsError(Exception):
    """No usable credentials were found; the message says where we looked and what to do."""


class Credentials(NamedTuple):
    """A client_id and its api_key; unpacks as a pair, and its repr never shows the key."""

    client_id: str
    api_key: str

    def __repr__(self) -> str:
        return f"Credentials(client_id={self.client_id!r}, api_key=<hidden>)"

    def __str__(self) -> str:
        return repr(self)


def clients_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The clients file to read: the argument, else $INFERENCECENTER_CLIENTS, else the default."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_CLIENTS)
    if env:
        return Path(env).expanduser()
    default: Path = clientsfile.default_path()
    return default


def resolve(
    client_id: str | None = None,
    api_key: str | None = None,
    clients_file: str | os.PathLike[str] | None = None,
) -> Credentials:
    """Explicit arguments win, then the environment, then the local clients file.

    From the file, the client named by `client_id` (when only the id was given) is used, else
    `local` (the client the daemon writes on first start) if present, else the first entry.
    """
    client_id = client_id or os.environ.get(ENV_CLIENT_ID) or None
    api_key = api_key or os.environ.get(ENV_API_KEY) or None
    if client_id and api_key:
        return Credentials(client_id, api_key)
    if api_key:
        # A key without its id could only be guessed at; say so rather than guess.
        raise CredentialsError(
            f"an api key was given without a client id: pass client_id "
            f"(--client-id) or set {ENV_CLIENT_ID}"
        )

    path = clients_path(clients_file)
    if not path.exists():
        raise CredentialsError(
            f"no credentials: pass a client id and api key (--client-id/--api-key), set "
            f"{ENV_CLIENT_ID} and {ENV_API_KEY}, or point {ENV_CLIENTS} (--clients) at a "
            f"clients file; {path} does not exist (the daemon writes it on first start on "
            f"this machine, and `inferencecenter keygen NAME` adds a client to it)"
        )
    try:
        entries = clientsfile.load(path)
    except clientsfile.ClientsFileError as exc:
        raise CredentialsError(f"cannot read credentials: {exc}") from None

    if client_id:
        entry = next((e for e in entries if e.client_id == client_id), None)
        if entry is None:
            raise CredentialsError(
                f"client {client_id!r} is not in {path}: pass its api key "
                f"(--api-key or {ENV_API_KEY}) or add it with `inferencecenter keygen {client_id}`"
            )
        return Credentials(entry.client_id, entry.api_key)

    if not entries:
        raise CredentialsError(
            f"{path} lists no clients: add one with `inferencecenter keygen NAME`, or pass "
            f"--client-id and --api-key"
        )
    local = next((e for e in entries if e.client_id == clientsfile.LOCAL_CLIENT_ID), None)
    entry = local or entries[0]
    return Credentials(entry.client_id, entry.api_key)
