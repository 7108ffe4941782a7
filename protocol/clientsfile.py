"""The clients file: who may connect, with which key, how many sessions and what priority.

Format (kept from the original InferenceCenter, plus `role` and the optional budgets
`max_prompt_tokens`, `max_queued`, `tokens_per_minute`: integers >= 0, 0 for no limit, absent
for the daemon's default):
`{"clients": [{"client_id", "api_key", "max_sessions", "priority", "description", "role"}]}`

A key is stored as `api_key_sha256` (hex) in place of `api_key`: a stolen file then gives no
key. The seed format with `api_key` is still read (the auth actor warns), and `migrate` rewrites
a file as hashes. Keys are random and long (at least MIN_KEY_CHARS), so one SHA-256 is enough.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from . import curve

PRIORITIES = ("high", "normal", "low")
# An admin may load and unload models and act on every client's sessions.
ROLES = ("user", "admin")
DEFAULT_MAX_SESSIONS = 8
LOCAL_CLIENT_ID = "local"
# A hand-written key shorter than this is refused (a generated one has 46 characters).
MIN_KEY_CHARS = 32
# Per-client budgets an entry may set (actors/budgets.py enforces them).
BUDGETS = ("max_prompt_tokens", "max_queued", "tokens_per_minute")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class ClientsFileError(Exception):
    """The clients file is missing, unreadable or malformed (the message says which)."""


@dataclass(frozen=True)
class ClientEntry:
    client_id: str
    api_key: str
    max_sessions: int = DEFAULT_MAX_SESSIONS
    priority: str = "normal"
    description: str = ""
    role: str = "user"
    # The key's SHA-256 (hex), computed from api_key when that is given; api_key is "" when the
    # file holds only the hash.
    api_key_sha256: str = ""
    max_prompt_tokens: int | None = None  # None: the daemon's default
    max_queued: int | None = None
    tokens_per_minute: int | None = None
    # Z85 CURVE public key: this client may authenticate only over a connection made with it
    # (under --curve), and may subscribe to metrics ("" : any connection, no metrics).
    curve_public_key: str = ""

    def __post_init__(self) -> None:
        if self.api_key and not self.api_key_sha256:
            object.__setattr__(self, "api_key_sha256", key_sha256(self.api_key))

    def __repr__(self) -> str:  # never show the key, even in a traceback
        return f"ClientEntry(client_id={self.client_id!r}, priority={self.priority!r})"


def key_sha256(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


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
    if not isinstance(client_id, str) or not client_id:
        raise ClientsFileError(f"{where}.client_id must be a non-empty string")
    api_key, digest = _key(raw, where, client_id)
    max_sessions = raw.get("max_sessions", DEFAULT_MAX_SESSIONS)
    if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
        raise ClientsFileError(f"{where}.max_sessions must be an integer >= 1")
    priority = raw.get("priority", "normal")
    if priority not in PRIORITIES:
        raise ClientsFileError(f"{where}.priority must be one of {', '.join(PRIORITIES)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ClientsFileError(f"{where}.description must be a string")
    role = raw.get("role", "user")
    if role not in ROLES:
        raise ClientsFileError(f"{where}.role must be one of {', '.join(ROLES)}")
    budgets: dict[str, int] = {}
    for name in BUDGETS:
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise ClientsFileError(f"{where}.{name} must be an integer >= 0 (0: no limit)")
        budgets[name] = value
    curve_key = raw.get("curve_public_key", "")
    if curve_key:
        try:
            curve_key = curve.z85_key(curve_key, f"{where}.curve_public_key").decode()
        except curve.CurveError as exc:
            raise ClientsFileError(str(exc)) from None
    return ClientEntry(
        client_id,
        api_key,
        max_sessions,
        priority,
        description,
        role,
        api_key_sha256=digest,
        **budgets,
        curve_public_key=curve_key,
    )


def _key(raw: dict[str, Any], where: str, client_id: str) -> tuple[str, str]:
    """(api_key or "", its SHA-256 hex) from `api_key_sha256` or the seed format's `api_key`."""
    api_key, digest = raw.get("api_key"), raw.get("api_key_sha256")
    if api_key is not None and digest is not None:
        raise ClientsFileError(f"{where} has both api_key and api_key_sha256: keep only the hash")
    if digest is not None:
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise ClientsFileError(f"{where}.api_key_sha256 must be 64 hex digits")
        return "", digest.lower()
    if not isinstance(api_key, str) or not api_key:
        raise ClientsFileError(f"{where} needs api_key_sha256 (or api_key)")
    if len(api_key) < MIN_KEY_CHARS:
        raise ClientsFileError(
            f"{where}.api_key is {len(api_key)} characters, fewer than {MIN_KEY_CHARS}: "
            f"`inferencecenter keygen {client_id} --replace` makes a random one"
        )
    return api_key, key_sha256(api_key)


def check_private(path: Path) -> None:
    """Refuse a file that the group or others may read or write (it holds keys or their
    hashes): `chmod 600` says the fix."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return  # reading it says what is wrong
    if mode & 0o077:
        raise ClientsFileError(
            f"{path} is open to group or others (mode {mode:o}): chmod 600 {path}"
        )


def load(path: Path) -> list[ClientEntry]:
    check_private(path)
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
    """Write atomically with mode 0600; an entry whose key is known keeps the seed format."""
    write_private(path, {"clients": [_to_json(entry) for entry in entries]})


def _to_json(entry: ClientEntry) -> dict[str, Any]:
    data = asdict(entry)
    del data["api_key_sha256" if entry.api_key else "api_key"]
    for name in BUDGETS:
        if data[name] is None:
            del data[name]
    if not entry.curve_public_key:
        del data["curve_public_key"]
    return data


def write_private(path: Path, data: Any) -> None:
    """JSON written atomically with mode 0600, its folder created with 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def hashed(entry: ClientEntry) -> ClientEntry:
    """The entry as stored without its key."""
    return replace(entry, api_key="")


def migrate(path: Path) -> list[str]:
    """Rewrite the file with every key as its hash; the client_ids that had a key in clear."""
    entries = load(path)
    plain = [entry.client_id for entry in entries if entry.api_key]
    if plain:
        save(path, [hashed(entry) for entry in entries])
    return plain


def create_default(path: Path, hash_only: bool = False) -> ClientEntry:
    """A new file with one client `local` and a random key (with `hash_only`, only its hash is
    written: the caller keeps the key, in the credentials file)."""
    entry = ClientEntry(
        LOCAL_CLIENT_ID, new_api_key(), DEFAULT_MAX_SESSIONS, "normal", "this machine"
    )
    save(path, [hashed(entry) if hash_only else entry])
    return entry


def add_client(path: Path, client_id: str, hash_only: bool = False, **fields: Any) -> ClientEntry:
    """Add (or replace the key of) one client; creates the file when missing. The entry
    returned has the key; with `hash_only` the file gets only its hash."""
    entries = load(path) if path.exists() else []
    old = next((e for e in entries if e.client_id == client_id), None)
    entry = ClientEntry(
        client_id,
        new_api_key(),
        fields.get("max_sessions", old.max_sessions if old else DEFAULT_MAX_SESSIONS),
        fields.get("priority", old.priority if old else "normal"),
        fields.get("description", old.description if old else ""),
        fields.get("role", old.role if old else "user"),
        **{name: getattr(old, name) for name in BUDGETS if old is not None},
        curve_public_key=fields.get("curve_public_key", old.curve_public_key if old else ""),
    )
    entries = [e for e in entries if e.client_id != client_id]
    save(path, [*entries, hashed(entry) if hash_only else entry])
    return entry
