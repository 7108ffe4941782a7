"""The sessions actor: who owns which session, quotas, and each conversation's token history.

The history lives here, outside the engine, so a session survives an engine crash (the engine
reloads every history when it starts and rebuilds a context on the session's next infer) and,
with `--state-dir`, a restart of the whole daemon.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from .config import Config
from .logs import EventLog
from ..protocol import internal
from ..protocol.errors import Forbidden, LimitReached, NotFound
from .actor import ActorServer, Body, Caller, report_to_supervisor

log = EventLog("sessions")


@dataclass
class SessionRecord:
    session_id: str
    client_id: str
    model: str
    created: float
    system_prompt: str | None = None
    tokens: bytes = b""  # int32 token ids, native order (array("i").tobytes())
    chat: list[dict[str, str]] = field(default_factory=list)

    def history(self) -> Body:
        return {
            "session_id": self.session_id,
            "system_prompt": self.system_prompt,
            "tokens": self.tokens,
            "chat": self.chat,
        }


class SessionStore:
    """One JSON file per session under `--state-dir` (written atomically, mode 0600)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory) / "sessions"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}.json"

    def save(self, record: SessionRecord) -> None:
        data = asdict(record)
        data["tokens"] = record.tokens.hex()
        path = self._path(record.session_id)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)

    def delete(self, session_id: str) -> None:
        self._path(session_id).unlink(missing_ok=True)

    def load(self) -> list[SessionRecord]:
        records = []
        for path in sorted(self.directory.glob("s-*.json")):
            try:
                data = json.loads(path.read_text())
                data["tokens"] = bytes.fromhex(data.get("tokens", ""))
                records.append(SessionRecord(**data))
            except (OSError, ValueError, TypeError) as exc:
                log.error("session file skipped", path=str(path), reason=str(exc))
        return records


class SessionTable:
    """Ownership and quotas; the engine holds the contexts, this table says who may use them."""

    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}

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
        return record

    def check(self, client_id: str, session_id: str) -> SessionRecord:
        record = self.sessions.get(session_id)
        if record is None:
            raise NotFound(f"no session {session_id[:80]!r}")
        if record.client_id != client_id:
            raise Forbidden("this session belongs to another client")
        return record

    def remove(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)


class SessionsActor:
    def __init__(self, config: Config) -> None:
        self.table = SessionTable()
        self.store = SessionStore(config.state_dir) if config.state_dir else None
        if self.store is not None:
            for record in self.store.load():
                self.table.sessions[record.session_id] = record
            log.info("sessions restored", count=len(self.table.sessions), path=config.state_dir)
        self.handlers = {
            "create": self.create,
            "check": self.check,
            "remove": self.remove,
            "list": self.list,
            "history": self.history,
            "snapshot": self.snapshot,
        }

    def create(self, body: Body, caller: Caller) -> None:
        record = self.table.create(
            body["client_id"], int(body["max_sessions"]), body["model"], body.get("system_prompt")
        )
        if self.store is not None:
            self.store.save(record)
        log.info("session created", session_id=record.session_id, client_id=record.client_id)
        caller.reply(session_id=record.session_id, created=record.created)

    def check(self, body: Body, caller: Caller) -> None:
        record = self.table.check(body["client_id"], body["session_id"])
        caller.reply(model=record.model)

    def remove(self, body: Body, caller: Caller) -> None:
        self.table.remove(body["session_id"])
        if self.store is not None:
            self.store.delete(body["session_id"])
        log.info("session closed", session_id=body["session_id"])
        caller.reply()

    def list(self, body: Body, caller: Caller) -> None:
        records = sorted(self.table.owned_by(body["client_id"]), key=lambda s: s.created)
        caller.reply(
            sessions=[
                {"session_id": s.session_id, "model": s.model, "created": s.created}
                for s in records
            ]
        )

    def history(self, body: Body, caller: Caller) -> None:
        """The engine's copy of a conversation after an infer (pushed, no reply)."""
        record = self.table.sessions.get(body["session_id"])
        if record is None:
            return
        record.tokens = bytes(body.get("tokens", b""))
        record.chat = list(body.get("chat", []))
        if self.store is not None:
            self.store.save(record)

    def snapshot(self, body: Body, caller: Caller) -> None:
        """Every conversation, for an engine that is starting."""
        caller.reply(sessions=[record.history() for record in self.table.sessions.values()])


def _ops_match(handlers: dict[str, Any]) -> None:
    assert set(handlers) == set(internal.SESSIONS_OPS), sorted(handlers)


async def main(config: Config, stop: trio.Event) -> None:
    actor = SessionsActor(config)
    _ops_match(actor.handlers)
    server = ActorServer(internal.SESSIONS, config, actor.handlers)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        report_to_supervisor(config, {"op": "ready", "actor": internal.SESSIONS})
        await stop.wait()
        nursery.cancel_scope.cancel()
