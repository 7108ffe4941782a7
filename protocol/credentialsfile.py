"""The local credentials file: the keys this user's CLI and client library authenticate with.

The daemon's clients file holds only hashes of keys; a key itself lives with its user, in
`$XDG_CONFIG_HOME/inferencecenter/credentials.json` (mode 0600, refused when the group or others
may read it):
`{"credentials": [{"client_id": "local", "api_key": "ic-..."}]}`.
The first entry is the default; `local` (written by the daemon on first start) wins over it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from . import clientsfile

FILE_NAME = "credentials.json"


class CredentialsFileError(Exception):
    """The credentials file is unreadable, open to others or malformed (the message says which)."""


class StoredKey(NamedTuple):
    """One client_id and its api key; the repr never shows the key."""

    client_id: str
    api_key: str

    def __repr__(self) -> str:
        return f"StoredKey(client_id={self.client_id!r}, api_key=<hidden>)"

    def __str__(self) -> str:
        return repr(self)


def default_path() -> Path:
    """Beside the default clients file: `$XDG_CONFIG_HOME/inferencecenter/credentials.json`."""
    return clientsfile.default_path().with_name(FILE_NAME)


def load(path: Path) -> list[StoredKey]:
    """The stored keys; a missing file holds none."""
    try:
        clientsfile.check_private(path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except clientsfile.ClientsFileError as exc:
        raise CredentialsFileError(str(exc)) from None
    except OSError as exc:
        raise CredentialsFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CredentialsFileError(f"{path} is not valid JSON (line {exc.lineno})") from None
    raw = data.get("credentials") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise CredentialsFileError(f'{path} must hold {{"credentials": [...]}}')
    keys: list[StoredKey] = []
    for index, item in enumerate(raw):
        client_id = item.get("client_id") if isinstance(item, dict) else None
        api_key = item.get("api_key") if isinstance(item, dict) else None
        if not isinstance(client_id, str) or not client_id or not isinstance(api_key, str):
            raise CredentialsFileError(
                f"{path}: credentials[{index}] must have a client_id and an api_key (strings)"
            )
        keys.append(StoredKey(client_id, api_key))
    return keys


def find(path: Path, client_id: str | None = None) -> StoredKey | None:
    """The key of `client_id`, or without one the default (`local`, else the first)."""
    keys = load(path)
    if client_id is not None:
        return next((key for key in keys if key.client_id == client_id), None)
    local = next((key for key in keys if key.client_id == clientsfile.LOCAL_CLIENT_ID), None)
    return local or (keys[0] if keys else None)


def store(path: Path, client_id: str, api_key: str) -> None:
    """Add the key of `client_id`, or replace it (atomically, mode 0600)."""
    keys = [key for key in load(path) if key.client_id != client_id]
    keys.append(StoredKey(client_id, api_key))
    data = {"credentials": [{"client_id": k.client_id, "api_key": k.api_key} for k in keys]}
    clientsfile.write_private(path, data)
