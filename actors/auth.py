"""The auth actor: checks credentials against the clients file's key hashes in constant time,
slows down whoever keeps failing, and logs failures as one line per window."""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..protocol import clientsfile, internal
from ..protocol.clientsfile import ClientEntry, ClientsFileError
from . import revocation
from .actor import ActorLink, ActorServer, Body, Caller, report_to_supervisor
from .budgets import Budgets
from .config import Config
from .logs import EventLog

log = EventLog("auth")

# Backoff: the first FREE_FAILURES failures of a client_id (or of an address) cost nothing; then
# its attempts are checked one at a time, spaced by a delay that doubles from BASE_DELAY_S up to
# MAX_DELAY_S (at most 1 / MAX_DELAY_S = 20 keys a second: 10,000 take 500 s). An attempt whose
# turn is more than MAX_WAIT_S away is refused at once, unchecked, with `retry_after_s`.
FREE_FAILURES = 5
BASE_DELAY_S = 0.005
MAX_DELAY_S = 0.05
MAX_WAIT_S = 5.0
FORGET_S = 600.0  # a key's failures are forgotten after this long without an attempt
MAX_TRACKED = 10_000  # keys followed at once (the least recently used one goes first)
# Failures are logged as one line for the first, then one summary per window while they go on.
SUMMARY_WINDOW_S = 60.0
SUMMARY_TOP = 5  # client_ids and addresses named in a summary (by count)
SUMMARY_KINDS = 1000  # distinct client_ids or addresses counted in one window; beyond: "others"
WATCH_S = 0.25  # how often the clients file is looked at (a change revokes within this)


def _digest(text: str) -> bytes:
    # Comparing fixed-length digests hides the length of the stored id and key.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class ClientRegistry:
    """The clients file, re-read when it changes on disk (so `inferencecenter keygen` needs no
    restart) or when asked (SIGHUP); a broken edit keeps the last good version and logs why."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._entries: list[tuple[bytes, bytes, ClientEntry]] = []
        self.table: revocation.Table = {}  # client_id -> fingerprint, for the front actors
        self._warned: set[str] = set()  # client_ids already named for a key in clear
        self.reload()

    def reload(self, force: bool = False) -> bool:
        """Read the file if it changed (its mtime, size or inode), or with `force` anyway;
        whether the table of fingerprints changed."""
        try:
            stat = self.path.stat()
        except OSError:
            return False
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature == self._signature and not force:
            return False
        self._signature = signature
        try:
            entries = clientsfile.load(self.path)
        except ClientsFileError as exc:
            log.error("clients file not reloaded", reason=str(exc))
            return False
        self._entries = [
            (_digest(e.client_id), bytes.fromhex(e.api_key_sha256), e) for e in entries
        ]
        table = revocation.table_of(entries)
        removed, rekeyed = revocation.changes(self.table, table)
        changed, self.table = table != self.table, table
        fields = {"removed": _names(removed), "rekeyed": _names(rekeyed)}
        log.info(
            "clients loaded",
            path=str(self.path),
            clients=len(entries),
            **{k: v for k, v in fields.items() if v},
        )
        plain = [e.client_id for e in entries if e.api_key and e.client_id not in self._warned]
        if plain:
            self._warned.update(plain)
            log.warning(
                "api keys stored in clear: `inferencecenter keys migrate` stores only hashes",
                path=str(self.path),
                clients=_names(plain),
            )
        return changed

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


@dataclass
class _Track:
    failures: int = 0
    pending: int = 0  # attempts waiting for their turn or being checked
    next_at: float = 0.0  # when the next attempt may be checked
    seen: float = 0.0


class Backoff:
    """When each auth attempt may be checked, per key (a client_id, an address): attempts of a
    key that keeps failing wait their turn, so guesses are spaced whatever the number of
    connections. Waiting attempts count as failures in advance, so a burst cannot slip through
    before the first failures are known. No I/O: the caller passes the time."""

    def __init__(
        self,
        free: int = FREE_FAILURES,
        base_s: float = BASE_DELAY_S,
        cap_s: float = MAX_DELAY_S,
        max_wait_s: float = MAX_WAIT_S,
        forget_s: float = FORGET_S,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.free, self.base_s, self.cap_s = free, base_s, cap_s
        self.max_wait_s, self.forget_s, self.max_tracked = max_wait_s, forget_s, max_tracked
        self.tracks: dict[str, _Track] = {}  # least recently seen first

    def delay(self, failures: int) -> float:
        if failures < self.free:
            return 0.0
        return min(self.cap_s, self.base_s * 2.0 ** min(failures - self.free, 64))

    def reserve(self, keys: list[str], now: float) -> tuple[bool, float]:
        """(True, when this attempt may be checked: now or its turn later), or (False, seconds
        after which to retry): refused unchecked, its turn is too far away."""
        self._forget(now)
        tracks = [self._track(key, now) for key in keys]
        at = max([now, *(track.next_at for track in tracks)])
        if at - now > self.max_wait_s:
            return False, at - now - self.max_wait_s
        for track in tracks:
            track.pending += 1
            track.next_at = at + self.delay(track.failures + track.pending - 1)
        return True, at

    def done(self, keys: list[str], ok: bool, now: float) -> None:
        """The attempt reserved for `keys` was checked (or abandoned: `ok` then says nothing
        about the key, pass False only for a wrong key)."""
        for key in keys:
            track = self.tracks.get(key)
            if track is None:
                continue
            track.pending = max(0, track.pending - 1)
            track.seen = now
            if ok:
                track.failures = 0
                if track.pending == 0:
                    del self.tracks[key]
            else:
                track.failures += 1

    def _track(self, key: str, now: float) -> _Track:
        track = self.tracks.pop(key, None) or _Track()
        track.seen = now
        self.tracks[key] = track  # to the end: most recently seen
        if len(self.tracks) > self.max_tracked:
            del self.tracks[next(iter(self.tracks))]
        return track

    def _forget(self, now: float) -> None:
        while self.tracks:
            key, track = next(iter(self.tracks.items()))
            if track.pending or now - track.seen < self.forget_s:
                return
            del self.tracks[key]


class FailureLog:
    """Auth failures as log lines: the first after a quiet window at once, then one summary per
    window while they go on (counts, the most frequent client_ids and addresses), so a flood of
    wrong keys writes a line a minute, not a line a guess. No I/O: `write` takes the lines."""

    def __init__(
        self, write: Callable[[str, dict[str, Any]], None], window_s: float = SUMMARY_WINDOW_S
    ) -> None:
        self.write = write
        self.window_s = window_s
        self.window_end: float | None = None  # None: quiet, the next failure is logged at once
        self.count = 0
        self.refused = 0
        self.clients: Counter[str] = Counter()
        self.addresses: Counter[str] = Counter()

    def failed(self, now: float, client_id: str, address: str, refused: bool, reason: str) -> None:
        self.flush(now)
        if self.window_end is None:
            self.window_end = now + self.window_s
            fields = {"client_id": client_id, "address": address, "reason": reason}
            self.write("auth failed", {k: v for k, v in fields.items() if v})
            return
        self.count += 1
        self.refused += refused
        for counter, name in ((self.clients, client_id), (self.addresses, address)):
            if name:
                known = name in counter or len(counter) < SUMMARY_KINDS
                counter[name if known else "others"] += 1

    def flush(self, now: float) -> None:
        """End the window if its time is up: its summary, if it saw failures."""
        if self.window_end is None or now < self.window_end:
            return
        if not self.count:
            self.window_end = None
            return
        fields: dict[str, Any] = {
            "failures": self.count,
            "refused_unchecked": self.refused,
            "window_s": self.window_s,
            "client_ids": _top(self.clients),
        }
        if self.addresses:
            fields["addresses"] = _top(self.addresses)
        self.write("auth failures", fields)
        self.window_end = now + self.window_s
        self.count = self.refused = 0
        self.clients.clear()
        self.addresses.clear()


def _names(client_ids: list[str]) -> str:
    """At most ten names for a log line."""
    rest = len(client_ids) - 10
    return ",".join(client_ids[:10]) + (f",+{rest}" if rest > 0 else "")


def _top(counter: Counter[str]) -> str:
    named = [f"{name}:{count}" for name, count in counter.most_common(SUMMARY_TOP)]
    rest = len(counter) - SUMMARY_TOP
    return ",".join(named) + (f",+{rest} more" if rest > 0 else "")


class AuthActor:
    def __init__(self, config: Config, monitor: ActorLink | None = None) -> None:
        self.registry = ClientRegistry(Path(config.clients))
        self.budgets = Budgets.defaults(config)
        self.monitor = monitor
        self.backoff = Backoff()
        self.failures = FailureLog(lambda event, fields: log.warning(event, **fields))
        self.watchers: dict[str, Caller] = {}  # by front actor: a restarted one replaces its own
        self.handlers = {
            "authenticate": self.authenticate,
            "authenticate_key": self.authenticate_key,
            "watch_clients": self.watch_clients,
            "reload": self.reload,
        }

    def watch_clients(self, body: Body, caller: Caller) -> None:
        """The table of fingerprints now, and again after every change (see revocation)."""
        self.watchers[str(body.get("watcher", ""))] = caller
        caller.send("clients", clients=self.registry.table)

    def reload(self, body: Body, caller: Caller) -> None:
        """Pushed by the supervisor on SIGHUP: read the file even if it looks unchanged."""
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        if self.registry.reload(force):
            for watcher in self.watchers.values():
                watcher.send("clients", clients=self.registry.table)

    async def watch_file(self) -> None:
        """Stat the clients file a few times a second: an edit revokes within WATCH_S."""
        while True:
            await trio.sleep(WATCH_S)
            self.refresh()

    async def authenticate(self, body: Body, caller: Caller) -> None:
        client_id = str(body.get("client_id", ""))[:256]
        api_key = str(body.get("api_key", ""))
        curve_key = str(body.get("curve_key") or "")

        def find() -> ClientEntry | None:
            entry = self.registry.authenticate(client_id, api_key)
            if entry is not None and entry.curve_public_key not in ("", curve_key):
                return None  # bound to its own CURVE key: a stolen api key alone is not enough
            return entry

        await self.check(
            body,
            caller,
            [f"id:{client_id}"],
            find,
            client_id,
            "unknown client_id or wrong api_key",
        )

    async def authenticate_key(self, body: Body, caller: Caller) -> None:
        api_key = str(body.get("api_key", ""))
        await self.check(
            body, caller, [], lambda: self.registry.authenticate_key(api_key), "", "unknown api_key"
        )

    async def check(
        self,
        body: Body,
        caller: Caller,
        keys: list[str],
        find: Callable[[], ClientEntry | None],
        client_id: str,
        reason: str,
    ) -> None:
        """Wait for the attempt's turn (backoff by client_id and by the peer's address, when the
        caller gives it), then check it; a turn too far away is refused without a check."""
        address = str(body.get("address") or "")[:64]
        if address:
            keys = [*keys, f"addr:{address}"]
        turn, at = self.backoff.reserve(keys, trio.current_time())
        if not turn:
            retry = round(at + 0.01, 2)
            self.failed(client_id, address, True, f"too many failures: retry in {retry} s")
            caller.reply(
                ok=False,
                reason=f"too many failed attempts: retry in {retry} s",
                retry_after_s=retry,
            )
            return
        entry = None
        try:
            await trio.sleep_until(at)
            self.refresh()
            entry = find()
        finally:
            self.backoff.done(keys, entry is not None, trio.current_time())
        if entry is None:
            self.failed(client_id, address, False, reason)
            caller.reply(ok=False, reason=reason)
            return
        self.succeeded(entry, caller)

    def failed(self, client_id: str, address: str, refused: bool, reason: str) -> None:
        self.failures.failed(trio.current_time(), client_id[:64], address, refused, reason)
        if self.monitor is not None:
            self.monitor.push("auth_failed", refused=refused)

    async def summarize(self) -> None:
        """Write a window's summary when it ends, even once the failures stopped."""
        while True:
            await trio.sleep(1.0)
            self.failures.flush(trio.current_time())

    def succeeded(self, entry: ClientEntry, caller: Caller) -> None:
        caller.reply(
            ok=True,
            client_id=entry.client_id,
            max_sessions=entry.max_sessions,
            priority=entry.priority,
            role=getattr(entry, "role", "user"),
            fingerprint=revocation.fingerprint(entry),
            budgets=self.budgets.overridden(entry).to_wire(),
        )


async def main(config: Config, stop: trio.Event) -> None:
    monitor = ActorLink(internal.MONITOR, config)
    actor = AuthActor(config, monitor)
    assert set(actor.handlers) == set(internal.AUTH_OPS)
    server = ActorServer(internal.AUTH, config, actor.handlers)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        nursery.start_soon(monitor.run)
        nursery.start_soon(actor.summarize)
        nursery.start_soon(actor.watch_file)
        report_to_supervisor(config, {"op": "ready", "actor": internal.AUTH})
        await stop.wait()
        nursery.cancel_scope.cancel()
