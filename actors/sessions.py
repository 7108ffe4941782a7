"""The sessions actor: the one owner of a session's existence, owner, expiry and durable record.

The token history lives here, outside the engine, so a session survives an engine crash (the
engine loads every history from `snapshot` when it starts and rebuilds a context on the
session's next infer) and, with `--state-dir`, a restart of the whole daemon. The engine pushes
only what each infer added (`append`); the journal on disk grows by that much per turn.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..protocol import internal
from ..protocol.errors import LimitReached, NotFound, ProtocolError
from .actor import ActorServer, Body, Caller, report_to_supervisor
from .config import Config
from .logs import EventLog
from .models import ModelDirectory

log = EventLog("sessions")

# A journal record on disk: this header, then the msgpack body it describes.
RECORD_HEADER = struct.Struct("<II")  # body length, CRC-32 of the body
# The journal is rewritten with only the live sessions once it is more than twice their size
# and over this many bytes (below it, rewriting saves too little to be worth it).
COMPACT_MIN_BYTES = 1 << 20
# How long expiry waits for the engine's answer before taking it as restarting.
ENGINE_CLOSE_TIMEOUT_S = 10.0


@dataclass
class SessionRecord:
    session_id: str
    client_id: str
    model: str
    created: float  # wall clock, for list_sessions
    system_prompt: str | None = None
    tokens: bytearray = field(default_factory=bytearray)  # int32 ids, native order
    chat: list[dict[str, str]] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)  # created, or its last append

    def append(self, tokens: bytes, chat: list[dict[str, str]], reset: bool) -> None:
        if reset:
            self.tokens = bytearray()
            self.chat = []
        self.tokens += tokens
        self.chat.extend(chat)

    def history(self) -> Body:
        """What an engine needs to rebuild the session's context."""
        return {
            "session_id": self.session_id,
            "system_prompt": self.system_prompt,
            "tokens": bytes(self.tokens),
            "chat": self.chat,
        }


def create_entry(record: SessionRecord) -> Body:
    return {
        "record": "create",
        "session_id": record.session_id,
        "client_id": record.client_id,
        "model": record.model,
        "created": record.created,
        "system_prompt": record.system_prompt,
    }


def append_entry(
    session_id: str, tokens: bytes, chat: list[dict[str, str]], reset: bool = False
) -> Body:
    return {
        "record": "append",
        "session_id": session_id,
        "tokens": tokens,
        "chat": chat,
        "reset": reset,
    }


def remove_entry(session_id: str) -> Body:
    return {"record": "remove", "session_id": session_id}


def apply_entry(sessions: dict[str, SessionRecord], entry: Body) -> None:
    """Replay one journal record into `sessions`."""
    kind, session_id = entry.get("record"), str(entry.get("session_id"))
    if kind == "create":
        sessions[session_id] = SessionRecord(
            session_id,
            str(entry["client_id"]),
            str(entry["model"]),
            float(entry["created"]),
            entry.get("system_prompt"),
        )
    elif kind == "append" and session_id in sessions:
        sessions[session_id].append(
            bytes(entry.get("tokens", b"")), list(entry.get("chat", [])), bool(entry.get("reset"))
        )
    elif kind == "remove":
        sessions.pop(session_id, None)


def frame_entry(entry: Body) -> bytes:
    body = internal.pack(entry)
    return RECORD_HEADER.pack(len(body), zlib.crc32(body)) + body


def read_entries(data: bytes) -> tuple[list[tuple[Body, int]], int]:
    """The whole records at the start of `data`, each with its size on disk, and where they
    end: a record cut short or damaged (a crash mid-write) ends the journal there."""
    entries: list[tuple[Body, int]] = []
    offset = 0
    while offset + RECORD_HEADER.size <= len(data):
        length, crc = RECORD_HEADER.unpack_from(data, offset)
        start = offset + RECORD_HEADER.size
        body = data[start : start + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break
        try:
            entry = internal.unpack(body)
        except Exception:
            break
        entries.append((entry, RECORD_HEADER.size + length))
        offset = start + length
    return entries, offset


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LiveBytes:
    """How much of the journal the live sessions take: what a compaction would keep."""

    def __init__(self) -> None:
        self.by_session: dict[str, int] = {}
        self.total = 0

    def count(self, entry: Body, size: int) -> None:
        session_id = str(entry.get("session_id"))
        kind = entry.get("record")
        before = self.by_session.get(session_id)
        if kind == "create":
            after = size
        elif kind == "append" and before is not None:
            after = size if entry.get("reset") else before + size
        elif kind == "remove" and before is not None:
            del self.by_session[session_id]
            self.total -= before
            return
        else:
            return
        self.by_session[session_id] = after
        self.total += after - (before or 0)


class SessionJournal:
    """The durable record under `--state-dir`: one append-only file of `create`, `append` and
    `remove` records (mode 0600), so a turn costs a write of what it added, never the whole
    conversation again. It is compacted (rewritten with only the live sessions, atomically)
    when it holds more than twice the live data. Records are not fsynced one by one: a crash
    of the process loses nothing written, and a record torn by a power loss is dropped at load.
    """

    def __init__(self, directory: str | Path, compact_min_bytes: int = COMPACT_MIN_BYTES) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "sessions.journal"
        self.old_directory = self.directory / "sessions"  # one JSON file per session, before
        self.compact_min_bytes = compact_min_bytes
        self.fd = -1
        self.size = 0
        self.live = LiveBytes()
        # A write failed (disk full): the file misses a change, so the next write is a whole
        # rewrite from memory instead of an append.
        self.behind = False

    def load(self) -> dict[str, SessionRecord]:
        """Replay the journal, drop a torn tail, take in an old per-file state once, and open
        the journal for appending."""
        sessions: dict[str, SessionRecord] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        entries, end = read_entries(data)
        for entry, size in entries:
            apply_entry(sessions, entry)
            self.live.count(entry, size)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if end < len(data):
            log.warning("journal tail dropped", path=str(self.path), bytes=len(data) - end)
            os.ftruncate(self.fd, end)
        self.size = end
        if self.migrate(sessions) or self.needs_compaction():
            self.compact(sessions)
        return sessions

    def migrate(self, sessions: dict[str, SessionRecord]) -> int:
        """Sessions saved one JSON file each (the earlier format) join the journal; their files
        are deleted once a journal holding them is on disk (see compact), so this happens once.
        """
        paths = sorted(self.old_directory.glob("s-*.json"))
        for path in paths:
            try:
                data = json.loads(path.read_text())
                record = SessionRecord(
                    data["session_id"],
                    data["client_id"],
                    data["model"],
                    float(data["created"]),
                    data.get("system_prompt"),
                    bytearray.fromhex(data.get("tokens", "")),
                    list(data.get("chat", [])),
                )
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.error("session file skipped", path=str(path), reason=str(exc))
                continue
            sessions.setdefault(record.session_id, record)
        if paths:
            log.info("sessions migrated to the journal", files=len(paths), path=str(self.path))
        return len(paths)

    def write(self, entry: Body) -> None:
        data = frame_entry(entry)
        try:
            write_all(self.fd, data)
        except OSError:
            os.ftruncate(self.fd, self.size)  # no half record before the next one
            raise
        self.size += len(data)
        self.live.count(entry, len(data))

    def needs_compaction(self) -> bool:
        return self.behind or (
            self.size > self.compact_min_bytes and self.size > 2 * self.live.total
        )

    def compact(self, sessions: dict[str, SessionRecord]) -> None:
        """Rewrite the journal with one `create` and one `append` per live session; the new
        file replaces the old one only once it is wholly on disk."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        live = LiveBytes()
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            for record in sessions.values():
                entries = [create_entry(record)]
                if record.tokens or record.chat:
                    entries.append(
                        append_entry(record.session_id, bytes(record.tokens), record.chat)
                    )
                for entry in entries:
                    data = frame_entry(entry)
                    write_all(fd, data)
                    size += len(data)
                    live.count(entry, len(data))
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        old_fd, before = self.fd, self.size
        self.fd, self.size, self.live, self.behind = fd, size, live, False
        os.close(old_fd)
        self.sync_directory()
        self.finish_migration()
        log.info("journal compacted", bytes_before=before, bytes_after=size)

    def finish_migration(self) -> None:
        for path in [*self.old_directory.glob("s-*.json"), *self.old_directory.glob("*.tmp")]:
            path.unlink(missing_ok=True)
        try:
            self.old_directory.rmdir()
        except OSError:
            pass

    def sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SessionTable:
    """Every session that exists, with its owner, quota and history; with a journal, each
    change is written to it as it happens."""

    def __init__(self, journal: SessionJournal | None = None) -> None:
        self.journal = journal
        self.sessions: dict[str, SessionRecord] = journal.load() if journal else {}

    def record(self, entry: Body) -> None:
        """Write a change already made in memory. Memory is the truth the daemon serves from: a
        failed write (disk full) is logged, and the journal is rewritten whole at the next one.
        """
        journal = self.journal
        if journal is None:
            return
        try:
            if not journal.behind:
                journal.write(entry)
            if journal.needs_compaction():
                journal.compact(self.sessions)
        except OSError as exc:
            journal.behind = True
            log.error("journal write failed", path=str(journal.path), reason=str(exc))

    def owned_by(self, client_id: str) -> list[SessionRecord]:
        return [s for s in self.sessions.values() if s.client_id == client_id]

    def create(
        self, client_id: str, max_sessions: int, model: str, system_prompt: str | None
    ) -> SessionRecord:
        if len(self.owned_by(client_id)) >= max_sessions:
            raise LimitReached(f"client {client_id!r} already has {max_sessions} sessions")
        record = SessionRecord(
            "s-" + secrets.token_urlsafe(18), client_id, model, time.time(), system_prompt
        )
        self.sessions[record.session_id] = record
        self.record(create_entry(record))
        return record

    def get(self, session_id: str) -> SessionRecord:
        record = self.sessions.get(session_id)
        if record is None:
            raise NotFound(f"no session {session_id[:80]!r}")
        return record

    def append(
        self, session_id: str, tokens: bytes, chat: list[dict[str, str]], reset: bool
    ) -> SessionRecord | None:
        """Add what an infer added (after clearing the history, with `reset`); the session is
        used now. None for a session that no longer exists."""
        record = self.sessions.get(session_id)
        if record is None:
            return None
        record.append(tokens, chat, reset)
        record.last_used = time.monotonic()
        self.record(append_entry(session_id, tokens, chat, reset))
        return record

    def remove(self, session_id: str) -> SessionRecord:
        record = self.get(session_id)
        del self.sessions[session_id]
        self.record(remove_entry(session_id))
        return record

    def idle_since(self, cutoff: float) -> list[SessionRecord]:
        return [s for s in self.sessions.values() if s.last_used < cutoff]


class SessionsActor:
    def __init__(self, config: Config, models: ModelDirectory | None = None) -> None:
        self.config = config
        self.models = models  # each model's engine, to close a session there
        journal = SessionJournal(config.state_dir) if config.state_dir else None
        self.table = SessionTable(journal)
        if journal is not None:
            log.info("sessions restored", count=len(self.table.sessions), path=str(journal.path))
        self.handlers = {
            "create": self.create,
            "check": self.check,
            "remove": self.remove,
            "list": self.list,
            "append": self.append,
            "snapshot": self.snapshot,
            "counts": self.counts,
        }

    def create(self, body: Body, caller: Caller) -> None:
        record = self.table.create(
            body["client_id"], int(body["max_sessions"]), body["model"], body.get("system_prompt")
        )
        log.info("session created", session_id=record.session_id, client_id=record.client_id)
        caller.reply(session_id=record.session_id, created=record.created)

    def check(self, body: Body, caller: Caller) -> None:
        """Who owns a session (never changes after create, so the asker may keep the answer)."""
        record = self.table.get(body["session_id"])
        caller.reply(client_id=record.client_id, model=record.model)

    def remove(self, body: Body, caller: Caller) -> None:
        self.table.remove(body["session_id"])
        log.info("session closed", session_id=body["session_id"])
        caller.reply()

    def list(self, body: Body, caller: Caller) -> None:
        """A client's sessions, or with `all` everyone's (the caller checked it may)."""
        if body.get("all"):
            found = list(self.table.sessions.values())
        else:
            found = self.table.owned_by(body["client_id"])
        caller.reply(
            sessions=[
                {
                    "session_id": s.session_id,
                    "client_id": s.client_id,
                    "model": s.model,
                    "created": s.created,
                    "tokens": len(s.tokens) // 4,
                }
                for s in sorted(found, key=lambda s: s.created)
            ]
        )

    def counts(self, body: Body, caller: Caller) -> None:
        """How many sessions each model has (loaded or not)."""
        counts: dict[str, int] = {}
        for record in self.table.sessions.values():
            counts[record.model] = counts.get(record.model, 0) + 1
        caller.reply(counts=counts)

    def append(self, body: Body, caller: Caller) -> None:
        """What one infer added to a conversation (pushed by the engine, no reply)."""
        session_id = str(body["session_id"])
        added = self.table.append(
            session_id,
            bytes(body.get("tokens", b"")),
            list(body.get("chat", [])),
            bool(body.get("reset")),
        )
        if added is None:
            self.disown(session_id, str(body.get("model", "")))

    def disown(self, session_id: str, model: str) -> None:
        """The engine used a session that no longer exists here (it expired or was closed while
        the engine could not hear of it): the engine drops it too."""
        log.debug("append for an unknown session", session_id=session_id)
        engine = self.models.running_link(model) if self.models is not None else None
        if engine is not None:
            engine.push("close", session_id=session_id)

    def snapshot(self, body: Body, caller: Caller) -> None:
        """The conversations of one model (all without `model`), for an engine that starts."""
        model = body.get("model")
        caller.reply(
            sessions=[
                record.history()
                for record in self.table.sessions.values()
                if model is None or record.model == model
            ]
        )

    async def expire_idle(self) -> None:
        """Close sessions unused for --session-idle-timeout (their owner is told nothing: the
        next use answers not_found)."""
        timeout = self.config.session_idle_timeout
        while True:
            await trio.sleep(min(30.0, timeout / 4))
            idle = self.table.idle_since(time.monotonic() - timeout)
            async with trio.open_nursery() as nursery:
                for record in idle:
                    nursery.start_soon(self.expire, record)

    async def expire(self, record: SessionRecord) -> None:
        """Expire one idle session unless its model's engine says it is generating right now.
        An engine that does not answer is restarting: it will load the snapshot without the
        session; with its model unloaded, nothing runs."""
        closed = True
        engine = self.models.running_link(record.model) if self.models is not None else None
        if engine is not None:
            try:
                reply = await engine.request(
                    "close",
                    timeout=ENGINE_CLOSE_TIMEOUT_S,
                    session_id=record.session_id,
                    if_idle=True,
                )
                closed = bool(reply.get("closed", True))
            except ProtocolError:
                closed = True
        if self.table.sessions.get(record.session_id) is not record:
            return  # closed by its client meanwhile
        if not closed:
            record.last_used = time.monotonic()
            return
        idle_s = time.monotonic() - record.last_used
        self.table.remove(record.session_id)
        log.info(
            "session expired",
            session_id=record.session_id,
            client_id=record.client_id,
            idle_s=round(idle_s, 1),
        )


def _ops_match(handlers: dict[str, Any]) -> None:
    assert set(handlers) == set(internal.SESSIONS_OPS), sorted(handlers)


async def main(config: Config, stop: trio.Event) -> None:
    models = ModelDirectory(config, internal.SESSIONS)
    actor = SessionsActor(config, models)
    _ops_match(actor.handlers)
    server = ActorServer(internal.SESSIONS, config, actor.handlers)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            nursery.start_soon(models.run)
            nursery.start_soon(actor.expire_idle)
            report_to_supervisor(config, {"op": "ready", "actor": internal.SESSIONS})
            await stop.wait()
            nursery.cancel_scope.cancel()
    finally:
        if actor.table.journal is not None:
            actor.table.journal.close()
