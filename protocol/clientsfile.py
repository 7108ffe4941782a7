"""The clients file: who may connect, with which key, how many sessions and what priority.

Format (kept from the original InferenceCenter):
`{"clients": [{"client_id", "api_key", "max_sessions", "priority", "description"}]}`
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PRIORITIES = ("high", "normal", "low")
DEFAULT_MAX_SESSIONS = 8
LOCAL_CLIENT_ID = "local"


class ClientsFileError(Exception):
    """The clients file is missing, unreadable or malformed (the message says which)."""


@dataclass(frozen=True)
class ClientEntry:
    client_id: str
    api_key: str
    max_sessions: int = DEFAULT_MAX_SESSIONS
    priority: str = "normal"
    description: str = ""

    def __repr__(self) -> str:  # never show the key, even in a traceback
        return f"ClientEntry(client_id={self.client_id!r}, priority={self.priority!r})"


def default_path() -> Path:
    """`$XDG_CONFIG_HOME/inferencecenter/clients.json` (~/.config when unset)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "inferencecenter" / "clients.json"


def new_api_key() -> str:
    return "ic-" + secrets.token_urlsafe(32)


def _entry(raw: Any, index: int, path: Path) -> ClientEntry:
    where = f"{path}: clients[{index}]"
    if not isinstance(raw, dict):
        raise ClientsFileError(f"{where} must be an object")
    client_id = raw.get("client_id")
    api_key = raw.get("api_key")
    if not isinstance(client_id, str) or not client_id:
        raise ClientsFileError(f"{where}.client_id must be a non-empty string")
    if not isinstance(api_key, str) or len(api_key) < 8:
        raise ClientsFileError(f"{where}.api_key must be a string of at least 8 characters")
    max_sessions = raw.get("max_sessions", DEFAULT_MAX_SESSIONS)
    if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
        raise ClientsFileError(f"{where}.max_sessions must be an integer >= 1")
    priority = raw.get("priority", "normal")
    if priority not in PRIORITIES:
        raise ClientsFileError(f"{where}.priority must be one of {', '.join(PRIORITIES)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ClientsFileError(f"{where}.description must be a string")
    return ClientEntry(client_id, api_key, max_sessions, priority, description)


def load(path: Path) -> list[ClientEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClientsFileError(f"clients file {path} does not exist") from None
    except OSError as exc:
        raise ClientsFileError(f"cannot read clients file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClientsFileError(f"{path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("clients"), list):
        raise ClientsFileError(f'{path} must hold {{"clients": [...]}}')
    entries = [_entry(raw, i, path) for i, raw in enumerate(data["clients"])]
    seen: set[str] = set()
    for entry in entries:
        if entry.client_id in seen:
            raise ClientsFileError(f"{path}: client_id {entry.client_id!r} appears twice")
        seen.add(entry.client_id)
    return entries


def save(path: Path, entries: list[ClientEntry]) -> None:
    """Write atomically with mode 0600 (the file holds keys)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    data = {"clients": [asdict(entry) for entry in entries]}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def create_default(path: Path) -> ClientEntry:
    """A new file with one client `local` and a random key."""
    entry = ClientEntry(
        LOCAL_CLIENT_ID, new_api_key(), DEFAULT_MAX_SESSIONS, "normal", "this machine"
    )
    save(path, [entry])
    return entry


def add_client(path: Path, client_id: str, **fields: Any) -> ClientEntry:
    """Add (or replace the key of) one client; creates the file when missing."""
    entries = load(path) if path.exists() else []
    old = next((e for e in entries if e.client_id == client_id), None)
    entry = ClientEntry(
        client_id,
        new_api_key(),
        fields.get("max_sessions", old.max_sessions if old else DEFAULT_MAX_SESSIONS),
        fields.get("priority", old.priority if old else "normal"),
        fields.get("description", old.description if old else ""),
    )
    entries = [e for e in entries if e.client_id != client_id] + [entry]
    save(path, entries)
    return entry
