"""Find the client_id and api_key to authenticate with: arguments, then environment, then files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from inferencecenter.protocol import clientsfile, credentialsfile

ENV_CLIENT_ID = "INFERENCECENTER_CLIENT_ID"
ENV_API_KEY = "INFERENCECENTER_API_KEY"
ENV_CLIENTS = "INFERENCECENTER_CLIENTS"
ENV_CREDENTIALS = "INFERENCECENTER_CREDENTIALS"
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


def credentials_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The credentials file: the argument, else $INFERENCECENTER_CREDENTIALS, else the default."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_CREDENTIALS)
    if env:
        return Path(env).expanduser()
    default: Path = credentialsfile.default_path()
    return default


def resolve(
    client_id: str | None = None,
    api_key: str | None = None,
    clients_file: str | os.PathLike[str] | None = None,
    credentials_file: str | os.PathLike[str] | None = None,
) -> Credentials:
    """Explicit arguments win, then the environment, then the files on this machine.

    The files: a clients file named by the argument or $INFERENCECENTER_CLIENTS (the seed format
    holds keys), then this user's credentials file (mode 0600: where the daemon puts `local`'s
    key on first start, and `keygen --save` others), then the default clients file. In each, the
    client named by `client_id` (when only the id was given), else `local` if present, else the
    first entry with a key.
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
    named = clients_file is not None or bool(os.environ.get(ENV_CLIENTS))
    clients = clients_path(clients_file)
    if named:
        found = _from_clients_file(clients, client_id)
        if found is not None:
            return found
    stored = credentials_path(credentials_file)
    try:
        key = credentialsfile.find(stored, client_id)
    except credentialsfile.CredentialsFileError as exc:
        raise CredentialsError(f"cannot read credentials: {exc}") from None
    if key is not None:
        return Credentials(key.client_id, key.api_key)
    if not named:
        found = _from_clients_file(clients, client_id)
        if found is not None:
            return found
    who = f"client {client_id!r}" if client_id else "no client"
    raise CredentialsError(
        f"no credentials: {who} in {stored} or {clients}: pass a client id and api key "
        f"(--client-id/--api-key), set {ENV_CLIENT_ID} and {ENV_API_KEY}, or add a client "
        f"with `inferencecenter keygen NAME --save` (the daemon stores the key of `local` in "
        f"{stored} on its first start on this machine)"
    )


def _from_clients_file(path: Path, client_id: str | None) -> Credentials | None:
    """A key held in clear by a clients file (the seed format), if it has one for the client."""
    if not path.exists():
        return None
    try:
        entries = [e for e in clientsfile.load(path) if e.api_key]
    except clientsfile.ClientsFileError as exc:
        raise CredentialsError(f"cannot read credentials: {exc}") from None
    if client_id:
        entry = next((e for e in entries if e.client_id == client_id), None)
    else:
        local = next((e for e in entries if e.client_id == clientsfile.LOCAL_CLIENT_ID), None)
        entry = local or (entries[0] if entries else None)
    return None if entry is None else Credentials(entry.client_id, entry.api_key)
