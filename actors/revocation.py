"""Revocation: when the clients file changes, connections of a client that was removed or
re-keyed lose their authentication at once.

The auth actor owns the clients file; it answers `watch_clients` with the table of every client's
fingerprint (a digest of what its authentication rests on: the key's hash, the role, the CURVE
public key) now and again after each change. A front actor (the gateway, the HTTP actor) keeps
the fingerprint its connections authenticated with; a connection whose client has another
fingerprint in the table, or none, was revoked. The whole table is sent each time, not the
changes, so a front actor that missed one (the auth actor restarted) is right again with the next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from ..protocol import internal
from ..protocol.clientsfile import ClientEntry
from .actor import ActorLink, Body
from .logs import EventLog

log = EventLog("revocation")

Table = dict[str, str]  # client_id -> fingerprint
REVOKED_MESSAGE = "the credentials of this connection were revoked: authenticate again"


def fingerprint(entry: ClientEntry) -> str:
    """What a client's authentication rests on, digested: any change of it revokes. Short and
    derived from the key's hash only, so it reveals nothing of the key."""
    parts = (entry.api_key_sha256, entry.role, str(getattr(entry, "curve_public_key", "") or ""))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def table_of(entries: Iterable[ClientEntry]) -> Table:
    return {entry.client_id: fingerprint(entry) for entry in entries}


def changes(old: Table, new: Table) -> tuple[list[str], list[str]]:
    """(removed, re-keyed) client_ids, sorted."""
    removed = sorted(cid for cid in old if cid not in new)
    rekeyed = sorted(cid for cid in old if cid in new and new[cid] != old[cid])
    return removed, rekeyed


def change_of(table: Table, client_id: str) -> str:
    """How a revoked client changed, for the log line."""
    return "removed" if client_id not in table else "re-keyed"


class ClientsWatch:
    """A front actor's copy of the auth actor's table, kept current over its auth link (the same
    link as its auth requests: a table pushed after a change arrives before any auth reply that
    saw the change). `on_change` gets each new table; `current` says whether an authentication
    still holds."""

    def __init__(self, auth: ActorLink, watcher: str) -> None:
        self.auth = auth
        self.watcher = watcher
        self.table: Table | None = None  # None until the auth actor first answers
        self.listeners: list[Callable[[Table], None]] = []

    def start(self) -> None:
        self.auth.stream("watch_clients", self.on_message, watcher=self.watcher)

    def on_message(self, body: Body) -> None:
        if body.get("op") == internal.ERROR:
            if body.get("lost"):  # the auth actor restarted: watch the new one
                self.start()
            else:
                log.error("clients not watched", reason=body.get("message"))
            return
        clients: Any = body.get("clients")
        if not isinstance(clients, dict):
            return
        self.table = {str(k): str(v) for k, v in clients.items()}
        for listener in self.listeners:
            listener(self.table)

    def current(self, client_id: str, fingerprint: str) -> bool:
        """Whether an authentication as `client_id` with this fingerprint still holds."""
        return self.table is None or self.table.get(client_id) == fingerprint
