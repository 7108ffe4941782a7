"""The auth actor: checks credentials against the clients file's key hashes in constant time."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import trio

from ..protocol import clientsfile, internal
from ..protocol.clientsfile import ClientEntry, ClientsFileError
from .actor import ActorLink, ActorServer, Body, Caller, report_to_supervisor
from .config import Config
from .logs import EventLog

log = EventLog("auth")


def _digest(text: str) -> bytes:
    # Comparing fixed-length digests hides the length of the stored id and key.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class ClientRegistry:
    """The clients file, re-read when it changes on disk (so `inferencecenter keygen` needs no
    restart); a broken edit keeps the last good version and logs why."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime_ns = -1
        self._entries: list[tuple[bytes, bytes, ClientEntry]] = []
        self._warned: set[str] = set()  # client_ids already named for a key in clear
        self.reload_if_changed()

    def reload_if_changed(self) -> None:
        try:
            mtime_ns = self.path.stat().st_mtime_ns
        except OSError:
            return
        if mtime_ns == self._mtime_ns:
            return
        try:
            entries = clientsfile.load(self.path)
        except ClientsFileError as exc:
            log.error("clients file not reloaded", reason=str(exc))
            self._mtime_ns = mtime_ns
            return
        self._mtime_ns = mtime_ns
        self._entries = [
            (_digest(e.client_id), bytes.fromhex(e.api_key_sha256), e) for e in entries
        ]
        log.info("clients loaded", path=str(self.path), clients=len(entries))
        plain = [e.client_id for e in entries if e.api_key and e.client_id not in self._warned]
        if plain:
            self._warned.update(plain)
            log.warning(
                "api keys stored in clear: `inferencecenter keys migrate` stores only hashes",
                path=str(self.path),
                clients=",".join(plain[:10]) + (f",+{len(plain) - 10}" if len(plain) > 10 else ""),
            )

    def authenticate(self, client_id: str, api_key: str) -> ClientEntry | None:
        """Every entry is compared, whatever matches, so timing says nothing about which failed."""
        id_digest, key_digest = _digest(client_id), _digest(api_key)
        found: ClientEntry | None = None
        for stored_id, stored_key, entry in self._entries:
            id_ok = hmac.compare_digest(id_digest, stored_id)
            key_ok = hmac.compare_digest(key_digest, stored_key)
            if id_ok & key_ok:
                found = entry
        return found

    def authenticate_key(self, api_key: str) -> ClientEntry | None:
        """The one client with this key (HTTP's Bearer key names the client by itself); every
        entry is compared, and a key that two entries share names nobody."""
        key_digest = _digest(api_key)
        found: list[ClientEntry] = []
        for _, stored_key, entry in self._entries:
            if hmac.compare_digest(key_digest, stored_key):
                found.append(entry)
        return found[0] if len(found) == 1 else None


class AuthActor:
    def __init__(self, config: Config, monitor: ActorLink | None = None) -> None:
        self.registry = ClientRegistry(Path(config.clients))
        self.monitor = monitor
        self.handlers = {
            "authenticate": self.authenticate,
            "authenticate_key": self.authenticate_key,
        }

    def authenticate(self, body: Body, caller: Caller) -> None:
        self.registry.reload_if_changed()
        client_id = str(body.get("client_id", ""))
        entry = self.registry.authenticate(client_id, str(body.get("api_key", "")))
        if entry is None:
            log.warning("auth failed", client_id=client_id[:64])
            if self.monitor is not None:
                self.monitor.push("auth_failed")
            caller.reply(ok=False, reason="unknown client_id or wrong api_key")
            return
        self.succeeded(entry, caller)

    def authenticate_key(self, body: Body, caller: Caller) -> None:
        self.registry.reload_if_changed()
        entry = self.registry.authenticate_key(str(body.get("api_key", "")))
        if entry is None:
            log.warning("auth failed", by="api_key")
            if self.monitor is not None:
                self.monitor.push("auth_failed")
            caller.reply(ok=False, reason="unknown api_key")
            return
        self.succeeded(entry, caller)

    def succeeded(self, entry: ClientEntry, caller: Caller) -> None:
        caller.reply(
            ok=True,
            client_id=entry.client_id,
            max_sessions=entry.max_sessions,
            priority=entry.priority,
            role=getattr(entry, "role", "user"),
        )


async def main(config: Config, stop: trio.Event) -> None:
    monitor = ActorLink(internal.MONITOR, config)
    actor = AuthActor(config, monitor)
    assert set(actor.handlers) == set(internal.AUTH_OPS)
    server = ActorServer(internal.AUTH, config, actor.handlers)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        nursery.start_soon(monitor.run)
        report_to_supervisor(config, {"op": "ready", "actor": internal.AUTH})
        await stop.wait()
        nursery.cancel_scope.cancel()
